//! The decoding engine. Rows join at a block boundary ([`Engine::add`]), leave when finished or
//! cancelled ([`Engine::cancel`]), and every [`Engine::step`] decodes one block (block models)
//! or one token (vanilla models) for all active rows together.

use super::sampling::{self, Sampler, SamplingParams};
use super::PositionMode;
use crate::error::{Error, Result};
use crate::kernels::attention::{KvCache, KvDtype, RowSpec};
use crate::kernels::kv_pool::KvPool;
use crate::model::gpt_neox::{HostView, Linear};
use crate::model::{Arch, BlockTransformer, Model, Vanilla};
use candle_core::Tensor;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

pub type SeqId = u64;

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Optional attention mask over the prompt (1 = real, 0 = padding). Only left padding
    /// (caller-padded batches, as in the official API) is supported.
    pub prompt_mask: Option<Vec<u8>>,
    /// Tokens to generate; honoured exactly unless EOS comes first.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop when this token is produced. `None`: never stop early.
    pub eos_token_id: Option<u32>,
    /// Report the log-probability of each generated token and this many alternatives.
    pub logprobs: Option<usize>,
}

impl GenRequest {
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        GenRequest {
            prompt,
            prompt_mask: None,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            eos_token_id: None,
            logprobs: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The EOS token was produced (in the default mode it is not part of the output).
    Eos,
    /// `max_new_tokens` reached.
    Length,
    Cancelled,
}

/// Log-probability of a generated token under the model (temperature 1) and the top
/// alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What one step produced for one row.
#[derive(Clone, Debug)]
pub struct StepEvent {
    pub id: SeqId,
    pub tokens: Vec<u32>,
    /// One entry per generated token when the request asked for logprobs.
    pub logprobs: Vec<TokenLogprob>,
    pub finished: Option<FinishReason>,
}

#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub positions: PositionMode,
    /// Rows decoded together; more requests wait in a queue.
    pub max_batch: usize,
    /// Element type of the long-lived caches (block decoder, vanilla) on the host path; the
    /// token decoder's per-block cache stays float32. The tensor path keeps its caches in the
    /// model's dtype.
    pub kv_dtype: KvDtype,
    /// Host kernels or candle tensor ops (see [`Backend`]).
    pub backend: Backend,
    /// Tensor path: positions (tokens) each row's cache holds, i.e. the longest prompt plus
    /// new tokens a request may ask for; `None`: the model's context length.
    pub max_context: Option<usize>,
}

/// How the engine runs the cached forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// Host kernels for a float32 model on the CPU, else the tensor path.
    #[default]
    Auto,
    /// Hand-written CPU kernels over per-sequence host caches (float32 CPU models only).
    Host,
    /// Candle ops on the model's device and dtype, caches in per-stack device pools with one
    /// slot per running row (the GPU path; on the CPU it serves as its test twin).
    Tensor,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            positions: PositionMode::Trained,
            max_batch: 64,
            kv_dtype: KvDtype::F32,
            backend: Backend::Auto,
            max_context: None,
        }
    }
}

struct Seq {
    id: SeqId,
    sampler: Sampler,
    max_new: usize,
    eos: Option<u32>,
    logprobs: Option<usize>,
    /// Block decoder cache (block models, over blocks) or the model's cache (vanilla); given
    /// when the row is admitted to the batch.
    cache: KvCache,
    /// Positions `cache` must hold.
    cache_len: usize,
    /// Token decoder cache for the current block (block models).
    td_cache: Option<KvCache>,
    /// Rotary position of cache entry 0 (leading all-padding blocks are dropped but keep
    /// their positions, as in the official code).
    pos_offset: usize,
    /// Inputs of the next step: prompt blocks/tokens before the first step, then the last
    /// generated block/token.
    pending: Vec<u32>,
    generated: usize,
    /// Official mode: tokens so far including the left padding, and the official max_length.
    padded_len: usize,
    left_pad: usize,
    official_max_len: usize,
}

/// Where the engine's time went (seconds, wall clock), for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    /// Block models: embedding new blocks.
    pub embedder_s: f64,
    /// Block models: the block decoder; vanilla models: the decoder stack.
    pub block_decoder_s: f64,
    /// Block models: the token decoder (expansion and layers).
    pub token_decoder_s: f64,
    /// The LM head (greedy CPU rows: with their argmax, which its kernel takes).
    pub lm_head_s: f64,
    /// Turning logits into tokens (host copy, sampling, logprobs).
    pub sampling_s: f64,
    /// Steps that prefilled at least one prompt, and the other steps.
    pub prefill_s: f64,
    pub decode_s: f64,
    pub steps: usize,
    pub tokens: usize,
}

