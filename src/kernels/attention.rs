//! Cached causal self-attention over a ragged batch, the decode-time hot spot.
//!
//! Each row of the batch brings `n_new` new positions (a whole prompt at prefill, one token or
//! one block at decode). For every (row, head) pair the kernel rotates the new queries and keys
//! (GPT-NeoX partial rotary), writes keys and values into the row's preallocated cache and
//! attends causally over the cache with a single-pass online softmax. Work is spread over
//! (row, head) pairs with rayon; nothing is allocated in proportion to the context.

use super::ops::copy_row;
use super::panel::{matmul_panels_serial, Panels};
use super::OutPtr;
use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Largest supported head dim (the online-softmax accumulator lives on the stack).
pub const MAX_HEAD_DIM: usize = 256;

/// Rotary tables of one GPT-NeoX stack, float32 as in the official code.
#[derive(Clone, Debug)]
pub struct Rotary {
    /// Rotary dims per head (`rd`), even.
    pub dims: usize,
    /// `1 / base^(2i/rd)`, `i < rd/2`.
    pub inv_freq: Vec<f32>,
    /// `cos(p * inv_freq_i)` for `p < table_len`, row-major `[p][i]`.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rotary {
    pub fn new(dims: usize, base: f64, table_len: usize) -> Self {
        let half = dims / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dims as f32))
            .collect();
        let mut cos = Vec::with_capacity(table_len * half);
        let mut sin = Vec::with_capacity(table_len * half);
        for p in 0..table_len {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Rotary {
            dims,
            inv_freq,
            cos,
            sin,
        }
    }

    fn table_len(&self) -> usize {
        self.cos
            .len()
            .checked_div(self.dims / 2)
            .unwrap_or(usize::MAX)
    }

    /// Appends `cos(pos * inv_freq_i)` and `sin(..)` for `i < dims/2` (the values
    /// [`Rotary::apply`] uses).
    pub fn cos_sin(&self, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let half = self.dims / 2;
        if pos < self.table_len() {
            cos.extend_from_slice(&self.cos[pos * half..(pos + 1) * half]);
            sin.extend_from_slice(&self.sin[pos * half..(pos + 1) * half]);
        } else {
            for f in &self.inv_freq {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }

    /// Rotates the first `dims` entries of a head vector in place (`x*cos + rotate_half(x)*sin`).
    #[inline]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        self.apply_signed(x, pos, false)
    }

    /// [`Rotary::apply`], or its inverse (rotation by `-angle`) when `inverse`.
    #[inline]
    pub fn apply_signed(&self, x: &mut [f32], pos: usize, inverse: bool) {
        let sign = if inverse { -1.0 } else { 1.0 };
        let half = self.dims / 2;
        if half == 0 {
            return;
        }
        if pos < self.table_len() {
            let c = &self.cos[pos * half..(pos + 1) * half];
            let s = &self.sin[pos * half..(pos + 1) * half];
            rotate(x, half, |i| (c[i], sign * s[i]));
        } else {
            rotate(x, half, |i| {
                let a = pos as f32 * self.inv_freq[i];
                (a.cos(), sign * a.sin())
            });
        }
    }
}

#[inline]
fn rotate(x: &mut [f32], half: usize, cs: impl Fn(usize) -> (f32, f32)) {
    for i in 0..half {
        let (c, s) = cs(i);
        let (u, w) = (x[i], x[i + half]);
        x[i] = u * c - w * s;
        x[i + half] = w * c + u * s;
    }
}

/// Which rotary positions the new entries of a row take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowSpec {
    /// New positions this call.
    pub n_new: usize,
    /// Rotary position of the first new entry.
    pub pos0: usize,
    /// Position increment between new entries (1 normally; 0 puts them all at `pos0`, as the
    /// official token-decoder generation does with its prefix vectors).
    pub pos_stride: usize,
}

impl RowSpec {
    pub fn arange(n_new: usize, pos0: usize) -> Self {
        RowSpec {
            n_new,
            pos0,
            pos_stride: 1,
        }
    }
}

/// Element type of a KV cache: float32, or float16 to halve the cache traffic of long contexts
/// (values are rounded when stored and widened to float32 when read; the math stays float32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

/// Storage of a [`KvCache`].
#[derive(Clone, Debug)]
enum KvStore {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    F16 {
        k: Vec<f16>,
        v: Vec<f16>,
    },
    /// A slot of a device pool (the tensor path).
    Slot(std::sync::Arc<super::kv_pool::SlotRef>),
}

