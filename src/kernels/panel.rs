//! Decode-shaped matmul `y[M, N] += x[M, K] · W[K, N]` over weights packed once into column
//! panels, for the few rows of batched decoding (M up to a few dozen).
//!
//! At these shapes a weight is used by only M multiply-adds, so the time is the weight stream:
//! the kernel must read each weight once, in address order, while the FMAs keep up. Packing at
//! load time puts each panel of [`PANEL`] columns in one contiguous run (`[K, PANEL]`), so a
//! panel streams sequentially through the prefetchers instead of touching K rows `4 N` bytes
//! apart (the row-major layout's pattern, which costs a TLB walk per row for the LM head). The
//! micro-kernel keeps a tile of up to [`TILE_ROWS`] rows x [`PANEL`] columns in registers;
//! later row tiles of the same panel read it from L2.
//!
//! Panels may hold `q8_0` weights instead ([`Panels::pack_q8_0`]: int8, one float16 scale per
//! 32 inputs of a column, ~3.8x fewer bytes); the kernel widens and scales them in registers,
//! so a memory-bound product streams a quarter of the bytes while the arithmetic stays float32.
//!
//! [`super::matmul::matmul_reference`] (on the unpacked matrix) is the plain twin.

use super::{ops, OutPtr};
use half::f16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// Columns per panel (two AVX-512 vectors).
pub const PANEL: usize = 32;
/// Most rows per register tile (12 x 2 accumulators of the 32 vector registers).
pub const TILE_ROWS: usize = 12;
/// Floats ahead of the current weight row that the micro-kernel prefetches (4 KiB).
const PREFETCH: usize = 1024;
/// Bytes of `x` per row block at prefill sizes (a share of L2).
const X_BLOCK_BYTES: usize = 256 << 10;
/// Inputs per `q8_0` block (one scale per block and column).
pub const Q8_BLOCK: usize = 32;
/// Bytes per `q8_0` weight: a block holds its int8 values and a float16 scale (8.5 bits).
pub const Q8_BYTES_PER_WEIGHT: f64 = (Q8_BLOCK + 2) as f64 / Q8_BLOCK as f64;

/// A `[K, N]` weight matrix as `ceil(N / PANEL)` panels of `[K, PANEL]` weights (the last one
/// zero-padded).
#[derive(Clone, Debug)]
pub struct Panels {
    k: usize,
    n: usize,
    data: Data,
}

#[derive(Clone, Debug)]
enum Data {
    F32(Vec<f32>),
    /// Per panel `[K, PANEL]` int8 values and `[K / Q8_BLOCK, PANEL]` scales.
    Q8 {
        q: Vec<i8>,
        scale: Vec<f16>,
    },
}

/// One panel as the kernels read it: weight `(kk, c)` is `w[kk * PANEL + c]`, or for `q8_0`
/// `q[kk * PANEL + c] * scale[kk / Q8_BLOCK * PANEL + c]`.
#[derive(Clone, Copy)]
enum Panel<'a> {
    F32(&'a [f32]),
    Q8 { q: &'a [i8], scale: &'a [f16] },
}