/// The batched decoding engine.
pub struct Engine {
    model: Arc<Model>,
    opts: EngineOptions,
    stats: EngineStats,
    running: Vec<Seq>,
    waiting: VecDeque<Seq>,
    events: Vec<StepEvent>,
    next_id: SeqId,
    /// Tensor path: the main stack's pool and the token decoder's (block models), created at
    /// the first step.
    pools: Option<(Arc<KvPool>, Option<Arc<KvPool>>)>,
    /// Host path: caches of finished rows kept for the next rows (at most `max_batch`), so a
    /// long-running engine touches fresh memory only when it grows.
    spare: Vec<(KvCache, Option<KvCache>)>,
    /// Wait for the device at every boundary of the time split (see [`Engine::set_sync_split`]).
    sync_split: bool,
}

impl Engine {
    pub fn new(model: Arc<Model>, opts: EngineOptions) -> Self {
        Engine {
            model,
            opts: EngineOptions {
                max_batch: opts.max_batch.max(1),
                ..opts
            },
            running: Vec::new(),
            waiting: VecDeque::new(),
            events: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
            pools: None,
            spare: Vec::new(),
            sync_split: false,
        }
    }

    /// On a GPU the host only queues work, so the parts of the time split (embedder, block
    /// decoder, token decoder, LM head, sampling) measure launch time and the wait lands in
    /// whichever part reads a result first. With `on`, the engine waits for the device at
    /// every boundary, so each part is its device time (at the cost of the overlap between
    /// launching one part and running the previous). No effect on the CPU.
    pub fn set_sync_split(&mut self, on: bool) {
        self.sync_split = on;
    }

    /// A boundary of the time split.
    fn split_point(&self) -> Result<()> {
        if self.sync_split {
            self.model.device().synchronize()?;
        }
        Ok(())
    }

    /// Whether this engine runs the tensor path.
    pub fn tensor_path(&self) -> bool {
        match self.opts.backend {
            Backend::Host => false,
            Backend::Tensor => true,
            Backend::Auto => {
                !(self.model.device().is_cpu() && self.model.dtype() == candle_core::DType::F32)
            }
        }
    }

    /// Positions a row's main cache may hold on the tensor path (tokens for vanilla models,
    /// blocks for block models).
    fn pool_capacity(&self) -> usize {
        let tokens = self
            .opts
            .max_context
            .unwrap_or_else(|| self.model.config.context_length());
        match &self.model.arch {
            Arch::Block(bt) => tokens.div_ceil(bt.cfg.block_length) + 2,
            Arch::Vanilla(_) => tokens,
        }
    }

    /// Creates the tensor path's pools (once).
    fn ensure_pools(&mut self) -> Result<()> {
        if self.pools.is_some() {
            return Ok(());
        }
        let (dev, dtype) = (self.model.device(), self.model.dtype());
        let slots = self.opts.max_batch;
        let pool = |stack: &crate::model::gpt_neox::NeoX, cap: usize| {
            let c = &stack.cfg;
            KvPool::new(
                c.num_hidden_layers,
                c.num_attention_heads,
                c.head_dim(),
                cap,
                slots,
                dtype,
                &dev,
            )
        };
        let cap = self.pool_capacity();
        self.pools = Some(match &self.model.arch {
            Arch::Block(bt) => {
                let td = &bt.token_decoder;
                let td_cap = td.n_prefix + bt.cfg.block_length.saturating_sub(1);
                (
                    pool(&bt.block_decoder.stack, cap)?,
                    Some(pool(&td.stack, td_cap)?),
                )
            }
            Arch::Vanilla(v) => (pool(&v.stack, cap)?, None),
        });
        Ok(())
    }

