//! Roofline model of a generation run: how fast this machine could possibly run it.
//!
//! - [`Machine`]: this machine's achievable f32 matmul FLOP/s and memory bandwidth, measured by
//!   a short probe ([`Machine::probe`]) and cached as JSON ([`Machine::load_or_probe`]).
//! - [`cost`]: every kernel of every engine step of a run (embedder, dense layers, attention,
//!   LM head), with its FLOPs and the bytes it must move (weights read once per call, KV caches
//!   read and written, logits written and read back).
//! - [`Roofline::bound`]: `sum over model calls of max(FLOPs / peak, bytes / bandwidth)`, a
//!   lower bound on the run's wall time (calls run one after another; within a call compute
//!   and memory traffic are allowed to overlap), hence an upper bound on its throughput. The
//!   stricter per-kernel sum is reported too (`kernel_seconds`).
//!
//! The engine's step structure is followed exactly (see `docs/bench.md`): a block model's first
//! step runs the block decoder over all `ceil(P / L)` prompt blocks (left-padded), later steps
//! over one block; each step then decodes one block with the token decoder: a prefix step over
//! `R` positions and `L - 1` one-token steps, each followed by the LM head. A vanilla model's
//! first step runs the whole prompt (LM head on the last position only), then one token a step.

use crate::config::{ModelConfig, NeoXConfig, Projection};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

const F32: f64 = 4.0;

/// Sizes of one generation run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Rows decoded together.
    pub batch: usize,
    /// Prompt tokens per row.
    pub prompt_len: usize,
    /// Generated tokens per row (no early stop).
    pub new_tokens: usize,
}

/// Which part of the model a kernel belongs to (the engine's time split).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Block models: token lookup and concat/projection of new blocks; vanilla: token lookup.
    Embedder,
    /// Block models: the block decoder; vanilla models: the decoder stack.
    BlockDecoder,
    /// Block models: expansion and token-decoder layers.
    TokenDecoder,
    /// The LM head.
    LmHead,
}

/// What a kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Embed,
    /// Weight matmuls of a layer stack (and the expansion layer).
    Dense,
    /// Cached attention: rotary, KV writes, `QK^T` and `PV` over the cache.
    Attention,
    /// LM head and the logits the sampler reads back.
    LmHead,
    /// Greedy decoding's LM head through its bfloat16 screen ([`crate::kernels::screen`]):
    /// bfloat16 weights, its FLOPs at the machine's bfloat16 rate.
    ScreenedLmHead,
}

/// One kernel of one engine step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Kernel {
    /// Engine step (0-based); step 0 prefills.
    pub step: usize,
    /// Model call (0-based over the run): one block-decoder call (embedder, layers,
    /// attention), one token-decoder call (layers, attention, LM head) per token position
    /// (the first one also expands the prefix), one vanilla call per step.
    pub call: usize,
    pub part: Part,
    pub kind: Kind,
    pub flops: f64,
    pub bytes: f64,
}

impl Kernel {
    pub fn prefill(&self) -> bool {
        self.step == 0
    }
}

/// Attention FLOPs of `n` new positions over a cache that already holds `past` positions, for
/// `layers` layers of width `w`: position `i` attends to `past + i + 1` keys, `QK^T` and `PV`
/// cost `2 w` FLOPs per key each.
fn attn_flops(layers: usize, w: usize, past: usize, n: usize) -> f64 {
    // sum_{i=1..n} 4 w (past + i) = 4 w (n past + n (n + 1) / 2)
    let keys = (n * past) as f64 + (n * (n + 1)) as f64 / 2.0;
    4.0 * (layers * w) as f64 * keys
}

/// Bytes of the cache traffic of `n` new positions after `past`: every key and value of the
/// `past + n` positions is read once (the new ones are written once too).
fn attn_bytes(e: f64, layers: usize, w: usize, past: usize, n: usize) -> f64 {
    e * (2 * layers * w) as f64 * ((past + n) + n) as f64
}

/// The kernels of a generation run, in order, for `rows` rows, with float32 weights and
/// caches.
pub fn cost(cfg: &ModelConfig, w: &Workload) -> Vec<Kernel> {
    cost_with(cfg, w, F32)
}

