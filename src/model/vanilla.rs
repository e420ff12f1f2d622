//! The vanilla baseline: Hugging Face `GPTNeoXForCausalLM` (Pythia), tensor names
//! `gpt_neox.embed_in`, `gpt_neox.layers.*`, `gpt_neox.final_layer_norm`, `embed_out`.

use super::gpt_neox::{Linear, NeoX};
use super::{Init, WeightSource};
use crate::config::NeoXConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

#[derive(Clone, Debug)]
pub struct Vanilla {
    pub cfg: NeoXConfig,
    /// `gpt_neox.embed_in.weight` `[V, W]`.
    pub embed_in: Tensor,
    pub stack: NeoX,
    /// `embed_out.weight` `[V, W]`.
    pub embed_out: Linear,
}

/// Output of [`Vanilla::forward`].
#[derive(Debug)]
pub struct VanillaForward {
    /// `[B, T, V]`.
    pub logits: Tensor,
    /// Mean cross-entropy of position t predicting label t+1 (HF shift), ignoring -100.
    pub loss: Option<Tensor>,
}

impl Vanilla {
    pub fn load(src: &mut dyn WeightSource, cfg: &NeoXConfig) -> Result<Self> {
        let (v, w) = (cfg.vocab_size, cfg.hidden_size);
        let embed_in = src.tensor("gpt_neox.embed_in.weight", &[v, w], Init::Normal(0.02))?;
        let stack = NeoX::load(src, "gpt_neox", cfg)?;
        let embed_out = Linear::load(src, "embed_out", v, w, false, 0.02)?;
        Ok(Vanilla {
            cfg: cfg.clone(),
            embed_in,
            stack,
            embed_out,
        })
    }

    /// Final hidden states `[B, T, W]` for `ids [B, T]` with an optional key mask `[B, T]`.
    pub fn hidden(&self, ids: &[u32], b: usize, t: usize, mask: Option<&[u8]>) -> Result<Tensor> {
        let v = self.cfg.vocab_size;
        if let Some(bad) = ids.iter().find(|&&x| x as usize >= v) {
            return Err(Error::input(
                "input_ids",
                format!("token id {bad} is out of the vocabulary (size {v})"),
            ));
        }
        let dev = self.embed_in.device();
        let ids_t = Tensor::from_slice(ids, b * t, dev)?;
        let x = self
            .embed_in
            .embedding(&ids_t)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let mask = match mask {
            Some(m) => Some(Tensor::from_slice(m, (b, t), dev)?.to_dtype(DType::F32)?),
            None => None,
        };
        self.stack.forward(&x, mask.as_ref())
    }

    /// Logits for every position, and the loss when labels `[B, T]` are given.
    pub fn forward(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        mask: Option<&[u8]>,
        labels: Option<&[i64]>,
    ) -> Result<VanillaForward> {
        let logits = self.embed_out.forward(&self.hidden(ids, b, t, mask)?)?;
        let loss = match labels {
            None => None,
            Some(lab) => {
                let (rows, targets): (Vec<u32>, Vec<i64>) = (0..b)
                    .flat_map(|bi| (0..t - 1).map(move |ti| (bi, ti)))
                    .filter(|&(bi, ti)| lab[bi * t + ti + 1] >= 0)
                    .map(|(bi, ti)| ((bi * t + ti) as u32, lab[bi * t + ti + 1]))
                    .unzip();
                if rows.is_empty() {
                    None
                } else {
                    let v = self.cfg.vocab_size;
                    let sel = logits
                        .reshape((b * t, v))?
                        .index_select(&Tensor::new(rows.as_slice(), logits.device())?, 0)?;
                    let (ce, _) = super::block_transformer::cross_entropy(&sel, &targets)?;
                    Some(ce.mean_all()?)
                }
            }
        };
        Ok(VanillaForward { logits, loss })
    }
}
