//! The bench's readable tables and JSON.

use super::roofline::{Roofline, Workload};
use super::{BenchReport, BenchRow};
use std::fmt::Write;

/// `1536` -> `1.5 KiB`.
pub fn bytes(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u < units.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

/// Parses `8GiB`, `8G`, `8GB` (powers of 1024 either way), `512MiB`, `1048576`, or `60%`
/// (of `available`).
pub fn parse_bytes(s: &str, available: Option<usize>) -> Result<usize, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let pct: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: expected a percentage such as 60%"))?;
        if !(pct > 0.0 && pct <= 100.0) {
            return Err(format!("`{s}`: the percentage must be in (0, 100]"));
        }
        let avail = available.ok_or_else(|| {
            format!("`{s}`: available memory is unknown here (no /proc/meminfo); give bytes")
        })?;
        return Ok((avail as f64 * pct / 100.0) as usize);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size such as 8GiB, 512MiB or 60%"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("`{s}`: unknown unit `{other}` (use KiB, MiB, GiB)")),
    };
    let n = x * mult as f64;
    if n < 1.0 {
        return Err(format!("`{s}`: must be positive"));
    }
    Ok(n as usize)
}

fn secs(x: f64) -> String {
    if x == 0.0 {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.3}")
    } else {
        format!("{x:.1}")
    }
}