impl Panels {
    /// Packs a row-major `[K, N]` matrix.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight shape");
        Self::build(k, n, |kk, j| w[kk * n + j])
    }

    /// Packs a row-major `[K, N]` matrix as `q8_0` (`K` a multiple of [`Q8_BLOCK`]): each
    /// column's block of 32 inputs becomes int8 values `round(w / d)` with `d = max |w| / 127`
    /// held as float16, the weights of ggml's `q8_0` exactly.
    pub fn pack_q8_0(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight shape");
        assert_eq!(
            k % Q8_BLOCK,
            0,
            "q8_0 needs K to be a multiple of {Q8_BLOCK}"
        );
        let panels = n.div_ceil(PANEL);
        let mut q = vec![0i8; panels * k * PANEL];
        let mut scale = vec![f16::ZERO; panels * (k / Q8_BLOCK) * PANEL];
        q.par_chunks_mut(k * PANEL)
            .zip(scale.par_chunks_mut(k / Q8_BLOCK * PANEL))
            .enumerate()
            .for_each(|(p, (q, scale))| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    let j = p * PANEL + c;
                    for b in 0..k / Q8_BLOCK {
                        let rows = b * Q8_BLOCK..(b + 1) * Q8_BLOCK;
                        let amax = rows
                            .clone()
                            .map(|kk| w[kk * n + j].abs())
                            .fold(0.0, f32::max);
                        let d = amax / 127.0;
                        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                        for kk in rows {
                            q[kk * PANEL + c] = (w[kk * n + j] * id).round() as i8;
                        }
                        scale[b * PANEL + c] = f16::from_f32(d);
                    }
                }
            });
        Self {
            k,
            n,
            data: Data::Q8 { q, scale },
        }
    }

    /// Packs the `[K, N]` matrix whose entry `(kk, j)` is `at(kk, j)`, on the calling thread
    /// (for small matrices packed inside parallel tasks, e.g. a head's keys, transposed).
    pub fn from_fn(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let mut data = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
        for (p, panel) in data.chunks_mut(k * PANEL).enumerate() {
            fill_panel(panel, p, k, n, &at);
        }
        Self {
            k,
            n,
            data: Data::F32(data),
        }
    }

    /// [`Panels::from_fn`] with the panels filled in parallel (whole weight matrices).
    fn build(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let mut data = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
        data.par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(p, panel)| fill_panel(panel, p, k, n, &at));
        Self {
            k,
            n,
            data: Data::F32(data),
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether the weights are `q8_0`.
    pub fn is_q8_0(&self) -> bool {
        matches!(self.data, Data::Q8 { .. })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(w) => w.len() * 4,
            Data::Q8 { q, scale } => q.len() + scale.len() * 2,
        }
    }

    /// The weights as row-major `[K, N]` floats (a `q8_0` matrix dequantized).
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        let mut buf = vec![0f32; k * PANEL];
        for p in 0..n.div_ceil(PANEL) {
            let panel = self.panel(p).to_f32(&mut buf);
            for kk in 0..k {
                for c in 0..PANEL.min(n - p * PANEL) {
                    w[kk * n + p * PANEL + c] = panel[kk * PANEL + c];
                }
            }
        }
        w
    }

    /// Column `j` of a float32 matrix: weight `(kk, j)` is `col[kk * PANEL]` (`None` for
    /// `q8_0`). The same floats the tiles read, for recomputing single outputs exactly.
    pub fn column(&self, j: usize) -> Option<&[f32]> {
        assert!(j < self.n, "column {j} of {}", self.n);
        match &self.data {
            Data::F32(w) => {
                let start = (j / PANEL) * self.k * PANEL + j % PANEL;
                Some(&w[start..start + (self.k - 1) * PANEL + 1])
            }
            Data::Q8 { .. } => None,
        }
    }

    fn panel(&self, p: usize) -> Panel<'_> {
        let k = self.k;
        match &self.data {
            Data::F32(w) => Panel::F32(&w[p * k * PANEL..(p + 1) * k * PANEL]),
            Data::Q8 { q, scale } => {
                let kb = k / Q8_BLOCK;
                Panel::Q8 {
                    q: &q[p * k * PANEL..(p + 1) * k * PANEL],
                    scale: &scale[p * kb * PANEL..(p + 1) * kb * PANEL],
                }
            }
        }
    }
}

impl<'a> Panel<'a> {
    /// The panel's float32 weights: itself, or a `q8_0` panel dequantized into `buf`.
    fn to_f32<'b>(self, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Panel::F32(w) => w,
            Panel::Q8 { q, scale } => {
                let buf = &mut buf[..q.len()];
                for (b, (qb, wb)) in q
                    .chunks(Q8_BLOCK * PANEL)
                    .zip(buf.chunks_mut(Q8_BLOCK * PANEL))
                    .enumerate()
                {
                    let mut s = [0f32; PANEL];
                    for (c, s) in s.iter_mut().enumerate() {
                        *s = scale[b * PANEL + c].to_f32();
                    }
                    for (qr, wr) in qb.chunks(PANEL).zip(wb.chunks_mut(PANEL)) {
                        for ((w, &q), &s) in wr.iter_mut().zip(qr).zip(&s) {
                            *w = q as f32 * s;
                        }
                    }
                }
                buf
            }
        }
    }
}

/// Panel `p` (`[k, PANEL]`, zero beyond column `n`) of the matrix whose entry `(kk, j)` is
/// `at(kk, j)`.
fn fill_panel(panel: &mut [f32], p: usize, k: usize, n: usize, at: impl Fn(usize, usize) -> f32) {
    for kk in 0..k {
        for c in 0..PANEL.min(n - p * PANEL) {
            panel[kk * PANEL + c] = at(kk, p * PANEL + c);
        }
    }
}

