//! SVG chart of throughput against batch size: one solid line per model and setting, its
//! roofline bound dashed in the same colour. Batch on a log2 axis, tokens/s on a log10 axis.

use super::BenchRow;
use std::fmt::Write;

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else if v >= 1.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

/// The chart as a standalone SVG document.
pub fn svg(rows: &[BenchRow], title: &str) -> String {
    // Series: (model, setting) in order of appearance.
    let mut series: Vec<(String, Vec<&BenchRow>)> = Vec::new();
    for r in rows {
        let lengths = format!("{}+{}", r.prompt_len, r.new_tokens);
        let key = if r.setting == lengths {
            format!("{} ({lengths})", r.model)
        } else {
            format!("{} ({}, {lengths})", r.model, r.setting)
        };
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => series.push((key, vec![r])),
        }
    }
    for (_, v) in series.iter_mut() {
        v.sort_by_key(|r| r.batch);
    }
    let (w, h) = (900.0f64, 560.0f64);
    let (left, right, top, bottom) = (80.0, 300.0, 50.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);

    let bmax = rows.iter().map(|r| r.batch).max().unwrap_or(1).max(2) as f64;
    let x_hi = bmax.log2().ceil().max(1.0);
    let ys: Vec<f64> = rows
        .iter()
        .flat_map(|r| std::iter::once(r.tokens_per_s).chain(r.bound.map(|b| b.tokens_per_s)))
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    let ymin = ys.iter().copied().fold(f64::MAX, f64::min).min(1e9);
    let ymax = ys
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(ymin * 10.0)
        .max(1.0);
    let y_lo = if ys.is_empty() {
        0.0
    } else {
        ymin.log10().floor()
    };
    let y_hi = ymax.log10().ceil().max(y_lo + 1.0);
    let px = |b: f64| left + pw * (b.max(1.0).log2() / x_hi);
    let py = |v: f64| top + ph * (1.0 - (v.max(1e-9).log10() - y_lo) / (y_hi - y_lo));

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        left + pw / 2.0,
        esc(title)
    );
    // Grid and ticks.
    for e in 0..=(x_hi as i32) {
        let b = 2f64.powi(e);
        let x = px(b);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + ph,
            top + ph + 18.0,
            b as usize
        );
    }
    for e in (y_lo as i32)..=(y_hi as i32) {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(e);
            if v.log10() > y_hi + 1e-9 {
                continue;
            }
            let y = py(v);
            let stroke = if m == 1.0 { "#ccc" } else { "#eee" };
            let _ = writeln!(
                s,
                r#"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{stroke}"/>"#,
                left + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 4.0,
                fmt_tick(v)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">batch size</text>"#,
        left + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">tokens/s (generated / wall time)</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    // Lines and legend.
    for (i, (key, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let line: Vec<String> = pts
            .iter()
            .map(|r| format!("{:.1},{:.1}", px(r.batch as f64), py(r.tokens_per_s)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            line.join(" ")
        );
        for r in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"><title>{} batch {}: {:.1} tokens/s</title></circle>"#,
                px(r.batch as f64),
                py(r.tokens_per_s),
                esc(key),
                r.batch,
                r.tokens_per_s
            );
        }
        let bound: Vec<String> = pts
            .iter()
            .filter_map(|r| {
                r.bound
                    .map(|b| format!("{:.1},{:.1}", px(r.batch as f64), py(b.tokens_per_s)))
            })
            .collect();
        if !bound.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="1.5" stroke-dasharray="6 4"/>"#,
                bound.join(" ")
            );
        }
        let ly = top + 10.0 + 36.0 * i as f64;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            esc(key)
        );
        if !bound.is_empty() {
            let _ = writeln!(
                s,
                r##"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="{c}" stroke-width="1.5" stroke-dasharray="6 4"/><text x="{}" y="{}" fill="#555">roofline bound</text>"##,
                ly + 16.0,
                lx + 24.0,
                ly + 16.0,
                lx + 30.0,
                ly + 20.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