/// What a cache element must do: be stored from float32, and read back as float32 (in place
/// where it already is, else widened into the caller's buffer).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Whether elements are IEEE float16 (else float32).
    const HALF: bool;
    fn store(src: &[f32], dst: &mut [Self]);
    fn view<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElem for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f32]) {
        copy_row(dst, src);
    }
    #[inline(always)]
    fn view<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for f16 {
    const HALF: bool = true;
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn view<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

/// Keys and values of one sequence for every layer of one stack, preallocated.
/// Layout `[layer][head][capacity][head_dim]`; keys are stored after rotary.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Positions written and committed.
    pub len: usize,
    store: KvStore,
}

impl KvCache {
    pub fn new(layers: usize, heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self::with_dtype(layers, heads, head_dim, capacity, KvDtype::F32)
    }

    pub fn with_dtype(
        layers: usize,
        heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: KvDtype,
    ) -> Self {
        let n = layers * heads * capacity * head_dim;
        let store = match dtype {
            KvDtype::F32 => KvStore::F32 {
                k: super::zeroed(n),
                v: super::zeroed(n),
            },
            KvDtype::F16 => KvStore::F16 {
                k: super::zeroed(n),
                v: super::zeroed(n),
            },
        };
        KvCache {
            layers,
            heads,
            head_dim,
            capacity,
            len: 0,
            store,
        }
    }

    /// A cache living in slot `slot.slot` of a device pool.
    pub fn in_slot(slot: super::kv_pool::SlotRef) -> Self {
        let p = &slot.pool;
        KvCache {
            layers: p.layers,
            heads: p.heads,
            head_dim: p.head_dim,
            capacity: p.capacity,
            len: 0,
            store: KvStore::Slot(std::sync::Arc::new(slot)),
        }
    }

    /// The pool slot of a tensor-path cache; `None` for host caches.
    pub fn slot(&self) -> Option<&super::kv_pool::SlotRef> {
        match &self.store {
            KvStore::Slot(s) => Some(s),
            _ => None,
        }
    }

    /// Element type of the stored keys and values.
    pub fn dtype(&self) -> DType {
        match &self.store {
            KvStore::F32 { .. } => DType::F32,
            KvStore::F16 { .. } => DType::F16,
            KvStore::Slot(s) => s.pool.dtype(),
        }
    }

    /// Bytes held by the cache (keys and values).
    pub fn bytes(&self) -> usize {
        match &self.store {
            KvStore::F32 { k, v } => (k.len() + v.len()) * 4,
            KvStore::F16 { k, v } => (k.len() + v.len()) * 2,
            KvStore::Slot(s) => s.pool.slot_bytes(),
        }
    }

    /// Forget everything (the token decoder's cache is reset for every block).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        let n = self.heads * self.capacity * self.head_dim;
        layer * n..(layer + 1) * n
    }

    /// Keys and values of one layer as float32 tensors `[heads, capacity, head_dim]`.
    pub fn layer_tensors(&self, layer: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let r = self.layer_range(layer);
        let shape = (self.heads, self.capacity, self.head_dim);
        let dev = Device::Cpu;
        Ok(match &self.store {
            KvStore::F32 { k, v } => (
                Tensor::from_slice(&k[r.clone()], shape, &dev)?,
                Tensor::from_slice(&v[r], shape, &dev)?,
            ),
            KvStore::F16 { k, v } => (
                Tensor::from_slice(&k[r.clone()], shape, &dev)?.to_dtype(DType::F32)?,
                Tensor::from_slice(&v[r], shape, &dev)?.to_dtype(DType::F32)?,
            ),
            KvStore::Slot(s) => {
                let get = |t: &Tensor| -> candle_core::Result<Tensor> {
                    t.narrow(0, s.slot, 1)?.squeeze(0)?.to_dtype(DType::F32)
                };
                (get(&s.pool.k[layer])?, get(&s.pool.v[layer])?)
            }
        })
    }
}

struct Task<'a, T> {
    spec: RowSpec,
    /// Cache length before this call.
    past: usize,
    /// Index of the row's first new position in the flattened batch.
    first: usize,
    head: usize,
    k: &'a mut [T],
    v: &'a mut [T],
    write_only: bool,
    /// The next task's cache rows, prefetched while this one attends.
    ahead: Ahead,
}