/// What a product does with each element `v` of `x W` as it leaves the registers.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// `y += v`
    Add,
    /// `y = v`
    Store,
    /// `y = v + b[column]`
    Bias(&'a [f32]),
    /// `y = gelu(v + b[column])`, exact (erf) when `true`, else the tanh form
    /// ([`ops::gelu_one`]).
    BiasGelu(&'a [f32], bool),
}

impl Epilogue<'_> {
    fn reads_y(&self) -> bool {
        matches!(self, Epilogue::Add)
    }

    fn bias(&self) -> Option<&[f32]> {
        match self {
            Epilogue::Bias(b) | Epilogue::BiasGelu(b, _) => Some(b),
            _ => None,
        }
    }

    /// The same epilogue for the columns from `col` on (a panel's share of the bias).
    fn at(self, col: usize) -> Self {
        match self {
            Epilogue::Bias(b) => Epilogue::Bias(&b[col..]),
            Epilogue::BiasGelu(b, exact) => Epilogue::BiasGelu(&b[col..], exact),
            other => other,
        }
    }

    /// The scalar form (the reference tile).
    fn apply(&self, y: f32, v: f32, col: usize) -> f32 {
        match *self {
            Epilogue::Add => y + v,
            Epilogue::Store => v,
            Epilogue::Bias(b) => v + b[col],
            Epilogue::BiasGelu(b, exact) => ops::gelu_one(v + b[col], exact),
        }
    }
}

/// `y += x W`: `x` is `[m, K]`, `y` is `[m, N]`, both row-major.
pub fn matmul_panels(x: &[f32], m: usize, w: &Panels, y: &mut [f32]) {
    matmul_panels_with(x, m, w, y, Epilogue::Add)
}

/// `x W` into `y` (`[m, N]`) through `epi`: the bias and the activation of a linear layer
/// are applied in registers, so `y` is written once and never read (a separate bias fill,
/// accumulation and activation pass would each stream it through memory).
pub fn matmul_panels_with(x: &[f32], m: usize, w: &Panels, y: &mut [f32], epi: Epilogue) {
    assert_eq!(y.len(), m * w.n, "y shape");
    if let Some(b) = epi.bias() {
        assert_eq!(b.len(), w.n, "bias length");
    }
    // SAFETY: y holds m * n floats.
    unsafe { run(x, m, w, y.as_mut_ptr(), epi) }
}

/// `x W` into a new `[m, N]` buffer, written once without a zero-fill first (the LM head's
/// logits: megabytes per step).
pub fn matmul_panels_new(x: &[f32], m: usize, w: &Panels) -> Vec<f32> {
    let mut y = Vec::with_capacity(m * w.n);
    // SAFETY: the buffer has room for m * n floats; `run` stores every one of them (each
    // panel's valid columns of every row), so the length can then cover them.
    unsafe {
        run(x, m, w, y.as_mut_ptr(), Epilogue::Store);
        y.set_len(m * w.n);
    }
    y
}

/// For each row of `x W`, the first column holding the row's maximum (NaN never wins) and
/// that maximum, without writing the product: each task's tiles land in a panel-sized buffer
/// that stays in L1 and is reduced at once (greedy decoding's LM head: the `[m, vocab]` logits
/// are never written nor read back). Same answer as [`crate::generate::sampling::argmax`] on
/// the rows of [`matmul_panels_new`], bit for bit.
pub fn argmax_panels(x: &[f32], m: usize, w: &Panels) -> Vec<(u32, f32)> {
    let (k, n) = (w.k, w.n);
    assert_eq!(x.len(), m * k, "x shape");
    let mut out = vec![(0u32, f32::NEG_INFINITY); m];
    if m == 0 || n == 0 {
        return out;
    }
    // Per task: its first row and the best (column, value) of each of its rows.
    let parts: Vec<(usize, Vec<(u32, f32)>)> = tasks(m, k, n)
        .map(|(rows, panels)| {
            let x = &x[rows.start * k..rows.end * k];
            let mut buf = vec![0f32; rows.len() * PANEL];
            let mut best = vec![(0u32, f32::NEG_INFINITY); rows.len()];
            for p in panels {
                let cols = PANEL.min(n - p * PANEL);
                // SAFETY: `buf` holds the task's rows of PANEL floats (row stride PANEL >= cols).
                unsafe {
                    panel_rows(
                        x,
                        k,
                        w.panel(p),
                        0..rows.len(),
                        buf.as_mut_ptr(),
                        PANEL,
                        cols,
                        Epilogue::Store,
                    )
                }
                for (r, best) in best.iter_mut().enumerate() {
                    let v = &buf[r * PANEL..r * PANEL + cols];
                    let top = ops::max_value(v);
                    if top > best.1 {
                        let c = v.iter().position(|&y| y == top).unwrap_or(0);
                        *best = ((p * PANEL + c) as u32, top);
                    }
                }
            }
            (rows.start, best)
        })
        .collect();
    // Tasks of one row block come in column order: a later one wins only with a larger value.
    for (m0, part) in parts {
        for (o, (c, v)) in out[m0..].iter_mut().zip(part) {
            if v > o.1 {
                *o = (c, v);
            }
        }
    }
    out
}

