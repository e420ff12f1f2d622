//! Batched generation: one step-able engine ([`Engine`]: add, cancel, step) with preallocated
//! KV caches for block and vanilla models, used by `generate`, `bench` and `serve` alike.
//!
//! - Block models: one step decodes one block for every active row. The block decoder's cache
//!   (over blocks) lives for the whole sequence; the token decoder's cache holds one block's
//!   prefix and tokens and is reset for every block.
//! - Vanilla models: one step decodes one token for every active row.
//!
//! Token-decoder rotary positions: [`PositionMode::Trained`] (default) uses the positions the
//! model was trained with (`0..R-1` for the prefix, `R-1+k` for token `k`);
//! [`PositionMode::Official`] reproduces the official `generate` (all prefix vectors at 0,
//! token `k` at `k`) together with its output-length rule and EOS filler ids.

mod engine;
pub mod official;
pub mod sampling;

pub use engine::{
    Backend, Engine, EngineOptions, EngineStats, FinishReason, GenRequest, SeqId, StepEvent,
    TokenLogprob,
};
pub use sampling::{Sampler, SamplingParams};

use crate::error::Result;
use crate::kernels::attention::{KvCache, RowSpec};
use crate::model::token_decoder::TokenDecoder;
use candle_core::Tensor;

/// Which rotary positions the token decoder uses during generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PositionMode {
    /// The positions of the training forward (default).
    #[default]
    Trained,
    /// The positions of the official `generate` (compatibility mode).
    Official,
}

impl TokenDecoder {
    /// First step of a block: prefix vectors from block-decoder states `s [S, D]` into empty
    /// caches; returns the logits predicting token 0 of each row, `[S, V]`.
    pub fn start_block(
        &self,
        s: &Tensor,
        caches: &mut [&mut KvCache],
        mode: PositionMode,
    ) -> Result<Tensor> {
        self.logits(&self.start_block_hidden(s, caches, mode)?)
    }

    /// [`TokenDecoder::start_block`] up to the LM head: the final hidden state of each row's
    /// last prefix position, `[S, H]`.
    pub fn start_block_hidden(
        &self,
        s: &Tensor,
        caches: &mut [&mut KvCache],
        mode: PositionMode,
    ) -> Result<Tensor> {
        let (rows, _) = s.dims2()?;
        let (r, h) = (self.n_prefix, self.hidden_size());
        let prefix = self.expand(s)?.reshape((rows * r, h))?;
        let spec = match mode {
            PositionMode::Trained => RowSpec::arange(r, 0),
            PositionMode::Official => RowSpec {
                n_new: r,
                pos0: 0,
                pos_stride: 0,
            },
        };
        for c in caches.iter_mut() {
            c.clear();
        }
        let specs = vec![spec; rows];
        let hid = self.stack.forward_cached(&prefix, &specs, caches)?; // [S*R, H]
        let last: Vec<u32> = (0..rows).map(|i| (i * r + r - 1) as u32).collect();
        Ok(hid.index_select(&Tensor::new(last.as_slice(), hid.device())?, 0)?)
    }

    /// Step `k >= 1` of a block: feeds token `k-1` of each row; returns the logits predicting
    /// token `k`, `[A, V]`.
    pub fn continue_block(
        &self,
        tokens: &[u32],
        k: usize,
        caches: &mut [&mut KvCache],
        mode: PositionMode,
    ) -> Result<Tensor> {
        self.logits(&self.continue_block_hidden(tokens, k, caches, mode)?)
    }

    /// [`TokenDecoder::continue_block`] up to the LM head, `[A, H]`.
    pub fn continue_block_hidden(
        &self,
        tokens: &[u32],
        k: usize,
        caches: &mut [&mut KvCache],
        mode: PositionMode,
    ) -> Result<Tensor> {
        let x = self.embed(&Tensor::new(tokens, self.embed_in.device())?)?; // [A, H]
        let pos = match mode {
            PositionMode::Trained => self.n_prefix + k - 1,
            PositionMode::Official => k,
        };
        let specs = vec![RowSpec::arange(1, pos); tokens.len()];
        self.stack.forward_cached(&x, &specs, caches)
    }

    /// A cache for one block: `R` prefix vectors and `L-1` tokens.
    pub fn new_block_cache(&self, block_length: usize) -> KvCache {
        self.stack
            .new_cache(self.n_prefix + block_length.saturating_sub(1))
    }
}