/// One layer of cached attention.
///
/// - `qkv`: `[N, 3W]` fused projections of the `N = sum(n_new)` new positions, GPT-NeoX
///   per-head interleaved (`[q | k | v]` for head 0, then head 1, ...).
/// - `out`: `[N, W]` attention output (heads merged in order).
/// - `caches[r]` receives row `r`'s new keys and values at `[len, len + n_new)`; `len` itself is
///   advanced by the caller once every layer has run ([`commit`]).
#[allow(clippy::too_many_arguments)]
pub fn cached_attention(
    qkv: &[f32],
    out: &mut [f32],
    rows: &[RowSpec],
    caches: &mut [&mut KvCache],
    layer: usize,
    rotary: &Rotary,
    heads: usize,
    head_dim: usize,
) {
    cached_attention_split(qkv, out, rows, caches, layer, rotary, heads, head_dim, &[]);
}

/// [`cached_attention`] where rows flagged in `write_only` only get their keys and values
/// written, and their rotated queries stored in `out` (for [`prefill_dense`]).
#[allow(clippy::too_many_arguments)]
pub fn cached_attention_split(
    qkv: &[f32],
    out: &mut [f32],
    rows: &[RowSpec],
    caches: &mut [&mut KvCache],
    layer: usize,
    rotary: &Rotary,
    heads: usize,
    head_dim: usize,
    write_only: &[bool],
) {
    match caches.first().map(|c| &c.store) {
        Some(KvStore::F32 { .. }) => run_tasks::<f32>(
            qkv, out, rows, caches, layer, rotary, heads, head_dim, write_only,
        ),
        Some(KvStore::F16 { .. }) => run_tasks::<f16>(
            qkv, out, rows, caches, layer, rotary, heads, head_dim, write_only,
        ),
        Some(KvStore::Slot(_)) => panic!("pool caches take the tensor path"),
        None => {}
    }
}

/// Cache storage viewed as slices of `T`.
trait Slices<T> {
    fn layer_mut(&mut self, range: std::ops::Range<usize>) -> (&mut [T], &mut [T]);
}

impl Slices<f32> for KvCache {
    fn layer_mut(&mut self, r: std::ops::Range<usize>) -> (&mut [f32], &mut [f32]) {
        match &mut self.store {
            KvStore::F32 { k, v } => (&mut k[r.clone()], &mut v[r]),
            _ => panic!("caches of one call must share a dtype"),
        }
    }
}

