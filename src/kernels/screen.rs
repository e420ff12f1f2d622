//! Greedy decoding's LM head through a bfloat16 screen: the exact argmax of `x W` (the same
//! column [`super::panel::argmax_panels`] returns, bit for bit) at about twice the speed.
//!
//! A greedy step needs one column per row: the first one holding the row's largest logit, as
//! the float32 panel kernel computes it. The screen finds it in two passes:
//!
//! 1. **Screen.** Rows and weights rounded to bfloat16 (8 significant bits) are multiplied on
//!    AVX-512 BF16 (`vdpbf16ps`: 32 multiply-adds per instruction, about twice the float32 FMA
//!    rate), with float32 accumulation. The result `a_j` is within a proven bound `T_j` of the
//!    logit `y_j` the float32 kernel computes: each term's rounding is at most `2^-8` of each
//!    factor, the two accumulations round at most `γ` of the sum of magnitudes, and that sum
//!    is at most `‖h‖₂ ‖w_j‖₂` (Cauchy-Schwarz), so `T_j = c ‖h‖₂ ‖w_j‖₂` plus allowances for
//!    flushed tiny values, with margin for the float32 arithmetic of the bound itself. A
//!    column whose upper end `a_j + T_j` lies below the best lower end `max_i (a_i - T_i)`
//!    cannot hold the maximum.
//! 2. **Exact.** The few columns left (a handful of 50k for a random row) are recomputed in
//!    float32 exactly as the panel kernel computes them (one fused multiply-add per input, in
//!    input order, from zero), and the first maximum wins, as in the full scan.
//!
//! Rows the bound cannot serve (zeros, non-finite or huge values) and rows left with too many
//! columns make the call return `None`, and the caller takes the full float32 scan. The plain
//! twin is [`super::panel::argmax_panels`] (and the scan of the stored logits).

use super::panel::{Panels, PANEL};
use rayon::prelude::*;

/// Relative margin on the whole bound, for the float32 arithmetic that computes it and the
/// interval ends.
const MARGIN: f64 = 1.01;
/// Magnitudes below this are rounded to zero (so that no product of two kept values is
/// subnormal, which `vdpbf16ps` flushes); each flushed value is accounted for in the bound.
const FLUSH: f32 = 1.0 / (1u64 << 40) as f32;
/// Largest row norm times column norm the bound's float32 arithmetic is trusted with.
const HUGE: f64 = 1e30;
/// Columns per register tile of the screen kernel.
const COLS: usize = 6;
/// Bytes ahead of its reads that the screen kernel prefetches its weights.
const PREFETCH_AHEAD: usize = 4096;
/// Columns per parallel task (a multiple of [`COLS`]).
const TASK_COLS: usize = 1536;
/// Rows per row group: four vectors of 16 rows, one register tile's height.
const GROUP_ROWS: usize = 64;
/// Candidates a row may keep before the call gives up and the caller scans in full.
const MAX_CANDIDATES: usize = 256;

/// An LM head's weights for the screen: per column, contiguous bfloat16 values and the
/// column's terms of the error bound.
#[derive(Debug)]
pub struct ArgmaxScreen {
    k: usize,
    n: usize,
    /// `K` rounded up to even (the kernel multiplies pairs of inputs).
    kp: usize,
    /// The weights in bfloat16 (round to nearest even) as tiles of [`COLS`] columns, each
    /// `[kp / 2, COLS, 2]` (a pair of inputs per column, the columns side by side), so that a
    /// tile streams in address order; the last tile and `kp` zero-padded.
    w: Vec<u16>,
    /// `‖w_j‖₂` per column, rounded up.
    norm: Vec<f32>,
    /// Per column: the allowance for the column's flushed weights and for flushed partial
    /// sums (`MARGIN 2^-40 √K ‖w_j‖₂ + K 2^-124`).
    slack: Vec<f32>,
    /// The bound's factor on `‖h‖₂ ‖w_j‖₂`.
    c: f64,
    /// `max_j ‖w_j‖₂`.
    norm_max: f32,
}

