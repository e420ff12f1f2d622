//! The official `generate` calls, reproduced token for token on top of the engine:
//! `BlockTransformer.generate(input_ids, attention_mask, max_length)` (greedy, with its
//! generation positions, length rule and EOS fillers) and Hugging Face
//! `GPTNeoXForCausalLM.generate(max_new_tokens)` (greedy) for vanilla models.

use super::{Backend, Engine, EngineOptions, FinishReason, GenRequest, PositionMode};
use crate::error::{Error, Result};
use crate::model::{Arch, Model};
use std::sync::Arc;

/// Greedy generation with the official semantics. `input_ids` rows must have equal length
/// (callers left-pad, as with the official API). For block models `limit` is the official
/// `max_length` (prompt included); for vanilla models it is `max_new_tokens`.
/// `eos_token_id` defaults to the model's EOS (0).
/// Returns prompt + generated ids per row, as the official code does.
pub fn generate(
    model: Arc<Model>,
    input_ids: &[Vec<u32>],
    attention_mask: Option<&[Vec<u8>]>,
    limit: usize,
    eos_token_id: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    generate_on(
        model,
        input_ids,
        attention_mask,
        limit,
        eos_token_id,
        Backend::Auto,
    )
}

/// [`generate`] on a chosen engine backend.
pub fn generate_on(
    model: Arc<Model>,
    input_ids: &[Vec<u32>],
    attention_mask: Option<&[Vec<u8>]>,
    limit: usize,
    eos_token_id: Option<u32>,
    backend: Backend,
) -> Result<Vec<Vec<u32>>> {
    let p = input_ids.first().map_or(0, Vec::len);
    if input_ids.iter().any(|r| r.len() != p) {
        return Err(Error::input(
            "input_ids",
            "rows must have equal length (left-pad them)",
        ));
    }
    let is_block = matches!(model.arch, Arch::Block(_));
    let max_new = if is_block {
        if limit < p {
            return Err(Error::input(
                "max_length",
                format!("{limit} is shorter than the prompt ({p} tokens)"),
            ));
        }
        limit - p
    } else {
        limit
    };
    let eos = eos_token_id.unwrap_or(model.config.eos_token_id());
    let positions = if is_block {
        PositionMode::Official
    } else {
        PositionMode::Trained
    };
    let mut engine = Engine::new(
        model.clone(),
        EngineOptions {
            positions,
            max_batch: input_ids.len(),
            backend,
            ..Default::default()
        },
    );
    let mut ids = Vec::new();
    for (i, row) in input_ids.iter().enumerate() {
        ids.push(engine.add(GenRequest {
            prompt_mask: attention_mask.map(|m| m[i].clone()),
            eos_token_id: Some(eos),
            ..GenRequest::greedy(row.clone(), max_new)
        })?);
    }
    let mut out: Vec<Vec<u32>> = input_ids.to_vec();
    for ev in engine.run_to_completion()? {
        let r = ids.iter().position(|&x| x == ev.id).expect("known id");
        out[r].extend_from_slice(&ev.tokens);
        if !is_block && ev.finished == Some(FinishReason::Eos) {
            out[r].push(eos); // HF keeps the EOS, then pads
        }
    }
    // Rows that finished early are padded to the batch's length with the pad id (0).
    let len = out.iter().map(Vec::len).max().unwrap_or(0);
    for row in &mut out {
        row.resize(len, 0);
    }
    Ok(out)
}
