//! Checkpoints: the official format (`model.safetensors` with the official tensor names; F32,
//! BF16 or F16) for both block and vanilla models, and our model folders
//! (`config.json` + `model.safetensors` + optional `tokenizer.json`), which use the same names.
//!
//! The weights file is memory-mapped; each tensor is converted straight from the map into
//! float32 model storage (one copy, none for tensors the model does not use).

use crate::config::{self, BlockConfig, EmbedderConfig, ModelConfig, NeoXConfig, Projection};
use crate::error::{Error, Result};
use crate::model::{block_decoder, Init, Model, WeightSource};
use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Tensors that checkpoints may store but no model reads: the official block decoder's
/// `embed_in`, and the attention buffers of older Hugging Face GPT-NeoX (Pythia) checkpoints
/// (causal mask `attention.bias`, `attention.masked_bias`, rotary `inv_freq`).
fn is_unused_buffer(name: &str) -> bool {
    name == block_decoder::UNUSED_EMBED_IN
        || name.ends_with(".attention.bias")
        || name.ends_with(".attention.masked_bias")
        || name.ends_with(".attention.rotary_emb.inv_freq")
}

/// Dtype, shape and byte range (within the data section) of one stored tensor.
pub type TensorEntry = (Dtype, Vec<usize>, (usize, usize));

/// A memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    /// name -> (dtype, shape, byte range within the data section)
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a concurrent writer could change its contents, as with
        // any mmap-based loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            Error::checkpoint(
                path,
                format!("not a valid safetensors file (truncated or another format?): {e:?}"),
            )
        })?;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info): (String, &TensorInfo)| {
                (name, (info.dtype, info.shape.clone(), info.data_offsets))
            })
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + n,
            tensors,
        })
    }

    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(k, (_, s, _))| (k.clone(), s.clone()))
            .collect()
    }

    /// Loads one tensor as float32.
    pub fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (dtype, shape, (a, b)) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::checkpoint(&self.path, format!("missing tensor `{name}`")))?;
        let bytes = &self.mmap[self.data_start + a..self.data_start + b];
        let data: Vec<f32> = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(Error::checkpoint(
                    &self.path,
                    format!("tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"),
                ))
            }
        };
        Ok(Tensor::from_vec(data, shape.as_slice(), device)?)
    }
}

/// Serves tensors from a checkpoint with shape checks, and reports missing and extra ones.
pub struct CheckpointSource<'a> {
    file: &'a SafetensorsFile,
    device: Device,
    used: HashSet<String>,
    /// Where the architecture came from, for error messages.
    arch_origin: String,
}

impl WeightSource for CheckpointSource<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        let Some((_, got, _)) = self.file.tensors.get(name) else {
            return Err(Error::checkpoint(
                &self.file.path,
                format!(
                    "missing tensor `{name}` (shape {shape:?}) required by the architecture from {}",
                    self.arch_origin
                ),
            ));
        };
        if got.as_slice() != shape {
            return Err(Error::checkpoint(
                &self.file.path,
                format!(
                    "tensor `{name}` has shape {got:?}, but the architecture from {} expects {shape:?}",
                    self.arch_origin
                ),
            ));
        }
        self.used.insert(name.to_string());
        self.file.load_f32(name, &self.device)
    }
}

/// Builds a model from a checkpoint file and an architecture; every tensor must be used
/// (except the official unused ones).
pub fn load_weights(
    file: &SafetensorsFile,
    config: &ModelConfig,
    arch_origin: &str,
    device: &Device,
) -> Result<Model> {
    let mut src = CheckpointSource {
        file,
        device: device.clone(),
        used: HashSet::new(),
        arch_origin: arch_origin.to_string(),
    };
    let model = Model::build(config, &mut src)?;
    let extra: Vec<&String> = file
        .tensors
        .keys()
        .filter(|k| !src.used.contains(*k) && !is_unused_buffer(k))
        .collect();
    if !extra.is_empty() {
        let shown: Vec<_> = extra.iter().take(5).map(|s| format!("`{s}`")).collect();
        return Err(Error::checkpoint(
            &file.path,
            format!(
                "{} unexpected tensor(s) for the architecture from {arch_origin}: {}{}",
                extra.len(),
                shown.join(", "),
                if extra.len() > 5 { ", ..." } else { "" }
            ),
        ));
    }
    Ok(model)
}