/// Whether this CPU runs the screen kernel (AVX-512 with BF16).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How many times the float32 multiply-add rate this CPU's bfloat16 dot products run
/// (`vdpbf16ps` against `vfmadd` on register operands, every pool thread at once, about 0.1 s);
/// `None` without AVX-512 BF16. The roofline scales its measured float32 matmul rate by it
/// for the screened LM head.
pub fn rate_ratio() -> Option<f64> {
    if !supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Per thread: (float32 multiply-adds, bfloat16 multiply-adds) per second.
        let rates: Vec<(f64, f64)> = rayon::broadcast(|_| {
            // SAFETY: `supported` checked AVX-512 BF16 (and F).
            unsafe { rates() }
        });
        let (f, b) = rates
            .iter()
            .fold((0.0, 0.0), |(f, b), (x, y)| (f + x, b + y));
        (f > 0.0).then(|| b / f)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Rounds of [`rates`]' loops (12 independent accumulators each).
#[cfg(target_arch = "x86_64")]
const RATE_ROUNDS: usize = 1 << 21;

/// Multiply-adds per second of `$op`, an instruction of `$macs` multiply-adds updating the
/// accumulator `$x`, over 12 independent accumulators.
#[cfg(target_arch = "x86_64")]
macro_rules! rate {
    ($macs:expr, |$x:ident| $op:expr) => {{
        let mut acc = [_mm512_setzero_ps(); 12];
        let t = std::time::Instant::now();
        for _ in 0..RATE_ROUNDS {
            for $x in acc.iter_mut() {
                *$x = $op;
            }
        }
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(acc);
        (RATE_ROUNDS * 12 * $macs) as f64 / dt
    }};
}

/// This thread's float32 FMA and bfloat16 dot-product rates (multiply-adds per second).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rates() -> (f64, f64) {
    use std::arch::x86_64::*;
    let (a, b) = (
        _mm512_set1_ps(std::hint::black_box(1.0001f32)),
        _mm512_set1_ps(std::hint::black_box(0.9999f32)),
    );
    // A pair of bfloat16 ones.
    let one = bf16_pairs(_mm512_set1_epi32(std::hint::black_box(0x3f80_3f80)));
    let f32_rate = rate!(16, |x| _mm512_fmadd_ps(*x, a, b));
    let bf16_rate = rate!(32, |x| _mm512_dpbf16_ps(*x, one, one));
    (f32_rate, bf16_rate)
}

/// `v` in bfloat16, rounded to nearest even; magnitudes below [`FLUSH`] become zero. `v` must
/// be finite and at most `HUGE` in magnitude.
fn to_bf16(v: f32) -> u16 {
    if v.abs() < FLUSH {
        return 0;
    }
    let b = v.to_bits();
    let round = 0x7fff + ((b >> 16) & 1);
    ((b + round) >> 16) as u16
}

/// The next float32 above a non-negative finite `v`.
fn next_up(v: f32) -> f32 {
    if v.is_finite() {
        f32::from_bits(v.to_bits() + 1)
    } else {
        v
    }
}

/// `v` as float32, rounded up.
fn up(v: f64) -> f32 {
    next_up(v as f32)
}