impl Slices<f16> for KvCache {
    fn layer_mut(&mut self, r: std::ops::Range<usize>) -> (&mut [f16], &mut [f16]) {
        match &mut self.store {
            KvStore::F16 { k, v } => (&mut k[r.clone()], &mut v[r]),
            _ => panic!("caches of one call must share a dtype"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_tasks<T: KvElem>(
    qkv: &[f32],
    out: &mut [f32],
    rows: &[RowSpec],
    caches: &mut [&mut KvCache],
    layer: usize,
    rotary: &Rotary,
    heads: usize,
    head_dim: usize,
    write_only: &[bool],
) where
    KvCache: Slices<T>,
{
    let w = heads * head_dim;
    let n: usize = rows.iter().map(|r| r.n_new).sum();
    assert_eq!(qkv.len(), n * 3 * w, "qkv shape");
    assert_eq!(out.len(), n * w, "out shape");
    assert_eq!(rows.len(), caches.len(), "one cache per row");
    assert!(head_dim <= MAX_HEAD_DIM);
    let mut tasks = Vec::with_capacity(rows.len() * heads);
    let mut first = 0;
    for (row, (spec, cache)) in rows.iter().zip(caches.iter_mut()).enumerate() {
        assert!(
            cache.len + spec.n_new <= cache.capacity,
            "kv cache overflow: {} + {} > {}",
            cache.len,
            spec.n_new,
            cache.capacity
        );
        let past = cache.len;
        let cap = cache.capacity;
        let range = cache.layer_range(layer);
        let (kl, vl) = Slices::<T>::layer_mut(&mut **cache, range);
        for (head, (k, v)) in kl
            .chunks_mut(cap * head_dim)
            .zip(vl.chunks_mut(cap * head_dim))
            .enumerate()
        {
            tasks.push(Task {
                spec: *spec,
                past,
                first,
                head,
                k,
                v,
                write_only: write_only.get(row).copied().unwrap_or(false),
                ahead: Ahead::NONE,
            });
        }
        first += spec.n_new;
    }
    // Each task prefetches the keys and values of the one after it (usually the next one its
    // thread takes): at short contexts every task is a short stream that would start cold.
    // Long rows stream well on their own, and two of them at once overflow L2 (a context of
    // 1024 read 5-15% slower with the prefetch, 128 5-10% faster, 512 the same).
    for i in 1..tasks.len() {
        let t = &tasks[i];
        let bytes = (t.past + t.spec.n_new) * head_dim * std::mem::size_of::<T>();
        if bytes <= AHEAD_MAX_BYTES {
            tasks[i - 1].ahead = Ahead {
                k: t.k.as_ptr() as usize,
                v: t.v.as_ptr() as usize,
                bytes,
            };
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let scale = 1.0 / (head_dim as f32).sqrt();
    tasks
        .into_par_iter()
        .with_min_len(super::min_len())
        .for_each(|t| {
            let (mut q, mut kr) = ([0f32; MAX_HEAD_DIM], [0f32; MAX_HEAD_DIM]);
            let (q, kr) = (&mut q[..head_dim], &mut kr[..head_dim]);
            for i in 0..t.spec.n_new {
                let g = t.first + i;
                let base = g * 3 * w + t.head * 3 * head_dim;
                let pos = t.spec.pos0 + i * t.spec.pos_stride;
                let slot = t.past + i;
                copy_row(kr, &qkv[base + head_dim..base + 2 * head_dim]);
                rotary.apply(kr, pos);
                T::store(kr, &mut t.k[slot * head_dim..(slot + 1) * head_dim]);
                T::store(
                    &qkv[base + 2 * head_dim..base + 3 * head_dim],
                    &mut t.v[slot * head_dim..(slot + 1) * head_dim],
                );
                // SAFETY: slot (g, head) is written by this task only; `out` outlives the loop.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.get().add(g * w + t.head * head_dim),
                        head_dim,
                    )
                };
                if t.write_only {
                    // The rotated query, rotated in place in the output.
                    copy_row(o, &qkv[base..base + head_dim]);
                    rotary.apply(o, pos);
                    continue;
                }
                copy_row(q, &qkv[base..base + head_dim]);
                rotary.apply(q, pos);
                let last = i + 1 == t.spec.n_new;
                attend_online_ahead::<T>(
                    q,
                    &t.k[..(slot + 1) * head_dim],
                    &t.v[..(slot + 1) * head_dim],
                    scale,
                    o,
                    if last { t.ahead } else { Ahead::NONE },
                );
            }
        });
}

/// Queries per task of [`prefill_dense`]: a tile's scores (`[DENSE_TILE, keys]`) stay in L2,
/// and only the diagonal tile computes masked scores.
const DENSE_TILE: usize = 128;

thread_local! {
    /// Per-thread scratch of [`prefill_dense`] (queries, scores, outputs of one tile).
    static DENSE_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Causal attention of a fresh prompt (`n` positions, cache empty before this call) with
/// matmuls: `q` holds the rotated queries `[n, heads * hd]` (as left by
/// [`cached_attention_split`]) and is overwritten with the attention output; keys and values
/// come from the cache. Each head's keys (transposed) and values are packed once into column
/// panels; then tasks (head, tile of `DENSE_TILE` (128) queries) run in parallel: scores `Q K^T`
/// of the tile against the keys up to its last query, masked unnormalized softmax, `P V`, and
/// the division by the row sums, with the panel kernel. Same result as the online kernel, at
/// matmul speed.
pub fn prefill_dense(
    q: &mut [f32],
    cache: &KvCache,
    layer: usize,
    n: usize,
) -> candle_core::Result<()> {
    let (h, hd, cap) = (cache.heads, cache.head_dim, cache.capacity);
    let w = h * hd;
    assert_eq!(q.len(), n * w, "queries shape");
    assert!(n <= cap, "prompt longer than the cache");
    let r = cache.layer_range(layer);
    let widened: (Vec<f32>, Vec<f32>);
    let (k, v): (&[f32], &[f32]) = match &cache.store {
        KvStore::F32 { k, v } => (&k[r.clone()], &v[r]),
        KvStore::F16 { k, v } => {
            widened = (k[r.clone()].to_f32_vec(), v[r].to_f32_vec());
            (&widened.0, &widened.1)
        }
        KvStore::Slot(_) => candle_core::bail!("pool caches take the tensor path"),
    };
    // Per head: K^T as [hd, n] panels of 32 keys, V as [n, hd] panels of 32 dims.
    let packed: Vec<(Panels, Panels)> = (0..h)
        .into_par_iter()
        .map(|head| {
            let kh = &k[head * cap * hd..head * cap * hd + n * hd];
            let vh = &v[head * cap * hd..head * cap * hd + n * hd];
            (
                Panels::from_fn(hd, n, |d, j| kh[j * hd + d]),
                Panels::from_fn(n, hd, |j, d| vh[j * hd + d]),
            )
        })
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let tiles = n.div_ceil(DENSE_TILE);
    let qp = OutPtr(q.as_mut_ptr());
    // Longest tiles first (the last queries see the most keys), for balance.
    (0..h * tiles).into_par_iter().for_each(|t| {
        let (tile, head) = (tiles - 1 - t / h, t % h);
        let (a, b) = (tile * DENSE_TILE, ((tile + 1) * DENSE_TILE).min(n));
        let rows = b - a;
        let (kt, vp) = &packed[head];
        DENSE_SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.resize(rows * (2 * hd + b), 0.0);
            let (qt, rest) = buf.split_at_mut(rows * hd);
            let (scores, out) = rest.split_at_mut(rows * b);
            for i in 0..rows {
                // SAFETY: this task alone reads and writes rows a..b of head `head`.
                let src = unsafe {
                    std::slice::from_raw_parts(qp.get().add((a + i) * w + head * hd), hd)
                };
                for (d, s) in qt[i * hd..(i + 1) * hd].iter_mut().zip(src) {
                    *d = s * scale;
                }
            }
            let scores = &mut scores[..rows * b];
            matmul_panels_serial(qt, rows, hd, kt, b, scores, b);
            let mut inv = [0f32; DENSE_TILE];
            for (i, row) in scores.chunks_exact_mut(b).enumerate() {
                inv[i] = 1.0 / super::ops::softmax_unnormalized(row, a + i + 1);
            }
            let out = &mut out[..rows * hd];
            matmul_panels_serial(scores, rows, b, vp, hd, out, hd);
            for i in 0..rows {
                // SAFETY: as above.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(qp.get().add((a + i) * w + head * hd), hd)
                };
                for (d, o) in dst.iter_mut().zip(&out[i * hd..(i + 1) * hd]) {
                    *d = o * inv[i];
                }
            }
        });
    });
    Ok(())
}

/// Marks the positions written by the last [`cached_attention`] calls as part of the caches.
pub fn commit(rows: &[RowSpec], caches: &mut [&mut KvCache]) {
    for (spec, cache) in rows.iter().zip(caches.iter_mut()) {
        cache.len += spec.n_new;
    }
}

/// Single-pass softmax attention of one query over cached keys/values (`[T, hd]` each) of
/// element type `E`. AVX-512 and AVX2 builds of the same code are selected at run time.
#[inline]
pub fn attend_online<E: KvElem>(q: &[f32], keys: &[E], values: &[E], scale: f32, out: &mut [f32]) {
    attend_online_ahead(q, keys, values, scale, out, Ahead::NONE)
}

/// Longest keys (and values) of one task that the previous task prefetches, in bytes.
const AHEAD_MAX_BYTES: usize = 32 << 10;

/// How far ahead of its reads a task prefetches its own keys and values, in bytes. The
/// hardware prefetcher alone left decode attention at 65-80% of the probe's read bandwidth
/// (it restarts at every 4 KiB page); 2-4 KiB ahead reached 90-100% (`cargo bench --bench
/// kernels -- attention`, alternating distances 0 / 2048 / 4096 / 8192).
const PREFETCH_AHEAD: usize = 4096;

/// Cache rows to prefetch while attending: the next task's keys and values (`bytes` of each
/// from addresses `k` and `v`; a prefetch never faults, the addresses are never read).
#[derive(Clone, Copy, Debug)]
pub struct Ahead {
    k: usize,
    v: usize,
    bytes: usize,
}

impl Ahead {
    pub const NONE: Ahead = Ahead {
        k: 0,
        v: 0,
        bytes: 0,
    };
}

/// [`attend_online`], prefetching `ahead` at the pace of its own reads (the same share of
/// the next rows per chunk of keys).
#[inline]
pub fn attend_online_ahead<E: KvElem>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    scale: f32,
    out: &mut [f32],
    ahead: Ahead,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU supports AVX-512F and F16C.
            return unsafe {
                match q.len() {
                    16 => attend_avx512::<E, 1>(q, keys, values, scale, out, ahead),
                    32 => attend_avx512::<E, 2>(q, keys, values, scale, out, ahead),
                    48 => attend_avx512::<E, 3>(q, keys, values, scale, out, ahead),
                    64 => attend_avx512::<E, 4>(q, keys, values, scale, out, ahead),
                    80 => attend_avx512::<E, 5>(q, keys, values, scale, out, ahead),
                    96 => attend_avx512::<E, 6>(q, keys, values, scale, out, ahead),
                    128 => attend_avx512::<E, 8>(q, keys, values, scale, out, ahead),
                    256 => attend_avx512::<E, 16>(q, keys, values, scale, out, ahead),
                    _ => attend_generic(q, keys, values, scale, out),
                }
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA.
            return unsafe { attend_avx2(q, keys, values, scale, out) };
        }
    }
    attend_generic(q, keys, values, scale, out)
}

