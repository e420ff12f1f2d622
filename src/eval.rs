//! Evaluation of block and vanilla models on exactly the same predicted tokens: loss,
//! perplexity, token accuracy and loss by position within the block (the paper's Figure 4).
//!
//! Each document (its tokens + EOS, the EOS being a real, predicted token as in training) is
//! cut into windows of `W` tokens. In every window the first token is context only and tokens
//! `1..W-1` are predicted:
//!
//! - vanilla: the window is the input, the HF shifted causal-LM loss;
//! - block: the window is left-padded with `L-1` pad tokens (mask 0) so its first token closes
//!   block 0 (never predicted) and every later token is predicted, right-padded to a block
//!   boundary (mask 0), and scored by the official forward ([`BlockTransformer::forward`]),
//!   as the official evaluation harness (`block_transformer_pad.py`) does.
//!
//! Token `j` of a window sits at padded position `L-1+j`, so its position in the block is
//! `(L-1+j) mod L`; vanilla losses are bucketed the same way so the curves compare.
//!
//! [`BlockTransformer::forward`]: crate::model::BlockTransformer::forward

use crate::error::{Error, Result};
use crate::model::block_transformer::{
    cross_entropy, BlockBatch, BlockTransformer, ForwardOptions,
};
use crate::model::{Arch, Model, Vanilla};
use serde::Serialize;

/// Running sums of an evaluation.
#[derive(Clone, Debug, Default)]
pub struct Accum {
    pub loss_sum: f64,
    pub count: usize,
    pub correct: usize,
    pub loss_sum_by_position: Vec<f64>,
    pub count_by_position: Vec<usize>,
}

impl Accum {
    pub fn new(block_length: usize) -> Self {
        Accum {
            loss_sum_by_position: vec![0.0; block_length],
            count_by_position: vec![0; block_length],
            ..Default::default()
        }
    }

    pub fn loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }

    pub fn loss_by_position(&self) -> Vec<f64> {
        self.loss_sum_by_position
            .iter()
            .zip(&self.count_by_position)
            .map(|(s, &c)| if c == 0 { f64::NAN } else { s / c as f64 })
            .collect()
    }
}

/// Adds a block batch scored by the official forward (labels required). The sums equal the
/// official loss and loss by position of that batch.
pub fn accumulate_block(bt: &BlockTransformer, batch: &BlockBatch, acc: &mut Accum) -> Result<()> {
    let out = bt.forward(batch, ForwardOptions::default())?;
    let nl = acc.loss_sum_by_position.len();
    for (j, (s, c)) in out
        .loss_sum_by_position
        .iter()
        .zip(&out.count_by_position)
        .enumerate()
    {
        acc.loss_sum_by_position[j % nl] += s;
        acc.count_by_position[j % nl] += c;
    }
    // Positions whose label is -100 count as 0 in the official mean; the same here.
    let kept: usize = out.count_by_position.iter().sum();
    acc.loss_sum += out.loss_sum_by_position.iter().sum::<f64>();
    acc.count += kept;
    acc.correct += out.token_losses.iter().filter(|t| t.2).count();
    Ok(())
}

/// Adds a vanilla batch `ids [B, T]` (mask, labels as the HF forward: position `t` predicts
/// `labels[t+1]`, -100 ignored); `position_of(b, t)` gives the in-block position of the token
/// predicted at `labels[b, t]`.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_vanilla(
    v: &Vanilla,
    ids: &[u32],
    b: usize,
    t: usize,
    mask: Option<&[u8]>,
    labels: &[i64],
    position_of: &dyn Fn(usize, usize) -> usize,
    acc: &mut Accum,
) -> Result<()> {
    let logits = v.forward(ids, b, t, mask, None)?.logits; // [B, T, V]
    let vocab = v.cfg.vocab_size;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut pos = Vec::new();
    for bi in 0..b {
        for ti in 0..t.saturating_sub(1) {
            let lab = labels[bi * t + ti + 1];
            if lab >= 0 {
                rows.push((bi * t + ti) as u32);
                targets.push(lab);
                pos.push(position_of(bi, ti + 1));
            }
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let sel = logits.reshape((b * t, vocab))?.index_select(
        &candle_core::Tensor::new(rows.as_slice(), logits.device())?,
        0,
    )?;
    let (ce, correct) = cross_entropy(&sel, &targets)?;
    let ce: Vec<f32> = ce.to_vec1()?;
    let nl = acc.loss_sum_by_position.len();
    for ((c, ok), p) in ce.iter().zip(correct).zip(pos) {
        acc.loss_sum += *c as f64;
        acc.count += 1;
        acc.correct += ok as usize;
        acc.loss_sum_by_position[p % nl] += *c as f64;
        acc.count_by_position[p % nl] += 1;
    }
    Ok(())
}

/// What [`evaluate`] reports.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub kind: String,
    /// Predicted tokens.
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub accuracy: f64,
    /// Block length used for the position buckets.
    pub block_length: usize,
    /// Mean loss at positions `1..=L` within the block.
    pub loss_by_position: Vec<f64>,
    pub count_by_position: Vec<usize>,
    pub window: usize,
    pub documents: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
}

/// Cuts documents (+ EOS) into windows of at most `window` tokens (windows shorter than 2
/// tokens predict nothing and are dropped).
pub fn windows(
    docs: &[Vec<u32>],
    eos: u32,
    window: usize,
    max_tokens: Option<usize>,
) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    let mut predicted = 0usize;
    for d in docs {
        let mut seq = d.clone();
        seq.push(eos);
        for w in seq.chunks(window) {
            if w.len() >= 2 {
                if let Some(m) = max_tokens {
                    if predicted >= m {
                        return out;
                    }
                    let take = (m - predicted + 1).min(w.len());
                    predicted += take - 1;
                    out.push(w[..take].to_vec());
                    continue;
                }
                predicted += w.len() - 1;
                out.push(w.to_vec());
            }
        }
    }
    out
}

