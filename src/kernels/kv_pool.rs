//! KV caches of the tensor decode path (CUDA, or any candle device).
//!
//! The host path gives every sequence its own cache buffer; on a GPU that would cost one kernel
//! launch per row and layer. Here one stack's caches for the whole batch live in one pool: per
//! layer a tensor `[slots, heads, capacity, head_dim]` in the model's dtype, each running row
//! owning a slot. One step then writes every row's new keys and values with one scatter per
//! layer, and rows that bring the same number of new positions attend together with two batched
//! matmuls over a strided view of the pool (slots `lo..=hi`, positions `0..T`).

use super::attention::{Rotary, RowSpec};
use super::pool_attention::{
    decode_attention, decode_supported, fused_kernels, masked_softmax, reference,
};
use crate::gpu::section;
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

/// Scores a batched attention group may hold (`span * heads * n_q * T`); larger groups are
/// split into runs of consecutive slots.
const GROUP_SCORE_BUDGET: usize = 1 << 27;

/// One stack's KV caches for up to `slots` rows.
pub struct KvPool {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Positions per slot.
    pub capacity: usize,
    pub slots: usize,
    /// Per layer `[slots, heads, capacity, head_dim]`; keys after rotary.
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    free: Mutex<Vec<usize>>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvPool({} layers, {} slots x {} positions x {} heads x {})",
            self.layers, self.slots, self.capacity, self.heads, self.head_dim
        )
    }
}

/// A row's slot in a pool; handed back when the last reference is dropped.
#[derive(Debug)]
pub struct SlotRef {
    pub pool: Arc<KvPool>,
    pub slot: usize,
}

impl Drop for SlotRef {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(self.slot);
        }
    }
}

impl KvPool {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layers: usize,
        heads: usize,
        head_dim: usize,
        capacity: usize,
        slots: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Arc<Self>> {
        let shape = (slots, heads, capacity, head_dim);
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Arc::new(KvPool {
            layers,
            heads,
            head_dim,
            capacity,
            slots,
            k,
            v,
            free: Mutex::new((0..slots).rev().collect()),
        }))
    }

    /// Bytes of one slot (keys and values of every layer).
    pub fn slot_bytes(&self) -> usize {
        let elem = self.k.first().map_or(4, |t| t.dtype().size_in_bytes());
        2 * self.layers * self.heads * self.capacity * self.head_dim * elem
    }

    pub fn dtype(&self) -> DType {
        self.k.first().map_or(DType::F32, |t| t.dtype())
    }

    /// The lowest free slot, or `None` when every slot is taken.
    pub fn acquire(self: &Arc<Self>) -> Option<SlotRef> {
        let mut free = self.free.lock().ok()?;
        let (i, _) = free.iter().enumerate().min_by_key(|(_, &s)| s)?;
        let slot = free.swap_remove(i);
        Some(SlotRef {
            pool: self.clone(),
            slot,
        })
    }
}

/// Rows of one step that attend together: same number of new positions `n_q`, slots
/// `lo..lo + span` (slots in that range without a row of the group are computed and ignored).
pub struct Group {
    pub lo: usize,
    pub span: usize,
    pub n_q: usize,
    /// Keys attended: cache positions `0..t`.
    pub t: usize,
    /// `[span * n_q]` (u32): for each (slot, query) the new position it reads its query from.
    pub q_index: Tensor,
    /// `[span, 1, n_q, 1]` (u32): the last cache position each query may attend to.
    pub limit: Tensor,
}

/// Rows bringing several positions (prompts, or a block's prefix) whose keys and values are
/// copied into their slots as one block per layer: `span` rows in consecutive slots from `lo`,
/// each bringing `n` positions at cache position `at`, found in the step at positions
/// `first..first + span * n` in row order (a lone row is a run of one).
pub struct BlockWrite {
    pub lo: usize,
    pub span: usize,
    /// Cache position of the first new entry.
    pub at: usize,
    /// Its first new position in the step and how many per row.
    pub first: usize,
    pub n: usize,
}

