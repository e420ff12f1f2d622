//! The Block Transformer and its official training/scoring forward
//! (`BlockTransformer.forward` of the official code, `official-architecture.md` section 8):
//!
//! 1. `E = embedder(blocks)`                         `[B, n, D]`
//! 2. `S = block_decoder(E, block_mask)`             `[B, n, D]`
//! 3. block `j >= 1` is predicted from `S[j-1]` (block 0 is never predicted); padding target
//!    blocks are skipped unless asked otherwise;
//! 4. token decoder over `[P_1..P_R, x_0..x_{L-2}]` with mask `[1 x R, m_0..m_{L-2}]`;
//!    output `R-1+j` predicts `x_j` and is kept only if `x_j != pad || m_j == 1`
//!    (`discard_redundant_tokens`);
//! 5. loss = mean cross-entropy over the kept positions.

use super::block_decoder::BlockDecoder;
use super::embedder::Embedder;
use super::token_decoder::TokenDecoder;
use super::WeightSource;
use crate::config::BlockConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};

#[derive(Clone, Debug)]
pub struct BlockTransformer {
    pub cfg: BlockConfig,
    pub embedder: Embedder,
    pub block_decoder: BlockDecoder,
    pub token_decoder: TokenDecoder,
}

/// A batch in block format, on the host.
#[derive(Clone, Debug)]
pub struct BlockBatch {
    pub batch: usize,
    pub n_blocks: usize,
    pub block_length: usize,
    /// `[B, n, L]` token ids.
    pub input_ids: Vec<u32>,
    /// `[B, n, L]` 1 = real token, 0 = padding.
    pub attention_mask: Vec<u8>,
    /// `[B, n]` 1 if the block holds any real token.
    pub block_mask: Vec<u8>,
    /// `[B, n, L]` targets, -100 = ignored; `None` = no loss.
    pub labels: Option<Vec<i64>>,
}

/// What the forward computed.
#[derive(Debug)]
pub struct BlockForward {
    /// `[B, n, D]` embedder output.
    pub block_embeddings: Tensor,
    /// `[B, n, D]` block-decoder states after the final LayerNorm.
    pub block_hidden: Tensor,
    /// `[B, n-1, L, V]`; redundant positions 0, skipped blocks filled with the EOS id's value.
    pub logits: Option<Tensor>,
    /// Mean cross-entropy over the kept positions (a scalar).
    pub loss: Option<Tensor>,
    /// Per position in the block: summed cross-entropy and count of kept positions.
    pub loss_sum_by_position: Vec<f64>,
    pub count_by_position: Vec<usize>,
    /// Per kept position, in order: (target id, cross-entropy, argmax correct).
    pub token_losses: Vec<(u32, f32, bool)>,
}

impl BlockForward {
    /// Mean loss by position (NaN where nothing was predicted), as the official logging.
    pub fn loss_by_position(&self) -> Vec<f64> {
        self.loss_sum_by_position
            .iter()
            .zip(&self.count_by_position)
            .map(|(s, &c)| if c == 0 { f64::NAN } else { s / c as f64 })
            .collect()
    }
}

/// Options of [`BlockTransformer::forward`].
#[derive(Clone, Copy, Debug)]
pub struct ForwardOptions {
    pub skip_padding_blocks: bool,
    pub want_logits: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            skip_padding_blocks: true,
            want_logits: false,
        }
    }
}

impl BlockTransformer {
    pub fn load(src: &mut dyn WeightSource, cfg: &BlockConfig) -> Result<Self> {
        // State-dict order: embedder, token decoder, block decoder.
        let embedder = Embedder::load(src, cfg)?;
        let token_decoder = TokenDecoder::load(src, cfg)?;
        let block_decoder = BlockDecoder::load(src, &cfg.block_decoder)?;
        Ok(BlockTransformer {
            cfg: cfg.clone(),
            embedder,
            block_decoder,
            token_decoder,
        })
    }

    pub fn device(&self) -> &Device {
        self.embedder.embeddings.device()
    }