impl ArgmaxScreen {
    /// The screen of a float32 panel matrix, or `None` where it cannot serve: `q8_0` panels,
    /// non-finite or huge weights, or a CPU without AVX-512 BF16.
    pub fn build(w: &Panels) -> Option<ArgmaxScreen> {
        if !supported() {
            return None;
        }
        let (k, n) = (w.k(), w.n());
        if k == 0 || n == 0 || w.is_q8_0() {
            return None;
        }
        let kp = k.div_ceil(2) * 2;
        // Per term: |h w - h_b w_b| <= (2 * 2^-8 + 2^-16) |h w|; the bfloat16 products summed
        // in float32 (at most 2K roundings, allowing round-toward-zero: 2u each) and the
        // float32 kernel's own sum (γ_K): in all at most c Σ|h w| <= c ‖h‖ ‖w_j‖.
        let u = f64::from(f32::EPSILON) / 2.0;
        let acc = 4.0 * k as f64 * u;
        let c = MARGIN * ((2.0f64).powi(-7) + (2.0f64).powi(-16) + 1.01 * acc + acc);
        let sqrt_k = (k as f64).sqrt();
        let flushed = f64::from(FLUSH);
        let tiles = n.div_ceil(COLS);
        let mut q = vec![0u16; tiles * kp * COLS];
        let mut norm = vec![0f32; tiles * COLS];
        let mut slack = vec![0f32; tiles * COLS];
        let ok = q
            .par_chunks_mut(kp * COLS)
            .zip(norm.par_chunks_mut(COLS))
            .zip(slack.par_chunks_mut(COLS))
            .enumerate()
            .all(|(t, ((qt, nt), st))| {
                for cc in 0..COLS.min(n - t * COLS) {
                    let col = w.column(t * COLS + cc).expect("float32 panels");
                    let mut sq = 0f64;
                    for kk in 0..k {
                        let v = col[kk * PANEL];
                        if !v.is_finite() || f64::from(v.abs()) > HUGE.sqrt() {
                            return false;
                        }
                        sq += f64::from(v) * f64::from(v);
                        qt[(kk / 2 * COLS + cc) * 2 + kk % 2] = to_bf16(v);
                    }
                    let norm = sq.sqrt() * (1.0 + 1e-12);
                    nt[cc] = up(norm);
                    st[cc] =
                        up(MARGIN * (flushed * sqrt_k * norm + k as f64 * (2.0f64).powi(-124)));
                }
                true
            });
        if !ok {
            return None;
        }
        let norm_max = norm.iter().fold(0f32, |a, &v| a.max(v));
        Some(ArgmaxScreen {
            k,
            n,
            kp,
            w: q,
            norm,
            slack,
            c,
            norm_max,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * self.w.len() + 4 * (self.norm.len() + self.slack.len())
    }

    /// For each row of `x [m, K]`, the first column holding the maximum of `x W` as the float32
    /// panel kernel computes it, and that maximum: [`super::panel::argmax_panels`]'s answer,
    /// bit for bit. `w` is the float32 matrix this screen was built from. `None` when a row's
    /// values or candidates rule the screen out (the caller then scans in full).
    pub fn argmax(&self, x: &[f32], m: usize, w: &Panels) -> Option<Vec<(u32, f32)>> {
        let k = self.k;
        assert_eq!(x.len(), m * k, "x shape");
        assert!(w.k() == k && w.n() == self.n, "screen and panels differ");
        if m == 0 {
            return Some(Vec::new());
        }
        let rows = Rows::new(x, m, k, self)?;
        let groups = m.div_ceil(GROUP_ROWS);
        let chunks = self.n.div_ceil(TASK_COLS);
        // Per task: its row group, the best lower end of each of its rows, and its candidates
        // (row, column, upper end).
        let parts: Vec<(usize, Vec<f32>, Vec<Candidate>)> = (0..groups * chunks)
            .into_par_iter()
            .with_min_len(super::min_len())
            .map(|t| {
                let (g, c) = (t / chunks, t % chunks);
                let cols = c * TASK_COLS..((c + 1) * TASK_COLS).min(self.n);
                let (best, cands) = self.scan_group(&rows, g, cols);
                (g, best, cands)
            })
            .collect();
        let mut floor = vec![f32::NEG_INFINITY; m];
        for (g, best, _) in &parts {
            for (f, b) in floor[g * GROUP_ROWS..].iter_mut().zip(best) {
                *f = f.max(*b);
            }
        }
        let mut cands: Vec<Candidate> = parts
            .into_iter()
            .flat_map(|(_, _, c)| c)
            .filter(|c| c.hi >= floor[c.row as usize])
            .collect();
        cands.sort_unstable_by_key(|c| (c.row, c.col));
        // Each row's run of candidates, in column order.
        let mut runs = vec![0..0; m];
        let mut i = 0;
        while i < cands.len() {
            let r = cands[i].row as usize;
            let j = i + cands[i..]
                .iter()
                .take_while(|c| c.row as usize == r)
                .count();
            if j - i > MAX_CANDIDATES {
                return None;
            }
            runs[r] = i..j;
            i = j;
        }
        let out = runs
            .into_par_iter()
            .enumerate()
            .with_min_len(super::min_len())
            .map(|(r, run)| {
                let xr = &x[r * k..(r + 1) * k];
                let mut best = (0u32, f32::NEG_INFINITY);
                for c in &cands[run] {
                    let y = exact_logit(xr, w.column(c.col as usize).expect("float32 panels"));
                    if y > best.1 {
                        best = (c.col, y);
                    }
                }
                best
            })
            .collect();
        Some(out)
    }

    /// The screen over columns `cols` for row group `g`: each row's best lower end and the
    /// columns whose upper end reached the row's best lower end when they were scanned.
    fn scan_group(
        &self,
        rows: &Rows,
        g: usize,
        cols: std::ops::Range<usize>,
    ) -> (Vec<f32>, Vec<Candidate>) {
        let r0 = g * GROUP_ROWS;
        let live = (rows.m - r0).min(GROUP_ROWS);
        let mut st = ScanState {
            best: [f32::NEG_INFINITY; GROUP_ROWS],
            cands: Vec::with_capacity(4 * live),
            prune_at: 16 * live,
        };
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the screen is built only where AVX-512 BF16 is present (`supported`).
            unsafe {
                match live.div_ceil(16) {
                    // Fewer rows, more columns at once: enough independent accumulators to
                    // hide the instruction's latency.
                    1 => scan_avx512::<1, { 4 * COLS }>(self, rows, r0, live, cols, &mut st),
                    2 => scan_avx512::<2, { 2 * COLS }>(self, rows, r0, live, cols, &mut st),
                    3 => scan_avx512::<3, COLS>(self, rows, r0, live, cols, &mut st),
                    _ => scan_avx512::<4, COLS>(self, rows, r0, live, cols, &mut st),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        scan_generic(self, rows, r0, live, cols, &mut st);
        st.prune();
        (st.best[..live].to_vec(), st.cands)
    }
}

/// The logit the float32 panel kernel computes for a row and a column (one fused multiply-add
/// per input, in input order, from zero; `col[kk * PANEL]` is weight `kk`).
fn exact_logit(x: &[f32], col: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA.
        return unsafe { exact_logit_fma(x, col) };
    }
    exact_logit_generic(x, col)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn exact_logit_fma(x: &[f32], col: &[f32]) -> f32 {
    exact_logit_generic(x, col)
}

#[inline(always)]
fn exact_logit_generic(x: &[f32], col: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (kk, &xv) in x.iter().enumerate() {
        acc = xv.mul_add(col[kk * PANEL], acc);
    }
    acc
}

/// A column still in the running for a row, with the upper end of its interval.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    row: u32,
    col: u32,
    hi: f32,
}

/// One task's running state over its row group.
struct ScanState {
    /// Best lower end per row of the group.
    best: [f32; GROUP_ROWS],
    /// Candidates (rows numbered in the whole batch).
    cands: Vec<Candidate>,
    /// Candidate count at which those below their row's best lower end are dropped.
    prune_at: usize,
}

impl ScanState {
    fn prune(&mut self) {
        if let Some(r0) = self
            .cands
            .first()
            .map(|c| c.row as usize / GROUP_ROWS * GROUP_ROWS)
        {
            let best = self.best;
            self.cands.retain(|c| c.hi >= best[c.row as usize - r0]);
        }
    }
}

/// The rows of one call as the kernel reads them.
struct Rows {
    m: usize,
    /// Per block of 16 rows `[kp / 2, 16 rows, 2]` bfloat16 values (rows padded with zeros).
    act: Vec<u16>,
    /// Per row (padded to 16): the bound's factor on `‖w_j‖₂` (`c ‖h‖₂`, rounded up) and the
    /// allowance for the row's flushed values (`MARGIN 2^-40 √K ‖h‖₂`).
    factor: Vec<f32>,
    slack: Vec<f32>,
}

impl Rows {
    /// `None` for a row the bound cannot serve: non-finite, all zero, or so large that the
    /// bound's arithmetic could overflow.
    fn new(x: &[f32], m: usize, k: usize, sc: &ArgmaxScreen) -> Option<Rows> {
        let blocks = m.div_ceil(16);
        let pairs = sc.kp / 2;
        let mut rows = Rows {
            m,
            act: vec![0u16; blocks * pairs * 32],
            factor: vec![0.0; blocks * 16],
            slack: vec![0.0; blocks * 16],
        };
        let sqrt_k = (k as f64).sqrt();
        for r in 0..m {
            let h = &x[r * k..(r + 1) * k];
            let mut sq = 0f64;
            for &v in h {
                if !v.is_finite() {
                    return None;
                }
                sq += f64::from(v) * f64::from(v);
            }
            let norm = sq.sqrt() * (1.0 + 1e-12);
            if norm == 0.0 || norm * f64::from(sc.norm_max.max(1.0)) > HUGE {
                return None;
            }
            let (b, lane) = (r / 16, r % 16);
            for (kk, &v) in h.iter().enumerate() {
                rows.act[((b * pairs + kk / 2) * 16 + lane) * 2 + kk % 2] = to_bf16(v);
            }
            rows.factor[r] = up(sc.c * norm);
            rows.slack[r] = up(MARGIN * f64::from(FLUSH) * sqrt_k * norm);
        }
        Some(rows)
    }
}

/// The per-row vectors of one row group in the screen kernel (`RV` vectors of 16 rows).
#[cfg(target_arch = "x86_64")]
struct Lanes<const RV: usize> {
    r0: usize,
    factor: [std::arch::x86_64::__m512; RV],
    slack: [std::arch::x86_64::__m512; RV],
    /// Running best lower end.
    best: [std::arch::x86_64::__m512; RV],
    /// Live rows of each vector.
    mask: [u16; RV],
}

/// The screen kernel over columns `cols` for rows `r0..r0 + live` (`RV` vectors of 16 rows):
/// a register tile of `RV x COLS` float32 accumulators over the bfloat16 products (rows in
/// lanes, each column's pair of weights broadcast), then each column's interval, the running
/// best lower end per row and the candidates.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,fma")]
unsafe fn scan_avx512<const RV: usize, const W: usize>(
    sc: &ArgmaxScreen,
    rows: &Rows,
    r0: usize,
    live: usize,
    cols: std::ops::Range<usize>,
    st: &mut ScanState,
) {
    use std::arch::x86_64::*;
    let pairs = sc.kp / 2;
    let act = rows.act.as_ptr().add(r0 / 16 * pairs * 32);
    let mut ln = Lanes::<RV> {
        r0,
        factor: [_mm512_setzero_ps(); RV],
        slack: [_mm512_setzero_ps(); RV],
        best: [_mm512_set1_ps(f32::NEG_INFINITY); RV],
        mask: [0; RV],
    };
    for i in 0..RV {
        ln.factor[i] = _mm512_loadu_ps(rows.factor.as_ptr().add(r0 + 16 * i));
        ln.slack[i] = _mm512_loadu_ps(rows.slack.as_ptr().add(r0 + 16 * i));
        let n = live.saturating_sub(16 * i).min(16);
        ln.mask[i] = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
    }
    let mut j = cols.start;
    debug_assert_eq!(j % COLS, 0, "tasks start on a tile");
    while j < cols.end {
        if cols.end - j >= W {
            let acc = products::<RV, W>(sc, act, j);
            finish(sc, &mut ln, acc, j, W, st);
            j += W;
        } else {
            let c = COLS.min(cols.end - j);
            let acc = products::<RV, COLS>(sc, act, j);
            finish(sc, &mut ln, acc, j, c, st);
            j += c;
        }
    }
    for (i, b) in ln.best.iter().enumerate() {
        _mm512_storeu_ps(st.best.as_mut_ptr().add(16 * i), *b);
    }
}

/// The screened products of `RV` vectors of 16 rows (`act`) with the `W / COLS` tiles of
/// columns from column `j` (a multiple of [`COLS`]): a register tile of float32 accumulators
/// (rows in lanes, each column's pair of weights broadcast), the tiles read in address order
/// and prefetched ahead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn products<const RV: usize, const W: usize>(
    sc: &ArgmaxScreen,
    act: *const u16,
    j: usize,
) -> [[std::arch::x86_64::__m512; W]; RV] {
    use std::arch::x86_64::*;
    let pairs = sc.kp / 2;
    let tile = sc.kp * COLS;
    let wp = sc.w.as_ptr().add(j / COLS * tile) as *const i32;
    let mut acc = [[_mm512_setzero_ps(); W]; RV];
    for g in 0..pairs {
        if g % 4 == 0 {
            // 4 pairs x 6 columns x 4 bytes = 96 bytes of each tile: its next lines, ahead. A
            // prefetch never faults, and the pointer is only formed, never read.
            for t in 0..W / COLS {
                let pf = wp.wrapping_add(t * tile / 2 + PREFETCH_AHEAD / 4 + g * COLS) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(pf);
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
            }
        }
        let mut a = [bf16_pairs(_mm512_setzero_si512()); RV];
        for (i, a) in a.iter_mut().enumerate() {
            *a = bf16_pairs(_mm512_loadu_si512(act.add((i * pairs + g) * 32) as *const _));
        }
        for t in 0..W / COLS {
            let wt = wp.add(t * tile / 2 + g * COLS);
            for c in 0..COLS {
                let b = bf16_pairs(_mm512_set1_epi32(wt.add(c).read_unaligned()));
                for (row, a) in acc.iter_mut().zip(&a) {
                    let x = &mut row[t * COLS + c];
                    *x = _mm512_dpbf16_ps(*x, *a, b);
                }
            }
        }
    }
    acc
}

/// 32 bfloat16 values (pairs of inputs) as the operand type of `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bf16_pairs(x: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<std::arch::x86_64::__m512i, std::arch::x86_64::__m512bh>(x) }
}

/// The intervals of the `c` columns from `j` whose screened products are in `acc`: the
/// running best lower ends, and the candidates whose upper end reaches them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn finish<const RV: usize, const W: usize>(
    sc: &ArgmaxScreen,
    ln: &mut Lanes<RV>,
    acc: [[std::arch::x86_64::__m512; W]; RV],
    j: usize,
    c: usize,
    st: &mut ScanState,
) {
    use std::arch::x86_64::*;
    for cc in 0..c {
        let jj = j + cc;
        let norm = _mm512_set1_ps(sc.norm[jj]);
        let slack = _mm512_set1_ps(sc.slack[jj]);
        for (i, row) in acc.iter().enumerate() {
            let y = row[cc];
            let t = _mm512_fmadd_ps(ln.factor[i], norm, _mm512_add_ps(ln.slack[i], slack));
            let hi = _mm512_add_ps(y, t);
            ln.best[i] = _mm512_max_ps(ln.best[i], _mm512_sub_ps(y, t));
            let hit = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(ln.mask[i], hi, ln.best[i]);
            if hit != 0 {
                let mut his = [0f32; 16];
                _mm512_storeu_ps(his.as_mut_ptr(), hi);
                let mut bits = hit;
                while bits != 0 {
                    let lane = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    st.cands.push(Candidate {
                        row: (ln.r0 + 16 * i + lane) as u32,
                        col: jj as u32,
                        hi: his[lane],
                    });
                }
            }
        }
    }
    if st.cands.len() >= st.prune_at {
        for (i, b) in ln.best.iter().enumerate() {
            _mm512_storeu_ps(st.best.as_mut_ptr().add(16 * i), *b);
        }
        st.prune();
        // Keep pruning cheap when many columns stay in the running.
        st.prune_at = st.prune_at.max(2 * st.cands.len());
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn scan_generic(
    _sc: &ArgmaxScreen,
    _rows: &Rows,
    _r0: usize,
    _live: usize,
    _cols: std::ops::Range<usize>,
    _st: &mut ScanState,
) {
    unreachable!("the screen is built only on x86-64 with AVX-512 BF16")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::panel::argmax_panels;
    use rand::{Rng, SeedableRng};

    fn randn(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Sum of uniforms: a bell shape with occasional larger values.
                let s: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
                s * std
            })
            .collect()
    }

    /// The screen's answer equals the full float32 scan's, bit for bit.
    fn check(x: &[f32], m: usize, k: usize, n: usize, w: &[f32], what: &str) {
        let packed = Panels::pack(w, k, n);
        let Some(screen) = ArgmaxScreen::build(&packed) else {
            assert!(!supported(), "{what}: no screen on a VNNI CPU");
            return;
        };
        let want = argmax_panels(x, m, &packed);
        let got = screen.argmax(x, m, &packed).expect(what);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.0, w.0, "{what}: row {r} column");
            assert_eq!(g.1.to_bits(), w.1.to_bits(), "{what}: row {r} value");
        }
    }

    #[test]
    fn screened_argmax_equals_the_full_scan() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(m, k, n) in &[
            (1, 64, 100),
            (3, 30, 1000),
            (16, 256, 5000),
            (17, 128, 3001),
            (64, 256, 4000),
            (70, 96, 2000),
            (130, 64, 1537),
        ] {
            let w = randn(&mut rng, k * n, 0.02);
            let x = randn(&mut rng, m * k, 1.0);
            check(&x, m, k, n, &w, &format!("{m}x{k}x{n}"));
        }
    }

    #[test]
    fn ties_and_near_ties_keep_the_first_maximum() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (m, k, n) = (20, 64, 700);
        let mut w = randn(&mut rng, k * n, 0.05);
        // Column 600 repeats column 3 (an exact tie), column 650 differs from column 5 by one
        // unit in the last place of a few weights (a near tie far below the int8 step).
        for kk in 0..k {
            w[kk * n + 600] = w[kk * n + 3];
            let v = w[kk * n + 5];
            w[kk * n + 650] = if kk % 7 == 0 {
                f32::from_bits(v.to_bits() + 1)
            } else {
                v
            };
        }
        // Rows aligned with the tied columns, so that they hold the maximum.
        let mut x = randn(&mut rng, m * k, 0.1);
        for r in 0..m {
            let src = if r % 2 == 0 { 3 } else { 5 };
            for kk in 0..k {
                x[r * k + kk] += 10.0 * w[kk * n + src];
            }
        }
        check(&x, m, k, n, &w, "ties");
    }

    #[test]
    fn degenerate_rows_fall_back_and_odd_weights_still_match() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (k, n) = (32, 300);
        let mut w = randn(&mut rng, k * n, 1.0);
        // A zero column, a column of one large weight, a column of tiny (flushed) weights.
        for kk in 0..k {
            w[kk * n + 10] = 0.0;
            w[kk * n + 11] = if kk == 0 { 1e6 } else { 0.0 };
            w[kk * n + 12] = 1e-30 * (kk as f32 - 16.0);
        }
        let x = randn(&mut rng, 4 * k, 1.0);
        check(&x, 4, k, n, &w, "odd columns");
        let packed = Panels::pack(&w, k, n);
        if let Some(screen) = ArgmaxScreen::build(&packed) {
            let zero = vec![0f32; 2 * k];
            assert!(screen.argmax(&zero, 2, &packed).is_none(), "a zero row");
            let mut bad = x.clone();
            bad[5] = f32::NAN;
            assert!(screen.argmax(&bad, 4, &packed).is_none(), "a NaN input");
            assert_eq!(screen.argmax(&[], 0, &packed), Some(Vec::new()));
        }
        let mut inf = w.clone();
        inf[7] = f32::INFINITY;
        assert!(ArgmaxScreen::build(&Panels::pack(&inf, k, n)).is_none());
    }

    #[test]
    fn every_column_that_can_hold_the_maximum_stays_a_candidate() {
        if !supported() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for &(m, k, n, std) in &[(37, 72, 50, 0.3), (64, 256, 3000, 0.02), (5, 31, 400, 1.0)] {
            let w = randn(&mut rng, k * n, std);
            let x = randn(&mut rng, m * k, 1.0);
            let packed = Panels::pack(&w, k, n);
            let sc = ArgmaxScreen::build(&packed).unwrap();
            let rows = Rows::new(&x, m, k, &sc).unwrap();
            for g in 0..m.div_ceil(GROUP_ROWS) {
                let (best, cands) = sc.scan_group(&rows, g, 0..n);
                for (i, floor) in best.iter().enumerate() {
                    let r = g * GROUP_ROWS + i;
                    let y: Vec<f32> = (0..n)
                        .map(|j| exact_logit(&x[r * k..(r + 1) * k], packed.column(j).unwrap()))
                        .collect();
                    let top = y.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    assert!(
                        *floor <= top,
                        "row {r}: floor {floor} above the maximum {top}"
                    );
                    let kept = cands.iter().filter(|c| c.row as usize == r).count();
                    assert!(kept < n / 4, "row {r}: {kept} of {n} columns kept");
                    for (j, &yj) in y.iter().enumerate() {
                        if yj >= *floor {
                            assert!(
                                cands
                                    .iter()
                                    .any(|c| c.row as usize == r && c.col as usize == j),
                                "row {r} column {j} ({yj} >= floor {floor}) missing"
                            );
                        }
                    }
                }
            }
        }
    }
}