/// The rows of a step that bring one position each, in slots `lo..lo + span`. The write is a
/// scatter along the position axis of the pool viewed as `[span * heads, capacity, head_dim]`,
/// so every (slot, head, element) is its own thread (a scatter along the pool's first axis
/// would loop over all rows in each of `head_dim` threads).
pub struct SingleWrite {
    pub lo: usize,
    pub span: usize,
    /// `[span]` (u32): the step position each slot's new key comes from (0 for slots without
    /// a row here, whose write is skipped).
    pub src: Tensor,
    /// `[span * heads, 1, head_dim]` (u32): the cache position written, `u32::MAX` (skip) for
    /// slots without a row here.
    pub at: Tensor,
}

/// Everything one cached step needs besides the layer weights, shared by every layer.
pub struct PoolStep {
    /// `[N, rd/2]` rotary cos/sin of each new position, in the model dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Rows bringing one position, written by one scatter per tensor and layer.
    pub scatter: Option<SingleWrite>,
    /// Rows bringing several positions, in runs that are copied at once.
    pub blocks: Vec<BlockWrite>,
    pub groups: Vec<Group>,
    /// `[N]` (u32): where new position `n`'s output sits in the groups' concatenated outputs.
    pub gather: Tensor,
}

impl PoolStep {
    /// Plans a step where row `r` brings `rows[r].n_new` positions into `slots[r]`, whose
    /// cache holds `lens[r]` positions.
    pub fn new(
        pool: &KvPool,
        rows: &[RowSpec],
        slots: &[usize],
        lens: &[usize],
        rotary: &Rotary,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let (nh, cap) = (pool.heads, pool.capacity);
        let n: usize = rows.iter().map(|r| r.n_new).sum();
        let half = rotary.dims / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        let mut first = Vec::with_capacity(rows.len());
        let (mut singles, mut blocks) = (Vec::new(), Vec::<BlockWrite>::new());
        let mut g = 0;
        for (r, spec) in rows.iter().enumerate() {
            if lens[r] + spec.n_new > cap {
                candle_core::bail!(
                    "kv cache overflow: {} + {} positions > capacity {cap}",
                    lens[r],
                    spec.n_new
                );
            }
            first.push(g);
            for i in 0..spec.n_new {
                rotary.cos_sin(spec.pos0 + i * spec.pos_stride, &mut cos, &mut sin);
            }
            if spec.n_new == 1 {
                singles.push(r);
            } else if spec.n_new > 1 {
                match blocks.last_mut() {
                    Some(b)
                        if b.n == spec.n_new
                            && b.at == lens[r]
                            && b.lo + b.span == slots[r]
                            && b.first + b.span * b.n == g =>
                    {
                        b.span += 1
                    }
                    _ => blocks.push(BlockWrite {
                        lo: slots[r],
                        span: 1,
                        at: lens[r],
                        first: g,
                        n: spec.n_new,
                    }),
                }
            }
            g += spec.n_new;
        }
        let cos = Tensor::from_vec(cos, (n, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), dev)?.to_dtype(dtype)?;
        let scatter = match (
            singles.iter().map(|&r| slots[r]).min(),
            singles.iter().map(|&r| slots[r]).max(),
        ) {
            (Some(lo), Some(hi)) => {
                let span = hi - lo + 1;
                let mut src = vec![0u32; span];
                let mut at = vec![u32::MAX; span * nh];
                for &r in &singles {
                    let s = slots[r] - lo;
                    src[s] = first[r] as u32;
                    at[s * nh..(s + 1) * nh].fill(lens[r] as u32);
                }
                Some(SingleWrite {
                    lo,
                    span,
                    src: Tensor::from_vec(src, span, dev)?,
                    at: Tensor::from_vec(at, (span * nh, 1, 1), dev)?
                        .broadcast_as((span * nh, 1, pool.head_dim))?
                        .contiguous()?,
                })
            }
            _ => None,
        };

        // Group rows by their number of new positions; split groups too large to batch.
        let mut by_len: Vec<(usize, Vec<usize>)> = Vec::new();
        for (r, spec) in rows.iter().enumerate() {
            match by_len.iter_mut().find(|(q, _)| *q == spec.n_new) {
                Some((_, v)) => v.push(r),
                None => by_len.push((spec.n_new, vec![r])),
            }
        }
        let mut groups = Vec::new();
        let mut gather = vec![0u32; n];
        let mut out_rows = 0usize;
        for (n_q, mut members) in by_len {
            // Runs of consecutive slots (sorted) while the run's scores fit the budget; each
            // run with the keys it attends to, `t`.
            members.sort_by_key(|&r| slots[r]);
            let mut parts: Vec<(Vec<usize>, usize)> = Vec::new();
            for r in members {
                let keys = lens[r] + n_q;
                match parts.last_mut() {
                    Some((p, t))
                        if (slots[r] - slots[p[0]] + 1) * nh * n_q * keys.max(*t)
                            <= GROUP_SCORE_BUDGET =>
                    {
                        p.push(r);
                        *t = keys.max(*t);
                    }
                    _ => parts.push((vec![r], keys)),
                }
            }
            for (part, t) in parts {
                let lo = slots[part[0]];
                let span = slots[part[part.len() - 1]] - lo + 1;
                // Slots without a row of this part read the part's first row's queries and
                // may attend to position 0 only (their output is ignored).
                let mut q_index = vec![first[part[0]] as u32; span * n_q];
                let mut limit = vec![0u32; span * n_q];
                for &r in &part {
                    let s = slots[r] - lo;
                    for i in 0..n_q {
                        q_index[s * n_q + i] = (first[r] + i) as u32;
                        limit[s * n_q + i] = (lens[r] + i) as u32;
                        gather[first[r] + i] = (out_rows + s * n_q + i) as u32;
                    }
                }
                out_rows += span * n_q;
                groups.push(Group {
                    lo,
                    span,
                    n_q,
                    t,
                    q_index: Tensor::from_vec(q_index, span * n_q, dev)?,
                    limit: Tensor::from_vec(limit, (span, 1, n_q, 1), dev)?,
                });
            }
        }
        Ok(PoolStep {
            cos,
            sin,
            scatter,
            blocks,
            groups,
            gather: Tensor::from_vec(gather, n, dev)?,
        })
    }
}