/// [`cost`] with weights, caches and activations of `e` bytes per element (2 for bf16/f16).
pub fn cost_with(cfg: &ModelConfig, w: &Workload, e: f64) -> Vec<Kernel> {
    cost_typed(cfg, w, e, e, e)
}

/// [`cost_with`] with the decoder layers' and the LM head's weights at `e_w` bytes each (1.0625
/// for `q8_0`; the embedder's tables and the token decoder's expansion keep `e`) and the
/// long-lived caches (block decoder, vanilla stack) at `e_kv` bytes per element (2 for the
/// host path's `--kv-cache f16`; the token decoder's per-block cache keeps `e`).
pub fn cost_typed(cfg: &ModelConfig, w: &Workload, e: f64, e_w: f64, e_kv: f64) -> Vec<Kernel> {
    let mut out = Vec::new();
    let b = w.batch as f64;
    if w.batch == 0 || w.new_tokens == 0 || w.prompt_len == 0 {
        return out;
    }
    match cfg {
        ModelConfig::Block(c) => {
            let l = c.block_length;
            let n_p = w.prompt_len.div_ceil(l);
            let steps = w.new_tokens.div_ceil(l);
            let bd = &c.block_decoder;
            let td = &c.token_decoder;
            let (d, h, r, v) = (bd.hidden_size, td.hidden_size, c.n_prefix(), td.vocab_size);
            let d_e = c.embedder.hidden_size;
            let (n_bd, n_td) = (bd.layer_params() as f64, td.layer_params() as f64);
            let (lb, lt) = (bd.num_hidden_layers, td.num_hidden_layers);
            let lm_head = |step: usize, rows: f64| Kernel {
                step,
                call: 0,
                part: Part::LmHead,
                kind: Kind::LmHead,
                flops: 2.0 * rows * (v * h) as f64,
                bytes: e_w * (v * h) as f64 + 2.0 * e * rows * v as f64,
            };
            for s in 0..steps {
                // Block decoder over the new blocks: all prompt blocks, then one block.
                let (past, new) = if s == 0 { (0, n_p) } else { (n_p + s - 1, 1) };
                let tokens = b * (new * l) as f64;
                let proj = match c.embedder.projection_method {
                    Projection::Concat => 0.0,
                    Projection::ProjectionLayer => (d * l * d_e + d) as f64,
                };
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::Embedder,
                    kind: Kind::Embed,
                    flops: 2.0 * b * new as f64 * proj,
                    bytes: 2.0 * e * tokens * d_e as f64 + e * proj,
                });
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::BlockDecoder,
                    kind: Kind::Dense,
                    flops: 2.0 * b * new as f64 * n_bd,
                    bytes: e_w * n_bd,
                });
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::BlockDecoder,
                    kind: Kind::Attention,
                    flops: b * attn_flops(lb, d, past, new),
                    bytes: b * attn_bytes(e_kv, lb, d, past, new),
                });
                // Token decoder: expansion, prefix step over R positions, LM head; then one
                // step per further token of the block.
                let want = (w.new_tokens - s * l).min(l);
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::TokenDecoder,
                    kind: Kind::Dense,
                    flops: 2.0 * b * (d * r * h) as f64 + 2.0 * b * r as f64 * n_td,
                    bytes: e * ((d + 1) * r * h) as f64 + e_w * n_td,
                });
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::TokenDecoder,
                    kind: Kind::Attention,
                    flops: b * attn_flops(lt, h, 0, r),
                    bytes: b * attn_bytes(e, lt, h, 0, r),
                });
                out.push(lm_head(s, b));
                for k in 1..want {
                    out.push(Kernel {
                        step: s,
                        call: 0,
                        part: Part::TokenDecoder,
                        kind: Kind::Dense,
                        flops: 2.0 * b * n_td,
                        bytes: e_w * n_td + e * b * h as f64,
                    });
                    out.push(Kernel {
                        step: s,
                        call: 0,
                        part: Part::TokenDecoder,
                        kind: Kind::Attention,
                        flops: b * attn_flops(lt, h, r + k - 1, 1),
                        bytes: b * attn_bytes(e, lt, h, r + k - 1, 1),
                    });
                    out.push(lm_head(s, b));
                }
            }
        }
        ModelConfig::Vanilla(c) => {
            let (wd, v, lv) = (c.hidden_size, c.vocab_size, c.num_hidden_layers);
            let n = c.layer_params() as f64;
            for s in 0..w.new_tokens {
                let (past, new) = if s == 0 {
                    (0, w.prompt_len)
                } else {
                    (w.prompt_len + s - 1, 1)
                };
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::Embedder,
                    kind: Kind::Embed,
                    flops: 0.0,
                    bytes: 2.0 * e * b * (new * wd) as f64,
                });
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::BlockDecoder,
                    kind: Kind::Dense,
                    flops: 2.0 * b * new as f64 * n,
                    bytes: e_w * n,
                });
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::BlockDecoder,
                    kind: Kind::Attention,
                    flops: b * attn_flops(lv, wd, past, new),
                    bytes: b * attn_bytes(e_kv, lv, wd, past, new),
                });
                out.push(Kernel {
                    step: s,
                    call: 0,
                    part: Part::LmHead,
                    kind: Kind::LmHead,
                    flops: 2.0 * b * (v * wd) as f64,
                    bytes: e_w * (v * wd) as f64 + 2.0 * e * b * v as f64,
                });
            }
        }
    }
    // Number the model calls: each starts with an embedding or a token-decoder layer pass.
    let mut call = 0;
    for (i, k) in out.iter_mut().enumerate() {
        let starts =
            k.kind == Kind::Embed || (k.part == Part::TokenDecoder && k.kind == Kind::Dense);
        if starts && i > 0 {
            call += 1;
        }
        k.call = call;
    }
    out
}

