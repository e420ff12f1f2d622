//! Lookup embedder: each block of `L` token ids becomes one vector of width `D`.
//!
//! `h = E[ids]` (`[N, L, d_e]`, no padding row: pad id 0 embeds as the EOS row), then
//! - `concat`: `e = [h_0 | h_1 | ... | h_{L-1}]` (`d_e * L = D`);
//! - `projection_layer`: `e = b + sum_k W[:, :, k] h_k` (a Conv1d with kernel = stride = L).

use super::{Init, WeightSource};
use crate::config::{BlockConfig, Projection};
use crate::error::Result;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Embedder {
    /// `embedder.embeddings.weight` `[V, d_e]`.
    pub embeddings: Tensor,
    /// `embedder.projection_layer.{weight [D, d_e, L], bias [D]}` for `projection_layer`.
    pub projection: Option<(Tensor, Tensor)>,
    pub block_length: usize,
}

impl Embedder {
    pub fn load(src: &mut dyn WeightSource, cfg: &BlockConfig) -> Result<Self> {
        let e = &cfg.embedder;
        let l = cfg.block_length;
        let d = cfg.block_decoder.hidden_size;
        let embeddings = src.tensor(
            "embedder.embeddings.weight",
            &[e.vocab_size, e.hidden_size],
            Init::Normal(0.02),
        )?;
        let projection = match e.projection_method {
            Projection::Concat => None,
            Projection::ProjectionLayer => {
                let std = 1.0 / ((e.hidden_size * l) as f64).sqrt();
                Some((
                    src.tensor(
                        "embedder.projection_layer.weight",
                        &[d, e.hidden_size, l],
                        Init::Normal(std),
                    )?,
                    src.tensor("embedder.projection_layer.bias", &[d], Init::Zeros)?,
                ))
            }
        };
        Ok(Embedder {
            embeddings,
            projection,
            block_length: l,
        })
    }

    /// `ids [N, L]` (u32) -> block vectors `[N, D]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (n, l) = ids.dims2()?;
        let d_e = self.embeddings.dim(1)?;
        let h = self
            .embeddings
            .embedding(&ids.flatten_all()?)?
            .reshape((n, l * d_e))?; // [N, L*d_e], token 0 first
        match &self.projection {
            None => Ok(h),
            Some((w, b)) => {
                // W[o, c, k] -> M[o, k*d_e + c] so that e = h M^T + b.
                let d = w.dim(0)?;
                let m = w.permute((0, 2, 1))?.reshape((d, l * d_e))?;
                Ok(h.matmul(&m.t()?)?.broadcast_add(b)?)
            }
        }
    }
}
