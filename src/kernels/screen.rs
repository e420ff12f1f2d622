//! Greedy decoding's LM head through a bfloat16 screen: the exact argmax of `x W` (the same
//! column [`super::panel::argmax_panels`] returns, bit for bit) in 1.5-1.75x less time.
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
use std::sync::atomic::{AtomicU32, Ordering};

/// Columns from which an LM head keeps a screen ([`crate::model::gpt_neox::Linear::build_screen`]):
/// below that the float32 head is a small share of a step and the screen's fixed costs (the
/// rows' norms, the candidates, the exact pass) take what it saves (the shipped models'
/// 4096-column heads read the same or 5% slower through it).
pub const MIN_COLUMNS: usize = 16384;

/// Relative margin on the whole bound, for the float32 arithmetic that computes it and the
/// interval ends.
const MARGIN: f64 = 1.01;
/// Magnitudes below this are rounded to zero (so that no product of two kept values is
/// subnormal, which `vdpbf16ps` flushes); each flushed value is accounted for in the bound.
const FLUSH: f32 = 1.0 / (1u64 << 40) as f32;
/// Largest row norm times column norm the bound's float32 arithmetic is trusted with.
const HUGE: f64 = 1e30;
/// Columns per tile of the weight layout: a pair of inputs of 16 columns is one vector.
const COLS: usize = 16;
/// Columns per parallel task (a multiple of [`COLS`]).
const TASK_COLS: usize = 1536;
/// Rows per row group (the rows one task screens together).
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
    /// `[kp / 2, COLS, 2]` (a pair of inputs per column, the columns side by side: one vector
    /// per pair), so that a tile streams in address order; the last tile and `kp` zero-padded.
    w: Vec<u16>,
    /// `‖w_j‖₂` per column, rounded up (zero-padded to whole tiles).
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
        let shared = Floors::new(m);
        let groups = m.div_ceil(GROUP_ROWS);
        let chunks = self.n.div_ceil(TASK_COLS);
        // Per task: its candidates (row, column, upper end).
        let parts: Vec<Vec<Candidate>> = (0..groups * chunks)
            .into_par_iter()
            .with_min_len(super::min_len())
            .map(|t| {
                let (g, c) = (t / chunks, t % chunks);
                let cols = c * TASK_COLS..((c + 1) * TASK_COLS).min(self.n);
                self.scan_group(&rows, g, cols, &shared)
            })
            .collect();
        // Every task has published its rows' best lower ends: `shared` holds each row's best.
        let mut cands: Vec<Candidate> = parts
            .into_iter()
            .flatten()
            .filter(|c| c.hi >= shared.get(c.row as usize))
            .collect();
        cands.sort_unstable_by_key(|c| (c.row, c.col));
        // Each row's candidates, in column order (every row has some: the column of its best
        // lower end reaches it).
        let runs: Vec<&[Candidate]> = cands.chunk_by(|a, b| a.row == b.row).collect();
        if runs.len() != m || runs.iter().any(|run| run.len() > MAX_CANDIDATES) {
            return None;
        }
        let out = runs
            .into_par_iter()
            .with_min_len(super::min_len())
            .map(|run| {
                let r = run[0].row as usize;
                let xr = &x[r * k..(r + 1) * k];
                let mut best = (0u32, f32::NEG_INFINITY);
                for c in run {
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

    /// The screen over columns `cols` for row group `g`: the columns whose upper end reached
    /// the row's best lower end when they were scanned. The task starts from the best lower
    /// ends that earlier tasks published in `shared`, and publishes its own there.
    fn scan_group(
        &self,
        rows: &Rows,
        g: usize,
        cols: std::ops::Range<usize>,
        shared: &Floors,
    ) -> Vec<Candidate> {
        let r0 = g * GROUP_ROWS;
        let live = (rows.m - r0).min(GROUP_ROWS);
        let mut st = ScanState {
            r0,
            best: [f32::NEG_INFINITY; GROUP_ROWS],
            cands: Vec::with_capacity(4 * live),
            prune_at: 16 * live,
        };
        for (i, b) in st.best[..live].iter_mut().enumerate() {
            *b = shared.get(r0 + i);
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the screen is built only where AVX-512 BF16 is present (`supported`).
            unsafe {
                if live <= SMALL_CALL_ROWS {
                    scan_few::<8, 3>(self, rows, live, cols, &mut st)
                } else {
                    scan_few::<6, 4>(self, rows, live, cols, &mut st)
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the screen is built only on x86-64 with AVX-512 BF16");
        st.prune();
        for (i, &b) in st.best[..live].iter().enumerate() {
            shared.raise(r0 + i, b);
        }
        st.cands
    }
}

/// Each row's best lower end found so far by any task of one call (float32 bits): a task
/// that starts from it keeps only the columns that can still beat it, instead of every
/// column until its own scan has found a good one (with 33 tasks a row, most of the
/// candidates; any lower end of a real column is a valid floor, so the order in which tasks
/// publish changes which columns are kept, never the answer).
struct Floors(Vec<AtomicU32>);

#[cfg(test)]
impl Clone for Floors {
    fn clone(&self) -> Floors {
        Floors(
            self.0
                .iter()
                .map(|a| AtomicU32::new(a.load(Ordering::Relaxed)))
                .collect(),
        )
    }
}

impl Floors {
    fn new(m: usize) -> Floors {
        Floors(
            (0..m)
                .map(|_| AtomicU32::new(f32::NEG_INFINITY.to_bits()))
                .collect(),
        )
    }

    fn get(&self, row: usize) -> f32 {
        f32::from_bits(self.0[row].load(Ordering::Relaxed))
    }

    /// Raises row `row`'s floor to `v` (if higher).
    fn raise(&self, row: usize, v: f32) {
        let a = &self.0[row];
        let mut cur = a.load(Ordering::Relaxed);
        while f32::from_bits(cur) < v {
            match a.compare_exchange_weak(cur, v.to_bits(), Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
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
    /// The group's first row.
    r0: usize,
    /// Best lower end per row of the group.
    best: [f32; GROUP_ROWS],
    /// Candidates (rows numbered in the whole batch).
    cands: Vec<Candidate>,
    /// Candidate count at which those below their row's best lower end are dropped.
    prune_at: usize,
}

impl ScanState {
    /// Drops the candidates below their row's best lower end so far.
    fn prune(&mut self) {
        let (best, r0) = (self.best, self.r0);
        self.cands.retain(|c| c.hi >= best[c.row as usize - r0]);
    }

    /// [`ScanState::prune`] once the list has grown to `prune_at`, which then keeps pruning
    /// cheap when many columns stay in the running.
    fn prune_if_long(&mut self) {
        if self.cands.len() >= self.prune_at {
            self.prune();
            self.prune_at = self.prune_at.max(2 * self.cands.len());
        }
    }
}

/// The rows of one call as the kernel reads them.
struct Rows {
    m: usize,
    /// The rows in bfloat16, `[m, kp]` (zero-padded).
    flat: Vec<u16>,
    /// Per row: the bound's factor on `‖w_j‖₂` (`c ‖h‖₂`, rounded up) and the
    /// allowance for the row's flushed values (`MARGIN 2^-40 √K ‖h‖₂`).
    factor: Vec<f32>,
    slack: Vec<f32>,
}

impl Rows {
    /// `None` for a row the bound cannot serve: non-finite, all zero, or so large that the
    /// bound's arithmetic could overflow.
    fn new(x: &[f32], m: usize, k: usize, sc: &ArgmaxScreen) -> Option<Rows> {
        let mut rows = Rows {
            m,
            flat: vec![0u16; m * sc.kp],
            factor: vec![0.0; m],
            slack: vec![0.0; m],
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
            for (f, &v) in rows.flat[r * sc.kp..].iter_mut().zip(h) {
                *f = to_bf16(v);
            }
            rows.factor[r] = up(sc.c * norm);
            rows.slack[r] = up(MARGIN * f64::from(FLUSH) * sqrt_k * norm);
        }
        Some(rows)
    }
}

/// The screen kernel over columns `cols` for the `live` rows from `r0`: register tiles of up to
/// `CH` rows broadcast against `TL` vectors of 16 columns (one pair of inputs each; see
/// [`SMALL_CALL_ROWS`]), then each (row, tile)'s intervals reduced to the row's best lower end, and the
/// candidates.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,fma")]
unsafe fn scan_few<const CH: usize, const TL: usize>(
    sc: &ArgmaxScreen,
    rows: &Rows,
    live: usize,
    cols: std::ops::Range<usize>,
    st: &mut ScanState,
) {
    debug_assert_eq!(cols.start % COLS, 0, "tasks start on a tile");
    let pairs = sc.kp / 2;
    let chunks = live.div_ceil(CH);
    let mut j = cols.start;
    while j < cols.end {
        let tiles = (cols.end - j).div_ceil(COLS);
        let step = if tiles >= TL { TL } else { 1 };
        // The next step's tiles (contiguous, one 64-byte line per pair and tile), fetched
        // while this step computes: each chunk of rows its share, at an even pace.
        let next_tiles = (tiles - step).min(TL);
        let next = sc.w.as_ptr().wrapping_add((j / COLS + step) * sc.kp * COLS);
        let lines = next_tiles * pairs;
        let mut r = 0;
        for ci in 0..chunks {
            let n = (live - r).min(CH);
            let a = Chunk {
                r,
                j,
                end: cols.end,
                pace: Pace {
                    next,
                    from: ci * lines / chunks,
                    to: (ci + 1) * lines / chunks,
                },
            };
            match (n, step == TL) {
                (8, true) => few::<8, TL>(sc, rows, a, st),
                (7, true) => few::<7, TL>(sc, rows, a, st),
                (6, true) => few::<6, TL>(sc, rows, a, st),
                (5, true) => few::<5, TL>(sc, rows, a, st),
                (4, true) => few::<4, TL>(sc, rows, a, st),
                (3, true) => few::<3, TL>(sc, rows, a, st),
                (2, true) => few::<2, TL>(sc, rows, a, st),
                (_, true) => few::<1, TL>(sc, rows, a, st),
                (8, false) => few::<8, 1>(sc, rows, a, st),
                (7, false) => few::<7, 1>(sc, rows, a, st),
                (6, false) => few::<6, 1>(sc, rows, a, st),
                (5, false) => few::<5, 1>(sc, rows, a, st),
                (4, false) => few::<4, 1>(sc, rows, a, st),
                (3, false) => few::<3, 1>(sc, rows, a, st),
                (2, false) => few::<2, 1>(sc, rows, a, st),
                (_, false) => few::<1, 1>(sc, rows, a, st),
            }
            r += n;
        }
        j += step * COLS;
    }
}

/// Register tiles of [`scan_few`], as (rows, tiles of 16 columns): up to 16 rows, 8 x 3 (two
/// chunks re-read a step's weights, not three: 16x768x50304 2.06-2.17 -> 1.79-1.93 ms); more
/// rows, 6 x 4 (at 64 rows 1-3% faster end to end than 8 x 3).
const SMALL_CALL_ROWS: usize = 16;

/// The lines `from..to` (64 bytes each) from `next` that one call of [`few`] prefetches.
#[derive(Clone, Copy)]
struct Pace {
    next: *const u16,
    from: usize,
    to: usize,
}

/// One call of [`few`]: its first row `r` within the row group, its first column `j` (a tile
/// boundary), the task's end column and its prefetch share.
#[derive(Clone, Copy)]
struct Chunk {
    r: usize,
    j: usize,
    end: usize,
    pace: Pace,
}

/// One pair of inputs of [`few`]: the `T` tiles' weight vectors against each row's pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn few_pair<const R: usize, const T: usize>(
    acc: &mut [[std::arch::x86_64::__m512; T]; R],
    wt: &[*const u16; T],
    xp: *const i32,
    pairs: usize,
    g: usize,
) {
    use std::arch::x86_64::*;
    let mut w = [bf16_pairs(_mm512_setzero_si512()); T];
    for (w, p) in w.iter_mut().zip(wt) {
        *w = bf16_pairs(_mm512_loadu_si512(p.add(g * 2 * COLS) as *const _));
    }
    for (i, row) in acc.iter_mut().enumerate() {
        let b = bf16_pairs(_mm512_set1_epi32(xp.add(i * pairs + g).read_unaligned()));
        for (a, w) in row.iter_mut().zip(&w) {
            *a = _mm512_dpbf16_ps(*a, *w, b);
        }
    }
}

/// `R` rows (rows `r..` of the group) against the `T` tiles from column `j`:
/// `R x T` accumulators of 16 columns each, then each (row, tile)'s intervals, the row's best
/// lower end (over the tile's live columns, below `end`) and the candidates.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,fma")]
#[inline(never)]
unsafe fn few<const R: usize, const T: usize>(
    sc: &ArgmaxScreen,
    rows: &Rows,
    Chunk { r, j, end, pace }: Chunk,
    st: &mut ScanState,
) {
    use std::arch::x86_64::*;
    let r0 = st.r0;
    let x = rows.flat.as_ptr().add((r0 + r) * sc.kp);
    let pairs = sc.kp / 2;
    let tile = sc.kp * COLS;
    let wp = sc.w.as_ptr().add(j / COLS * tile);
    let wt: [*const u16; T] = std::array::from_fn(|t| wp.add(t * tile));
    let xp = x as *const i32;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    // This call's share of the next tiles, spread over its pairs (no division in the loop).
    let (mut line, mut credit) = (pace.from, 0);
    let share = pace.to - pace.from;
    for g in 0..pairs {
        credit += share;
        while credit >= pairs {
            credit -= pairs;
            // A prefetch never faults; the pointer is only formed, never read.
            _mm_prefetch::<_MM_HINT_T0>(pace.next.wrapping_add(line * 32) as *const i8);
            line += 1;
        }
        few_pair(&mut acc, &wt, xp, pairs, g);
    }
    few_intervals(sc, rows, r, j, end, &acc, st);
}

/// The epilogue of [`few`]: per row, the intervals of its `16 T` columns (the live ones, below
/// `end`), one reduction of their lower ends into the row's best (a lane-wise maximum over the
/// tiles first), then the columns whose upper end reaches it (a quarter of the instructions of
/// a reduction and a comparison per tile, on every call).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn few_intervals<const R: usize, const T: usize>(
    sc: &ArgmaxScreen,
    rows: &Rows,
    r: usize,
    j: usize,
    end: usize,
    acc: &[[std::arch::x86_64::__m512; T]; R],
    st: &mut ScanState,
) {
    use std::arch::x86_64::*;
    // A call's tiles all start below `end` (`scan_few` takes `T` tiles only where as many
    // remain); only the last may be partial.
    let live: [__mmask16; T] = std::array::from_fn(|t| {
        let n = (end - (j + t * COLS)).min(COLS);
        (((1u32 << n) - 1) & 0xffff) as __mmask16
    });
    let norm: [__m512; T] =
        std::array::from_fn(|t| _mm512_loadu_ps(sc.norm.as_ptr().add(j + t * COLS)));
    let slack: [__m512; T] =
        std::array::from_fn(|t| _mm512_loadu_ps(sc.slack.as_ptr().add(j + t * COLS)));
    let ri0 = st.r0 + r;
    let (factor, row_slack) = (&rows.factor[ri0..ri0 + R], &rows.slack[ri0..ri0 + R]);
    for i in 0..R {
        let f = _mm512_set1_ps(factor[i]);
        let s = _mm512_set1_ps(row_slack[i]);
        let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut hi = [_mm512_setzero_ps(); T];
        for t in 0..T {
            let tt = _mm512_fmadd_ps(f, norm[t], _mm512_add_ps(s, slack[t]));
            top = _mm512_mask_max_ps(top, live[t], top, _mm512_sub_ps(acc[i][t], tt));
            hi[t] = _mm512_add_ps(acc[i][t], tt);
        }
        let top = _mm512_reduce_max_ps(top);
        if top > st.best[r + i] {
            st.best[r + i] = top;
        }
        let floor = _mm512_set1_ps(st.best[r + i]);
        for (t, hi) in hi.iter().enumerate() {
            let hit = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(live[t], *hi, floor);
            if hit != 0 {
                push_hits(st, ri0 + i, j + t * COLS, hit, *hi);
            }
        }
    }
    st.prune_if_long();
}

/// Appends the columns of `hit` (lanes of the tile from column `jt`) as candidates of row `ri`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn push_hits(
    st: &mut ScanState,
    ri: usize,
    jt: usize,
    hit: std::arch::x86_64::__mmask16,
    hi: std::arch::x86_64::__m512,
) {
    let mut his = [0f32; 16];
    std::arch::x86_64::_mm512_storeu_ps(his.as_mut_ptr(), hi);
    let mut bits = hit;
    while bits != 0 {
        let lane = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        st.cands.push(Candidate {
            row: ri as u32,
            col: (jt + lane) as u32,
            hi: his[lane],
        });
    }
}

/// 32 bfloat16 values (pairs of inputs) as the operand type of `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bf16_pairs(x: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<std::arch::x86_64::__m512i, std::arch::x86_64::__m512bh>(x) }
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
        // 300 equal columns: all stay candidates, more than a row may keep.
        let same: Vec<f32> = (0..k * n).map(|i| w[i / n * n]).collect();
        let packed = Panels::pack(&same, k, n);
        if let Some(screen) = ArgmaxScreen::build(&packed) {
            assert!(n > MAX_CANDIDATES);
            assert!(screen.argmax(&x, 4, &packed).is_none(), "equal columns");
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
            // A task that starts cold, and one that starts from the floor a task over the
            // other half of the columns published.
            let seeded = Floors::new(m);
            for g in 0..m.div_ceil(GROUP_ROWS) {
                sc.scan_group(&rows, g, n / 2 / COLS * COLS..n, &seeded);
            }
            for (g, floors) in
                (0..m.div_ceil(GROUP_ROWS)).flat_map(|g| [(g, Floors::new(m)), (g, seeded.clone())])
            {
                let cands = sc.scan_group(&rows, g, 0..n, &floors);
                for r in g * GROUP_ROWS..(m.min((g + 1) * GROUP_ROWS)) {
                    let floor = floors.get(r);
                    let y: Vec<f32> = (0..n)
                        .map(|j| exact_logit(&x[r * k..(r + 1) * k], packed.column(j).unwrap()))
                        .collect();
                    let top = y.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    assert!(
                        floor <= top,
                        "row {r}: floor {floor} above the maximum {top}"
                    );
                    let kept = cands.iter().filter(|c| c.row as usize == r).count();
                    assert!(kept < n / 4, "row {r}: {kept} of {n} columns kept");
                    for (j, &yj) in y.iter().enumerate() {
                        if yj >= floor {
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
