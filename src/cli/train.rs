//! `blockformer train`: train a block or vanilla model from scratch (or uptrain a block model
//! from a vanilla checkpoint), with exact resume.

use anyhow::{bail, Context};
use blockformer::checkpoint;
use blockformer::config::{self, ModelConfig};
use blockformer::data::{split_files, DocMode, PackedDataset, Packing, TokenCache};
use blockformer::model::RandomInit;
use blockformer::tokenizer::Tokenizer;
use blockformer::train::{self, MapSource, RunOptions, TrainConfig, Trainer};
use candle_core::Device;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture: a preset name (its vocabulary is replaced by the tokenizer's) or a
    /// config.json. With --init-from-vanilla it may be left out (the official uptraining
    /// layout is derived from the vanilla model).
    #[arg(long)]
    pub config: Option<String>,
    /// tokenizer.json (copied next to the checkpoints).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Training text files.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Validation text files (default: a seeded --valid-fraction of the --data files, held out).
    #[arg(long, num_args = 1..)]
    pub valid: Vec<PathBuf>,
    /// Fraction of the --data files held out for validation when --valid is not given.
    #[arg(long, default_value_t = 0.05)]
    pub valid_fraction: f64,
    /// `file`: one file = one document; `blank-line`: blank-line-separated records.
    #[arg(long, default_value = "file")]
    pub doc_mode: String,
    /// Output folder: final model, checkpoint/, metrics.jsonl, loss.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, value_parser = super::at_least_one)]
    pub steps: Option<usize>,
    /// Wall-clock budget in minutes instead of --steps (the step count is fixed after the first
    /// steps from their speed and recorded).
    #[arg(long)]
    pub time_budget: Option<f64>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Sequences per forward/backward.
    #[arg(long, default_value_t = 8, value_parser = super::at_least_one)]
    pub batch_size: usize,
    /// Tokens per optimizer step, reached by gradient accumulation (default: one micro-batch).
    #[arg(long, value_parser = super::at_least_one)]
    pub token_batch: Option<usize>,
    /// Context length in tokens (default: the config's).
    #[arg(long)]
    pub context: Option<usize>,
    /// Tokens per training sequence (default: the context length).
    #[arg(long, value_parser = super::at_least_one)]
    pub seq_len: Option<usize>,
    /// Vocabulary size (default: the tokenizer's, for presets).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validation every N steps (0 = at the end only).
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 16, value_parser = super::at_least_one)]
    pub eval_samples: usize,
    /// Checkpoint every N steps (also at the end and on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub save_every: usize,
    /// Resume from OUT/checkpoint (hyper-parameters come from the checkpoint; with --steps N
    /// the schedule length changes to N, which makes the run differ from an uninterrupted one).
    #[arg(long)]
    pub resume: bool,
    /// Initialise a block model from a vanilla model folder (official uptraining init).
    #[arg(long)]
    pub init_from_vanilla: Option<PathBuf>,
    /// Block length of the derived uptraining config.
    #[arg(long, default_value_t = 4, value_parser = super::at_least_one)]
    pub block_length: usize,
    /// Where tokenized data is cached (default: OUT/.cache).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Device of the forward and backward passes: cpu, or cuda[:N] (a CUDA build). The AdamW
    /// update and its state stay on the host in float32.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Mixed precision: bf16 computes the linear layers' products in bfloat16 over float32
    /// master weights; off keeps float32. Default: bf16 on CUDA, off on the CPU.
    #[arg(long)]
    pub autocast: Option<String>,
}

fn with_vocab(cfg: ModelConfig, v: usize) -> ModelConfig {
    match cfg {
        ModelConfig::Vanilla(mut c) => {
            c.vocab_size = v;
            ModelConfig::Vanilla(c)
        }
        ModelConfig::Block(mut c) => {
            c.embedder.vocab_size = v;
            c.block_decoder.vocab_size = v;
            c.token_decoder.vocab_size = v;
            ModelConfig::Block(c)
        }
    }
}

fn with_context(cfg: ModelConfig, ctx: usize) -> ModelConfig {
    match cfg {
        ModelConfig::Vanilla(mut c) => {
            c.max_position_embeddings = ctx;
            ModelConfig::Vanilla(c)
        }
        ModelConfig::Block(mut c) => {
            c.context_length = ctx;
            ModelConfig::Block(c)
        }
    }
}