/// The parallel tasks of an `[m, k] x [k, n]` panel product, each `(rows, panels)`: row blocks
/// whose `x` stays in L2 while the panels stream past (all rows at decode sizes), then
/// contiguous runs of panels, a few tasks per thread for balance; the tasks of a row block
/// come in column order.
fn tasks(
    m: usize,
    k: usize,
    n: usize,
) -> impl IndexedParallelIterator<Item = (Range<usize>, Range<usize>)> {
    let panels = n.div_ceil(PANEL);
    let mb = if m <= 64 {
        m
    } else {
        ((X_BLOCK_BYTES / (4 * k)) / TILE_ROWS * TILE_ROWS).max(TILE_ROWS)
    };
    let mblocks = m.div_ceil(mb);
    let runs = (4 * rayon::current_num_threads())
        .div_ceil(mblocks)
        .min(panels)
        .max(1);
    let per = panels.div_ceil(runs);
    let runs = panels.div_ceil(per);
    (0..mblocks * runs)
        .into_par_iter()
        .with_min_len(super::min_len())
        .map(move |t| {
            let (b, run) = (t / runs, t % runs);
            (
                b * mb..((b + 1) * mb).min(m),
                run * per..((run + 1) * per).min(panels),
            )
        })
}

/// [`matmul_panels_with`] into `y` (`m * N` floats).
///
/// # Safety
/// `y` must be valid for writes of `m * N` floats (and reads, when `epi` adds).
unsafe fn run(x: &[f32], m: usize, w: &Panels, y: *mut f32, epi: Epilogue) {
    let (k, n) = (w.k, w.n);
    assert_eq!(x.len(), m * k, "x shape");
    if m == 0 || n == 0 {
        return;
    }
    let out = OutPtr(y);
    tasks(m, k, n).for_each(|(rows, panels)| {
        for p in panels {
            let cols = PANEL.min(n - p * PANEL);
            // SAFETY: panel p owns output columns [p * PANEL, p * PANEL + cols) of these
            // rows; `y` outlives the loop and has m * n elements.
            unsafe {
                panel_rows(
                    x,
                    k,
                    w.panel(p),
                    rows.clone(),
                    out.get().add(p * PANEL),
                    n,
                    cols,
                    epi.at(p * PANEL),
                )
            }
        }
    });
}

/// `y[m, ..cols] = x[m, k] · W[..k, ..cols]` on the calling thread, over the leading `k` rows
/// and `cols` columns of `w` (`x` has row stride `k`, `y` row stride `ldy`; other columns of
/// `y` are left as they are).
pub fn matmul_panels_serial(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Panels,
    cols: usize,
    y: &mut [f32],
    ldy: usize,
) {
    assert!(k <= w.k && cols <= w.n && ldy >= cols, "panel sub-matrix");
    assert!(x.len() >= m * k, "x shape");
    if m == 0 || cols == 0 {
        return;
    }
    assert!(y.len() >= (m - 1) * ldy + cols, "y shape");
    for p in 0..cols.div_ceil(PANEL) {
        let c = PANEL.min(cols - p * PANEL);
        // SAFETY: rows 0..m, columns [p * PANEL, p * PANEL + c) lie inside `y` (checked above).
        unsafe {
            panel_rows(
                x,
                k,
                w.panel(p),
                0..m,
                y.as_mut_ptr().add(p * PANEL),
                ldy,
                c,
                Epilogue::Store,
            )
        }
    }
}