/// The LM head kernels of `kernels` as greedy decoding runs them through the bfloat16 screen
/// ([`crate::kernels::screen`]): the weights read as bfloat16 (2 bytes each, plus 8 bytes of
/// bound terms per column) instead of `e_w` bytes, the FLOPs at the bfloat16 rate
/// ([`Kind::ScreenedLmHead`]). The exact float32 pass over the few columns left is not
/// counted (a few columns per row).
pub fn screen_lm_head(kernels: &mut [Kernel], cfg: &ModelConfig, e_w: f64) {
    let (v, h) = match cfg {
        ModelConfig::Block(c) => (c.token_decoder.vocab_size, c.token_decoder.hidden_size),
        ModelConfig::Vanilla(c) => (c.vocab_size, c.hidden_size),
    };
    let (v, h) = (v as f64, h as f64);
    for k in kernels.iter_mut().filter(|k| k.kind == Kind::LmHead) {
        k.kind = Kind::ScreenedLmHead;
        k.bytes += (2.0 - e_w) * v * h + 8.0 * v;
    }
}

/// Engine steps of a run: one per block (block models) or per token (vanilla).
pub fn engine_steps(cfg: &ModelConfig, new_tokens: usize) -> usize {
    match cfg {
        ModelConfig::Block(c) => new_tokens.div_ceil(c.block_length),
        ModelConfig::Vanilla(_) => new_tokens,
    }
}

/// The roofline bound of a run on a machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Roofline {
    pub flops: f64,
    pub bytes: f64,
    /// `sum max(FLOPs / peak, bytes / bandwidth)` over the run's model calls.
    pub seconds: f64,
    /// The same summed over single kernels (dense layers, attention, LM head apart): a
    /// tighter bound, for kernels that cannot overlap.
    pub kernel_seconds: f64,
    /// The same, prefill step only / later steps only.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// By part (the engine's time split).
    pub embedder_s: f64,
    pub block_decoder_s: f64,
    pub token_decoder_s: f64,
    pub lm_head_s: f64,
    /// Seconds of the calls that are memory-bound (bytes / bandwidth > FLOPs / peak).
    pub memory_bound_s: f64,
    /// Of which reading and writing KV caches.
    pub kv_s: f64,
    /// Generated tokens / seconds.
    pub tokens_per_s: f64,
}

impl Roofline {
    /// The bound: `sum over model calls of max(FLOPs / peak, bytes / bandwidth)` (the
    /// benchmark's definition: within one call, compute and memory traffic may overlap), with
    /// the per-kernel variant in `kernel_seconds`.
    pub fn bound(cfg: &ModelConfig, w: &Workload, m: &Machine) -> Roofline {
        Self::bound_with(cfg, w, m, F32)
    }