/// Keys per chunk of [`attend_avx512`]: one vector of scores.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 16;

/// The prefetches of one attention task: its own keys and values [`PREFETCH_AHEAD`] bytes
/// ahead of its reads, and the next task's ([`Ahead`]) at the pace of its own reads (the same
/// share of the next rows per chunk of keys); first, the part of the next rows beyond this
/// task's length (at most 4 KiB).
#[cfg(target_arch = "x86_64")]
struct Prefetch {
    ahead: Ahead,
    k: usize,
    v: usize,
    /// Bytes of this task's keys (and of its values).
    end: usize,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    #[inline(always)]
    fn start(ahead: Ahead, k: usize, v: usize, end: usize) -> Prefetch {
        let pf = Prefetch { ahead, k, v, end };
        pf.next_task(end, end + 4096);
        pf
    }

    /// Prefetches for a chunk of keys at bytes `lo..hi` of this task.
    #[inline(always)]
    fn chunk(&self, lo: usize, hi: usize) {
        self.next_task(lo, hi);
        lines(
            self.k,
            self.v,
            lo + PREFETCH_AHEAD,
            (hi + PREFETCH_AHEAD).min(self.end),
        );
    }

    #[inline(always)]
    fn next_task(&self, lo: usize, hi: usize) {
        lines(self.ahead.k, self.ahead.v, lo, hi.min(self.ahead.bytes));
    }
}