thread_local! {
    /// A `q8_0` panel dequantized for the float32 tiles (`K x PANEL` floats).
    static DEQUANT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows `rows` of `x` (row stride `k`) against one panel, through `epi` (whose bias starts at
/// the panel's first column) into `y` (which points at the panel's first column of row 0; row
/// stride `ldy`, `cols` valid columns), a register tile at a time.
///
/// # Safety
/// `y` must be valid for rows `rows` of `cols` floats at stride `ldy`.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows(
    x: &[f32],
    k: usize,
    panel: Panel,
    rows: Range<usize>,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
) {
    match panel {
        Panel::F32(w) => panel_rows_f32(x, k, w, rows, y, ldy, cols, epi, true),
        Panel::Q8 { q, scale } => {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                // Each tile widens and scales the weights in registers (at 16 rows 1.3x
                // faster than dequantizing the panel once for its tiles, at 64 rows 1.2x).
                for (r0, n) in row_tiles(rows.start, rows.end) {
                    let x = &x[r0 * k..(r0 + n) * k];
                    tile_q8(x, n, k, q, scale, y.add(r0 * ldy), ldy, cols, epi);
                }
                return;
            }
            // Without AVX-512: the panel dequantized, then the float32 tiles.
            let run = |buf: &mut Vec<f32>| {
                if buf.len() < k * PANEL {
                    buf.resize(k * PANEL, 0.0);
                }
                let w = panel.to_f32(buf);
                panel_rows_f32(x, k, w, rows.clone(), y, ldy, cols, epi, false)
            };
            DEQUANT.with(|buf| match buf.try_borrow_mut() {
                Ok(mut buf) => run(&mut buf),
                Err(_) => run(&mut Vec::new()),
            })
        }
    }
}

/// [`panel_rows`] on float32 weights; `next_follows`: the next panel lies right after this one
/// in memory (the tiles then fetch it; a dequantized copy has no successor).
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows_f32(
    x: &[f32],
    k: usize,
    panel: &[f32],
    rows: Range<usize>,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
    next_follows: bool,
) {
    let tiles = (rows.end - rows.start).div_ceil(TILE_ROWS);
    for (t, (r0, n)) in row_tiles(rows.start, rows.end).enumerate() {
        let x = &x[r0 * k..(r0 + n) * k];
        // What the tile prefetches while it computes (one address per weight row):
        // - a lone tile streams its own panel from memory, a little ahead;
        // - several tiles share the fetch of the next panel (they lie back to back), tile t
        //   taking the t-th share, so the memory stream runs at an even pace under all of
        //   them and every tile finds its panel in L2.
        let (pf, stride) = if tiles == 1 || !next_follows {
            (panel.as_ptr().wrapping_add(PREFETCH), PANEL)
        } else {
            let next = panel.as_ptr().wrapping_add(k * PANEL);
            (
                next.wrapping_add(t * k * PANEL / tiles),
                PANEL.div_ceil(tiles),
            )
        };
        tile(x, n, k, panel, pf, stride, y.add(r0 * ldy), ldy, cols, epi)
    }
}

/// Rows `m0..m1` as register tiles of equal height, at most [`TILE_ROWS`] (16 rows: 8 + 8
/// rather than 12 + 4): `(first row, rows)`.
fn row_tiles(m0: usize, m1: usize) -> impl Iterator<Item = (usize, usize)> {
    let tiles = (m1 - m0).div_ceil(TILE_ROWS);
    (0..tiles).map(move |t| {
        let r0 = m0 + t * (m1 - m0) / tiles;
        (r0, m0 + (t + 1) * (m1 - m0) / tiles - r0)
    })
}

/// `$kernel::<R>($args)` for a tile of `$rows` rows, R from 1 to [`TILE_ROWS`] (a register
/// tile's height is a compile-time constant).
macro_rules! by_rows {
    ($rows:expr, $kernel:ident, ($($arg:expr),*)) => {
        match $rows {
            12 => $kernel::<12>($($arg),*),
            11 => $kernel::<11>($($arg),*),
            10 => $kernel::<10>($($arg),*),
            9 => $kernel::<9>($($arg),*),
            8 => $kernel::<8>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            _ => $kernel::<1>($($arg),*),
        }
    };
}