    /// [`Roofline::bound`] for elements of `e` bytes (weights and caches).
    pub fn bound_with(cfg: &ModelConfig, w: &Workload, m: &Machine, e: f64) -> Roofline {
        Self::bound_typed(cfg, w, m, e, e, e)
    }

    /// [`Roofline::bound_with`] with the decoder layers' and LM head's weights at `e_w` bytes
    /// each and the long-lived caches at `e_kv` (see [`cost_typed`]).
    pub fn bound_typed(
        cfg: &ModelConfig,
        w: &Workload,
        m: &Machine,
        e: f64,
        e_w: f64,
        e_kv: f64,
    ) -> Roofline {
        Self::bound_sampled(cfg, w, m, (e, e_w, e_kv), &[])
    }

    /// [`Roofline::bound_typed`] (elements of `(e, e_w, e_kv)` bytes) with the bandwidth of
    /// each engine step read from samples taken during the run ([`step_bandwidth`]; the
    /// machine's where there are none).
    pub fn bound_sampled(
        cfg: &ModelConfig,
        w: &Workload,
        m: &Machine,
        (e, e_w, e_kv): (f64, f64, f64),
        samples: &[BandwidthSample],
    ) -> Roofline {
        Self::of_kernels(&cost_typed(cfg, w, e, e_w, e_kv), w, m, samples)
    }

    /// The bound of these kernels ([`cost_typed`], possibly adjusted, e.g. by
    /// [`screen_lm_head`]) with each engine step's bandwidth from `samples`.
    pub fn of_kernels(
        kernels: &[Kernel],
        w: &Workload,
        m: &Machine,
        samples: &[BandwidthSample],
    ) -> Roofline {
        let rate = |k: &Kernel| {
            if k.kind == Kind::ScreenedLmHead && m.bf16_flops > 0.0 {
                m.bf16_flops
            } else {
                m.flops
            }
        };
        let mut r = Roofline::default();
        let mut i = 0;
        while i < kernels.len() {
            let call = kernels[i].call;
            let j = kernels[i..]
                .iter()
                .position(|k| k.call != call)
                .map_or(kernels.len(), |n| i + n);
            let ks = &kernels[i..j];
            let bw = step_bandwidth(samples, ks[0].step).unwrap_or(m.bandwidth);
            let flops: f64 = ks.iter().map(|k| k.flops).sum();
            let bytes: f64 = ks.iter().map(|k| k.bytes).sum();
            let tc: f64 = ks.iter().map(|k| k.flops / rate(k)).sum();
            let tm = bytes / bw;
            let t = tc.max(tm);
            r.flops += flops;
            r.bytes += bytes;
            r.seconds += t;
            if ks[0].prefill() {
                r.prefill_s += t;
            } else {
                r.decode_s += t;
            }
            // The call's time split over its kernels in proportion to their own bounds.
            let own: Vec<f64> = ks
                .iter()
                .map(|k| (k.flops / rate(k)).max(k.bytes / bw))
                .collect();
            let total: f64 = own.iter().sum();
            r.kernel_seconds += total;
            for (k, o) in ks.iter().zip(&own) {
                let share = if total > 0.0 { t * o / total } else { 0.0 };
                match k.part {
                    Part::Embedder => r.embedder_s += share,
                    Part::BlockDecoder => r.block_decoder_s += share,
                    Part::TokenDecoder => r.token_decoder_s += share,
                    Part::LmHead => r.lm_head_s += share,
                }
            }
            if tm > tc {
                r.memory_bound_s += t;
                r.kv_s += ks
                    .iter()
                    .filter(|k| k.kind == Kind::Attention)
                    .map(|k| k.bytes / bw)
                    .sum::<f64>();
            }
            i = j;
        }
        if r.seconds > 0.0 {
            r.tokens_per_s = (w.batch * w.new_tokens) as f64 / r.seconds;
        }
        r
    }
}

/// The machine's memory bandwidth read during a run, after `step` engine steps (0: before the
/// first).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BandwidthSample {
    pub step: usize,
    /// Bytes / s, as the probe counts them.
    pub bandwidth: f64,
}