fn install_ctrlc() {
    // SAFETY: the handler only stores to an atomic.
    let r = unsafe {
        signal_hook_registry::register(libc::SIGINT, || {
            train::STOP.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    if let Err(e) = r {
        tracing::warn!("could not install the Ctrl-C handler: {e}");
    }
}

pub fn open_dataset(
    files: &[PathBuf],
    mode: DocMode,
    tokenizer: &Path,
    cache_dir: &Path,
    packing: Packing,
    seq_len: usize,
    seed: u64,
) -> anyhow::Result<PackedDataset> {
    let (cache, path) = TokenCache::open_or_build(files, mode, tokenizer, cache_dir)?;
    eprintln!(
        "data: {} files, {} documents, {} tokens (cache {})",
        files.len(),
        cache.n_docs(),
        cache.n_tokens(),
        path.display()
    );
    Ok(PackedDataset::new(cache, packing, seq_len, 0, 0, seed)?)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.out.exists() && !a.out.is_dir() {
        bail!(
            "--out {}: exists and is not a folder (expected a folder for the model, checkpoint/ and metrics)",
            a.out.display()
        );
    }
    if !(0.0..1.0).contains(&a.valid_fraction) {
        bail!(
            "--valid-fraction {}: expected 0 <= fraction < 1",
            a.valid_fraction
        );
    }
    let mode: DocMode = a.doc_mode.parse()?;
    let tok = Tokenizer::from_file(&a.tokenizer)?;
    let ckpt_dir = a.out.join("checkpoint");
    let dev = super::common::device(&a.device)?;
    let autocast = match a.autocast.as_deref() {
        None => !dev.is_cpu(),
        Some("bf16") => true,
        Some("off") | Some("f32") => false,
        Some(o) => bail!("--autocast {o}: expected bf16 or off"),
    };
    let mut trainer = if a.resume {
        if !ckpt_dir.join("trainer_state.json").exists() {
            bail!("--resume: no checkpoint in {}", ckpt_dir.display());
        }
        let mut t = Trainer::resume_on(&ckpt_dir, &dev)?;
        if a.autocast.is_some() {
            t.cfg.autocast_bf16 = autocast;
        }
        if let Some(s) = a.steps {
            if s != t.state.total_steps {
                // Changes the schedule from here on: no longer bit-identical to the original
                // run, on purpose.
                eprintln!(
                    "--steps {s}: schedule length changed from {} steps",
                    t.state.total_steps
                );
                t.state.total_steps = s.max(t.state.step);
                t.cfg.total_steps = t.state.total_steps;
            }
        }
        eprintln!(
            "resumed from {} at step {}/{}",
            ckpt_dir.display(),
            t.state.step,
            t.state.total_steps
        );
        t
    } else {
        let vanilla = match &a.init_from_vanilla {
            Some(p) => Some(checkpoint::load(p, None, None, &Device::Cpu)?.model),
            None => None,
        };
        let mut cfg = match (&a.config, &vanilla) {
            (Some(c), _) if Path::new(c).is_file() => ModelConfig::from_file(Path::new(c))?,
            (Some(c), _) => {
                let p = config::preset(c)?;
                with_vocab(p, a.vocab_size.unwrap_or(tok.vocab_size()))
            }
            (None, Some(v)) => match &v.config {
                ModelConfig::Vanilla(vc) => ModelConfig::Block(train::uptrain_config(
                    vc,
                    a.block_length,
                    a.context.unwrap_or(vc.max_position_embeddings),
                )),
                ModelConfig::Block(_) => bail!("--init-from-vanilla: that is a block model"),
            },
            (None, None) => bail!("give --config PRESET|config.json (or --init-from-vanilla DIR)"),
        };
        if let Some(v) = a.vocab_size {
            cfg = with_vocab(cfg, v);
        }
        if let Some(c) = a.context {
            cfg = with_context(cfg, c);
        }
        cfg.validate("training config")?;
        if tok.vocab_size() > cfg.vocab_size() {
            bail!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                cfg.vocab_size()
            );
        }
        let seq_len = a.seq_len.unwrap_or(cfg.context_length());
        let tokens_per_micro = a.batch_size * seq_len;
        let accum = a
            .token_batch
            .map(|t| t.div_ceil(tokens_per_micro).max(1))
            .unwrap_or(1);
        if a.steps.is_none() && a.time_budget.is_none() {
            bail!("give --steps N or --time-budget MINUTES");
        }
        let tc = TrainConfig {
            lr: a.lr,
            min_lr_ratio: a.min_lr_ratio,
            warmup_steps: a.warmup,
            total_steps: a.steps.unwrap_or(0),
            time_budget_s: a.time_budget.map(|m| m * 60.0),
            weight_decay: a.weight_decay,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: a.grad_clip,
            micro_batch: a.batch_size,
            accum,
            seq_len,
            seed: a.seed,
            eval_every: a.eval_every,
            eval_samples: a.eval_samples,
            save_every: a.save_every,
            autocast_bf16: autocast,
        };
        let mut rnd = RandomInit::new(a.seed, &Device::Cpu);
        match vanilla {
            Some(v) => {
                let ModelConfig::Block(bc) = &cfg else {
                    bail!("--init-from-vanilla needs a block-model config");
                };
                let mut src = MapSource {
                    map: train::uptrain_tensors(&v, bc)?,
                    fallback: Some(rnd),
                    origin: "init-from-vanilla".into(),
                };
                Trainer::new_on(&cfg, &mut src, tc, &dev)?
            }
            None => Trainer::new_on(&cfg, &mut rnd, tc, &dev)?,
        }
    };
    let cfg = trainer.model.config.clone();
    let packing = match &cfg {
        ModelConfig::Block(b) => Packing::Block {
            block_length: b.block_length,
        },
        ModelConfig::Vanilla(_) => Packing::Vanilla,
    };
    let (train_files, valid_files) = if a.valid.is_empty() {
        split_files(&a.data, a.valid_fraction, trainer.cfg.seed)
    } else {
        let mut t = a.data.clone();
        t.sort();
        (t, a.valid.clone())
    };
    for v in &valid_files {
        if train_files.contains(v) {
            bail!(
                "{} is in both the training and the validation files",
                v.display()
            );
        }
    }
    let cache_dir = a.cache_dir.clone().unwrap_or_else(|| a.out.join(".cache"));
    let seq_len = trainer.cfg.seq_len;
    let seed = trainer.cfg.seed;
    let train_ds = open_dataset(
        &train_files,
        mode,
        &a.tokenizer,
        &cache_dir,
        packing,
        seq_len,
        seed,
    )
    .context("training data")?;
    let valid_ds = if valid_files.is_empty() {
        None
    } else {
        Some(
            open_dataset(
                &valid_files,
                mode,
                &a.tokenizer,
                &cache_dir,
                packing,
                seq_len,
                seed + 1,
            )
            .context("validation data")?,
        )
    };
    eprintln!(
        "model: {} | non-embedding {} params, trainable {} | {} tokens/step ({} x {} x {} accum) | {} training samples",
        if trainer.model.is_block() { "block" } else { "vanilla" },
        cfg.non_embedding_params(),
        trainer.n_params(),
        trainer.cfg.tokens_per_step(),
        trainer.cfg.micro_batch,
        trainer.cfg.seq_len,
        trainer.cfg.accum,
        train_ds.len()
    );
    install_ctrlc();
    let header = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "train_files": train_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "valid_files": valid_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    let summary = train::run(
        &mut trainer,
        &train_ds,
        valid_ds.as_ref(),
        &RunOptions {
            out_dir: a.out.clone(),
            tokenizer: Some(a.tokenizer.clone()),
            quiet: a.quiet,
            stop_after: None,
            header,
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if summary.interrupted {
        eprintln!(
            "interrupted at step {}; resume with the same command plus --resume",
            summary.steps
        );
    } else {
        eprintln!("model saved to {}", a.out.display());
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Model folder to export.
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype: f16 (half the size) or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
}

/// `blockformer export`: copies a model folder, optionally with float16 weights.
pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    let l = checkpoint::load(&a.model, None, None, &Device::Cpu)?;
    let tok = l.tokenizer_path.as_deref();
    match a.dtype.as_str() {
        "f16" => train::save_f16(&l.model, &a.out, tok)?,
        "f32" => checkpoint::save(&l.model, &a.out, tok)?,
        o => bail!("--dtype {o}: expected f16 or f32"),
    }
    eprintln!("wrote {} ({})", a.out.display(), a.dtype);
    Ok(())
}