/// One register tile: `rows` rows of `x` against one panel, added into `y` (row stride `ldy`,
/// `cols` valid columns).
///
/// # Safety
/// `y` must be valid for `rows` rows of `cols` floats at stride `ldy`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    x: &[f32],
    rows: usize,
    k: usize,
    panel: &[f32],
    pf: *const f32,
    stride: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return by_rows!(
            rows,
            tile_avx512,
            (x, k, panel, pf, stride, y, ldy, cols, epi)
        );
    }
    tile_generic(x, rows, k, panel, y, ldy, cols, epi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const R: usize>(
    x: &[f32],
    k: usize,
    panel: &[f32],
    pf: *const f32,
    stride: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && panel.len() >= k * PANEL);
    prefetch_out::<R>(y, ldy, epi);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    for kk in 0..k {
        let w0 = _mm512_loadu_ps(wp.add(kk * PANEL));
        let w1 = _mm512_loadu_ps(wp.add(kk * PANEL + 16));
        // Prefetch addresses may lie past the panels (the last one's successor): a prefetch
        // never faults, and the pointer is only formed, never read.
        let p = pf.wrapping_add(kk * stride);
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
        if stride > 16 {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(16) as *const i8);
        }
        fma_rows(&mut acc, xp.add(kk), k, w0, w1);
    }
    store_tile(&acc, y, ldy, cols, epi)
}

/// The rank-1 update of a tile by one weight row `(w0, w1)`: row `r` adds `x[r * k] * w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fma_rows<const R: usize>(
    acc: &mut [[std::arch::x86_64::__m512; 2]; R],
    x: *const f32,
    k: usize,
    w0: std::arch::x86_64::__m512,
    w1: std::arch::x86_64::__m512,
) {
    use std::arch::x86_64::*;
    for (r, a) in acc.iter_mut().enumerate() {
        let xb = _mm512_set1_ps(*x.add(r * k));
        a[0] = _mm512_fmadd_ps(xb, w0, a[0]);
        a[1] = _mm512_fmadd_ps(xb, w1, a[1]);
    }
}

/// One register tile against a `q8_0` panel: [`tile`], each weight widened to float32 and
/// scaled as it is loaded.
///
/// # Safety
/// `y` must be valid for `rows` rows of `cols` floats at stride `ldy`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_q8(
    x: &[f32],
    rows: usize,
    k: usize,
    q: &[i8],
    scale: &[f16],
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
) {
    by_rows!(rows, tile_q8_avx512, (x, k, q, scale, y, ldy, cols, epi))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_q8_avx512<const R: usize>(
    x: &[f32],
    k: usize,
    q: &[i8],
    scale: &[f16],
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && q.len() >= k * PANEL);
    debug_assert!(scale.len() >= k / Q8_BLOCK * PANEL);
    prefetch_out::<R>(y, ldy, epi);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (xp, qp, sp) = (x.as_ptr(), q.as_ptr(), scale.as_ptr());
    for b in 0..k / Q8_BLOCK {
        let s = sp.add(b * PANEL) as *const __m256i;
        let s0 = _mm512_cvtph_ps(_mm256_loadu_si256(s));
        let s1 = _mm512_cvtph_ps(_mm256_loadu_si256(s.add(1)));
        for kk in b * Q8_BLOCK..(b + 1) * Q8_BLOCK {
            let row = qp.add(kk * PANEL);
            // 4 KiB ahead, once per cache line (two weight rows); never read, never faults.
            if kk % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4096));
            }
            let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(row as *const __m128i));
            let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(row.add(16) as *const __m128i));
            let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), s0);
            let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), s1);
            fma_rows(&mut acc, xp.add(kk), k, w0, w1);
        }
    }
    store_tile(&acc, y, ldy, cols, epi)
}

/// Starts fetching a tile's output lines when the epilogue reads them (rows of a wide output
/// such as the LM head's logits lie in different pages, far from the cache).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn prefetch_out<const R: usize>(y: *mut f32, ldy: usize, epi: Epilogue) {
    use std::arch::x86_64::*;
    if epi.reads_y() {
        for r in 0..R {
            _mm_prefetch::<_MM_HINT_T0>(y.add(r * ldy) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(y.add(r * ldy + 16) as *const i8);
        }
    }
}