/// Where a loaded model's architecture came from.
#[derive(Clone, Debug, PartialEq)]
pub enum ArchSource {
    Preset(String),
    ConfigFile(PathBuf),
    Inferred,
}

impl std::fmt::Display for ArchSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchSource::Preset(p) => write!(f, "preset `{p}`"),
            ArchSource::ConfigFile(p) => write!(f, "config {}", p.display()),
            ArchSource::Inferred => write!(f, "tensor shapes (official head/MLP rules)"),
        }
    }
}

/// A model loaded from disk, with what was used to load it.
pub struct Loaded {
    pub model: Model,
    pub arch_source: ArchSource,
    pub weights_path: PathBuf,
    /// `tokenizer.json` next to the weights, if any.
    pub tokenizer_path: Option<PathBuf>,
}

/// Loads a model folder or a `.safetensors` file.
///
/// The architecture comes from, in order: `preset` if given, `config` if given, the folder's
/// `config.json`, or the tensor shapes.
pub fn load(
    path: &Path,
    preset: Option<&str>,
    config: Option<&Path>,
    device: &Device,
) -> Result<Loaded> {
    let (dir, weights) = if path.is_dir() {
        (path.to_path_buf(), path.join(WEIGHTS_FILE))
    } else {
        (
            path.parent().map(Path::to_path_buf).unwrap_or_default(),
            path.to_path_buf(),
        )
    };
    if !weights.exists() {
        return Err(Error::checkpoint(
            &weights,
            "file not found (expected a model folder with model.safetensors, or a .safetensors file)",
        ));
    }
    let file = SafetensorsFile::open(&weights)?;
    let dir_config = dir.join(CONFIG_FILE);
    let (cfg, source) = if let Some(p) = preset {
        (config::preset(p)?, ArchSource::Preset(p.to_string()))
    } else if let Some(c) = config {
        (
            ModelConfig::from_file(c)?,
            ArchSource::ConfigFile(c.to_path_buf()),
        )
    } else if path.is_dir() && dir_config.exists() {
        (
            ModelConfig::from_file(&dir_config)?,
            ArchSource::ConfigFile(dir_config),
        )
    } else {
        (
            infer_config(&file.shapes(), &weights)?,
            ArchSource::Inferred,
        )
    };
    let model = load_weights(&file, &cfg, &source.to_string(), device)?;
    let tok = dir.join(TOKENIZER_FILE);
    Ok(Loaded {
        model,
        arch_source: source,
        weights_path: weights,
        tokenizer_path: tok.exists().then_some(tok),
    })
}

fn shape_of<'a>(
    shapes: &'a BTreeMap<String, Vec<usize>>,
    name: &str,
    rank: usize,
    path: &Path,
) -> Result<&'a [usize]> {
    match shapes.get(name) {
        Some(s) if s.len() == rank => Ok(s),
        Some(s) => Err(Error::checkpoint(
            path,
            format!(
                "tensor `{name}` has rank {} (shape {s:?}); expected rank {rank}",
                s.len()
            ),
        )),
        None => Err(Error::checkpoint(
            path,
            format!("cannot infer the architecture: missing tensor `{name}`"),
        )),
    }
}

fn infer_stack(
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
    vocab: usize,
    path: &Path,
) -> Result<NeoXConfig> {
    let w = shape_of(
        shapes,
        &format!("{prefix}.final_layer_norm.weight"),
        1,
        path,
    )?[0];
    let layers = (0..)
        .take_while(|i| shapes.contains_key(&format!("{prefix}.layers.{i}.input_layernorm.weight")))
        .count();
    if layers == 0 {
        return Err(Error::checkpoint(
            path,
            format!("cannot infer the architecture: no `{prefix}.layers.0.*` tensors"),
        ));
    }
    let f = shape_of(
        shapes,
        &format!("{prefix}.layers.0.mlp.dense_h_to_4h.weight"),
        2,
        path,
    )?[0];
    Ok(NeoXConfig::pythia(
        vocab,
        layers,
        w,
        w / config::auto_head_dim(w).min(w),
        f,
    ))
}

