//! Model code, one module per concept of the paper.
//!
//! - [`gpt_neox`]: the GPT-NeoX layer stack shared by every decoder;
//! - [`embedder`]: the lookup embedder (tokens of a block -> one block vector);
//! - [`block_decoder`]: causal attention over block vectors (global context);
//! - [`token_decoder`]: decodes a block's tokens from its prefix (local context);
//! - [`block_transformer`]: the whole model and its official training/scoring forward;
//! - [`vanilla`]: the GPT-NeoX causal LM baseline (Pythia).

pub mod block_decoder;
pub mod block_transformer;
pub mod embedder;
pub mod gpt_neox;
pub mod token_decoder;
pub mod vanilla;

use crate::config::ModelConfig;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use gpt_neox::Linear;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

pub use block_transformer::BlockTransformer;
pub use vanilla::Vanilla;

/// How a fresh parameter is initialised (used when no checkpoint provides it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// Where parameters come from: a checkpoint, a random initialiser, trainable variables.
/// Names are the official state-dict names; shapes are PyTorch's.
pub trait WeightSource {
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor>;

    /// A weight stored as `[out, ...in]` (PyTorch layout), returned as a contiguous
    /// `[in, out]` matrix: the layout the matmuls read fastest (3-4x faster at decode shapes
    /// than a transposed view).
    fn tensor_t(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = self.tensor(name, shape, init)?;
        let out = shape[0];
        Ok(t.reshape((out, t.elem_count() / out))?.t()?.contiguous()?)
    }
}

/// Random weights from a seed (presets without a checkpoint, fresh training runs).
pub struct RandomInit {
    rng: rand_chacha::ChaCha8Rng,
    device: Device,
}

impl RandomInit {
    pub fn new(seed: u64, device: &Device) -> Self {
        RandomInit {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        }
    }
}

impl WeightSource for RandomInit {
    fn tensor(&mut self, _name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if !self.device.is_cpu() {
            // On a GPU the device's own generator (seeded from ours): a 1.2B-parameter preset
            // in a second instead of tens of seconds of host sampling and upload.
            if let Init::Normal(std) = init {
                self.device.set_seed(rand::Rng::random(&mut self.rng))?;
                return Ok(Tensor::randn(0f32, std as f32, shape, &self.device)?);
            }
        }
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => {
                let d = Normal::new(0.0f32, std as f32).expect("valid std");
                (0..n).map(|_| d.sample(&mut self.rng)).collect()
            }
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }

    fn tensor_t(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        // The initialisers are symmetric: draw straight into the transposed layout.
        let out = shape[0];
        let inn = shape.iter().product::<usize>() / out;
        self.tensor(name, &[inn, out], init)
    }
}

/// Wraps a source and remembers every parameter it handed out, in order.
struct Recorder<'a> {
    inner: &'a mut dyn WeightSource,
    params: Vec<(String, Tensor)>,
}

impl WeightSource for Recorder<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = self.inner.tensor(name, shape, init)?;
        self.params.push((name.to_string(), t.clone()));
        Ok(t)
    }

    fn tensor_t(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = self.inner.tensor_t(name, shape, init)?;
        // Recorded in the official layout as a view of the same storage (`reshape` would copy
        // a transposed tensor): `[out, in]`, plus unit dims such as the expansion's `[.., 1]`.
        let mut view = t.t()?;
        while view.rank() < shape.len() {
            view = view.unsqueeze(view.rank())?;
        }
        if view.dims() != shape {
            return Err(crate::Error::checkpoint(
                name,
                format!("cannot view {:?} as {shape:?}", t.dims()),
            ));
        }
        self.params.push((name.to_string(), view));
        Ok(t)
    }
}

/// Serves tensors (official layout) from a map; names not in the map come from `fallback`
/// (or are an error when there is none).
pub struct MapSource {
    pub map: std::collections::HashMap<String, Tensor>,
    pub fallback: Option<RandomInit>,
    pub origin: String,
}

impl WeightSource for MapSource {
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        match self.map.get(name) {
            Some(t) if t.dims() == shape => Ok(t.clone()),
            Some(t) => Err(crate::Error::checkpoint(
                &self.origin,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            )),
            None => match &mut self.fallback {
                Some(f) => f.tensor(name, shape, init),
                None => Err(crate::Error::checkpoint(
                    &self.origin,
                    format!("missing tensor `{name}` (shape {shape:?})"),
                )),
            },
        }
    }
}

/// The two model kinds.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Arch {
    Block(BlockTransformer),
    Vanilla(Vanilla),
}

/// A model with its config and its parameters under their official names (the tensors are
/// shared with the modules, so saving always writes the current weights).
#[derive(Clone, Debug)]
pub struct Model {
    pub arch: Arch,
    pub config: ModelConfig,
    pub params: Vec<(String, Tensor)>,
}

impl Model {
    /// Builds the model, taking every parameter from `src`.
    pub fn build(config: &ModelConfig, src: &mut dyn WeightSource) -> Result<Model> {
        let mut rec = Recorder {
            inner: src,
            params: Vec::new(),
        };
        let arch = match config {
            ModelConfig::Block(c) => Arch::Block(BlockTransformer::load(&mut rec, c)?),
            ModelConfig::Vanilla(c) => Arch::Vanilla(Vanilla::load(&mut rec, c)?),
        };
        Ok(Model {
            arch,
            config: config.clone(),
            params: rec.params,
        })
    }

