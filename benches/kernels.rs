//! `cargo bench --bench kernels`: the hand-written kernels against the library path at decode
//! shapes (the weights of `block_main_b4_85` / `vanilla_70`). `-- hot`, `-- cold`, `-- q8`,
//! `-- attention`, `-- greedy` (the LM head's argmax: float32 scan against the bfloat16 screen) and
//! `-- overlap` (one core streaming memory while it multiplies) select the other groups.

use blockformer::kernels::attention::{attend_online, cached_attention, KvCache, Rotary, RowSpec};
use blockformer::kernels::matmul::matmul_skinny;
use candle_core::{Device, Tensor};
use std::time::Instant;

fn time(it: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..it {
        f();
    }
    t.elapsed().as_secs_f64() / it as f64
}

/// Distinct `[k, n]` weight matrices (values in -0.06..0.06) adding up to at least `bytes`,
/// at least two: cycling through them keeps every product's weights out of the caches.
fn cold_copies(k: usize, n: usize, bytes: usize) -> Vec<Vec<f32>> {
    let copies = bytes.div_ceil(k * n * 4).max(2);
    (0..copies)
        .map(|c| {
            (0..k * n)
                .map(|i| ((i * 7 + c) % 13) as f32 * 0.01 - 0.06)
                .collect()
        })
        .collect()
}

/// Decode-shaped matmuls with cold weights (distinct copies cycling through ~300 MB, as a
/// decode step streams the whole model): `gemm` on the row-major weights against the packed
/// panels.
fn cold_matmuls() {
    use blockformer::kernels::ops::matmul_acc;
    use blockformer::kernels::panel::{matmul_panels, Panels};
    println!(
        "{:>18} {:>10} {:>10} {:>10} {:>8}",
        "M x K x N (cold)", "gemm ms", "panel ms", "bound ms", "eff"
    );
    let (flops, bw) = (467e9, 44.2e9);
    for (m, k, n) in [
        (16, 768, 50304),
        (64, 768, 50304),
        (16, 256, 50304),
        (64, 256, 50304),
        (16, 512, 1536),
        (16, 2048, 512),
        (64, 512, 1536),
        (64, 2048, 512),
        (16, 768, 2304),
        (64, 768, 3072),
        (64, 256, 256),
        (64, 256, 1024),
        (64, 1024, 256),
        (2048, 512, 1536),
        (2048, 2048, 512),
        (8192, 512, 2048),
        (8192, 768, 2304),
        (8192, 256, 768),
        (8192, 256, 1024),
        (8192, 1024, 256),
        (8192, 256, 4096),
        (8192, 4096, 256),
    ] {
        let ws = cold_copies(k, n, if m > 64 { 2 } else { 300 << 20 });
        let copies = ws.len();
        let ps: Vec<Panels> = ws.iter().map(|w| Panels::pack(w, k, n)).collect();
        let x: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0f32; m * n];
        let reps = 2 * copies;
        let mut c = 0;
        let g = time(reps, || {
            c = (c + 1) % copies;
            matmul_acc(&x, &ws[c], m, k, n, &mut y);
        });
        let p = time(reps, || {
            c = (c + 1) % copies;
            matmul_panels(&x, m, &ps[c], &mut y);
        });
        if m > 64 {
            let q = time(reps, || {
                c = (c + 1) % copies;
                std::hint::black_box(blockformer::kernels::panel::matmul_panels_new(
                    &x, m, &ps[c],
                ));
            });
            println!("store-only {:.3}", q * 1e3);
        }
        let bound = f64::max(2.0 * (m * k * n) as f64 / flops, (k * n * 4) as f64 / bw);
        println!(
            "{:>18} {:>10.3} {:>10.3} {:>10.3} {:>7.0}%",
            format!("{m}x{k}x{n}"),
            g * 1e3,
            p * 1e3,
            bound * 1e3,
            100.0 * bound / p
        );
    }
}

