//! Skinny matmul `y[M, N] += x[M, K] · w[K, N]` for the small `M` of decoding (one row per
//! sequence in the batch). At these shapes the weights are read once per call and the time is
//! memory traffic: this kernel streams each weight row once, where the general `gemm` path
//! reaches only about half the memory bandwidth at `M = 1` (the LM head of `block_main_b4_85`,
//! 1 x 768 x 50304: ~6 ms here against ~11 ms; `cargo bench --bench kernels`).
//!
//! Columns are split into strips processed in parallel; a strip's accumulators (`M x strip`
//! floats) stay in L1 while the weight rows stream through, four rows per pass. AVX-512 and
//! AVX2 builds of the same code are selected at run time.

use rayon::prelude::*;

/// Largest `M` the model layers send to this kernel (beyond it the general gemm is faster).
pub const SKINNY_MAX_ROWS: usize = 2;
/// Columns per parallel task (at most; narrower for small `n` so both cores get work).
const STRIP: usize = 256;

/// `dst[m, n] = alpha * lhs[m, k] . rhs[k, n]` through the `gemm` crate, operands given by
/// their (row, column) strides (a transposed operand is the same buffer with the strides
/// swapped); `dst` is row-major. `parallel`: split over rayon's threads (else one thread, for
/// callers that are themselves parallel).
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    (m, k, n): (usize, usize, usize),
    dst: &mut [f32],
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    assert!(dst.len() >= m * n);
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts bound every index the strides reach; dst is row-major [m, n].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// `y = x w + bias`; `x` is `[m, k]`, `w` is `[k, n]`, `y` is `[m, n]`, all row-major.
pub fn matmul_skinny(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), k * n);
    assert_eq!(y.len(), m * n);
    // Each task owns a column strip of every output row: gather per-strip outputs, then scatter.
    let threads = rayon::current_num_threads().max(1);
    let width = STRIP
        .min(n.div_ceil(4 * threads).next_multiple_of(16))
        .max(16);
    let strips: Vec<usize> = (0..n).step_by(width).collect();
    let y_in: &[f32] = y;
    let parts: Vec<Vec<f32>> = strips
        .par_iter()
        .map(|&c0| {
            let c1 = (c0 + width).min(n);
            let mut part = Vec::with_capacity(m * (c1 - c0));
            for r in 0..m {
                part.extend_from_slice(&y_in[r * n + c0..r * n + c1]);
            }
            strip(x, w, m, k, n, c0, c1, &mut part);
            part
        })
        .collect();
    for (&c0, part) in strips.iter().zip(&parts) {
        let width = part.len() / m.max(1);
        for r in 0..m {
            y[r * n + c0..r * n + c0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn strip(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { strip_avx512(x, w, m, k, n, c0, c1, out) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA.
            return unsafe { strip_avx2(x, w, m, k, n, c0, c1, out) };
        }
    }
    strip_generic(x, w, m, k, n, c0, c1, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn strip_avx512(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    strip_generic(x, w, m, k, n, c0, c1, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn strip_avx2(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    strip_generic(x, w, m, k, n, c0, c1, out)
}

/// Output columns `c0..c1` of every row into `out` (`[m, c1 - c0]`): the accumulators stay in
/// L1 while the weight rows stream by, four at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn strip_generic(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    let s = c1 - c0;
    let row = |kk: usize| &w[kk * n + c0..kk * n + c1];
    let mut kk = 0;
    while kk + 4 <= k {
        let (w0, w1, w2, w3) = (row(kk), row(kk + 1), row(kk + 2), row(kk + 3));
        for r in 0..m {
            let xr = &x[r * k + kk..r * k + kk + 4];
            let (x0, x1, x2, x3) = (xr[0], xr[1], xr[2], xr[3]);
            let a = &mut out[r * s..(r + 1) * s];
            let (w0, w1, w2, w3) = (
                &w0[..a.len()],
                &w1[..a.len()],
                &w2[..a.len()],
                &w3[..a.len()],
            );
            for j in 0..a.len() {
                a[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
            }
        }
        kk += 4;
    }
    while kk < k {
        let w0 = row(kk);
        for r in 0..m {
            let x0 = x[r * k + kk];
            let a = &mut out[r * s..(r + 1) * s];
            for (aj, wj) in a.iter_mut().zip(w0) {
                *aj += x0 * wj;
            }
        }
        kk += 1;
    }
}

/// Reference twin: the textbook triple loop, `y += x w`.
pub fn matmul_reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) {
    for r in 0..m {
        for j in 0..n {
            let mut s = y[r * n + j];
            for kk in 0..k {
                s += x[r * k + kk] * w[kk * n + j];
            }
            y[r * n + j] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn skinny_matmul_matches_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (m, k, n) in [
            (1, 7, 5),
            (3, 64, 100),
            (8, 96, 1031),
            (9, 33, 2048),
            (16, 128, 64),
            (5, 1, 33),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            for init in [vec![0.0; m * n], b.repeat(m)] {
                let (mut y, mut z) = (init.clone(), init);
                matmul_skinny(&x, &w, m, k, n, &mut y);
                matmul_reference(&x, &w, m, k, n, &mut z);
                for (a, b) in y.iter().zip(&z) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{m}x{k}x{n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