/// The bandwidth during engine step `step` (0-based): the mean of the last reading before it
/// and the first after it, or the one of the two there is; `None` without samples.
pub fn step_bandwidth(samples: &[BandwidthSample], step: usize) -> Option<f64> {
    let before = samples.iter().rev().find(|s| s.step <= step);
    let after = samples.iter().find(|s| s.step > step);
    match (before, after) {
        (Some(a), Some(b)) => Some(0.5 * (a.bandwidth + b.bandwidth)),
        (Some(s), None) | (None, Some(s)) => Some(s.bandwidth),
        (None, None) => None,
    }
}

/// Memory a run needs, by the same accounting as the cost model (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryModel {
    /// Parameters held (f32).
    pub weights: usize,
    /// KV caches of one row as the engine allocates them (block decoder over the prompt and
    /// generated blocks + one, token decoder over `R + L - 1`; vanilla over `P + G`).
    pub kv_per_sample: usize,
    /// The largest step's live activations per row (prefill: hidden states, QKV, MLP
    /// intermediate, the logits and their host copy).
    pub activations_per_sample: usize,
    /// The host path runs a prefill of more than this many rows in groups
    /// ([`crate::model::gpt_neox::PREFILL_CHUNK`] positions); `usize::MAX` when it does not.
    pub rows_per_group: usize,
    /// Per row: the work buffers a group reuses (all but the input and the output, which
    /// every row keeps: each group writes its rows' part of one output buffer).
    pub group_buffers_per_sample: usize,
}

impl MemoryModel {
    pub fn new(cfg: &ModelConfig, prompt_len: usize, new_tokens: usize) -> MemoryModel {
        Self::with_elem(cfg, prompt_len, new_tokens, std::mem::size_of::<f32>())
    }

    /// [`MemoryModel::new`] with `f` bytes per element (2 for bf16/f16 on a GPU).
    pub fn with_elem(
        cfg: &ModelConfig,
        prompt_len: usize,
        new_tokens: usize,
        f: usize,
    ) -> MemoryModel {
        Self::with_elems(cfg, prompt_len, new_tokens, f, f)
    }

    /// [`MemoryModel::with_elem`] with the long-lived caches (block decoder, vanilla stack) at
    /// `f_kv` bytes per element (the host path's `--kv-cache f16`: 2).
    pub fn with_elems(
        cfg: &ModelConfig,
        prompt_len: usize,
        new_tokens: usize,
        f: usize,
        f_kv: usize,
    ) -> MemoryModel {
        let stack_act = |c: &NeoXConfig, n: usize| {
            // The cached forward's buffers: input and output, and the work buffers reused by
            // every layer: residual stream, LayerNorm out, QKV (3W), attention out, MLP
            // intermediate.
            n * (8 * c.hidden_size + c.intermediate_size) * f
        };
        // Prefill groups of the host path (over the stack that takes the prompt).
        let grouping = |c: &NeoXConfig, n: usize| {
            let chunk = crate::model::gpt_neox::PREFILL_CHUNK;
            (
                (chunk / n.max(1)).max(1),
                n * (6 * c.hidden_size + c.intermediate_size) * f,
            )
        };
        match cfg {
            ModelConfig::Block(c) => {
                let l = c.block_length;
                let n_p = prompt_len.div_ceil(l);
                let bd = &c.block_decoder;
                let td = &c.token_decoder;
                let blocks = n_p + new_tokens.div_ceil(l) + 1;
                let kv_bd = 2 * bd.num_hidden_layers * blocks * bd.hidden_size * f_kv;
                let kv_td = 2
                    * td.num_hidden_layers
                    * (c.n_prefix() + l.saturating_sub(1))
                    * td.hidden_size
                    * f;
                let logits = 2 * td.vocab_size * f;
                // The embedder's lookups: with concat they are the block decoder's input
                // (counted there); a projection layer keeps them beside its output.
                let lookups = match c.embedder.projection_method {
                    Projection::Concat => 0,
                    Projection::ProjectionLayer => n_p * l * c.embedder.hidden_size * f,
                };
                let act = (stack_act(bd, n_p) + lookups).max(stack_act(td, c.n_prefix())) + logits;
                let (rows_per_group, group_buffers_per_sample) = grouping(bd, n_p);
                MemoryModel {
                    weights: cfg.total_params() * f,
                    kv_per_sample: kv_bd + kv_td,
                    activations_per_sample: act,
                    rows_per_group,
                    group_buffers_per_sample,
                }
            }
            ModelConfig::Vanilla(c) => {
                let kv = 2 * c.num_hidden_layers * (prompt_len + new_tokens) * c.hidden_size * f_kv;
                let (rows_per_group, group_buffers_per_sample) = grouping(c, prompt_len);
                MemoryModel {
                    weights: cfg.total_params() * f,
                    kv_per_sample: kv,
                    activations_per_sample: stack_act(c, prompt_len) + 2 * c.vocab_size * f,
                    rows_per_group,
                    group_buffers_per_sample,
                }
            }
        }
    }