/// One layer of cached attention on a pool.
///
/// - `q`, `k`, `v`: `[heads, N, head_dim]`, contiguous, keys and queries already rotated;
/// - keys and values are written into the rows' slots at `[len, len + n_new)` (one scatter for
///   the rows bringing one position, a block copy per row bringing a prompt);
/// - returns the attention output `[N, heads * head_dim]`.
pub fn pooled_attention(
    pool: &KvPool,
    layer: usize,
    step: &PoolStep,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    let (nh, _, hd) = q.dims3()?;
    let (kp, vp) = (&pool.k[layer], &pool.v[layer]);
    let dev = q.device();
    section("kv write", dev, || -> candle_core::Result<()> {
        // Single positions: one scatter per tensor for all of them.
        if let Some(w) = &step.scatter {
            for (dst, src) in [(kp, k), (vp, v)] {
                let rows = src
                    .index_select(&w.src, 1)? // [nh, span, hd]
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((w.span * nh, 1, hd))?;
                dst.narrow(0, w.lo, w.span)?
                    .reshape((w.span * nh, pool.capacity, hd))?
                    .scatter_set(&w.at, &rows, 1)?;
            }
        }
        // Prompts and prefixes: one block copy per run of rows in consecutive slots (no index
        // tensor the size of the prompts).
        for b in &step.blocks {
            for (dst, src) in [(kp, k), (vp, v)] {
                let rows = src
                    .narrow(1, b.first, b.span * b.n)?
                    .reshape((nh, b.span, b.n, hd))?
                    .transpose(0, 1)?
                    .contiguous()?; // [span, nh, n, hd]
                dst.narrow(0, b.lo, b.span)?.slice_set(&rows, 2, b.at)?;
            }
        }
        Ok(())
    })?;
    section("attention", dev, || -> candle_core::Result<Tensor> {
        let scale = 1.0 / (hd as f32).sqrt();
        let fused = fused_kernels(dev);
        let mut outs = Vec::with_capacity(step.groups.len());
        for g in &step.groups {
            let qg = q
                .index_select(&g.q_index, 1)? // [nh, span*n_q, hd]
                .reshape((nh, g.span, g.n_q, hd))?
                .transpose(0, 1)?
                .contiguous()?; // [span, nh, n_q, hd]
            if fused && g.n_q == 1 && decode_supported(hd) {
                // One query per row: straight over the pool, each key and value read once.
                let o = decode_attention(&qg, kp, vp, g.lo, &g.limit, scale)?; // [span, nh, 1, hd]
                outs.push(o.reshape((g.span, nh * hd))?);
                continue;
            }
            let kg = kp.narrow(0, g.lo, g.span)?.narrow(2, 0, g.t)?; // [span, nh, t, hd] view
            let vg = vp.narrow(0, g.lo, g.span)?.narrow(2, 0, g.t)?;
            // Scores [span, nh, n_q, t]; each query sees keys 0..=its limit.
            let scores = qg.matmul(&kg.t()?)?;
            let p = if fused {
                masked_softmax(&scores, &g.limit, scale)?
            } else {
                reference(&scores, &g.limit, scale)?
            };
            let o = p.matmul(&vg)?; // [span, nh, n_q, hd]
            outs.push(o.transpose(1, 2)?.reshape((g.span * g.n_q, nh * hd))?);
        }
        let all = if outs.len() == 1 {
            outs.pop().expect("one group")
        } else {
            Tensor::cat(&outs, 0)?
        };
        all.index_select(&step.gather, 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_lowest_first() {
        let pool = KvPool::new(1, 1, 2, 4, 3, DType::F32, &Device::Cpu).unwrap();
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        let c = pool.acquire().unwrap();
        assert_eq!((a.slot, b.slot, c.slot), (0, 1, 2));
        assert!(pool.acquire().is_none());
        drop(b);
        assert_eq!(pool.acquire().unwrap().slot, 1);
    }

    /// Keys and values land in their slots at their positions, and nothing else is written:
    /// single positions in slots with gaps and different lengths, a run of two prompts in
    /// consecutive slots, and a lone prompt.
    #[test]
    fn pooled_writes_land_in_their_slots_only() {
        let (nh, hd, cap, slots) = (2, 4, 8, 7);
        let dev = Device::Cpu;
        let pool = KvPool::new(1, nh, hd, cap, slots, DType::F32, &dev).unwrap();
        for t in [&pool.k[0], &pool.v[0]] {
            t.slice_set(
                &Tensor::full(-1f32, (slots, nh, cap, hd), &dev).unwrap(),
                0,
                0,
            )
            .unwrap();
        }
        // (slot, cache length before, new positions), in step order.
        let rows = [(1, 3, 1), (4, 0, 1), (2, 2, 2), (3, 2, 2), (6, 5, 3)];
        let specs: Vec<RowSpec> = rows
            .iter()
            .map(|&(_, len, n)| RowSpec::arange(n, len))
            .collect();
        let sl: Vec<usize> = rows.iter().map(|r| r.0).collect();
        let lens: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let n: usize = rows.iter().map(|r| r.2).sum();
        let rotary = Rotary::new(0, 10000.0, 16);
        let step = PoolStep::new(&pool, &specs, &sl, &lens, &rotary, DType::F32, &dev).unwrap();
        assert_eq!(
            step.blocks.len(),
            2,
            "slots 2 and 3 are one run, slot 6 another"
        );
        // Key of step position p, head h, element e: 100 p + 10 h + e; values negated.
        let k: Vec<f32> = (0..nh)
            .flat_map(|h| {
                (0..n).flat_map(move |p| (0..hd).map(move |e| (100 * p + 10 * h + e) as f32))
            })
            .collect();
        let k = Tensor::from_vec(k, (nh, n, hd), &dev).unwrap();
        let v = k.neg().unwrap();
        pooled_attention(&pool, 0, &step, &k, &k, &v).unwrap();
        let pk: Vec<f32> = pool.k[0].flatten_all().unwrap().to_vec1().unwrap();
        let pv: Vec<f32> = pool.v[0].flatten_all().unwrap().to_vec1().unwrap();
        let mut expect = vec![-1f32; slots * nh * cap * hd];
        let mut first = 0;
        for &(slot, len, cnt) in &rows {
            for i in 0..cnt {
                for h in 0..nh {
                    for e in 0..hd {
                        let at = ((slot * nh + h) * cap + len + i) * hd + e;
                        expect[at] = (100 * (first + i) + 10 * h + e) as f32;
                    }
                }
            }
            first += cnt;
        }
        assert_eq!(pk, expect);
        let expect_v: Vec<f32> = expect
            .iter()
            .map(|&x| if x == -1.0 { -1.0 } else { -x })
            .collect();
        assert_eq!(pv, expect_v);
    }
}
