//! `blockformer generate`: batched generation from text prompts or raw ids, streamed.

use super::common::{parse_ids, ModelArgs};
use anyhow::{bail, Context};
use blockformer::generate::{
    Backend, Engine, EngineOptions, FinishReason, GenRequest, PositionMode, SamplingParams,
};
use blockformer::kernels::attention::KvDtype;
use blockformer::tokenizer::StreamDecoder;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compat {
    /// Token-decoder positions as in training (default).
    Trained,
    /// Reproduce the official `generate`: its positions, length rule and EOS fillers.
    Official,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheType {
    F32,
    F16,
}

impl From<KvCacheType> for KvDtype {
    fn from(k: KvCacheType) -> KvDtype {
        match k {
            KvCacheType::F32 => KvDtype::F32,
            KvCacheType::F16 => KvDtype::F16,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    /// Host kernels for float32 on the CPU, tensor ops otherwise.
    Auto,
    /// Hand-written CPU kernels (float32 CPU models).
    Host,
    /// Candle ops with device-resident KV pools (the GPU path; also runs on the CPU).
    Tensor,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Host => Backend::Host,
            BackendArg::Tensor => Backend::Tensor,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text prompt(s); each is one sequence.
    #[arg(long, num_args = 1..)]
    pub prompt: Vec<String>,
    /// Raw token-id prompt(s) ("1 2 3" or "1,2,3"); output is printed as ids.
    #[arg(long, num_args = 1..)]
    pub ids: Vec<String>,
    /// A random prompt of this many ids (seeded by --seed), for speed runs without a tokenizer.
    #[arg(long)]
    pub random_prompt_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rows decoded together. With one prompt and N > 1, the prompt is repeated N times
    /// (row i sampled with seed + i).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Token-decoder position rule.
    #[arg(long, value_enum, default_value_t = Compat::Trained)]
    pub compat: Compat,
    /// KV-cache element type of the block decoder / vanilla model (f16 halves the cache
    /// traffic of long contexts; the math stays float32).
    #[arg(long, value_enum, default_value_t = KvCacheType::F32)]
    pub kv_cache: KvCacheType,
    /// Decode path: auto (host kernels for float32 on the CPU, else tensor ops), host or tensor.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Do not stop at the EOS token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print only the generated continuation, not the prompt.
    #[arg(long)]
    pub no_echo: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    let loaded = a.model.load()?;
    eprintln!("model: {}", loaded.description);
    let tok = loaded.tokenizer;
    let as_ids = !a.ids.is_empty() || a.random_prompt_len.is_some();

    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for p in &a.prompt {
        let t = tok.as_ref().context(
            "--prompt needs a tokenizer: give --tokenizer FILE, a model folder with tokenizer.json, or use --ids",
        )?;
        prompts.push(t.encode(p)?);
    }
    for s in &a.ids {
        prompts.push(parse_ids(s)?);
    }
    if let Some(n) = a.random_prompt_len {
        let v = loaded.model.config.vocab_size() as u32;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
        prompts.push((0..n).map(|_| rng.random_range(0..v)).collect());
    }
    if prompts.is_empty() {
        bail!("nothing to generate from: give --prompt TEXT, --ids IDS or --random-prompt-len N");
    }
    // One prompt with --batch-size N > 1 is repeated N times: check before making the copies.
    let rows = if prompts.len() == 1 {
        a.batch_size
    } else {
        a.batch_size.min(prompts.len())
    };
    check_memory(&loaded.model, rows, &prompts, &a)?;
    if prompts.len() == 1 && a.batch_size > 1 {
        prompts = vec![prompts[0].clone(); a.batch_size];
    }
    let model = Arc::new(loaded.model);
    let eos = (!a.ignore_eos).then(|| model.config.eos_token_id());
    let positions = match a.compat {
        Compat::Trained => PositionMode::Trained,
        Compat::Official => PositionMode::Official,
    };
    let mut engine = Engine::new(
        model.clone(),
        EngineOptions {
            positions,
            max_batch: a.batch_size,
            kv_dtype: a.kv_cache.into(),
            backend: a.backend.into(),
            max_context: prompts.iter().map(|p| p.len() + a.max_new_tokens).max(),
        },
    );
    let mut rows: HashMap<u64, usize> = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        let id = engine
            .add(GenRequest {
                prompt: p.clone(),
                prompt_mask: None,
                max_new_tokens: a.max_new_tokens,
                sampling: SamplingParams {
                    seed: a.seed.wrapping_add(i as u64),
                    ..sampling
                },
                eos_token_id: eos,
                logprobs: None,
            })
            .with_context(|| format!("prompt {i}"))?;
        rows.insert(id, i);
    }

    let stream = prompts.len() == 1;
    let mut out = std::io::stdout().lock();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut decoder = StreamDecoder::default();
    if stream && !a.no_echo {
        match (&tok, as_ids) {
            (Some(t), false) => write!(out, "{}", decoder.push(t, &prompts[0])?)?,
            _ => write!(out, "{}", join(&prompts[0]))?,
        }
        out.flush()?;
    }
    let start = Instant::now();
    let mut first_token: Option<f64> = None;
    while !engine.is_idle() {
        for ev in engine.step()? {
            let r = rows[&ev.id];
            if !ev.tokens.is_empty() && first_token.is_none() {
                first_token = Some(start.elapsed().as_secs_f64());
            }
            generated[r].extend_from_slice(&ev.tokens);
            if stream {
                match (&tok, as_ids) {
                    (Some(t), false) => write!(out, "{}", decoder.push(t, &ev.tokens)?)?,
                    _ if !ev.tokens.is_empty() => write!(out, " {}", join(&ev.tokens))?,
                    _ => {}
                }
                out.flush()?;
            }
            if let Some(reason) = ev.finished {
                if stream {
                    writeln!(out)?;
                } else {
                    let mut all = if a.no_echo {
                        vec![]
                    } else {
                        prompts[r].clone()
                    };
                    all.extend_from_slice(&generated[r]);
                    let text = match (&tok, as_ids) {
                        (Some(t), false) => t.decode(&all)?,
                        _ => join(&all),
                    };
                    writeln!(out, "[{r}] {text}")?;
                }
                if reason == FinishReason::Eos {
                    tracing::debug!("row {r} stopped at EOS");
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let total: usize = generated.iter().map(Vec::len).sum();
    eprintln!(
        "generated {total} tokens in {secs:.3} s: {:.1} tokens/s ({} rows, batch {}, {:.2} ms per token per row; first tokens after {:.3} s)",
        total as f64 / secs,
        prompts.len(),
        a.batch_size.min(prompts.len()),
        1e3 * secs / (total as f64 / prompts.len() as f64).max(1.0),
        first_token.unwrap_or(secs)
    );
    Ok(())
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

/// Refuses a batch of `rows` decoded together that cannot fit in memory (the bench's memory
/// model at the longest prompt): such a run would swap or be killed part-way.
fn check_memory(
    model: &blockformer::model::Model,
    rows: usize,
    prompts: &[Vec<u32>],
    a: &Args,
) -> anyhow::Result<()> {
    let Some(available) = blockformer::bench::memory_left(&model.device()) else {
        return Ok(());
    };
    let w = blockformer::bench::roofline::Workload {
        batch: rows,
        prompt_len: prompts.iter().map(Vec::len).max().unwrap_or(0),
        new_tokens: a.max_new_tokens,
    };
    blockformer::bench::check_batch_fits(model, &w, a.kv_cache.into(), available)?;
    Ok(())
}