/// The LM head with cold weights (copies cycling through ~300 MB): float32 panels, `q8_0`
/// panels and candle's `q8_0` matmul (`cargo bench --bench kernels -- q8`).
fn cold_q8() {
    use blockformer::kernels::panel::{matmul_panels_new, Panels};
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    println!(
        "{:>18} {:>10} {:>10} {:>12}",
        "M x K x N (cold)", "f32 ms", "q8_0 ms", "candle q8 ms"
    );
    for (m, k, n) in [
        (1, 768, 50304),
        (8, 768, 50304),
        (16, 768, 50304),
        (64, 768, 50304),
        (1, 512, 50304),
        (16, 512, 50304),
        (64, 256, 50304),
    ] {
        let ws = cold_copies(k, n, 300 << 20);
        let copies = ws.len();
        let fp: Vec<Panels> = ws.iter().map(|w| Panels::pack(w, k, n)).collect();
        let qp: Vec<Panels> = ws.iter().map(|w| Panels::pack_q8_0(w, k, n)).collect();
        let qm: Vec<QMatMul> = ws
            .iter()
            .map(|w| {
                let t = Tensor::from_slice(w, (k, n), &Device::Cpu).unwrap();
                let t = t.t().unwrap().contiguous().unwrap();
                QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()).unwrap()
            })
            .collect();
        let x: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
        let reps = 2 * copies;
        let mut c = 0;
        let mut run = |ps: &[Panels]| {
            time(reps, || {
                c = (c + 1) % copies;
                std::hint::black_box(matmul_panels_new(&x, m, &ps[c]));
            })
        };
        let (f, q) = (run(&fp), run(&qp));
        let g = time(reps, || {
            c = (c + 1) % copies;
            std::hint::black_box(candle_core::Module::forward(&qm[c], &xt).unwrap());
        });
        println!(
            "{:>18} {:>10.3} {:>10.3} {:>12.3}",
            format!("{m}x{k}x{n}"),
            f * 1e3,
            q * 1e3,
            g * 1e3
        );
    }
}