/// Prefetches (into L1) the cache lines at bytes `lo..hi` from addresses `k` and `v`; a
/// prefetch never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lines(k: usize, v: usize, lo: usize, hi: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut at = lo;
    while at < hi {
        // SAFETY: prefetch is a hint that never faults, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(k.wrapping_add(at) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(at) as *const i8);
        }
        at += 64;
    }
}

/// 16 elements of a cache row at `p`, widened to float32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn load16<E: KvElem>(p: *const E) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if E::HALF {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

/// The online softmax a chunk of 16 keys at a time, for head dim `16 * NV`: 16 lane-wise
/// products with the query summed by one add tree, one running-maximum update, one vector
/// `exp`, then the weighted values. The head dim is a constant so that the query, the
/// accumulators and the chunk's products live in registers (arrays indexed by a run-time head
/// dim stay in memory, and the accumulator chain then waits on store-to-load forwarding: 3x
/// slower on L2-resident rows, `cargo bench --bench kernels -- hot`). Two sets of
/// accumulators, for even and odd keys, halve the chain of dependent FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma,f16c")]
unsafe fn attend_avx512<E: KvElem, const NV: usize>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    scale: f32,
    out: &mut [f32],
    ahead: Ahead,
) {
    use std::arch::x86_64::*;
    let hd = 16 * NV;
    debug_assert_eq!(q.len(), hd);
    let t = keys.len() / hd;
    assert!(
        values.len() >= t * hd && out.len() >= hd,
        "attention row shapes"
    );
    let mut qv = [_mm512_setzero_ps(); NV];
    for (i, v) in qv.iter_mut().enumerate() {
        *v = _mm512_mul_ps(
            _mm512_loadu_ps(q.as_ptr().add(16 * i)),
            _mm512_set1_ps(scale),
        );
    }
    let (mut even, mut odd) = ([_mm512_setzero_ps(); NV], [_mm512_setzero_ps(); NV]);
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    let mut s = [0f32; CHUNK];
    let row_bytes = hd * std::mem::size_of::<E>();
    let (kp, vp) = (keys.as_ptr(), values.as_ptr());
    let pf = Prefetch::start(ahead, kp as usize, vp as usize, t * row_bytes);
    for c0 in (0..t).step_by(CHUNK) {
        let c = CHUNK.min(t - c0);
        pf.chunk(c0 * row_bytes, (c0 + c) * row_bytes);
        let mut d = [_mm512_setzero_ps(); CHUNK];
        for (j, dj) in d.iter_mut().enumerate() {
            if j < c {
                let k = kp.add((c0 + j) * hd);
                let mut acc = _mm512_mul_ps(qv[0], load16(k));
                for (i, qi) in qv.iter().enumerate().skip(1) {
                    acc = _mm512_fmadd_ps(*qi, load16(k.add(16 * i)), acc);
                }
                *dj = acc;
            }
        }
        let live: __mmask16 = if c == CHUNK { 0xffff } else { (1u16 << c) - 1 };
        let sv = sum_lanes16(&d);
        let cmax = _mm512_mask_reduce_max_ps(live, sv);
        if cmax > m {
            let corr = (m - cmax).exp();
            l *= corr;
            for a in even.iter_mut().chain(odd.iter_mut()) {
                *a = _mm512_mul_ps(*a, _mm512_set1_ps(corr));
            }
            m = cmax;
        }
        let p = _mm512_maskz_mov_ps(
            live,
            super::ops::exp16(_mm512_sub_ps(sv, _mm512_set1_ps(m))),
        );
        l += _mm512_reduce_add_ps(p);
        _mm512_storeu_ps(s.as_mut_ptr(), p);
        let mut j = 0;
        while j + 1 < c {
            let (v0, v1) = (vp.add((c0 + j) * hd), vp.add((c0 + j + 1) * hd));
            let (p0, p1) = (_mm512_set1_ps(s[j]), _mm512_set1_ps(s[j + 1]));
            for (i, (e, o)) in even.iter_mut().zip(odd.iter_mut()).enumerate() {
                *e = _mm512_fmadd_ps(p0, load16(v0.add(16 * i)), *e);
                *o = _mm512_fmadd_ps(p1, load16(v1.add(16 * i)), *o);
            }
            j += 2;
        }
        if j < c {
            let v0 = vp.add((c0 + j) * hd);
            let p0 = _mm512_set1_ps(s[j]);
            for (i, e) in even.iter_mut().enumerate() {
                *e = _mm512_fmadd_ps(p0, load16(v0.add(16 * i)), *e);
            }
        }
    }
    let inv = _mm512_set1_ps(1.0 / l);
    for (i, (e, o)) in even.iter().zip(&odd).enumerate() {
        _mm512_storeu_ps(
            out.as_mut_ptr().add(16 * i),
            _mm512_mul_ps(_mm512_add_ps(*e, *o), inv),
        );
    }
}