    fn check_batch(&self, x: &BlockBatch) -> Result<()> {
        let (b, n, l) = (x.batch, x.n_blocks, x.block_length);
        if l != self.cfg.block_length {
            return Err(Error::input(
                "block_length",
                format!(
                    "batch has blocks of {l} tokens, the model {}",
                    self.cfg.block_length
                ),
            ));
        }
        if n < 2 {
            return Err(Error::input(
                "input_ids",
                format!("need at least 2 blocks to predict anything, got {n}"),
            ));
        }
        if x.input_ids.len() != b * n * l || x.attention_mask.len() != b * n * l {
            return Err(Error::input(
                "input_ids",
                "length differs from batch x blocks x L",
            ));
        }
        if x.block_mask.len() != b * n {
            return Err(Error::input(
                "block_mask",
                "length differs from batch x blocks",
            ));
        }
        let v = self.cfg.vocab_size();
        if let Some(bad) = x.input_ids.iter().find(|&&t| t as usize >= v) {
            return Err(Error::input(
                "input_ids",
                format!("token id {bad} is out of the vocabulary (size {v})"),
            ));
        }
        Ok(())
    }

    /// The official forward (training and scoring semantics).
    pub fn forward(&self, x: &BlockBatch, opts: ForwardOptions) -> Result<BlockForward> {
        self.check_batch(x)?;
        let dev = self.device().clone();
        let (b, n, l) = (x.batch, x.n_blocks, x.block_length);
        let r = self.token_decoder.n_prefix;
        let pad = self.cfg.pad_token_id;

        // 1-2. Embed blocks, run the block decoder.
        let ids = Tensor::from_slice(&x.input_ids, (b * n, l), &dev)?;
        let e = self.embedder.forward(&ids)?; // [B*n, D]
        let d = e.dim(1)?;
        let e = e.reshape((b, n, d))?;
        let bm = Tensor::from_slice(&x.block_mask, (b, n), &dev)?.to_dtype(DType::F32)?;
        let s = self.block_decoder.forward(&e, &bm)?; // [B, n, D]

        // 3. Target blocks 1..n-1 of every row, predicted from the state of the block before.
        let mut kept = Vec::new(); // index into B*(n-1)
        for bi in 0..b {
            for j in 1..n {
                if !opts.skip_padding_blocks || x.block_mask[bi * n + j] == 1 {
                    kept.push(bi * (n - 1) + j - 1);
                }
            }
        }
        let target_block = |t: usize| (t / (n - 1)) * n + t % (n - 1) + 1; // index into B*n
        let k = kept.len();
        let mut out = BlockForward {
            block_embeddings: e,
            block_hidden: s.clone(),
            logits: None,
            loss: None,
            loss_sum_by_position: vec![0.0; l],
            count_by_position: vec![0; l],
            token_losses: Vec::new(),
        };
        if k == 0 {
            if opts.want_logits {
                let v = self.cfg.vocab_size();
                out.logits = Some(
                    (Tensor::ones((b, n - 1, l, v), DType::F32, &dev)?
                        * self.cfg.eos_token_id as f64)?,
                );
            }
            return Ok(out);
        }
        let ctx_idx: Vec<u32> = kept.iter().map(|&t| (target_block(t) - 1) as u32).collect();
        let tgt_idx: Vec<u32> = kept.iter().map(|&t| target_block(t) as u32).collect();
        let ctx = s
            .reshape((b * n, d))?
            .index_select(&Tensor::new(ctx_idx.as_slice(), &dev)?, 0)?; // [K, D]

        // 4. Token decoder input [P_1..P_R, x_0..x_{L-2}] and key mask [1 x R, m_0..m_{L-2}].
        let prefix = self.token_decoder.expand(&ctx)?; // [K, R, H]
        let mut tok = Vec::with_capacity(k * (l - 1));
        let mut key_mask = Vec::with_capacity(k * (r + l - 1));
        let mut content = Vec::with_capacity(k * l); // (kept?, label) per [K, L]
        for &tb in &tgt_idx {
            let base = tb as usize * l;
            tok.extend_from_slice(&x.input_ids[base..base + l - 1]);
            key_mask.extend(std::iter::repeat_n(1u8, r));
            key_mask.extend_from_slice(&x.attention_mask[base..base + l - 1]);
            for j in 0..l {
                let (id, m) = (x.input_ids[base + j], x.attention_mask[base + j]);
                let label = x
                    .labels
                    .as_ref()
                    .map(|lab| lab[base + j])
                    .unwrap_or(id as i64);
                content.push((id != pad || m == 1, label));
            }
        }
        let h = self.token_decoder.hidden_size();
        let input = if l > 1 {
            let tok = Tensor::from_vec(tok, (k, l - 1), &dev)?;
            Tensor::cat(&[&prefix, &self.token_decoder.embed(&tok)?], 1)?
        } else {
            prefix
        };
        let key_mask = Tensor::from_vec(key_mask, (k, r + l - 1), &dev)?.to_dtype(DType::F32)?;
        let hid = self.token_decoder.stack.forward(&input, Some(&key_mask))?;
        let hid = hid.narrow(1, r - 1, l)?; // [K, L, H]

        // 5. Loss over the kept positions.
        let keep_pos: Vec<u32> = (0..k * l)
            .filter(|&i| content[i].0)
            .map(|i| i as u32)
            .collect();
        if x.labels.is_some() && !keep_pos.is_empty() {
            let sel = hid
                .reshape((k * l, h))?
                .index_select(&Tensor::new(keep_pos.as_slice(), &dev)?, 0)?;
            let logits = self.token_decoder.logits(&sel)?; // [C, V]
            let labels: Vec<i64> = keep_pos.iter().map(|&i| content[i as usize].1).collect();
            let (ce, correct) = cross_entropy(&logits, &labels)?; // [C], -100 -> 0
            out.loss = Some(ce.mean_all()?);
            let ce_host: Vec<f32> = ce.to_vec1()?;
            for ((&i, &c), (&lab, ok)) in keep_pos
                .iter()
                .zip(&ce_host)
                .zip(labels.iter().zip(correct))
            {
                let j = i as usize % l;
                out.loss_sum_by_position[j] += c as f64;
                out.count_by_position[j] += 1;
                if lab >= 0 {
                    out.token_losses.push((lab as u32, c, ok));
                }
            }
        }
        if opts.want_logits {
            let v = self.cfg.vocab_size();
            let mask: Vec<f32> = content.iter().map(|c| c.0 as u8 as f32).collect();
            let mask = Tensor::from_vec(mask, (k, l, 1), &dev)?;
            let logits = self
                .token_decoder
                .logits(&hid)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&mask)?; // [K, L, V]
            let kept_t = Tensor::new(
                kept.iter()
                    .map(|&t| t as u32)
                    .collect::<Vec<_>>()
                    .as_slice(),
                &dev,
            )?;
            let full = Tensor::zeros((b * (n - 1), l, v), DType::F32, &dev)?
                .index_add(&kept_t, &logits, 0)?;
            // Skipped (padding) target blocks hold the numeric value of the EOS id.
            let mut skipped = vec![1f32; b * (n - 1)];
            for &t in &kept {
                skipped[t] = 0.0;
            }
            let fill = (Tensor::from_vec(skipped, (b * (n - 1), 1, 1), &dev)?
                * self.cfg.eos_token_id as f64)?;
            out.logits = Some(full.broadcast_add(&fill)?.reshape((b, n - 1, l, v))?);
        }
        Ok(out)
    }
}

/// Per-row cross-entropy `[C]` of `logits [C, V]` against `labels` (-100 rows give 0), and
/// whether each row's argmax equals its label.
pub fn cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<(Tensor, Vec<bool>)> {
    let dev = logits.device();
    let c = labels.len();
    let safe: Vec<u32> = labels.iter().map(|&x| x.max(0) as u32).collect();
    let valid: Vec<f32> = labels.iter().map(|&x| (x >= 0) as u8 as f32).collect();
    let logits = &logits.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp
        .gather(&Tensor::from_vec(safe.clone(), (c, 1), dev)?, 1)?
        .squeeze(1)?;
    let ce = (picked.neg()? * Tensor::from_vec(valid, c, dev)?)?;
    let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let correct = argmax.iter().zip(&safe).map(|(a, b)| a == b).collect();
    Ok((ce, correct))
}