/// Batched decode attention over cold caches (64 rows x 8 heads, context 1024, K+V well beyond
/// the L3), at the head sizes of the presets: GB/s of cache read. `ATT_CTX=128,640,2048` sets
/// the contexts and `ATT_CAP=2176` the caches' capacity (default: context + 1).
fn decode_attention() {
    let ctxs: Vec<usize> = std::env::var("ATT_CTX")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1024]);
    let cap_env: Option<usize> = std::env::var("ATT_CAP").ok().and_then(|v| v.parse().ok());
    for hd in [32usize, 64] {
        for &ctx in &ctxs {
            let (rows, heads) = (64usize, 8usize);
            let cap = cap_env.unwrap_or(ctx + 1);
            let w = heads * hd;
            let rot = Rotary::new(hd / 4, 10000.0, 2048);
            let mut caches: Vec<KvCache> =
                (0..rows).map(|_| KvCache::new(1, heads, hd, cap)).collect();
            let specs = vec![RowSpec::arange(1, ctx); rows];
            for (r, c) in caches.iter_mut().enumerate() {
                // Varied keys, so the running maximum moves as in real decoding.
                let prefill: Vec<f32> = (0..ctx * 3 * w)
                    .map(|i| (((i * 7919 + r * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.5)
                    .collect();
                let mut out = vec![0f32; ctx * w];
                let spec = [RowSpec::arange(ctx, 0)];
                cached_attention(&prefill, &mut out, &spec, &mut [c], 0, &rot, heads, hd);
                blockformer::kernels::attention::commit(&spec, &mut [c]);
            }
            let qkv: Vec<f32> = (0..rows * 3 * w)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                .collect();
            let mut out = vec![0f32; rows * w];
            let t = time(20, || {
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                cached_attention(&qkv, &mut out, &specs, &mut refs, 0, &rot, heads, hd);
            });
            let (ms, gbs) = (t * 1e3, (rows * heads * ctx * hd * 2 * 4) as f64 / t / 1e9);
            println!(
                "decode attention {rows} rows x {heads} heads x {hd}, context {ctx}: \
                 {ms:.2} ms, {gbs:.1} GB/s of K+V"
            );
        }
    }
}

/// One thread multiplying `m` rows by weights that stay in L2 or L3: the micro-kernel's
/// arithmetic speed, in GFLOP/s (the machine probe's peak is for both threads).
fn hot_matmuls() {
    use blockformer::kernels::panel::{matmul_panels, Panels};
    for (m, k, n) in [
        (16, 512, 256),
        (16, 512, 1536),
        (64, 512, 256),
        (64, 512, 1536),
        (8, 512, 256),
        (252, 256, 1024),
        (2048, 256, 1024),
        (2048, 1024, 256),
    ] {
        let w: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
        let p = Panels::pack(&w, k, n);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0f32; m * n];
        let secs = blockformer::kernels::serial(|| {
            time(if m > 64 { 50 } else { 2000 }, || {
                matmul_panels(&x, m, &p, &mut y)
            })
        });
        println!(
            "hot matmul {m}x{k}x{n} (one thread): {:.2} us, {:.1} GFLOP/s",
            secs * 1e6,
            2.0 * (m * k * n) as f64 / secs / 1e9
        );
    }
}

/// One thread attending over keys and values that stay in L2 (1024 positions): the kernel's
/// arithmetic speed, in GB/s of K+V it could consume.
fn hot_attention() {
    for hd in [32usize, 64] {
        let t = 1024;
        let q: Vec<f32> = (0..hd).map(|i| (i % 5) as f32 * 0.1).collect();
        let kv: Vec<f32> = (0..t * hd)
            .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut out = vec![0f32; hd];
        let secs = time(2000, || attend_online(&q, &kv, &kv, 0.2, &mut out));
        println!(
            "hot attention 1 query x {t} keys x {hd}: {:.2} us, {:.1} GB/s of K+V",
            secs * 1e6,
            (2 * t * hd * 4) as f64 / secs / 1e9
        );
    }
}

/// One core streaming memory and multiplying in registers, apart and interleaved in one loop:
/// whether a core's FMA units work while its loads wait (they do: the stream slows a little
/// and the arithmetic runs at most of its own rate). Reads a 1 GiB buffer; per 256 bytes read,
/// `r` rounds of 24 FMAs on 12 register accumulators.
#[cfg(target_arch = "x86_64")]
fn overlap() {
    if !std::is_x86_feature_detected!("avx512f") {
        return println!("overlap: needs AVX-512F");
    }
    let n = 1usize << 28;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    // The FMAs alone, at the stream's r = 4 count.
    let rounds = n / 64 * 4;
    let t = Instant::now();
    // SAFETY: AVX-512F checked above.
    let s = unsafe { stream_and_multiply(&buf[..0], 0, rounds) };
    let alone = rounds as f64 * 24.0 * 32.0 / t.elapsed().as_secs_f64() / 1e9;
    println!("FMAs alone: {alone:.1} GFLOP/s ({s})");
    for r in [0usize, 1, 2, 3, 4, 8] {
        let t = Instant::now();
        // SAFETY: AVX-512F checked above.
        let s = unsafe { stream_and_multiply(&buf, r, 0) };
        let secs = t.elapsed().as_secs_f64();
        let flops = (n / 64 * r) as f64 * 24.0 * 32.0;
        println!(
            "r = {r}: {:.1} GB/s read while multiplying at {:.1} GFLOP/s ({s})",
            (n * 4) as f64 / secs / 1e9,
            flops / secs / 1e9
        );
    }
}

/// Sums `buf` (prefetching 4 KiB ahead) with `r` rounds of FMAs per 64 floats read, then
/// `extra` rounds with no reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_and_multiply(buf: &[f32], r: usize, extra: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(1.0); 12];
    let (a, b) = (
        _mm512_set1_ps(std::hint::black_box(0.999)),
        _mm512_set1_ps(0.001),
    );
    let mut sum = [_mm512_setzero_ps(); 4];
    let round = |acc: &mut [__m512; 12]| {
        for _ in 0..2 {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
    };
    let p = buf.as_ptr();
    for i in (0..buf.len() / 64 * 64).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + 1024) as *const i8);
        for (j, s) in sum.iter_mut().enumerate() {
            *s = _mm512_add_ps(*s, _mm512_loadu_ps(p.add(i + 16 * j)));
        }
        for _ in 0..r {
            round(&mut acc);
        }
    }
    for _ in 0..extra {
        round(&mut acc);
    }
    let mut s = _mm512_add_ps(_mm512_add_ps(sum[0], sum[1]), _mm512_add_ps(sum[2], sum[3]));
    for x in acc {
        s = _mm512_add_ps(s, x);
    }
    _mm512_reduce_add_ps(s)
}