    /// Random weights (the official initialisation scheme: N(0, 0.02), LayerNorm 1/0).
    pub fn random(config: &ModelConfig, seed: u64, device: &Device) -> Result<Model> {
        Self::build(config, &mut RandomInit::new(seed, device))
    }

    /// Drops the activation buffers the decoder stacks keep from one forward to the next (a
    /// long prompt's run to tens of megabytes), e.g. before measuring another workload's
    /// memory. The next forward allocates afresh.
    pub fn release_buffers(&self) {
        match &self.arch {
            Arch::Block(b) => {
                b.block_decoder.stack.release_buffers();
                b.token_decoder.stack.release_buffers();
            }
            Arch::Vanilla(v) => v.stack.release_buffers(),
        }
    }

    pub fn device(&self) -> Device {
        self.params
            .first()
            .map(|(_, t)| t.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// Element type of the weights.
    pub fn dtype(&self) -> DType {
        self.params
            .first()
            .map(|(_, t)| t.dtype())
            .unwrap_or(DType::F32)
    }

    /// The same model with its weights on `device` in `dtype` (a copy; `self` is unchanged
    /// unless nothing changes, in which case the tensors are shared).
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Model> {
        if self.device().same_device(device) && self.dtype() == dtype {
            return Ok(self.clone());
        }
        let map = self
            .params
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_device(device)?.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        let mut src = MapSource {
            map,
            fallback: None,
            origin: "the model".into(),
        };
        Self::build(&self.config, &mut src)
    }

    /// Inference with the decoder layers' matrices and the LM head in `q8_0` (int8 blocks of 32
    /// inputs with a float16 scale: ~3.8x fewer bytes than float32 for the weights every
    /// decode step reads in full; embedding tables, biases and LayerNorms stay float32).
    /// Float32 models only; the stored parameters (and saved checkpoints) are unchanged.
    pub fn quantize_q8_0(&mut self) -> Result<()> {
        if self.dtype() != DType::F32 {
            return Err(crate::Error::input(
                "--quantize",
                "q8_0 quantizes a float32 model (use --dtype f32)",
            ));
        }
        // All or none: check every layer before quantizing any.
        for l in self.decode_linears() {
            l.check_q8_0()?;
        }
        self.decode_linears_mut()
            .into_iter()
            .try_for_each(Linear::quantize_q8_0)
    }

    /// Packs the weights of every decoder layer and the LM head for CPU float32 inference
    /// (column panels, see [`crate::kernels::panel`]): a copy the decode kernels stream in
    /// address order. Other devices and dtypes, and a quantized LM head, are left as they are;
    /// the stored parameters (and saved checkpoints) are unchanged.
    pub fn pack_for_host(&mut self) -> Result<()> {
        self.decode_linears_mut()
            .into_iter()
            .try_for_each(Linear::pack)?;
        // Greedy decoding's argmax through the LM head's bfloat16 screen.
        self.lm_head_mut().build_screen();
        Ok(())
    }

    /// Whether greedy decoding's LM head runs through its bfloat16 screen
    /// ([`crate::kernels::screen`]).
    pub fn lm_head_screened(&self) -> bool {
        self.lm_head().screen.is_some()
    }

    /// Bytes of the packed copies ([`Model::pack_for_host`]).
    pub fn packed_bytes(&self) -> usize {
        self.decode_linears().iter().map(|l| l.packed_bytes()).sum()
    }

    /// Bytes of the quantized copies held for inference ([`Model::quantize_q8_0`]).
    pub fn quantized_bytes(&self) -> usize {
        self.decode_linears()
            .iter()
            .map(|l| l.quantized_bytes())
            .sum()
    }

    /// Bytes per weight of the decoder layers and the LM head as held for inference (`q8_0`:
    /// 34 bytes per block of 32).
    pub fn linear_bytes_per_weight(&self) -> f64 {
        if self.lm_head().is_q8_0() {
            crate::kernels::panel::Q8_BYTES_PER_WEIGHT
        } else {
            self.dtype().size_in_bytes() as f64
        }
    }

    fn lm_head(&self) -> &Linear {
        match &self.arch {
            Arch::Block(bt) => &bt.token_decoder.embed_out,
            Arch::Vanilla(v) => &v.embed_out,
        }
    }

    fn lm_head_mut(&mut self) -> &mut Linear {
        match &mut self.arch {
            Arch::Block(bt) => &mut bt.token_decoder.embed_out,
            Arch::Vanilla(v) => &mut v.embed_out,
        }
    }

    /// The linear layers decoding multiplies by: every decoder layer's, then the LM head.
    fn decode_linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = match &self.arch {
            Arch::Block(bt) => bt
                .block_decoder
                .stack
                .linears()
                .chain(bt.token_decoder.stack.linears())
                .collect(),
            Arch::Vanilla(v) => v.stack.linears().collect(),
        };
        out.push(self.lm_head());
        out
    }

    /// [`Model::decode_linears`], mutable.
    fn decode_linears_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.arch {
            Arch::Block(bt) => bt
                .block_decoder
                .stack
                .linears_mut()
                .chain(bt.token_decoder.stack.linears_mut())
                .chain([&mut bt.token_decoder.embed_out])
                .collect(),
            Arch::Vanilla(v) => v.stack.linears_mut().chain([&mut v.embed_out]).collect(),
        }
    }

    pub fn is_block(&self) -> bool {
        matches!(self.arch, Arch::Block(_))
    }

    /// Number of stored parameters held in memory.
    pub fn param_count(&self) -> usize {
        self.params.iter().map(|(_, t)| t.elem_count()).sum()
    }
}