fn table(header: &[&str], rows: &[Vec<String>], out: &mut String) {
    let mut wid: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            wid[i] = wid[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>, out: &mut String| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < 2 {
                    format!("{c:<w$}", w = wid[i])
                } else {
                    format!("{c:>w$}", w = wid[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect(), out);
    line(wid.iter().map(|&w| "-".repeat(w)).collect(), out);
    for r in rows {
        line(r.clone(), out);
    }
}

/// Throughput and bound, one line per measurement.
pub fn throughput_table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let (bound, eff, why) = match (&r.bound, r.efficiency) {
                (Some(b), Some(e)) => (
                    format!("{:.1}", b.tokens_per_s),
                    format!("{:.0}%", 100.0 * e),
                    format!(
                        "{:.0}% mem, {:.0}% KV",
                        100.0 * b.memory_bound_s / b.seconds,
                        100.0 * b.kv_s / b.seconds
                    ),
                ),
                _ => ("-".into(), "-".into(), "-".into()),
            };
            vec![
                r.model.clone(),
                r.setting.clone(),
                format!("{}+{}", r.prompt_len, r.new_tokens),
                r.batch.to_string(),
                format!("{:.1}", r.tokens_per_s),
                format!(
                    "{:.0}-{:.0} ({})",
                    r.tokens_per_s_min,
                    r.tokens_per_s_max,
                    r.runs.len()
                ),
                format!("{:.2}", r.ms_per_token),
                secs(r.seconds),
                bound,
                eff,
                r.kernel_efficiency
                    .map_or("-".into(), |e| format!("{:.0}%", 100.0 * e)),
                why,
            ]
        })
        .collect();
    table(
        &[
            "model",
            "setting",
            "P+G",
            "batch",
            "tokens/s",
            "range (runs)",
            "ms/token",
            "time s",
            "bound tok/s",
            "eff",
            "kernel eff",
            "bound is",
        ],
        &cells,
        &mut out,
    );
    for line in rows.iter().flat_map(row_notes) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// The lines that follow the table for one row: what it discarded, whether its machine was
/// steady, the bandwidth read during it.
pub fn row_notes(r: &BenchRow) -> impl Iterator<Item = String> {
    probe_note(r)
        .into_iter()
        .chain(discarded_note(r))
        .chain(bandwidth_warning(r))
        .chain(sampled_note(r))
}

/// A note on the probe taken just before this row's measurement (`--reprobe-each`).
pub fn probe_note(r: &BenchRow) -> Option<String> {
    let p = r.probe.as_ref()?;
    Some(format!(
        "note: {} {} batch {}: probed just before: matmul {:.1} GFLOP/s{}, bandwidth {:.1} GB/s",
        r.model,
        r.setting,
        r.batch,
        p.flops / 1e9,
        p.bf16_note(),
        p.bandwidth / 1e9
    ))
}

/// A note on the bandwidth read during the median run (`--sample-bandwidth`), which its bound
/// uses.
pub fn sampled_note(r: &BenchRow) -> Option<String> {
    let s = r.sampled_bandwidth?;
    Some(format!(
        "note: {} {} batch {}: bound at the bandwidth read every {} s during the run: {:.1}-{:.1} GB/s, mean {:.1} ({} readings)",
        r.model,
        r.setting,
        r.batch,
        s.every_s,
        s.min / 1e9,
        s.max / 1e9,
        s.mean / 1e9,
        s.readings
    ))
}

/// A note when a row was measured again because the machine's bandwidth moved during an
/// earlier measurement (`--retry-unsteady`): what was discarded, and the bandwidth the kept
/// measurement's bound uses.
pub fn discarded_note(r: &BenchRow) -> Option<String> {
    if r.discarded.is_empty() {
        return None;
    }
    let earlier: Vec<String> = r
        .discarded
        .iter()
        .map(|d| {
            let c = d.bandwidth_check;
            format!(
                "{:.1} tokens/s (probe {:.1} GB/s, {:.1} before, {:.1} after)",
                d.tokens_per_s,
                c.probe / 1e9,
                c.before / 1e9,
                c.after / 1e9
            )
        })
        .collect();
    let now = r
        .bandwidth_check
        .map(|c| format!(", against {:.1} GB/s measured again", c.probe / 1e9))
        .unwrap_or_default();
    Some(format!(
        "note: {} {} batch {}: measured {} times, the machine's bandwidth having moved during {}; kept the last{now}",
        r.model,
        r.setting,
        r.batch,
        r.discarded.len() + 1,
        earlier.join(", ")
    ))
}

/// A warning when the machine's memory bandwidth around a measurement departed from its
/// probe's (see [`super::BandwidthCheck`]).
pub fn bandwidth_warning(r: &BenchRow) -> Option<String> {
    let c = r.bandwidth_check.filter(|c| c.moved())?;
    Some(format!(
        "warning: {} {} batch {}: memory bandwidth {:.1} GB/s before and {:.1} after the runs, the probe's {:.1}: the machine is not steady, its efficiency is not comparable (rerun with --reprobe on a quiet machine, or add --retry-unsteady N)",
        r.model,
        r.setting,
        r.batch,
        c.before / 1e9,
        c.after / 1e9,
        c.probe / 1e9
    ))
}

/// The first columns of the time split and of the efficiency by part: the measurement and the
/// engine's parts.
const SPLIT_HEAD: [&str; 7] = [
    "model",
    "setting",
    "batch",
    "embedder",
    "block/dec",
    "token dec",
    "lm head",
];

/// Where the time and memory went, one line per measurement.
pub fn split_table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let s = &r.stats;
            vec![
                r.model.clone(),
                r.setting.clone(),
                r.batch.to_string(),
                secs(s.embedder_s),
                secs(s.block_decoder_s),
                secs(s.token_decoder_s),
                secs(s.lm_head_s),
                secs(s.sampling_s),
                secs(s.prefill_s),
                secs(s.decode_s),
                bytes(r.memory.device_peak.unwrap_or(r.memory.peak_rss)),
                bytes(r.memory.expected),
                format!("{:.2}", r.memory.ratio),
                bytes(r.memory.model_rss),
                bytes(r.kv_bytes_per_sample),
            ]
        })
        .collect();
    let header = [
        &SPLIT_HEAD[..],
        &["sampling", "prefill", "decode"],
        &["peak RSS", "expected", "peak/exp", "model RSS", "KV/sample"],
    ]
    .concat();
    table(&header, &cells, &mut out);
    out
}

/// Where each measurement stands against its bound, part by part: the bound's seconds in a
/// part (a model call's bound shared among its kernels in proportion to their own bounds)
/// over the seconds the engine measured there. Rows without a bound are left out.
pub fn part_table(rows: &[BenchRow]) -> String {
    let eff = |bound: f64, measured: f64| {
        if bound > 0.0 && measured > 0.0 {
            format!("{:.0}%", 100.0 * bound / measured)
        } else {
            "-".into()
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|r| {
            let (b, s) = (r.bound.as_ref()?, &r.stats);
            Some(vec![
                r.model.clone(),
                r.setting.clone(),
                r.batch.to_string(),
                eff(b.embedder_s, s.embedder_s),
                eff(b.block_decoder_s, s.block_decoder_s),
                eff(b.token_decoder_s, s.token_decoder_s),
                eff(b.lm_head_s, s.lm_head_s),
                eff(b.prefill_s, s.prefill_s),
                eff(b.decode_s, s.decode_s),
            ])
        })
        .collect();
    let mut out = String::new();
    if !cells.is_empty() {
        let header = [&SPLIT_HEAD[..], &["prefill", "decode"]].concat();
        table(&header, &cells, &mut out);
    }
    out
}

/// A roofline bound without a measurement (`bench --dry-run`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BoundLine {
    pub model: String,
    /// Whether the bound counts greedy decoding's LM head through its bfloat16 screen.
    pub lm_head_screened: bool,
    pub setting: String,
    pub workload: Workload,
    pub bound: Roofline,
    /// Expected resident memory: process + weights + caches + activations.
    pub memory: usize,
    pub kv_per_sample: usize,
}

