//! Row-wise building blocks of the decode path on host buffers: matmul accumulating into its
//! output (so biases and residuals are fused), LayerNorm, exact GELU. Each has a plain twin in
//! the tests (candle's ops or a loop) that it is compared with. Also two ops of the training
//! path with their own backward: LayerNorm ([`LayerNormOp`]) and bias + GELU ([`BiasGeluOp`]).

use super::matmul;
use rayon::prelude::*;

/// `y[m, n] += x[m, k] · w[k, n]` (row-major): the skinny kernel for decode-sized `m`, the
/// `gemm` crate otherwise.
pub fn matmul_acc(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), m * k, "x shape");
    assert_eq!(w.len(), k * n, "w shape");
    assert_eq!(y.len(), m * n, "y shape");
    if m == 0 || n == 0 {
        return;
    }
    if m <= matmul::SKINNY_MAX_ROWS {
        return matmul::matmul_skinny(x, w, m, k, n, y);
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices have the asserted sizes; strides describe row-major matrices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `dst = src` for the short rows of the attention loops (a head's 32-128 values): 16 floats
/// at a time inline, where `copy_from_slice` calls `memcpy` for every row.
#[inline(always)]
pub fn copy_row(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy_row lengths");
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (a, b) in (&mut d).zip(&mut s) {
        let a: &mut [f32; 16] = a.try_into().expect("16 lanes");
        let b: &[f32; 16] = b.try_into().expect("16 lanes");
        *a = *b;
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a = *b;
    }
}

/// The largest value of `xs` (NaN never wins; `-inf` when empty), as lane-wise maxima over
/// 16 lanes so that it vectorizes.
pub fn max_value(xs: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a })
}

/// Every row of `y` (`[m, bias.len()]`) set to `bias`.
pub fn fill_rows(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// `bias` added to every row of `y`.
pub fn add_rows(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    }
}

/// Row-wise LayerNorm (biased variance) of `x [m, d]` into `out`. The mean and variance sum
/// 16 lanes side by side, then the lanes (so that they vectorize; built for AVX-512 where
/// the CPU has it); [`layer_norm_reference`] is the plain twin.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    let rows = x.len() / d;
    // The CPU's features once per call, not per row.
    let row = layer_norm_row_kernel();
    let body = |(xr, or): (&[f32], &mut [f32])| row(xr, weight, bias, eps, or);
    if rows * d >= 1 << 16 {
        x.par_chunks_exact(d)
            .zip(out.par_chunks_exact_mut(d))
            .with_min_len(super::min_len())
            .for_each(body);
    } else {
        x.chunks_exact(d)
            .zip(out.chunks_exact_mut(d))
            .for_each(body);
    }
}

/// Row-wise LayerNorm with sequential sums: the twin of [`layer_norm`].
pub fn layer_norm_reference(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((o, v), (w, b)) in or.iter_mut().zip(xr).zip(weight.iter().zip(bias)) {
            *o = (v - mean) * inv * w + b;
        }
    }
}

/// One row of LayerNorm: `(x, weight, bias, eps, out)`.
type LayerNormRow = fn(&[f32], &[f32], &[f32], f32, &mut [f32]);

/// [`layer_norm_row`] built for AVX-512 where the CPU has it, else the portable build.
fn layer_norm_row_kernel() -> LayerNormRow {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY (of the call inside): the CPU supports AVX-512F.
        return |x, w, b, eps, out| unsafe { layer_norm_row_avx512(x, w, b, eps, out) };
    }
    layer_norm_row
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn layer_norm_row_avx512(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    layer_norm_row(x, weight, bias, eps, out)
}

/// One row of [`layer_norm`].
#[inline(always)]
fn layer_norm_row(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let d = x.len() as f32;
    let mean = lane_sum(x, |v| v) / d;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d;
    let inv = 1.0 / (var + eps).sqrt();
    for ((o, v), (w, b)) in out.iter_mut().zip(x).zip(weight.iter().zip(bias)) {
        *o = (v - mean) * inv * w + b;
    }
}

/// `sum f(x_i)` over 16 lanes side by side, then the lanes and the tail.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU of one value: exact (`erf`) for `gelu`, the tanh approximation otherwise.
#[inline]
pub fn gelu_one(x: f32, exact: bool) -> f32 {
    if exact {
        0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
    } else {
        0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
    }
}

