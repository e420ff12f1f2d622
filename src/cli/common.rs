//! Arguments and helpers shared by the subcommands.

use anyhow::{bail, Context};
use blockformer::checkpoint::{self, ArchSource};
use blockformer::config;
use blockformer::model::Model;
use blockformer::tokenizer::Tokenizer;
use candle_core::{DType, Device};
use std::path::PathBuf;

/// Which model to use.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder (config.json + model.safetensors [+ tokenizer.json]) or a .safetensors file
    /// (official checkpoint or HF GPT-NeoX).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A preset architecture (e.g. block_main_b4_85, vanilla_70). Alone: random weights;
    /// with --model: the architecture of that checkpoint.
    #[arg(long)]
    pub preset: Option<String>,
    /// Architecture from a config.json (ours, HF GPT-NeoX, or the official YAML keys as JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Tokenizer (tokenizer.json); defaults to the one in the model folder.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Seed of the random weights when no checkpoint is given.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Where and how a model runs: shared by every command that runs one for inference.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Device: cpu, or cuda[:N] (a build with the `cuda` feature and an NVIDIA GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight (and GPU KV-cache) dtype: f32, bf16 or f16. Default: f32 on the CPU; on a GPU
    /// bf16 (eval: f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Inference quantization: `q8_0` keeps the decoder layers' matrices and the LM head as
    /// int8 blocks of 32 inputs with a float16 scale (8.5 bits per weight; float32 models).
    #[arg(long)]
    pub quantize: Option<String>,
}

impl RunArgs {
    /// The device and dtype asked for; `gpu_dtype` when no dtype is given on a GPU.
    pub fn device_dtype(&self, gpu_dtype: DType) -> anyhow::Result<(Device, DType)> {
        let dev = device(&self.device)?;
        let dt = match self.dtype.as_deref() {
            None if !dev.is_cpu() => gpu_dtype,
            d => dtype(d, &dev)?,
        };
        Ok((dev, dt))
    }

    /// `model` on `dev` in `dt`, quantized as asked, and packed for the CPU decode kernels
    /// (float32 on the CPU; see [`Model::pack_for_host`]).
    pub fn prepare(&self, model: Model, dev: &Device, dt: DType) -> anyhow::Result<Model> {
        let mut model = self.prepare_unpacked(model, dev, dt)?;
        model.pack_for_host()?;
        Ok(model)
    }

    /// [`RunArgs::prepare`] without the packed copies (scoring with the official forward).
    pub fn prepare_unpacked(&self, model: Model, dev: &Device, dt: DType) -> anyhow::Result<Model> {
        let mut model = model
            .to(dev, dt)
            .with_context(|| format!("converting the weights to {dt:?}"))?;
        match self.quantize.as_deref() {
            None => {}
            Some("q8_0") => model.quantize_q8_0()?,
            Some(o) => bail!("--quantize {o}: expected q8_0"),
        }
        Ok(model)
    }
}

pub struct LoadedModel {
    pub model: Model,
    pub description: String,
    pub tokenizer: Option<Tokenizer>,
}

/// Parses `--device`: `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> anyhow::Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            Some(Err(_)) => bail!("--device {d}: expected cuda:N with N a GPU index"),
            None => bail!("--device {d}: unknown device (expected cpu or cuda[:N])"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--device {name}: this binary was built without CUDA support \
             (build it with scripts/build-cuda.sh, i.e. `cargo build --features cuda`)"
        );
    }
    blockformer::gpu::open_cuda(ordinal).map_err(|e| {
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default().to_string();
        anyhow::anyhow!(
            "--device {name}: no CUDA device could be opened (no CUDA device or driver?): {first}"
        )
    })
}

/// Parses `--dtype` (default: f32 on the CPU, bf16 on a GPU).
pub fn dtype(name: Option<&str>, dev: &Device) -> anyhow::Result<DType> {
    Ok(match name {
        None if dev.is_cpu() => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(o) => bail!("--dtype {o}: expected f32, bf16 or f16"),
    })
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let (dev, dt) = self.run.device_dtype(DType::BF16)?;
        let (model, description, tok_path) = match (&self.model, &self.preset, &self.config) {
            (Some(path), preset, cfg) => {
                let l = checkpoint::load(path, preset.as_deref(), cfg.as_deref(), &dev)?;
                let desc = format!(
                    "{} (architecture from {})",
                    l.weights_path.display(),
                    l.arch_source
                );
                if l.arch_source == ArchSource::Inferred {
                    tracing::info!("architecture inferred from tensor shapes");
                }
                (l.model, desc, l.tokenizer_path)
            }
            (None, Some(p), None) => {
                let cfg = config::preset(p)?;
                let m = Model::random(&cfg, self.weights_seed, &dev)?;
                (
                    m,
                    format!(
                        "preset {p} with random weights (seed {})",
                        self.weights_seed
                    ),
                    None,
                )
            }
            (None, None, Some(c)) => {
                let cfg = config::ModelConfig::from_file(c)?;
                let m = Model::random(&cfg, self.weights_seed, &dev)?;
                (
                    m,
                    format!(
                        "{} with random weights (seed {})",
                        c.display(),
                        self.weights_seed
                    ),
                    None,
                )
            }
            (None, Some(_), Some(_)) => {
                bail!("--preset and --config both give an architecture; pick one")
            }
            (None, None, None) => {
                bail!("no model: give --model DIR, --preset NAME or --config FILE")
            }
        };
        let model = self.run.prepare(model, &dev, dt)?;
        let tok_path = self.tokenizer.clone().or(tok_path);
        let tokenizer = match tok_path {
            Some(p) => {
                let t = Tokenizer::from_file(&p)?;
                let v = model.config.vocab_size();
                if t.vocab_size() > v {
                    bail!(
                        "tokenizer {} has {} tokens but the model's vocabulary has {v}",
                        p.display(),
                        t.vocab_size()
                    );
                }
                Some(t)
            }
            None => None,
        };
        Ok(LoadedModel {
            model,
            description,
            tokenizer,
        })
    }
}

/// Parses "1 2 3" or "1,2,3" into ids.
pub fn parse_ids(s: &str) -> anyhow::Result<Vec<u32>> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>().with_context(|| {
                format!("--ids: `{t}` is not a token id (expected non-negative integers)")
            })
        })
        .collect()
}

pub fn millions(n: usize) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}