    /// Weights + caches + activations of `batch` rows.
    pub fn total(&self, batch: usize) -> usize {
        self.weights + batch * self.kv_per_sample + self.activations(batch)
    }

    /// Caches + activations of `batch` rows: [`MemoryModel::total`] less the weights, or
    /// `None` past `usize` (a batch given on the command line can be any number).
    pub fn beyond_weights(&self, batch: usize) -> Option<usize> {
        // `batch` whole rows of caches and activations bound the need from above.
        batch.checked_mul(self.kv_per_sample + self.activations_per_sample)?;
        Some(batch * self.kv_per_sample + self.activations(batch))
    }

    /// The largest step's activations with `batch` rows: a prefill of more than
    /// `rows_per_group` rows reuses one group's work buffers (and keeps every group's output).
    /// At most `batch * activations_per_sample`, the per-row figure the batch auto-tune uses.
    pub fn activations(&self, batch: usize) -> usize {
        if batch <= self.rows_per_group {
            return batch * self.activations_per_sample;
        }
        batch * self.activations_per_sample
            - (batch - self.rows_per_group) * self.group_buffers_per_sample
    }

    /// The largest batch whose [`MemoryModel::total`] plus `overhead` fits `budget`: exact up
    /// to 8, then a multiple of 8; at most `max_batch`. `None` if not even one row fits.
    pub fn largest_batch(&self, budget: usize, overhead: usize, max_batch: usize) -> Option<usize> {
        let fixed = self.weights + overhead;
        let per = (self.kv_per_sample + self.activations_per_sample).max(1);
        if budget < fixed + per || max_batch == 0 {
            return None;
        }
        let b = ((budget - fixed) / per).min(max_batch);
        Some(if b > 8 { b / 8 * 8 } else { b })
    }
}

/// This machine's achievable speeds, as measured by [`Machine::probe`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// f32 matmul FLOP/s (best of a few `N x N x N` products through candle).
    pub flops: f64,
    /// The same for bfloat16 dot products (`flops` times the ratio of the CPU's bfloat16 and
    /// float32 multiply-add rates, [`crate::kernels::screen::rate_ratio`]); 0 where it has
    /// none (a cache from before this field reads 0 too).
    #[serde(default)]
    pub bf16_flops: f64,
    /// Memory bandwidth in bytes/s used by the bound: the better of `read_bandwidth` and
    /// `copy_bandwidth`.
    pub bandwidth: f64,
    /// Streaming read of a large buffer (a reduction), bytes/s.
    pub read_bandwidth: f64,
    /// Copy of a large buffer, read + written bytes per second.
    pub copy_bandwidth: f64,
    pub cpu: String,
    pub threads: usize,
    /// Matmul size and buffer size of the probe.
    pub matmul_n: usize,
    pub buffer_mib: usize,
    /// Seconds since the Unix epoch when probed.
    pub probed_at: u64,
}

/// Where the probe came from.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeSource {
    Cache(PathBuf),
    Measured(Option<PathBuf>),
}

impl Machine {
    /// `", bf16 dot N GFLOP/s"` where the machine has a bfloat16 rate, else nothing (for the
    /// reports' machine lines).
    pub fn bf16_note(&self) -> String {
        if self.bf16_flops > 0.0 {
            format!(", bf16 dot {:.1} GFLOP/s", self.bf16_flops / 1e9)
        } else {
            String::new()
        }
    }