/// GELU in place: [`gelu_one`], vectorized with AVX-512 where available (absolute error
/// below 1e-6 against it for |x| < 10).
pub fn gelu(x: &mut [f32], exact: bool) {
    let f = |c: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { gelu_avx512(c, exact) };
        }
        c.iter_mut().for_each(|v| *v = gelu_one(*v, exact));
    };
    if x.len() >= 1 << 14 {
        x.par_chunks_mut(4096).for_each(f);
    } else {
        f(x);
    }
}

/// GELU of 16 lanes. Exact form: `erfc` by the Chebyshev fit of Numerical Recipes
/// (`erfc(z) = t exp(-z^2 + P(t))`, `t = 1 / (1 + z / 2)`, relative error < 1.2e-7), so
/// `gelu(x) = x (1 - erfc(z) / 2)` for `x >= 0` and `x erfc(z) / 2` below, `z = |x| / sqrt 2`.
/// Tanh form: `0.5 x (1 + tanh u) = x / (1 + exp(-2 u))`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_avx512(x: &mut [f32], exact: bool) {
    map16(x, |v| gelu16(v, exact));
}

/// GELU of one vector of 16 lanes (see [`gelu_avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn gelu16(
    v: std::arch::x86_64::__m512,
    exact: bool,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    #[allow(clippy::excessive_precision)] // the published coefficients
    const P: [f32; 10] = [
        -1.265_512_2,
        1.000_023_7,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let one = _mm512_set1_ps(1.0);
    let half = _mm512_set1_ps(0.5);
    if exact {
        let z = _mm512_mul_ps(
            _mm512_abs_ps(v),
            _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        );
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(half, z, one));
        let mut p = _mm512_set1_ps(P[9]);
        for &c in P[..9].iter().rev() {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        let erfc = _mm512_mul_ps(t, exp16(_mm512_fnmadd_ps(z, z, p)));
        let half_erfc = _mm512_mul_ps(half, erfc);
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
        let cdf = _mm512_mask_blend_ps(neg, _mm512_sub_ps(one, half_erfc), half_erfc);
        _mm512_mul_ps(v, cdf)
    } else {
        let u = _mm512_mul_ps(
            _mm512_set1_ps(SQRT_2_OVER_PI),
            _mm512_fmadd_ps(
                _mm512_mul_ps(_mm512_set1_ps(0.044715), v),
                _mm512_mul_ps(v, v),
                v,
            ),
        );
        let e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0), u));
        _mm512_div_ps(v, _mm512_add_ps(one, e))
    }
}

/// Applies `f` to `x` 16 lanes at a time (the tail under a mask).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn map16(x: &mut [f32], f: impl Fn(std::arch::x86_64::__m512) -> std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        _mm512_storeu_ps(c.as_mut_ptr(), f(_mm512_loadu_ps(c.as_ptr())));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mask: __mmask16 = ((1u32 << rest.len()) - 1) as __mmask16;
        let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
        _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, f(v));
    }
}

/// `x = exp(x)` in place, vectorized with AVX-512 where available (relative error below 1e-6;
/// inputs below -87 give 0 or a denormal, as `f32::exp` nearly does).
pub fn exp_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F.
        return unsafe { exp_avx512(x) };
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

/// `exp(x) = 2^n exp(r)`, `n = round(x log2 e)`, `r = x - n ln 2` (ln 2 in two parts, so `r`
/// keeps its precision), `|r| <= ln 2 / 2`, `exp(r)` by its degree-7 Taylor polynomial
/// (relative error ~5e-9), scaled with `vscalefps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(x: &mut [f32]) {
    map16(x, |v| exp16(v));
}

/// `exp` of 16 lanes (see [`exp_avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn exp16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const C: [f32; 8] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let v = _mm512_min_ps(
        _mm512_max_ps(v, _mm512_set1_ps(-104.0)),
        _mm512_set1_ps(89.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(1.428_606_8e-6),
        _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), v),
    );
    let mut p = _mm512_set1_ps(C[7]);
    for &c in C[..7].iter().rev() {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// One attention row of scaled scores: the first `live` entries become `exp(s - max)`, the
/// rest 0; returns the sum (the caller divides the output by it). AVX-512 where available.
pub fn softmax_unnormalized(row: &mut [f32], live: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F.
        return unsafe { softmax_unnormalized_avx512(row, live) };
    }
    softmax_unnormalized_reference(row, live)
}

