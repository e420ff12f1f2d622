//! Token decoder (`prefix` strategy): a GPT-NeoX causal LM that decodes the `L` tokens of a
//! block from `R` prefix vectors made from the previous block's block-decoder state:
//!
//! ```text
//! [P_1 .. P_R] = expansion(s)        Conv1d(D -> R*H, kernel 1), prefix r = channels r*H..(r+1)*H
//! input        = [P_1 .. P_R, emb(x_0) .. emb(x_{L-2})]
//! output R-1+j predicts x_j
//! ```

use super::gpt_neox::{Linear, NeoX};
use super::{Init, WeightSource};
use crate::config::BlockConfig;
use crate::error::Result;
use candle_core::Tensor;

pub const PREFIX: &str = "token_decoder.gpt_neox";

#[derive(Clone, Debug)]
pub struct TokenDecoder {
    /// `token_decoder.gpt_neox.embed_in.weight` `[V, H]`.
    pub embed_in: Tensor,
    pub stack: NeoX,
    /// `token_decoder.embed_out.weight` `[V, H]`, no bias.
    pub embed_out: Linear,
    /// `token_decoder.expansion_layer.weight` `[R*H, D, 1]`, held as `[D, R*H]`.
    pub expansion_weight_t: Tensor,
    /// `token_decoder.expansion_layer.bias` `[R*H]`.
    pub expansion_bias: Tensor,
    pub n_prefix: usize,
}

impl TokenDecoder {
    pub fn load(src: &mut dyn WeightSource, cfg: &BlockConfig) -> Result<Self> {
        let t = &cfg.token_decoder;
        let (h, v, d, r) = (
            t.hidden_size,
            t.vocab_size,
            cfg.block_decoder.hidden_size,
            cfg.n_prefix(),
        );
        let embed_in = src.tensor(
            &format!("{PREFIX}.embed_in.weight"),
            &[v, h],
            Init::Normal(0.02),
        )?;
        let stack = NeoX::load(src, PREFIX, t)?;
        let embed_out = Linear::load(src, "token_decoder.embed_out", v, h, false, 0.02)?;
        let expansion_weight_t = src.tensor_t(
            "token_decoder.expansion_layer.weight",
            &[r * h, d, 1],
            Init::Normal(1.0 / (d as f64).sqrt()),
        )?;
        let expansion_bias =
            src.tensor("token_decoder.expansion_layer.bias", &[r * h], Init::Zeros)?;
        Ok(TokenDecoder {
            embed_in,
            stack,
            embed_out,
            expansion_weight_t,
            expansion_bias,
            n_prefix: r,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.stack.cfg.hidden_size
    }

    /// Block-decoder states `s [N, D]` -> prefix vectors `[N, R, H]`.
    pub fn expand(&self, s: &Tensor) -> Result<Tensor> {
        let n = s.dim(0)?;
        let (r, h) = (self.n_prefix, self.hidden_size());
        Ok(s.matmul(&self.expansion_weight_t)?
            .broadcast_add(&self.expansion_bias)?
            .reshape((n, r, h))?)
    }

    /// Token embeddings `ids [..] -> [.., H]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let dims = ids.dims().to_vec();
        let e = self.embed_in.embedding(&ids.flatten_all()?)?;
        let mut out = dims;
        out.push(self.hidden_size());
        Ok(e.reshape(out)?)
    }

    /// Hidden states -> logits over the vocabulary.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.embed_out.forward(h)
    }
}