    /// Gives an admitted row its caches.
    fn allocate(&mut self, s: &mut Seq) -> Result<()> {
        if let Some((main, td)) = &self.pools {
            if s.cache_len > main.capacity {
                return Err(Error::input(
                    "max_context",
                    format!(
                        "a request needs {} cache positions but the engine's rows hold {} \
                         (raise the engine's maximum context)",
                        s.cache_len, main.capacity
                    ),
                ));
            }
            let full = || Error::input("max_batch", "no free cache slot");
            s.cache = KvCache::in_slot(main.acquire().ok_or_else(full)?);
            if let Some(td) = td {
                s.td_cache = Some(KvCache::in_slot(td.acquire().ok_or_else(full)?));
            }
            return Ok(());
        }
        if let Some((cache, td)) = self.take_spare(s.cache_len) {
            (s.cache, s.td_cache) = (cache, td);
            return Ok(());
        }
        match &self.model.arch {
            Arch::Block(bt) => {
                s.cache = bt
                    .block_decoder
                    .stack
                    .new_cache_typed(s.cache_len, self.opts.kv_dtype);
                s.td_cache = Some(bt.token_decoder.new_block_cache(bt.cfg.block_length));
            }
            Arch::Vanilla(v) => {
                s.cache = v.stack.new_cache_typed(s.cache_len, self.opts.kv_dtype);
            }
        }
        Ok(())
    }

    /// A spare cache holding `need` positions without wasting more than half of itself
    /// (the smallest such), emptied.
    fn take_spare(&mut self, need: usize) -> Option<(KvCache, Option<KvCache>)> {
        let i = (0..self.spare.len())
            .filter(|&i| (need..=2 * need.max(1)).contains(&self.spare[i].0.capacity))
            .min_by_key(|&i| self.spare[i].0.capacity)?;
        let (mut cache, mut td) = self.spare.swap_remove(i);
        cache.clear();
        if let Some(td) = &mut td {
            td.clear();
        }
        Some((cache, td))
    }

    /// Keeps the host caches of a row that left the batch for later rows.
    fn recycle(&mut self, s: Seq) {
        if s.cache.slot().is_some() {
            return; // pool slots go back to their pool when dropped
        }
        if self.spare.len() >= self.opts.max_batch {
            self.spare.remove(0);
        }
        self.spare.push((s.cache, s.td_cache));
    }