/// The window length that fits every model: `min(context) - max(L)` when a block model is
/// among them (the `L-1` left pads and the block rounding must fit in its context).
pub fn common_window(models: &[&Model]) -> usize {
    let ctx = models
        .iter()
        .map(|m| m.config.context_length())
        .min()
        .unwrap_or(1024);
    let l = models
        .iter()
        .filter_map(|m| match &m.arch {
            Arch::Block(b) => Some(b.cfg.block_length),
            Arch::Vanilla(_) => None,
        })
        .max()
        .unwrap_or(0);
    ctx - l
}

/// Evaluates `model` on the windows (see the module docs), `batch` windows per forward;
/// `pos_len` is the block length used for the vanilla model's position buckets.
pub fn evaluate(
    model: &Model,
    wins: &[Vec<u32>],
    batch: usize,
    pos_len: usize,
) -> Result<EvalReport> {
    let start = std::time::Instant::now();
    let batch = batch.max(1);
    let window = wins.iter().map(Vec::len).max().unwrap_or(0);
    let (kind, l) = match &model.arch {
        Arch::Block(b) => ("block", b.cfg.block_length),
        Arch::Vanilla(_) => ("vanilla", pos_len.max(1)),
    };
    let mut acc = Accum::new(l);
    for chunk in wins.chunks(batch) {
        match &model.arch {
            Arch::Block(bt) => {
                let pad = bt.cfg.pad_token_id;
                let n = chunk
                    .iter()
                    .map(|w| (l - 1 + w.len()).div_ceil(l))
                    .max()
                    .unwrap_or(2)
                    .max(2);
                if n * l > bt.cfg.context_length + l {
                    return Err(Error::input(
                        "window",
                        format!("windows of {window} tokens exceed the block model's context"),
                    ));
                }
                let b = chunk.len();
                let mut ids = vec![pad; b * n * l];
                let mut mask = vec![0u8; b * n * l];
                for (bi, w) in chunk.iter().enumerate() {
                    let base = bi * n * l + l - 1;
                    ids[base..base + w.len()].copy_from_slice(w);
                    mask[base..base + w.len()].fill(1);
                }
                let labels = ids
                    .iter()
                    .zip(&mask)
                    .map(|(&i, &m)| if m == 1 { i as i64 } else { -100 })
                    .collect();
                let block_mask = mask.chunks(l).map(|c| c.contains(&1) as u8).collect();
                let bb = BlockBatch {
                    batch: b,
                    n_blocks: n,
                    block_length: l,
                    input_ids: ids,
                    attention_mask: mask,
                    block_mask,
                    labels: Some(labels),
                };
                accumulate_block(bt, &bb, &mut acc)?;
            }
            Arch::Vanilla(v) => {
                let t = chunk.iter().map(Vec::len).max().unwrap_or(0);
                let b = chunk.len();
                let mut ids = vec![0u32; b * t];
                let mut mask = vec![0u8; b * t];
                let mut labels = vec![-100i64; b * t];
                for (bi, w) in chunk.iter().enumerate() {
                    ids[bi * t..bi * t + w.len()].copy_from_slice(w);
                    mask[bi * t..bi * t + w.len()].fill(1);
                    for (j, &x) in w.iter().enumerate() {
                        labels[bi * t + j] = x as i64;
                    }
                }
                let full = mask.iter().all(|&m| m == 1);
                accumulate_vanilla(
                    v,
                    &ids,
                    b,
                    t,
                    (!full).then_some(mask.as_slice()),
                    &labels,
                    &|_, j| (l - 1 + j) % l,
                    &mut acc,
                )?;
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let loss = acc.loss();
    Ok(EvalReport {
        kind: kind.to_string(),
        tokens: acc.count,
        loss,
        perplexity: loss.exp(),
        accuracy: acc.correct as f64 / acc.count.max(1) as f64,
        block_length: l,
        loss_by_position: acc.loss_by_position(),
        count_by_position: acc.count_by_position.clone(),
        window,
        documents: 0,
        wall_s: wall,
        tokens_per_s: acc.count as f64 / wall.max(1e-9),
    })
}