/// The horizontal sums of 16 vectors as one vector (lane `j` = sum of `d[j]`): a transposing
/// add tree of 45 shuffles and adds, against 8 per vector for separate reductions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum_lanes16(d: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Pairs: each 128-bit lane holds [a, b, a, b] partials of vectors (a, b) = (2i, 2i + 1).
    let mut t = [_mm512_setzero_ps(); 8];
    for (i, t) in t.iter_mut().enumerate() {
        let (a, b) = (d[2 * i], d[2 * i + 1]);
        *t = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Quads: each 128-bit lane holds one partial of vectors 4i..4i + 4, in order.
    let mut u = [_mm512_setzero_ps(); 4];
    for (i, u) in u.iter_mut().enumerate() {
        let (x, y) = (t[2 * i], t[2 * i + 1]);
        *u = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
        );
    }
    // Across 128-bit lanes: lanes 0, 2 of each input plus lanes 1, 3.
    let fold = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    };
    let v0 = fold(u[0], u[1]);
    let v1 = fold(u[2], u[3]);
    fold(v0, v1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<E: KvElem>(q: &[f32], keys: &[E], values: &[E], scale: f32, out: &mut [f32]) {
    attend_generic(q, keys, values, scale, out)
}

#[inline(always)]
fn attend_generic<E: KvElem>(q: &[f32], keys: &[E], values: &[E], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let mut acc = [0f32; MAX_HEAD_DIM];
    let acc = &mut acc[..hd];
    // Row buffers for narrow element types (float32 rows are read in place).
    let (mut kb, mut vb) = ([0f32; MAX_HEAD_DIM], [0f32; MAX_HEAD_DIM]);
    let mut m = f32::NEG_INFINITY;
    let mut l = 0f32;
    for (k, v) in keys.chunks_exact(hd).zip(values.chunks_exact(hd)) {
        let s = dot(q, E::view(k, &mut kb[..hd])) * scale;
        if s > m {
            let c = (m - s).exp();
            l *= c;
            for a in acc.iter_mut() {
                *a *= c;
            }
            m = s;
        }
        let p = (s - m).exp();
        l += p;
        for (a, x) in acc.iter_mut().zip(E::view(v, &mut vb[..hd])) {
            *a += p * x;
        }
    }
    let inv = 1.0 / l;
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise the reduction.
    let mut s = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            s[j] += x[j] * y[j];
        }
    }
    let mut t: f32 = s.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