    /// Time spent so far, by part.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn reset_stats(&mut self) {
        self.stats = EngineStats::default();
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Rows being decoded and rows waiting for a slot.
    pub fn active(&self) -> usize {
        self.running.len()
    }
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty() && self.events.is_empty()
    }

    /// KV-cache bytes held by the running rows.
    pub fn kv_cache_bytes(&self) -> usize {
        self.running
            .iter()
            .map(|s| s.cache.bytes() + s.td_cache.as_ref().map_or(0, |c| c.bytes()))
            .sum()
    }

    /// Queues a request; it joins the batch at the next step with a free slot.
    pub fn add(&mut self, req: GenRequest) -> Result<SeqId> {
        req.sampling.validate()?;
        let vocab = self.model.config.vocab_size();
        if req.prompt.is_empty() {
            return Err(Error::input(
                "prompt",
                "empty prompt (give at least one token)",
            ));
        }
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::input(
                "prompt",
                format!("token id {bad} is out of the vocabulary (size {vocab})"),
            ));
        }
        let ctx = self.model.config.context_length();
        if req.prompt.len() > ctx {
            return Err(Error::input(
                "prompt",
                format!(
                    "{} tokens is longer than the model's context of {ctx} tokens",
                    req.prompt.len()
                ),
            ));
        }
        let mask = match &req.prompt_mask {
            Some(m) if m.len() != req.prompt.len() => {
                return Err(Error::input(
                    "attention_mask",
                    format!(
                        "length {} differs from the prompt's {}",
                        m.len(),
                        req.prompt.len()
                    ),
                ))
            }
            Some(m) => m.clone(),
            None => vec![1; req.prompt.len()],
        };
        if let Some(i) = mask.iter().position(|&m| m != 0) {
            if mask[i..].contains(&0) {
                return Err(Error::input(
                    "attention_mask",
                    "padding after the first real token; only left padding is supported",
                ));
            }
        } else {
            return Err(Error::input("attention_mask", "masks out the whole prompt"));
        }
        let id = self.next_id;
        let seq = match &self.model.arch {
            Arch::Block(bt) => self.new_block_seq(bt, id, &req, &mask),
            Arch::Vanilla(_) => Self::new_vanilla_seq(id, &req, &mask),
        };
        if self.tensor_path() && seq.cache_len > self.pool_capacity() {
            return Err(Error::input(
                "max_new_tokens",
                format!(
                    "prompt plus max_new_tokens needs {} cache positions but this engine's rows \
                     hold {} (its maximum context)",
                    seq.cache_len,
                    self.pool_capacity()
                ),
            ));
        }
        self.next_id += 1;
        if req.max_new_tokens == 0 {
            self.events.push(StepEvent {
                id,
                tokens: vec![],
                logprobs: vec![],
                finished: Some(FinishReason::Length),
            });
        } else {
            self.waiting.push_back(seq);
        }
        Ok(id)
    }

    fn new_block_seq(
        &self,
        bt: &BlockTransformer,
        id: SeqId,
        req: &GenRequest,
        mask: &[u8],
    ) -> Seq {
        let l = bt.cfg.block_length;
        let p = (l - req.prompt.len() % l) % l;
        let mut ids = vec![bt.cfg.pad_token_id; p];
        ids.extend_from_slice(&req.prompt);
        let mut m = vec![0u8; p];
        m.extend_from_slice(mask);
        // Leading blocks without a real token are dropped (they are masked keys that never
        // influence a real output) but keep their rotary positions.
        let dropped = m
            .chunks(l)
            .take_while(|b| b.iter().all(|&x| x == 0))
            .count();
        let pending = ids[dropped * l..].to_vec();
        let blocks = pending.len() / l + req.max_new_tokens.div_ceil(l) + 1;
        Seq {
            id,
            sampler: Sampler::new(req.sampling),
            max_new: req.max_new_tokens,
            eos: req.eos_token_id,
            logprobs: req.logprobs,
            cache: KvCache::new(0, 0, 0, 0),
            cache_len: blocks,
            td_cache: None,
            pos_offset: dropped,
            pending,
            generated: 0,
            padded_len: ids.len(),
            left_pad: p,
            official_max_len: req.prompt.len() + req.max_new_tokens,
        }
    }

    fn new_vanilla_seq(id: SeqId, req: &GenRequest, mask: &[u8]) -> Seq {
        // Padding is dropped: HF positions are cumsum(mask) - 1 and padded keys get zero weight.
        let pending: Vec<u32> = req
            .prompt
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m != 0)
            .map(|(&t, _)| t)
            .collect();
        Seq {
            id,
            sampler: Sampler::new(req.sampling),
            max_new: req.max_new_tokens,
            eos: req.eos_token_id,
            logprobs: req.logprobs,
            cache: KvCache::new(0, 0, 0, 0),
            cache_len: pending.len() + req.max_new_tokens,
            td_cache: None,
            pos_offset: 0,
            pending,
            generated: 0,
            padded_len: 0,
            left_pad: 0,
            official_max_len: 0,
        }
    }

    /// Stops a request; its slot is free at the next step.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let found = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.recycle(s);
            true
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            true
        } else {
            false
        };
        if found {
            self.events.push(StepEvent {
                id,
                tokens: vec![],
                logprobs: vec![],
                finished: Some(FinishReason::Cancelled),
            });
        }
        found
    }

    /// Admits waiting rows, decodes one block (or token) for every running row, and returns
    /// what each row produced.
    ///
    /// The step runs on a worker of rayon's pool (inline when called from one): its many
    /// small parallel loops then share work with the other workers directly instead of each
    /// waking the pool from outside and sleeping until it ends. On the CPU the pool's other
    /// workers stay awake for the step ([`crate::kernels::with_workers_awake`]); a GPU step
    /// leaves them asleep.
    pub fn step(&mut self) -> Result<Vec<StepEvent>> {
        rayon::scope(|_| {
            if self.model.device().is_cpu() {
                crate::kernels::with_workers_awake(|| self.step_here())
            } else {
                self.step_here()
            }
        })
    }

    fn step_here(&mut self) -> Result<Vec<StepEvent>> {
        if self.tensor_path() && !self.waiting.is_empty() {
            self.ensure_pools()?;
        }
        while self.running.len() < self.opts.max_batch {
            match self.waiting.pop_front() {
                Some(mut s) => {
                    if let Err(e) = self.allocate(&mut s) {
                        self.waiting.push_front(s);
                        return Err(e);
                    }
                    self.running.push(s)
                }
                None => break,
            }
        }
        let mut events = std::mem::take(&mut self.events);
        if self.running.is_empty() {
            return Ok(events);
        }
        let model = self.model.clone();
        let start = Instant::now();
        let prefill = self.running.iter().any(|s| s.cache.len == 0);
        let mut new = match &model.arch {
            Arch::Block(bt) => self.step_block(bt)?,
            Arch::Vanilla(v) => self.step_vanilla(v)?,
        };
        let dt = start.elapsed().as_secs_f64();
        if prefill {
            self.stats.prefill_s += dt;
        } else {
            self.stats.decode_s += dt;
        }
        self.stats.steps += 1;
        self.stats.tokens += new.iter().map(|e| e.tokens.len()).sum::<usize>();
        let finished: Vec<SeqId> = new
            .iter()
            .filter(|e| e.finished.is_some())
            .map(|e| e.id)
            .collect();
        let done: Vec<Seq> = self
            .running
            .extract_if(.., |s| finished.contains(&s.id))
            .collect();
        for s in done {
            self.recycle(s);
        }
        events.append(&mut new);
        Ok(events)
    }

    /// Runs until every request has finished; returns all events in order.
    pub fn run_to_completion(&mut self) -> Result<Vec<StepEvent>> {
        let mut all = Vec::new();
        while !self.is_idle() {
            all.extend(self.step()?);
        }
        Ok(all)
    }

    fn step_block(&mut self, bt: &BlockTransformer) -> Result<Vec<StepEvent>> {
        let l = bt.cfg.block_length;
        let mode = self.opts.positions;
        let dev = bt.device().clone();

        // Block decoder over each row's new blocks (whole prompt at first, then one block).
        let mut ids = Vec::new();
        let mut specs = Vec::with_capacity(self.running.len());
        let mut last_rows = Vec::with_capacity(self.running.len());
        for s in &self.running {
            let n = s.pending.len() / l;
            ids.extend_from_slice(&s.pending);
            specs.push(RowSpec::arange(n, s.pos_offset + s.cache.len));
            last_rows.push((specs.iter().map(|r| r.n_new).sum::<usize>() - 1) as u32);
        }
        let n_blocks = ids.len() / l;
        let t = Instant::now();
        let e = bt
            .embedder
            .forward(&Tensor::from_vec(ids, (n_blocks, l), &dev)?)?;
        self.split_point()?;
        self.stats.embedder_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut caches: Vec<&mut KvCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
        let hid = bt
            .block_decoder
            .stack
            .forward_cached(&e, &specs, &mut caches)?;
        let states = hid.index_select(&Tensor::new(last_rows.as_slice(), &dev)?, 0)?; // [S, D]
        self.split_point()?;
        self.stats.block_decoder_s += t.elapsed().as_secs_f64();
        let t_td = Instant::now();
        let (sampling_before, lm_head_before) = (self.stats.sampling_s, self.stats.lm_head_s);

        // Tokens to decode in this block per row.
        let want: Vec<usize> = self
            .running
            .iter()
            .map(|s| match mode {
                PositionMode::Trained => (s.max_new - s.generated).min(l),
                PositionMode::Official => {
                    let cur = s.padded_len - s.left_pad;
                    s.official_max_len.saturating_sub(cur).min(l)
                }
            })
            .collect();

        // Token decoder: prefix step, then one step per token.
        let td = &bt.token_decoder;
        let rows = self.running.len();
        let mut blocks: Vec<Vec<u32>> = vec![Vec::with_capacity(l); rows];
        let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); rows];
        let mut hit_eos = vec![false; rows];
        let mut td_caches: Vec<&mut KvCache> = self
            .running
            .iter_mut()
            .map(|s| {
                s.td_cache
                    .as_mut()
                    .expect("block rows have a token-decoder cache")
            })
            .collect();
        let hidden = td.start_block_hidden(&states, &mut td_caches, mode)?;
        let all: Vec<usize> = (0..rows).filter(|&r| want[r] > 0).collect();
        let hidden = if all.len() < rows {
            let keep: Vec<u32> = all.iter().map(|&r| r as u32).collect();
            hidden.index_select(&Tensor::new(keep.as_slice(), &dev)?, 0)?
        } else {
            hidden
        };
        self.pick(
            &td.embed_out,
            &hidden,
            &all,
            &mut blocks,
            &mut lps,
            &mut hit_eos,
        )?;
        let max_want = want.iter().copied().max().unwrap_or(0);
        for k in 1..max_want {
            let active: Vec<usize> = (0..rows).filter(|&r| !hit_eos[r] && k < want[r]).collect();
            if active.is_empty() {
                break;
            }
            let tokens: Vec<u32> = active.iter().map(|&r| blocks[r][k - 1]).collect();
            let mut is_active = vec![false; rows];
            for &r in &active {
                is_active[r] = true;
            }
            let mut sub: Vec<&mut KvCache> = self
                .running
                .iter_mut()
                .zip(&is_active)
                .filter(|(_, &a)| a)
                .map(|(s, _)| s.td_cache.as_mut().expect("token-decoder cache"))
                .collect();
            let hidden = td.continue_block_hidden(&tokens, k, &mut sub, mode)?;
            self.pick(
                &td.embed_out,
                &hidden,
                &active,
                &mut blocks,
                &mut lps,
                &mut hit_eos,
            )?;
        }

        self.split_point()?;
        self.stats.token_decoder_s += t_td.elapsed().as_secs_f64()
            - (self.stats.sampling_s - sampling_before)
            - (self.stats.lm_head_s - lm_head_before);

        // Assemble each row's block and decide who is finished.
        let produced = blocks.iter().map(Vec::len).max().unwrap_or(0);
        let mut events = Vec::with_capacity(rows);
        for (r, s) in self.running.iter_mut().enumerate() {
            let mut block = std::mem::take(&mut blocks[r]);
            let (tokens, finished) = match mode {
                PositionMode::Trained => {
                    if hit_eos[r] {
                        block.pop();
                    }
                    s.generated += block.len();
                    let fin = if hit_eos[r] {
                        Some(FinishReason::Eos)
                    } else if s.generated >= s.max_new {
                        Some(FinishReason::Length)
                    } else {
                        None
                    };
                    s.pending = block.clone();
                    (block, fin)
                }
                PositionMode::Official => {
                    // After a row's EOS: the generation pad id while the token-decoder batch is
                    // still decoding, then the pad id; the block itself is padded with the pad id.
                    let pad = bt.cfg.pad_token_id;
                    let gen_pad = bt.cfg.generation_pad_token_id;
                    while block.len() < produced.min(want[r]) {
                        block.push(gen_pad);
                    }
                    while block.len() < want[r] {
                        block.push(pad);
                    }
                    let mut next = block.clone();
                    next.resize(l, pad);
                    s.padded_len += l;
                    s.generated += block.len();
                    let fin = if s.eos.is_some_and(|e| next.contains(&e)) {
                        Some(FinishReason::Eos)
                    } else if s.padded_len >= s.official_max_len {
                        Some(FinishReason::Length)
                    } else {
                        None
                    };
                    s.pending = next;
                    (block, fin)
                }
            };
            events.push(StepEvent {
                id: s.id,
                tokens,
                logprobs: std::mem::take(&mut lps[r]),
                finished,
            });
        }
        Ok(events)
    }

    fn step_vanilla(&mut self, v: &Vanilla) -> Result<Vec<StepEvent>> {
        let dev = v.embed_in.device().clone();
        let mut ids = Vec::new();
        let mut specs = Vec::with_capacity(self.running.len());
        let mut last_rows = Vec::with_capacity(self.running.len());
        for s in &self.running {
            ids.extend_from_slice(&s.pending);
            specs.push(RowSpec::arange(s.pending.len(), s.cache.len));
            last_rows.push((ids.len() - 1) as u32);
        }
        let n = ids.len();
        let t = Instant::now();
        let x = v.embed_in.embedding(&Tensor::from_vec(ids, n, &dev)?)?;
        self.split_point()?;
        self.stats.embedder_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut caches: Vec<&mut KvCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
        let hid = v.stack.forward_cached(&x, &specs, &mut caches)?;
        let last = hid.index_select(&Tensor::new(last_rows.as_slice(), &dev)?, 0)?;
        self.split_point()?;
        self.stats.block_decoder_s += t.elapsed().as_secs_f64();
        let rows = self.running.len();
        let mut toks: Vec<Vec<u32>> = vec![Vec::new(); rows];
        let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); rows];
        let mut hit_eos = vec![false; rows];
        let all: Vec<usize> = (0..rows).collect();
        self.pick(&v.embed_out, &last, &all, &mut toks, &mut lps, &mut hit_eos)?;
        let mut events = Vec::with_capacity(rows);
        for (r, s) in self.running.iter_mut().enumerate() {
            let mut tokens = std::mem::take(&mut toks[r]);
            s.pending = tokens.clone();
            let finished = if hit_eos[r] {
                tokens.clear();
                Some(FinishReason::Eos)
            } else {
                s.generated += 1;
                (s.generated >= s.max_new).then_some(FinishReason::Length)
            };
            events.push(StepEvent {
                id: s.id,
                tokens,
                logprobs: std::mem::take(&mut lps[r]),
                finished,
            });
        }
        Ok(events)
    }

    /// Whether every row in `rows` decodes greedily without logprobs.
    fn greedy_only(&self, rows: &[usize]) -> bool {
        rows.iter().all(|&r| {
            let s = &self.running[r];
            s.logprobs.is_none() && s.sampler.is_greedy()
        })
    }

    /// The LM head `head` on `hidden [rows.len(), H]`, then one token for each row in
    /// `rows`. Greedy rows on the CPU take the head's argmax straight from its kernel (the
    /// logits are never written); on a GPU greedy rows take one device argmax; other rows are
    /// sampled on the host from one copy of the logits. Adds its time to `lm_head_s`, the
    /// host sampling's to `sampling_s`.
    fn pick(
        &mut self,
        head: &Linear,
        hidden: &Tensor,
        rows: &[usize],
        out: &mut [Vec<u32>],
        lps: &mut [Vec<TokenLogprob>],
        hit_eos: &mut [bool],
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let greedy = self.greedy_only(rows);
        let t = Instant::now();
        if greedy {
            // On the CPU: the ids straight from the head's kernel, no logits.
            if let Some(ids) = head.argmax_rows(hidden)? {
                self.stats.lm_head_s += t.elapsed().as_secs_f64();
                self.record(greedy_picks(rows, ids), out, lps, hit_eos);
                return Ok(());
            }
        }
        let logits = crate::gpu::section("lm head", hidden.device(), || head.forward(hidden))?;
        self.split_point()?;
        self.stats.lm_head_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let chosen = if greedy && !logits.device().is_cpu() {
            // One argmax on the device and a copy of one id per row.
            let ids = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
            greedy_picks(rows, ids)
        } else {
            self.sample_on_host(&logits, rows)?
        };
        self.record(chosen, out, lps, hit_eos);
        self.stats.sampling_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Appends each chosen `(row, token, logprobs)` to its row's output and notes EOS.
    fn record(
        &self,
        chosen: Vec<(usize, u32, Option<TokenLogprob>)>,
        out: &mut [Vec<u32>],
        lps: &mut [Vec<TokenLogprob>],
        hit_eos: &mut [bool],
    ) {
        for (r, tok, lp) in chosen {
            lps[r].extend(lp);
            out[r].push(tok);
            if self.running[r].eos == Some(tok) {
                hit_eos[r] = true;
            }
        }
    }

    /// Copies the logits to the host once and samples every row there (in parallel, each
    /// with its own sampler): `(row, token, logprobs)` in row order.
    fn sample_on_host(
        &mut self,
        logits: &Tensor,
        rows: &[usize],
    ) -> Result<Vec<(usize, u32, Option<TokenLogprob>)>> {
        let v = logits.dim(1)?;
        // CPU float32 logits are read in place; others are copied to the host once.
        let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let copied: Vec<f32>;
        let view;
        let host: &[f32] = if logits.device().is_cpu() {
            view = HostView::new(&logits)?;
            view.get()
        } else {
            copied = logits.flatten_all()?.to_vec1()?;
            &copied
        };
        let mut picked: Vec<(usize, &mut Seq)> = Vec::with_capacity(rows.len());
        let mut want = rows.iter().peekable();
        for (r, s) in self.running.iter_mut().enumerate() {
            if want.peek() == Some(&&r) {
                picked.push((r, s));
                want.next();
            }
        }
        debug_assert_eq!(picked.len(), rows.len(), "rows must be ascending");
        Ok(picked
            .into_par_iter()
            .enumerate()
            .map(|(i, (r, s))| {
                let row = &host[i * v..(i + 1) * v];
                let tok = s.sampler.sample(row);
                let lp = s.logprobs.map(|n| {
                    let (logprob, top) = sampling::logprobs(row, tok, n);
                    TokenLogprob {
                        token: tok,
                        logprob,
                        top,
                    }
                });
                (r, tok, lp)
            })
            .collect())
    }
}

/// `(row, token, no logprobs)` for greedy `rows` and their `ids`, in order.
fn greedy_picks(rows: &[usize], ids: Vec<u32>) -> Vec<(usize, u32, Option<TokenLogprob>)> {
    rows.iter()
        .zip(ids)
        .map(|(&r, tok)| (r, tok, None))
        .collect()
}