/// A tile's accumulators through `epi` into `y` (row stride `ldy`, `cols` valid columns).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_tile<const R: usize>(
    acc: &[[std::arch::x86_64::__m512; 2]; R],
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
) {
    use std::arch::x86_64::*;
    let m0: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        (1u32 << cols) as u16 - 1
    };
    let m1: __mmask16 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u32 << (cols - 16)) as u16 - 1
    } else {
        0
    };
    // The bias of the panel's columns (zero beyond them), and the activation.
    let bias = epi.bias().map(|b| {
        (
            _mm512_maskz_loadu_ps(m0, b.as_ptr()),
            _mm512_maskz_loadu_ps(m1, b.as_ptr().add(16)),
        )
    });
    let gelu = match epi {
        Epilogue::BiasGelu(_, exact) => Some(exact),
        _ => None,
    };
    for (r, a) in acc.iter().enumerate() {
        let yr = y.add(r * ldy);
        let (mut v0, mut v1) = (a[0], a[1]);
        if epi.reads_y() {
            v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, yr), v0);
            v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, yr.add(16)), v1);
        }
        if let Some((b0, b1)) = bias {
            v0 = _mm512_add_ps(v0, b0);
            v1 = _mm512_add_ps(v1, b1);
        }
        if let Some(exact) = gelu {
            v0 = ops::gelu16(v0, exact);
            v1 = ops::gelu16(v1, exact);
        }
        _mm512_mask_storeu_ps(yr, m0, v0);
        _mm512_mask_storeu_ps(yr.add(16), m1, v1);
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn tile_generic(
    x: &[f32],
    rows: usize,
    k: usize,
    panel: &[f32],
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epi: Epilogue,
) {
    for r in 0..rows {
        let mut acc = [0f32; PANEL];
        for kk in 0..k {
            let xv = x[r * k + kk];
            for (a, w) in acc.iter_mut().zip(&panel[kk * PANEL..(kk + 1) * PANEL]) {
                *a += xv * w;
            }
        }
        for (c, a) in acc.iter().enumerate().take(cols) {
            let yc = y.add(r * ldy + c);
            *yc = epi.apply(*yc, *a, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul::matmul_reference;
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Ties go to the first column (across panels and tasks), NaN never wins.
    #[test]
    fn argmax_panels_takes_the_first_maximum() {
        let n = 200;
        let mut w = vec![0.5f32; n];
        w[3] = f32::NAN;
        w[150] = 0.25;
        let best = argmax_panels(&[2.0, -1.0], 2, &Panels::pack(&w, 1, n));
        assert_eq!(best[0], (0, 1.0));
        assert_eq!(best[1], (150, -0.25));
        w[0] = 0.1;
        w[97] = 0.7;
        w[180] = 0.7;
        let best = argmax_panels(&[1.0], 1, &Panels::pack(&w, 1, n));
        assert_eq!(best[0], (97, 0.7));
    }

    #[test]
    fn packed_matmul_matches_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (m, k, n) in [
            (1, 7, 5),
            (3, 64, 100),
            (8, 96, 1031),
            (9, 33, 64),
            (16, 128, 65),
            (17, 40, 33),
            (12, 20, 32),
            (64, 33, 70),
            (300, 50, 70),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y0: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut want = y0.clone();
            matmul_reference(&x, &w, m, k, n, &mut want);
            let mut y = y0.clone();
            matmul_panels(&x, m, &Panels::pack(&w, k, n), &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{m}x{k}x{n}: {a} vs {b}"
                );
            }
            // Stored into a new buffer: x W alone.
            let mut want = vec![0f32; m * n];
            matmul_reference(&x, &w, m, k, n, &mut want);
            let y = matmul_panels_new(&x, m, &Panels::pack(&w, k, n));
            assert_eq!(y.len(), m * n);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "new {m}x{k}x{n}");
            }
            // Bias and bias + GELU in the epilogue: the separate passes, bit for bit.
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let packed = Panels::pack(&w, k, n);
            for exact in [None, Some(false), Some(true)] {
                let mut want = vec![0f32; m * n];
                ops::fill_rows(&mut want, &bias);
                matmul_panels(&x, m, &packed, &mut want);
                let epi = match exact {
                    None => Epilogue::Bias(&bias),
                    Some(e) => {
                        ops::gelu(&mut want, e);
                        Epilogue::BiasGelu(&bias, e)
                    }
                };
                let mut y = vec![f32::NAN; m * n];
                matmul_panels_with(&x, m, &packed, &mut y, epi);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{epi:?} {m}x{k}x{n} at {i}");
                }
            }
            // Argmax without the product: the scan of the stored rows, bit for bit.
            let best = argmax_panels(&x, m, &Panels::pack(&w, k, n));
            for (r, &(c, v)) in best.iter().enumerate() {
                let row = &y[r * n..(r + 1) * n];
                let want = crate::generate::sampling::argmax_reference(row);
                assert_eq!(
                    (c, v.to_bits()),
                    (want, row[want as usize].to_bits()),
                    "argmax {m}x{k}x{n} row {r}"
                );
            }
            // The serial kernel on a leading sub-matrix, packed from a function.
            let (ks, ns) = (k.div_ceil(2), n - n / 3);
            let sub: Vec<f32> = (0..ks * ns).map(|i| w[i / ns * n + i % ns]).collect();
            let xs: Vec<f32> = (0..m * ks).map(|i| x[i / ks * k + i % ks]).collect();
            let mut want = y0.clone();
            for r in 0..m {
                // The sub-matrix's columns are overwritten, the others kept.
                let (xr, yr) = (&xs[r * ks..(r + 1) * ks], &mut want[r * n..r * n + ns]);
                yr.fill(0.0);
                matmul_reference(xr, &sub, 1, ks, ns, yr);
            }
            let mut y = y0.clone();
            let packed = Panels::from_fn(k, n, |kk, j| w[kk * n + j]);
            matmul_panels_serial(&xs, m, ks, &packed, ns, &mut y, n);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "serial {m}x{ks}x{ns} at {i}: {a} vs {b}"
                );
            }
        }
    }

    /// `q8_0` panels: each weight within half a step (`d / 2`, `d = max |w| / 127` of its block
    /// of 32 inputs) of the original, plus the float16 rounding of `d` (2^-11 of `127 d`);
    /// products against the plain matmul on the dequantized matrix (`unpack`, the
    /// dequantization the float32 fallback tiles read), one register tile and several.
    #[test]
    fn q8_0_panels_match_the_dequantized_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (m, k, n) in [
            (1, 32, 5),
            (3, 64, 100),
            (12, 96, 70),
            (13, 64, 33),
            (40, 128, 65),
        ] {
            let mut w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            // One all-zero block (scale 0) and one block with a single large weight.
            for kk in 0..32 {
                w[kk * n] = 0.0;
            }
            w[n + 1] = 40.0;
            let packed = Panels::pack_q8_0(&w, k, n);
            assert!(packed.is_q8_0());
            assert_eq!(packed.bytes(), n.div_ceil(PANEL) * PANEL * (k + k / 16));
            let deq = packed.unpack();
            for j in 0..n {
                for b in 0..k / Q8_BLOCK {
                    let block: Vec<usize> = (b * 32..(b + 1) * 32).map(|kk| kk * n + j).collect();
                    let amax = block.iter().map(|&i| w[i].abs()).fold(0.0, f32::max);
                    for &i in &block {
                        assert!(
                            (deq[i] - w[i]).abs() <= amax * (0.5 / 127.0 + 1.0 / 2048.0) + 1e-7,
                            "{k}x{n} at {i}: {} vs {}",
                            deq[i],
                            w[i]
                        );
                    }
                }
            }
            assert!((0..32).all(|kk| deq[kk * n] == 0.0));
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y0: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut want = y0.clone();
            matmul_reference(&x, &deq, m, k, n, &mut want);
            let mut y = y0.clone();
            matmul_panels(&x, m, &packed, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "q8 {m}x{k}x{n}: {a} vs {b}"
                );
            }
            let mut want = vec![0f32; m * n];
            ops::fill_rows(&mut want, &bias);
            matmul_reference(&x, &deq, m, k, n, &mut want);
            ops::gelu(&mut want, true);
            let mut y = vec![f32::NAN; m * n];
            matmul_panels_with(&x, m, &packed, &mut y, Epilogue::BiasGelu(&bias, true));
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "q8 gelu {m}x{k}x{n}"
                );
            }
            // Greedy argmax: the scan of the stored product, bit for bit.
            let y = matmul_panels_new(&x, m, &packed);
            for (r, &(c, v)) in argmax_panels(&x, m, &packed).iter().enumerate() {
                let row = &y[r * n..(r + 1) * n];
                let want = crate::generate::sampling::argmax_reference(row);
                assert_eq!((c, v.to_bits()), (want, row[want as usize].to_bits()));
            }
        }
    }
}