/// Reference twin of [`attend_online`]: scores, softmax, weighted sum, in three plain passes.
pub fn attend_reference(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let scores: Vec<f32> = keys
        .chunks_exact(hd)
        .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f32 = e.iter().sum();
    out.fill(0.0);
    for (p, v) in e.iter().zip(values.chunks_exact(hd)) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p / z * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    #[test]
    fn online_softmax_matches_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (t, hd) in [
            (1, 8),
            (7, 16),
            (100, 64),
            (33, 256),
            (16, 32),
            (17, 32),
            (300, 48),
            (50, 128),
            (31, 16),
            (20, 96),
            (45, 80),
        ] {
            let q = rand_vec(&mut rng, hd);
            let k = rand_vec(&mut rng, t * hd);
            let v = rand_vec(&mut rng, t * hd);
            let (mut a, mut b) = (vec![0.0; hd], vec![0.0; hd]);
            attend_online(&q, &k, &v, 0.3, &mut a);
            attend_reference(&q, &k, &v, 0.3, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "t={t} hd={hd}: {x} vs {y}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn add_tree_sums_each_vector_into_its_lane() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32) * 0.25 - 7.0)
            .collect();
        // SAFETY: AVX-512F checked above; loads read 16 floats inside `x`.
        let got = unsafe {
            use std::arch::x86_64::*;
            let mut d = [_mm512_setzero_ps(); 16];
            for (j, d) in d.iter_mut().enumerate() {
                *d = _mm512_loadu_ps(x.as_ptr().add(16 * j));
            }
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), sum_lanes16(&d));
            out
        };
        for (j, g) in got.iter().enumerate() {
            let want: f32 = x[16 * j..16 * (j + 1)].iter().sum();
            assert!((g - want).abs() < 1e-4, "lane {j}: {g} vs {want}");
        }
    }

    #[test]
    fn dense_prefill_matches_the_online_kernel() {
        let (heads, hd, n) = (2, 16, 300);
        let w = heads * hd;
        let rot = Rotary::new(4, 10000.0, 512);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let qkv = rand_vec(&mut rng, n * 3 * w);
        let spec = [RowSpec::arange(n, 0)];
        // float32 and float16 caches, exactly sized and with room to spare.
        for (dtype, cap) in [
            (KvDtype::F32, n),
            (KvDtype::F32, n + 77),
            (KvDtype::F16, n + 5),
        ] {
            let mut c1 = KvCache::with_dtype(1, heads, hd, cap, dtype);
            let mut online = vec![0.0; n * w];
            cached_attention(&qkv, &mut online, &spec, &mut [&mut c1], 0, &rot, heads, hd);
            let mut c2 = KvCache::with_dtype(1, heads, hd, cap, dtype);
            let mut dense = vec![0.0; n * w];
            cached_attention_split(
                &qkv,
                &mut dense,
                &spec,
                &mut [&mut c2],
                0,
                &rot,
                heads,
                hd,
                &[true],
            );
            prefill_dense(&mut dense, &c2, 0, n).unwrap();
            for (i, (a, b)) in online.iter().zip(&dense).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{dtype:?} cap {cap}: at {i} (position {}): {a} vs {b}",
                    i / w
                );
            }
        }
    }

    #[test]
    fn ragged_batch_equals_rows_one_at_a_time() {
        // Two rows, prefilled and then stepped, in one batch vs. separately.
        let (heads, hd) = (3, 8);
        let w = heads * hd;
        let rot = Rotary::new(4, 10000.0, 16);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let rows = [RowSpec::arange(5, 0), RowSpec::arange(2, 3)];
        let qkv = rand_vec(&mut rng, 7 * 3 * w);
        let mut c0 = KvCache::new(1, heads, hd, 8);
        let mut c1 = KvCache::new(1, heads, hd, 8);
        let mut out = vec![0.0; 7 * w];
        cached_attention(
            &qkv,
            &mut out,
            &rows,
            &mut [&mut c0, &mut c1],
            0,
            &rot,
            heads,
            hd,
        );
        for (r, (spec, range)) in [(rows[0], 0..5), (rows[1], 5..7)].into_iter().enumerate() {
            let mut c = KvCache::new(1, heads, hd, 8);
            let mut o = vec![0.0; spec.n_new * w];
            cached_attention(
                &qkv[range.start * 3 * w..range.end * 3 * w],
                &mut o,
                &[spec],
                &mut [&mut c],
                0,
                &rot,
                heads,
                hd,
            );
            assert_eq!(&o[..], &out[range.start * w..range.end * w], "row {r}");
        }
        // A decode step after the prefill sees the earlier keys.
        commit(&rows, &mut [&mut c0, &mut c1]);
        assert_eq!((c0.len, c1.len), (5, 2));
    }
}
