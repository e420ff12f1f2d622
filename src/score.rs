//! Log-likelihood of a given text under a model (what evaluation harnesses ask of
//! `echo: true, max_tokens: 0, logprobs: N`).
//!
//! Block models are scored as the official evaluation harness does
//! (`lm_eval/models/block_transformer_pad.py`): the text is left-padded with `L-1` pad tokens so
//! that every token after the first is predicted, right-padded to a block boundary, and run
//! through the official forward without skipping padding blocks. The first token has no
//! log-probability.

use crate::error::{Error, Result};
use crate::generate::sampling;
use crate::generate::TokenLogprob;
use crate::model::block_transformer::{BlockBatch, ForwardOptions};
use crate::model::{Arch, Model};
use candle_core::D;

/// Log-probability of every token of `ids` given the tokens before it (`None` for the first),
/// with the `top_n` most likely alternatives at each position.
pub fn token_logprobs(
    model: &Model,
    ids: &[u32],
    top_n: usize,
) -> Result<Vec<Option<TokenLogprob>>> {
    if ids.is_empty() {
        return Err(Error::input("prompt", "empty text cannot be scored"));
    }
    let ctx = model.config.context_length();
    let vocab = model.config.vocab_size();
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::input(
            "prompt",
            format!("token id {bad} is out of the vocabulary (size {vocab})"),
        ));
    }
    let rows: Vec<Vec<f32>> = match &model.arch {
        Arch::Vanilla(v) => {
            if ids.len() > ctx {
                return Err(Error::input(
                    "prompt",
                    format!("{} tokens exceed the context of {ctx}", ids.len()),
                ));
            }
            let logits = v.forward(ids, 1, ids.len(), None, None)?.logits; // [1, T, V]
            let logp = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?;
            logp.to_vec2()?
        }
        Arch::Block(bt) => {
            let l = bt.cfg.block_length;
            let pad = bt.cfg.pad_token_id;
            let mut x = vec![pad; l - 1];
            let mut m = vec![0u8; l - 1];
            x.extend_from_slice(ids);
            m.extend(std::iter::repeat_n(1u8, ids.len()));
            // The first pad after the text is an EOS (mask 1), as the official harness marks it.
            x.push(bt.cfg.eos_token_id);
            m.push(1);
            while x.len() % l != 0 || x.len() < 2 * l {
                x.push(pad);
                m.push(0);
            }
            if x.len() > ctx + l {
                return Err(Error::input(
                    "prompt",
                    format!("{} tokens exceed the context of {ctx}", ids.len()),
                ));
            }
            let n = x.len() / l;
            let block_mask = m.chunks(l).map(|b| b.contains(&1) as u8).collect();
            let batch = BlockBatch {
                batch: 1,
                n_blocks: n,
                block_length: l,
                input_ids: x,
                attention_mask: m,
                block_mask,
                labels: None,
            };
            let out = bt.forward(
                &batch,
                ForwardOptions {
                    skip_padding_blocks: false,
                    want_logits: true,
                },
            )?;
            let logits = out.logits.expect("logits requested"); // [1, n-1, L, V]
            let logp =
                candle_nn::ops::log_softmax(&logits.reshape(((n - 1) * l, vocab))?, D::Minus1)?;
            // Row r predicts padded position L + r; token i sits at padded position L-1+i,
            // so token i >= 1 is row i-1: the same indexing as a vanilla model.
            logp.to_vec2()?
        }
    };
    let mut out = Vec::with_capacity(ids.len());
    out.push(None);
    for i in 1..ids.len() {
        let row = &rows[i - 1];
        let (logprob, top) = sampling::logprobs_from_logprobs(row, ids[i], top_n);
        out.push(Some(TokenLogprob {
            token: ids[i],
            logprob,
            top,
        }));
    }
    Ok(out)
}