/// Plain twin of [`softmax_unnormalized`].
pub fn softmax_unnormalized_reference(row: &mut [f32], live: usize) -> f32 {
    let (live, dead) = row.split_at_mut(live);
    let m = live.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    live.iter_mut().for_each(|v| *v = (*v - m).exp());
    dead.fill(0.0);
    live.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_unnormalized_avx512(row: &mut [f32], live: usize) -> f32 {
    use std::arch::x86_64::*;
    let (live, dead) = row.split_at_mut(live);
    dead.fill(0.0);
    let full = live.len() / 16 * 16;
    let mask: __mmask16 = ((1u32 << (live.len() - full)) - 1) as __mmask16;
    let p = live.as_mut_ptr();
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(p.add(i)));
    }
    mx = _mm512_mask_max_ps(mx, mask, mx, _mm512_maskz_loadu_ps(mask, p.add(full)));
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    let mut sum = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
    }
    if mask != 0 {
        let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p.add(full)), m));
        _mm512_mask_storeu_ps(p.add(full), mask, e);
        sum = _mm512_mask_add_ps(sum, mask, sum, e);
    }
    _mm512_reduce_add_ps(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    pub(super) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    /// Forward values and input gradients of a custom op against the composed candle ops.
    pub(super) fn assert_pairs_close(pairs: &[(&Tensor, &Tensor)], tol: f32) {
        for (i, (a, b)) in pairs.iter().enumerate() {
            for (p, q) in host(a).unwrap().iter().zip(&host(b).unwrap()) {
                assert!((p - q).abs() < tol, "pair {i}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn matmul_acc_matches_reference_both_paths() {
        for (m, k, n) in [(1, 33, 70), (2, 64, 129), (5, 48, 200), (40, 96, 96)] {
            let (x, w, y0) = (rand_vec(m * k, 1), rand_vec(k * n, 2), rand_vec(m * n, 3));
            let (mut y, mut z) = (y0.clone(), y0);
            matmul_acc(&x, &w, m, k, n, &mut y);
            matmul::matmul_reference(&x, &w, m, k, n, &mut z);
            for (a, b) in y.iter().zip(&z) {
                assert!((a - b).abs() < 1e-3, "{m}x{k}x{n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn vector_exp_and_softmax_match_their_plain_twins() {
        let mut x: Vec<f32> = (0..1000).map(|i| -110.0 + i as f32 * 0.2).collect();
        x.extend([0.0, -0.0, 1e-8, -1e-8, 88.5, f32::NEG_INFINITY]);
        let want: Vec<f32> = x.iter().map(|v| v.exp()).collect();
        let mut got = x.clone();
        exp_inplace(&mut got);
        for ((a, b), v) in got.iter().zip(&want).zip(&x) {
            let err = (a - b).abs() / b.max(f32::MIN_POSITIVE);
            assert!(
                a == b || err < 1e-6 || (a - b).abs() < 1e-37,
                "exp({v}): {a} vs {b}"
            );
        }
        // Unnormalized masked softmax rows against candle's softmax with a -inf mask.
        for (width, live) in [(7, 5), (40, 40), (33, 17), (16, 1), (100, 64)] {
            let raw = rand_vec(width, width as u64);
            let mut mine = raw.clone();
            let sum = softmax_unnormalized(&mut mine, live);
            let mut twin = raw.clone();
            let twin_sum = softmax_unnormalized_reference(&mut twin, live);
            assert!((sum - twin_sum).abs() < 1e-5 * twin_sum);
            let mask: Vec<f32> = (0..width)
                .map(|j| if j < live { 0.0 } else { f32::NEG_INFINITY })
                .collect();
            let t = Tensor::from_vec(raw, (1, width), &Device::Cpu).unwrap();
            let m = Tensor::from_vec(mask, (1, width), &Device::Cpu).unwrap();
            let want: Vec<f32> = candle_nn::ops::softmax_last_dim(&(t + m).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for ((a, t), b) in mine.iter().zip(&twin).zip(&want) {
                assert!((a / sum - b).abs() < 1e-6, "{a} vs {b}");
                assert!((t / twin_sum - b).abs() < 1e-6, "{t} vs {b}");
            }
        }
    }

    #[test]
    fn vector_gelu_matches_its_plain_twin() {
        let x: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
        for exact in [true, false] {
            let mut got = x.clone();
            gelu(&mut got, exact);
            for (a, v) in got.iter().zip(&x) {
                let b = gelu_one(*v, exact);
                assert!(
                    (a - b).abs() < 1e-6 * (1.0 + b.abs()),
                    "gelu({v}, {exact}): {a} vs {b}"
                );
            }
        }
    }

    /// The inline copy against `copy_from_slice`, with and without a tail of lanes.
    #[test]
    fn copy_row_copies_every_value() {
        for n in [0, 5, 16, 32, 37, 128] {
            let src = rand_vec(n, 10);
            let (mut fast, mut plain) = (vec![0.0; n], vec![0.0; n]);
            copy_row(&mut fast, &src);
            plain.copy_from_slice(&src);
            assert_eq!(fast, plain, "{n} values");
        }
    }

    #[test]
    fn layer_norm_and_gelu_match_candle() {
        let dev = Device::Cpu;
        let (m, d) = (300, 256); // large enough for the parallel paths
        let (x, w, b) = (rand_vec(m * d, 4), rand_vec(d, 5), rand_vec(d, 6));
        let mut out = vec![0.0; m * d];
        layer_norm(&x, &w, &b, 1e-5, &mut out);
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
        let want: Vec<f32> =
            candle_nn::ops::layer_norm(&t(&x, &[m, d]), &t(&w, &[d]), &t(&b, &[d]), 1e-5)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        for (a, c) in out.iter().zip(&want) {
            assert!((a - c).abs() < 1e-4, "layer norm {a} vs {c}");
        }
        // Against the twin with sequential sums, at widths with and without a tail of lanes.
        for d in [256, 37] {
            let (x, w, b) = (rand_vec(4 * d, 7), rand_vec(d, 8), rand_vec(d, 9));
            let (mut fast, mut plain) = (vec![0.0; 4 * d], vec![0.0; 4 * d]);
            layer_norm(&x, &w, &b, 1e-5, &mut fast);
            layer_norm_reference(&x, &w, &b, 1e-5, &mut plain);
            for (a, c) in fast.iter().zip(&plain) {
                assert!((a - c).abs() < 1e-5, "layer norm (d = {d}) {a} vs {c}");
            }
        }
        for exact in [true, false] {
            let mut g = x.clone();
            gelu(&mut g, exact);
            let tx = t(&x, &[m * d]);
            let want: Vec<f32> = if exact { tx.gelu_erf() } else { tx.gelu() }
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, c) in g.iter().zip(&want) {
                assert!((a - c).abs() < 1e-5, "gelu (exact {exact}) {a} vs {c}");
            }
        }
    }
}

/// LayerNorm as one differentiable op (`x`, gain, bias), for training: the composed version
/// costs nine tensor ops forward and as many backward. Forward is [`layer_norm`]; backward
/// recomputes the normalised input and returns
/// `dx = rstd * (g w - mean(g w) - x_hat mean(g w x_hat))`, `dw = sum(g x_hat)`, `db = sum(g)`.
pub struct LayerNormOp {
    pub eps: f32,
}

fn host(t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// The float32 data of a custom op's contiguous input.
pub(crate) fn input<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: non-contiguous input")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, w, b) = (
            input(s1, l1, self.name())?,
            input(s2, l2, self.name())?,
            input(s3, l3, self.name())?,
        );
        let mut out = vec![0f32; x.len()];
        layer_norm(x, w, b, self.eps, &mut out);
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        w: &candle_core::Tensor,
        _b: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> candle_core::Result<(
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
    )> {
        let d = w.elem_count();
        let (xv, wv, gv) = (host(x)?, host(w)?, host(grad)?);
        let rows = xv.len() / d;
        // Per row: dx, and this row's contributions to dw and db.
        let per_row = |r: usize| -> (Vec<f32>, Vec<f32>) {
            let (xr, gr) = (&xv[r * d..(r + 1) * d], &gv[r * d..(r + 1) * d]);
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            let xhat: Vec<f32> = xr.iter().map(|v| (v - mean) * rstd).collect();
            let gw: Vec<f32> = gr.iter().zip(&wv).map(|(g, w)| g * w).collect();
            let m1 = gw.iter().sum::<f32>() / d as f32;
            let m2 = gw.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f32>() / d as f32;
            let dx = gw
                .iter()
                .zip(&xhat)
                .map(|(g, h)| rstd * (g - m1 - h * m2))
                .collect();
            let dwr = gr.iter().zip(&xhat).map(|(g, h)| g * h).collect();
            (dx, dwr)
        };
        let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..rows).into_par_iter().map(per_row).collect();
        let mut dx = Vec::with_capacity(xv.len());
        let mut dw = vec![0f32; d];
        let mut db = vec![0f32; d];
        for (r, (dxr, dwr)) in parts.into_iter().enumerate() {
            dx.extend_from_slice(&dxr);
            for j in 0..d {
                dw[j] += dwr[j];
                db[j] += gv[r * d + j];
            }
        }
        let dev = x.device();
        Ok((
            Some(candle_core::Tensor::from_vec(dx, x.shape(), dev)?),
            Some(candle_core::Tensor::from_vec(dw, w.shape(), dev)?),
            Some(candle_core::Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod layer_norm_op_tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn fused_layer_norm_gradients_match_the_composed_ops() {
        let dev = Device::Cpu;
        let mut seed = 9;
        let mut v = |n: usize| {
            seed += 1;
            super::tests::rand_vec(n, seed)
        };
        let (rows, d) = (7, 24);
        let x = Var::from_vec(v(rows * d), (rows, d), &dev).unwrap();
        let w = Var::from_vec(v(d), d, &dev).unwrap();
        let b = Var::from_vec(v(d), d, &dev).unwrap();
        let r = Tensor::from_vec(v(rows * d), (rows, d), &dev).unwrap();
        let fused = x.apply_op3(&w, &b, LayerNormOp { eps: 1e-5 }).unwrap();
        let composed = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
        let (gf, gc) = (
            (fused.clone() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
            (composed.clone() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
        );
        let mut pairs = vec![(&fused, &composed)];
        for t in [&x, &w, &b] {
            pairs.push((gf.get(t).unwrap(), gc.get(t).unwrap()));
        }
        super::tests::assert_pairs_close(&pairs, 1e-4);
    }
}

/// `gelu(x + b)` over rows of `x [.., F]` with `b [F]`, the MLP's bias and activation as one
/// differentiable op for training (the composed backward of candle's `gelu_erf` alone takes
/// about ten elementwise passes over `[N, F]`). Backward recomputes `z = x + b` and returns
/// `dx = g gelu'(z)` and `db = sum over rows of dx`.
pub struct BiasGeluOp {
    /// `erf` GELU (`gelu`); else the tanh approximation (`gelu_new`, `gelu_fast`).
    pub exact: bool,
}

impl BiasGeluOp {
    /// `gelu'(z)`.
    #[inline]
    fn slope(&self, z: f32) -> f32 {
        if self.exact {
            let cdf = 0.5 * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * z * z).exp() * (0.5 * SQRT_2_OVER_PI);
            cdf + z * pdf
        } else {
            let t = (SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)).tanh();
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z);
            0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
        }
    }
}

impl candle_core::CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, b) = (input(s1, l1, self.name())?, input(s2, l2, self.name())?);
        let f = b.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(f * 16)
            .zip(x.par_chunks(f * 16))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_exact_mut(f).zip(xs.chunks_exact(f)) {
                    for ((oj, &xj), &bj) in orow.iter_mut().zip(xrow).zip(b) {
                        *oj = gelu_one(xj + bj, self.exact);
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        b: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        let f = b.elem_count();
        let (xv, bv, gv) = (host(x)?, host(b)?, host(grad)?);
        let mut dx = vec![0f32; xv.len()];
        // Chunks of rows: dx, and each chunk's partial db.
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(f * 16)
            .zip(xv.par_chunks(f * 16).zip(gv.par_chunks(f * 16)))
            .map(|(d, (xs, gs))| {
                let mut db = vec![0f32; f];
                for ((drow, xrow), grow) in d
                    .chunks_exact_mut(f)
                    .zip(xs.chunks_exact(f))
                    .zip(gs.chunks_exact(f))
                {
                    for j in 0..f {
                        let v = grow[j] * self.slope(xrow[j] + bv[j]);
                        drow[j] = v;
                        db[j] += v;
                    }
                }
                db
            })
            .collect();
        let mut db = vec![0f32; f];
        for p in partial {
            for (a, v) in db.iter_mut().zip(p) {
                *a += v;
            }
        }
        let dev = x.device();
        Ok((
            Some(candle_core::Tensor::from_vec(dx, x.shape(), dev)?),
            Some(candle_core::Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod bias_gelu_op_tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn fused_bias_gelu_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let (rows, f) = (37, 24);
        for exact in [true, false] {
            let x = Var::from_vec(super::tests::rand_vec(rows * f, 3), (rows, f), &dev).unwrap();
            let b = Var::from_vec(super::tests::rand_vec(f, 4), f, &dev).unwrap();
            let r = Tensor::from_vec(super::tests::rand_vec(rows * f, 5), (rows, f), &dev).unwrap();
            let fused = x.apply_op2(&b, BiasGeluOp { exact }).unwrap();
            let z = x.broadcast_add(&b).unwrap();
            let composed = if exact { z.gelu_erf() } else { z.gelu() }.unwrap();
            let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (grads(&fused), grads(&composed));
            let mut pairs = vec![(&fused, &composed)];
            for t in [&x, &b] {
                pairs.push((gf.get(t).unwrap(), gc.get(t).unwrap()));
            }
            super::tests::assert_pairs_close(&pairs, 1e-4);
        }
    }
}
