//! Block decoder: a GPT-NeoX stack over block vectors (global context). No token embedding is
//! used and there is no LM head; rotary positions are block indices. The official checkpoints
//! also store an unused `block_decoder.gpt_neox.embed_in.weight`, which loading accepts and skips.

use super::gpt_neox::NeoX;
use super::WeightSource;
use crate::config::NeoXConfig;
use crate::error::Result;
use candle_core::Tensor;

pub const PREFIX: &str = "block_decoder.gpt_neox";
/// Stored by the official code, never used.
pub const UNUSED_EMBED_IN: &str = "block_decoder.gpt_neox.embed_in.weight";

#[derive(Clone, Debug)]
pub struct BlockDecoder {
    pub stack: NeoX,
}

impl BlockDecoder {
    pub fn load(src: &mut dyn WeightSource, cfg: &NeoXConfig) -> Result<Self> {
        Ok(BlockDecoder {
            stack: NeoX::load(src, PREFIX, cfg)?,
        })
    }

    /// `e [B, n, D]`, `block_mask [B, n]` -> final-LayerNorm states `[B, n, D]`.
    pub fn forward(&self, e: &Tensor, block_mask: &Tensor) -> Result<Tensor> {
        self.stack.forward(e, Some(block_mask))
    }
}