/// Infers the architecture from tensor names and shapes; heads follow the official auto-fill
/// rule (head dim 32/64/128 by width), everything else the Pythia defaults.
pub fn infer_config(shapes: &BTreeMap<String, Vec<usize>>, path: &Path) -> Result<ModelConfig> {
    if shapes.contains_key("embedder.embeddings.weight") {
        let emb = shape_of(shapes, "embedder.embeddings.weight", 2, path)?;
        let (v, d_e) = (emb[0], emb[1]);
        let bd = infer_stack(shapes, block_decoder::PREFIX, v, path)?;
        let td = infer_stack(shapes, "token_decoder.gpt_neox", v, path)?;
        let exp = shape_of(shapes, "token_decoder.expansion_layer.weight", 3, path)?;
        let (d, h) = (bd.hidden_size, td.hidden_size);
        if exp[0] % h != 0 || exp[1] != d {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor `token_decoder.expansion_layer.weight` has shape {exp:?}; expected [R*{h}, {d}, 1]"
                ),
            ));
        }
        let (projection_method, l) = match shapes.get("embedder.projection_layer.weight") {
            Some(p) if p.len() == 3 => (Projection::ProjectionLayer, p[2]),
            _ => {
                if d_e == 0 || d % d_e != 0 {
                    return Err(Error::checkpoint(
                        path,
                        format!("embedder width {d_e} does not divide the block-decoder width {d}"),
                    ));
                }
                (Projection::Concat, d / d_e)
            }
        };
        let cfg = BlockConfig {
            block_length: l,
            embedder: EmbedderConfig {
                vocab_size: v,
                hidden_size: d_e,
                projection_method,
            },
            block_decoder: bd,
            token_decoder: td,
            expansion_ratio: exp[0] / h,
            ..BlockConfig::main(l, v, 1, d)
        };
        let cfg = ModelConfig::Block(cfg);
        cfg.validate(&format!("{} (inferred)", path.display()))?;
        Ok(cfg)
    } else if shapes.contains_key("gpt_neox.embed_in.weight") {
        let v = shape_of(shapes, "gpt_neox.embed_in.weight", 2, path)?[0];
        let cfg = ModelConfig::Vanilla(infer_stack(shapes, "gpt_neox", v, path)?);
        cfg.validate(&format!("{} (inferred)", path.display()))?;
        Ok(cfg)
    } else {
        Err(Error::checkpoint(
            path,
            "cannot infer the architecture: neither `embedder.embeddings.weight` (block model) nor `gpt_neox.embed_in.weight` (GPT-NeoX) is present",
        ))
    }
}

/// Writes `model.safetensors` (official names, float32, metadata `format: pt`) and
/// `config.json` into `dir`, plus `tokenizer.json` if given.
pub fn save(model: &Model, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(model.params.len());
    for (name, t) in &model.params {
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        bufs.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::checkpoint(dir, format!("tensor `{n}`: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let wpath = dir.join(WEIGHTS_FILE);
    safetensors::tensor::serialize_to_file(views, Some(meta), &wpath)
        .map_err(|e| Error::checkpoint(&wpath, format!("write failed: {e:?}")))?;
    let cpath = dir.join(CONFIG_FILE);
    std::fs::write(&cpath, model.config.to_json()).map_err(|e| Error::io(&cpath, e))?;
    if let Some(t) = tokenizer {
        let dst = dir.join(TOKENIZER_FILE);
        if t != dst {
            std::fs::copy(t, &dst).map_err(|e| Error::io(t, e))?;
        }
    }
    Ok(())
}