/// Bounds only, one line per model, setting and batch.
pub fn bound_table(lines: &[BoundLine]) -> String {
    let mut out = String::new();
    let cells: Vec<Vec<String>> = lines
        .iter()
        .map(|l| {
            let b = &l.bound;
            vec![
                l.model.clone(),
                l.setting.clone(),
                format!("{}+{}", l.workload.prompt_len, l.workload.new_tokens),
                l.workload.batch.to_string(),
                format!("{:.1}", b.tokens_per_s),
                secs(b.seconds),
                secs(b.prefill_s),
                secs(b.decode_s),
                format!("{:.1}", b.flops / 1e9),
                format!("{:.1}", b.bytes / 1e9),
                format!("{:.0}%", 100.0 * b.memory_bound_s / b.seconds),
                format!("{:.0}%", 100.0 * b.kv_s / b.seconds),
                bytes(l.memory),
                bytes(l.kv_per_sample),
            ]
        })
        .collect();
    table(
        &[
            "model",
            "setting",
            "P+G",
            "batch",
            "bound tok/s",
            "bound s",
            "prefill s",
            "decode s",
            "GFLOP",
            "GB moved",
            "mem-bound",
            "KV",
            "memory",
            "KV/sample",
        ],
        &cells,
        &mut out,
    );
    out
}

/// The whole readable report.
pub fn text(r: &BenchReport) -> String {
    let mut out = String::new();
    if let Some(m) = &r.machine {
        let _ = writeln!(
            out,
            "machine: {}, {} threads: matmul {:.1} GFLOP/s{}, bandwidth {:.1} GB/s (read {:.1}, copy {:.1})",
            m.cpu,
            m.threads,
            m.flops / 1e9,
            m.bf16_note(),
            m.bandwidth / 1e9,
            m.read_bandwidth / 1e9,
            m.copy_bandwidth / 1e9
        );
    }
    let kv = if r.rows.iter().any(|row| row.kv_elem_bytes == 2) {
        "; KV caches 16-bit"
    } else {
        ""
    };
    let more = if r.min_seconds > 0.0 {
        format!(
            " (more until the timed runs add up to {:.1} s)",
            r.min_seconds
        )
    } else {
        String::new()
    };
    let screen = if r.rows.iter().any(|row| row.lm_head_screened) {
        "; greedy LM head through its bfloat16 screen (same tokens; counted as bfloat16 work)"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "{} warm-up + {} timed runs each{more}; tokens/s = generated tokens / wall time (median run, prefill included){kv}{screen}\n",
        r.warmup, r.runs
    );
    out.push_str(&throughput_table(&r.rows));
    out.push_str("\nTime split (s, median run; block/dec = block decoder or the vanilla decoder stack) and memory:\n\n");
    out.push_str(&split_table(&r.rows));
    out.push_str("\nexpected = process before loading + parameters + KV caches (as allocated) + largest step's activations (+ the bandwidth sampler's buffers with --sample-bandwidth); model RSS = resident memory the model added when loaded\n");
    let parts = part_table(&r.rows);
    if !parts.is_empty() {
        out.push_str("\nEfficiency by part (the bound's seconds in each part / the seconds measured there):\n\n");
        out.push_str(&parts);
    }
    if let Some((a, b)) = &r.compare {
        let _ = writeln!(out, "\n{a} / {b} throughput:");
        for x in &r.ratios {
            let batch = if x.batch_a == x.batch_b {
                format!("batch {}", x.batch_a)
            } else {
                format!("batch {} vs {}", x.batch_a, x.batch_b)
            };
            let _ = writeln!(
                out,
                "  {} {batch}: {:.1} / {:.1} = {:.2}x",
                x.setting, x.tokens_per_s_a, x.tokens_per_s_b, x.ratio
            );
        }
    }
    out
}

pub fn json(r: &BenchReport) -> String {
    serde_json::to_string_pretty(r).expect("bench report serializes")
}