/// Greedy decoding's LM head (vocabulary 50304) with cold weights: the float32 panel scan
/// against the bfloat16 screen and its exact pass ([`blockformer::kernels::screen`]), which must
/// agree on every row.
fn greedy_heads() {
    use blockformer::kernels::panel::{argmax_panels, Panels};
    use blockformer::kernels::screen::ArgmaxScreen;
    // A bell-shaped pseudo-random value (sum of four uniforms) of standard deviation ~`std`.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bell = |std: f32| {
        let mut s = 0f32;
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        s * std * 1.732
    };
    let n = 50304;
    println!(
        "{:>18} {:>12} {:>12} {:>8}",
        "M x K x N (cold)", "float32 ms", "screen ms", "speedup"
    );
    for (m, k) in [
        (1, 256),
        (16, 256),
        (64, 256),
        (64, 512),
        (16, 768),
        (64, 768),
    ] {
        let copies = (300usize << 20).div_ceil(k * n * 5).max(2);
        let ps: Vec<Panels> = (0..copies)
            .map(|_| {
                let w: Vec<f32> = (0..k * n).map(|_| bell(0.02)).collect();
                Panels::pack(&w, k, n)
            })
            .collect();
        let ss: Vec<ArgmaxScreen> = ps.iter().filter_map(ArgmaxScreen::build).collect();
        if ss.len() != ps.len() {
            println!("no screen on this CPU (AVX-512 BF16 needed)");
            return;
        }
        let x: Vec<f32> = (0..m * k).map(|_| bell(1.0)).collect();
        for c in 0..copies {
            let want = argmax_panels(&x, m, &ps[c]);
            assert_eq!(
                ss[c].argmax(&x, m, &ps[c]),
                Some(want),
                "screen and scan differ"
            );
        }
        let reps = 4 * copies;
        let mut c = 0;
        let f = time(reps, || {
            c = (c + 1) % copies;
            std::hint::black_box(argmax_panels(&x, m, &ps[c]));
        });
        let s = time(reps, || {
            c = (c + 1) % copies;
            std::hint::black_box(ss[c].argmax(&x, m, &ps[c]));
        });
        println!(
            "{:>18} {:>12.3} {:>12.3} {:>7.2}x",
            format!("{m}x{k}x{n}"),
            f * 1e3,
            s * 1e3,
            f / s
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "greedy") {
        return greedy_heads();
    }
    #[cfg(target_arch = "x86_64")]
    if std::env::args().any(|a| a == "overlap") {
        return overlap();
    }
    if std::env::args().any(|a| a == "hot") {
        hot_matmuls();
        return hot_attention();
    }
    if std::env::args().any(|a| a == "cold") {
        return cold_matmuls();
    }
    if std::env::args().any(|a| a == "q8") {
        return cold_q8();
    }
    if std::env::args().any(|a| a == "attention") {
        return decode_attention();
    }
    let dev = Device::Cpu;
    println!(
        "{:>18} {:>12} {:>12} {:>10}",
        "M x K x N", "gemm ms", "skinny ms", "GB/s"
    );
    for (m, k, n) in [
        (1, 768, 50304),
        (8, 768, 50304),
        (16, 768, 50304),
        (1, 768, 2304),
        (8, 768, 2304),
        (8, 768, 3072),
        (8, 3072, 768),
        (16, 512, 2048),
        (16, 2048, 512),
    ] {
        let w = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let it = if n > 10000 { 20 } else { 200 };
        let g = time(it, || {
            x.matmul(&w).unwrap();
        });
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let mut y = vec![0f32; m * n];
        let s = time(it, || matmul_skinny(&xv, &wv, m, k, n, &mut y));
        println!(
            "{:>18} {:>12.3} {:>12.3} {:>10.1}",
            format!("{m}x{k}x{n}"),
            g * 1e3,
            s * 1e3,
            (k * n * 4) as f64 / s / 1e9
        );
    }

    decode_attention();
}