    /// Data-sheet peaks of known GPUs (dense bf16 tensor-core FLOP/s, HBM bytes/s), matched on
    /// the driver's device name.
    pub fn gpu_data_sheet(name: &str) -> Option<(f64, f64)> {
        let n = name.to_ascii_uppercase();
        if n.contains("H200") {
            Some((989e12, 4.8e12))
        } else if n.contains("H100") && (n.contains("PCIE") || n.contains("PCI")) {
            Some((756e12, 2.0e12))
        } else if n.contains("H100") {
            Some((989e12, 3.35e12))
        } else if n.contains("A100") {
            Some((312e12, 2.0e12))
        } else {
            None
        }
    }
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `$XDG_CACHE_HOME/blockformer/probe.json`, else `~/.cache/blockformer/probe.json`.
pub fn default_cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("blockformer").join("probe.json"))
}

/// Seconds of matmuls before the probe times one.
const WARM_UP_S: f64 = 0.5;

impl Machine {
    /// Measures matmul FLOP/s (`n x n x n`, best of `reps`) and bandwidth over a buffer of
    /// `buffer_mib` MiB (best of `reps`), on rayon's current thread count.
    pub fn probe_with(n: usize, buffer_mib: usize, reps: usize) -> crate::Result<Machine> {
        use candle_core::{Device, Tensor};
        let reps = reps.max(1);
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        // Warm-up: thread pool, page faults, and half a second for the cores to reach their
        // working clock (a probe straight after an idle spell read half the speed).
        let warm = Instant::now();
        while warm.elapsed().as_secs_f64() < WARM_UP_S {
            std::hint::black_box(a.matmul(&b)?);
        }
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            let c = a.matmul(&b)?;
            best = best.min(t.elapsed().as_secs_f64());
            drop(c);
        }
        let flops = 2.0 * (n as f64).powi(3) / best;

        let (read_bandwidth, copy_bandwidth) = measure_bandwidth(buffer_mib, reps);
        let bf16_flops = crate::kernels::screen::rate_ratio().map_or(0.0, |r| r * flops);
        Ok(Machine {
            flops,
            bf16_flops,
            bandwidth: read_bandwidth.max(copy_bandwidth),
            read_bandwidth,
            copy_bandwidth,
            cpu: cpu_model(),
            threads: rayon::current_num_threads(),
            matmul_n: n,
            buffer_mib,
            probed_at: unix_now(),
        })
    }

    /// The standard probe: 1024^3 matmul and a 256 MiB buffer, best of 5 (a few seconds).
    pub fn probe() -> crate::Result<Machine> {
        Self::probe_with(1024, 256, 5)
    }

    /// This machine's memory bandwidth now, measured as the probe measures it (its buffer,
    /// best of 3; a fraction of a second): the bench reads it around each measurement to tell
    /// whether the machine kept the bandwidth its probe saw.
    pub fn bandwidth_now(&self) -> f64 {
        let (read, copy) = measure_bandwidth(self.buffer_mib, 3);
        read.max(copy)
    }

    /// This machine with its bandwidth measured again as the probe measures it (the matmul
    /// speed kept): the bound of a measurement repeated because the bandwidth moved.
    pub fn with_bandwidth_now(&self) -> Machine {
        let (read, copy) = measure_bandwidth(self.buffer_mib, 5);
        Machine {
            bandwidth: read.max(copy),
            read_bandwidth: read,
            copy_bandwidth: copy,
            probed_at: unix_now(),
            ..self.clone()
        }
    }

    /// The cached probe for this CPU and thread count, or a fresh one (then cached). A cache
    /// that cannot be written is not an error.
    pub fn load_or_probe(
        cache: Option<&std::path::Path>,
        reprobe: bool,
    ) -> crate::Result<(Machine, ProbeSource)> {
        let threads = rayon::current_num_threads();
        let cpu = cpu_model();
        if let (Some(p), false) = (cache, reprobe) {
            if let Some(m) = std::fs::read_to_string(p)
                .ok()
                .and_then(|s| serde_json::from_str::<Machine>(&s).ok())
                .filter(|m| {
                    m.threads == threads
                        && m.cpu == cpu
                        && m.flops > 0.0
                        && m.bandwidth > 0.0
                        && (m.bf16_flops > 0.0 || !crate::kernels::screen::supported())
                })
            {
                return Ok((m, ProbeSource::Cache(p.to_path_buf())));
            }
        }
        let m = Self::probe()?;
        let saved = cache.and_then(|p| {
            let dir = p.parent()?;
            std::fs::create_dir_all(dir).ok()?;
            std::fs::write(p, serde_json::to_string_pretty(&m).ok()?).ok()?;
            Some(p.to_path_buf())
        });
        Ok((m, ProbeSource::Measured(saved)))
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Best of `reps` reads (bytes / s) and copies ((read + written bytes) / s) of a buffer of
/// `buffer_mib` MiB, on rayon's current thread count.
fn measure_bandwidth(buffer_mib: usize, reps: usize) -> (f64, f64) {
    BandwidthMeter::new(buffer_mib).measure(reps)
}

/// The probe's bandwidth measurement over buffers it keeps (allocated and faulted in once):
/// the bench reads the bandwidth with one between the steps of a run
/// (`BenchSpec::sample_every`), without allocating there.
pub struct BandwidthMeter {
    src: Vec<f32>,
    dst: Vec<f32>,
}

impl BandwidthMeter {
    /// Two buffers of `buffer_mib` MiB each (the probe's size), written once.
    pub fn new(buffer_mib: usize) -> BandwidthMeter {
        use rayon::prelude::*;
        let len = (buffer_mib.max(1) * (1 << 20) / 4).max(1 << 14);
        let src: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 7) as f32).collect();
        let mut m = BandwidthMeter {
            src,
            dst: vec![0f32; len],
        };
        m.copy_once(); // fault the destination in
        m
    }

    /// Bytes the meter holds.
    pub fn bytes(&self) -> usize {
        4 * (self.src.len() + self.dst.len())
    }

    fn chunk(&self) -> usize {
        (self.src.len() / (4 * rayon::current_num_threads().max(1))).max(1 << 14)
    }

    fn read_once(&self) -> f32 {
        use rayon::prelude::*;
        self.src.par_chunks(self.chunk()).map(read_streams).sum()
    }

    fn copy_once(&mut self) {
        use rayon::prelude::*;
        let chunk = self.chunk();
        self.dst
            .par_chunks_mut(chunk)
            .zip(self.src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }

    /// Best of `reps` reads (bytes / s) and copies ((read + written bytes) / s), after one
    /// untimed read.
    pub fn measure(&mut self, reps: usize) -> (f64, f64) {
        let mut sink = self.read_once();
        let (mut best_read, mut best_copy) = (f64::MAX, f64::MAX);
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            sink += self.read_once();
            best_read = best_read.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            self.copy_once();
            best_copy = best_copy.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box((sink, &self.dst));
        let bytes = (self.src.len() * 4) as f64;
        (bytes / best_read, 2.0 * bytes / best_copy)
    }

    /// The bandwidth as the probe counts it (the better of read and copy), best of `reps`.
    pub fn bandwidth(&mut self, reps: usize) -> f64 {
        let (read, copy) = self.measure(reps);
        read.max(copy)
    }
}

/// Sum of `c`, read as four interleaved sequential streams (the access pattern of the decode
/// kernels, which read weight panels and several cache rows at once; one stream alone leaves
/// bandwidth unused on some CPUs). AVX-512 where available.
fn read_streams(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F.
        return unsafe { read_streams_avx512(c) };
    }
    read_streams_generic(c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_streams_avx512(c: &[f32]) -> f32 {
    read_streams_generic(c)
}

#[inline(always)]
fn read_streams_generic(c: &[f32]) -> f32 {
    const LANES: usize = 64;
    let q = c.len() / 4 / LANES * LANES;
    let (s0, rest) = c.split_at(q);
    let (s1, rest) = rest.split_at(q);
    let (s2, rest) = rest.split_at(q);
    let (s3, tail) = rest.split_at(q);
    let mut acc = [0f32; LANES];
    for i in (0..q).step_by(LANES) {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += s0[i + j] + s1[i + j] + s2[i + j] + s3[i + j];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}
