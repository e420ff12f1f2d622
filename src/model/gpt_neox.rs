//! The GPT-NeoX decoder stack shared by the block decoder, the token decoder and the vanilla
//! model (Hugging Face `GPTNeoXModel`, transformers 4.39 eager semantics):
//!
//! ```text
//! a   = LN_in(x);  [q|k|v] per head = a W_qkv^T + b      (interleaved per head)
//! q,k = rotary on the first rd = hd * rotary_pct dims
//! o   = softmax(q k^T / sqrt(hd) + causal + padding) v;  attn = dense(o)
//! y   = x + attn + MLP(LN_post(x))                      (parallel residual)
//! y   = x + attn;  y = y + MLP(LN_post(y))              (sequential residual)
//! MLP(z) = W_2 gelu(W_1 z + b_1) + b_2
//! ```
//!
//! Two forward paths over the same weights:
//! - [`NeoX::forward`]: whole sequences `[B, T, W]` with a key-padding mask, built only from
//!   differentiable candle ops (training, scoring, parity tests);
//! - [`NeoX::forward_cached`]: a ragged batch of new positions `[N, W]` over preallocated
//!   per-sequence KV caches (generation): host buffers and hand-written kernels on the CPU, or
//!   candle ops over the slots of a device-resident pool (the tensor path, used on GPUs).

use super::{Init, WeightSource};
use crate::config::NeoXConfig;
use crate::error::Result;
use crate::gpu::section;
use crate::kernels::attention::{self, KvCache, KvDtype, Rotary, RowSpec};
use crate::kernels::kv_pool::{self, KvPool, PoolStep};
use crate::kernels::panel::{self, Epilogue, Panels};
use crate::kernels::pool_attention;
use crate::kernels::screen::ArgmaxScreen;
use crate::kernels::train_attention::CausalAttentionOp;
use crate::kernels::{matmul, ops, zeroed};
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

thread_local! {
    static AUTOCAST_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Mixed-precision training: float32 (master) weights and activations, with the products of
/// [`Linear`] layers computed in bfloat16 (their inputs and weights cast down, the result cast
/// back up; gradients flow through the casts). Off by default; set by the trainer around its
/// own forward passes, for the calling thread only.
pub fn set_autocast_bf16(on: bool) {
    AUTOCAST_BF16.with(|a| a.set(on));
}

/// Whether LM heads keep a bfloat16 screen for greedy decoding (`BLOCKFORMER_SCREEN=0`: no).
fn screen_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BLOCKFORMER_SCREEN").as_deref() != Ok("0"))
}

fn autocast_bf16() -> bool {
    AUTOCAST_BF16.with(|a| a.get())
}

/// Dense layer `y = x W^T + b`; the weight is held as `W^T` (`[in, out]`, contiguous).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[in, out]`.
    pub weight_t: Tensor,
    pub bias: Option<Tensor>,
    /// Inference with int8 weights (`q8_0`: blocks of 32 with one scale), when quantized.
    pub quantized: Option<candle_core::quantized::QMatMul>,
    /// Inference on the CPU in float32 with the weight packed in column panels (a copy made
    /// by [`Linear::pack`]; see [`crate::kernels::panel`]).
    pub packed: Option<Arc<Panels>>,
    /// Greedy decoding's bfloat16 screen of the packed weight (the LM head on CPUs with
    /// AVX-512 BF16; see [`crate::kernels::screen`]): the same argmax, 1.5-1.75x faster.
    pub screen: Option<Arc<ArgmaxScreen>>,
}

impl Linear {
    pub fn load(
        src: &mut dyn WeightSource,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        std: f64,
    ) -> Result<Self> {
        let weight_t = src.tensor_t(
            &format!("{name}.weight"),
            &[out_dim, in_dim],
            Init::Normal(std),
        )?;
        let bias = if bias {
            Some(src.tensor(&format!("{name}.bias"), &[out_dim], Init::Zeros)?)
        } else {
            None
        };
        Ok(Linear {
            weight_t,
            bias,
            quantized: None,
            packed: None,
            screen: None,
        })
    }

    /// Keeps a copy of the weight packed in column panels for CPU float32 inference, which
    /// then takes the panel kernel; nothing changes for other devices, dtypes, training, or a
    /// quantized layer.
    pub fn pack(&mut self) -> Result<()> {
        if self.packed.is_some()
            || self.quantized.is_some()
            || !self.weight_t.device().is_cpu()
            || self.weight_t.dtype() != DType::F32
        {
            return Ok(());
        }
        let (k, n) = self.weight_t.dims2()?;
        let w = HostView::new(&self.weight_t)?;
        self.packed = Some(Arc::new(Panels::pack(w.get(), k, n)));
        Ok(())
    }

    /// Keeps a bfloat16 screen of the packed float32 weight for greedy decoding's argmax
    /// ([`Linear::argmax_rows`]), where the CPU has AVX-512 BF16, the layer no bias and at
    /// least [`crate::kernels::screen::MIN_COLUMNS`] outputs;
    /// `BLOCKFORMER_SCREEN=0` turns it off (the full float32 scan, same answers).
    pub fn build_screen(&mut self) {
        if self.screen.is_some() || self.bias.is_some() || !screen_enabled() {
            return;
        }
        if let Some(p) = self.packed.as_ref().filter(|p| !p.is_q8_0()) {
            if p.n() >= crate::kernels::screen::MIN_COLUMNS {
                self.screen = ArgmaxScreen::build(p).map(Arc::new);
            }
        }
    }

    /// Bytes of the packed float32 copy and its screen (0 without them).
    pub fn packed_bytes(&self) -> usize {
        self.packed
            .as_ref()
            .filter(|p| !p.is_q8_0())
            .map_or(0, |p| p.bytes())
            + self.screen.as_ref().map_or(0, |s| s.bytes())
    }

    /// Bytes of the `q8_0` copy (0 without one).
    pub fn quantized_bytes(&self) -> usize {
        match (&self.quantized, &self.packed) {
            (Some(candle_core::quantized::QMatMul::QTensor(q)), _) => q.storage_size_in_bytes(),
            (_, Some(p)) if p.is_q8_0() => p.bytes(),
            _ => 0,
        }
    }

    /// Whether inference reads a `q8_0` copy of the weight.
    pub fn is_q8_0(&self) -> bool {
        self.quantized.is_some() || self.packed.as_ref().is_some_and(|p| p.is_q8_0())
    }

    /// Whether [`Linear::quantize_q8_0`] can quantize this layer: its input width must be a
    /// multiple of the block of 32.
    pub fn check_q8_0(&self) -> Result<()> {
        let in_dim = self.weight_t.dim(0)?;
        if in_dim % panel::Q8_BLOCK != 0 {
            return Err(crate::Error::input(
                "--quantize",
                format!(
                    "q8_0 needs every layer's input width to be a multiple of {} (this model \
                     has a layer of width {in_dim})",
                    panel::Q8_BLOCK
                ),
            ));
        }
        Ok(())
    }

    /// Keeps a `q8_0` copy of the weight (blocks of 32 int8 values with one float16 scale, 8.5
    /// bits per weight) and computes inference products with it; training (variables) is
    /// unaffected. On the CPU in float32 the copy is packed in panels for the decode kernels,
    /// which widen the weights in registers (activations stay float32); elsewhere candle's
    /// `q8_0` matmul.
    pub fn quantize_q8_0(&mut self) -> Result<()> {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        self.check_q8_0()?;
        if self.weight_t.device().is_cpu() && self.weight_t.dtype() == DType::F32 {
            let (k, n) = self.weight_t.dims2()?;
            let w = HostView::new(&self.weight_t)?;
            self.packed = Some(Arc::new(Panels::pack_q8_0(w.get(), k, n)));
            self.screen = None;
            return Ok(());
        }
        let w = self.weight_t.t()?.contiguous()?; // [out, in]
        self.quantized = Some(QMatMul::from_qtensor(QTensor::quantize(
            &w,
            GgmlDType::Q8_0,
        )?)?);
        Ok(())
    }

    /// `x W^T` without the bias, `x [.., in] -> [.., out]` (bf16 products under autocast).
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 2 {
            // No reshape nodes: each costs a zero-fill and an add in the backward pass.
            return self.product_2d(x);
        }
        let mut dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("rank >= 1");
        let y = self.product_2d(&x.reshape((x.elem_count() / in_dim, in_dim))?)?;
        *dims.last_mut().expect("rank >= 1") = self.weight_t.dim(1)?;
        Ok(y.reshape(dims)?)
    }

    fn product_2d(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if autocast_bf16() && x.dtype() == DType::F32 {
            x.to_dtype(DType::BF16)?
                .matmul(&self.weight_t.to_dtype(DType::BF16)?)?
                .to_dtype(DType::F32)?
        } else {
            x.matmul(&self.weight_t)?
        })
    }

    /// `x [.., in] -> [.., out]`, flattened to one matmul. Inference on the CPU with few rows
    /// (decoding) takes the skinny kernel, which streams the weights at memory speed.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("rank >= 1");
        let out_dim = self.weight_t.dim(1)?;
        let rows = x.elem_count() / in_dim;
        let y = match &self.quantized {
            Some(q) if !x.track_op() => self.add_bias(candle_core::Module::forward(
                q,
                &x.reshape((rows, in_dim))?,
            )?)?,
            _ => match self.host(x, rows, in_dim, out_dim)? {
                Some(y) => y,
                None => self.add_bias(self.product(x)?)?,
            },
        };
        if y.rank() == dims.len() {
            return Ok(y);
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = out_dim;
        Ok(y.reshape(out_dims)?)
    }

    /// Greedy decoding on the CPU: for each row of `x [rows, in]` the index of its largest
    /// output (first on ties), straight from the panel kernel without writing the outputs.
    /// `None` where that kernel does not apply (not packed, a bias, quantized, another device
    /// or dtype, training).
    pub fn argmax_rows(&self, x: &Tensor) -> Result<Option<Vec<u32>>> {
        let Some(p) = &self.packed else {
            return Ok(None);
        };
        if self.bias.is_some()
            || self.quantized.is_some()
            || !x.device().is_cpu()
            || x.dtype() != DType::F32
            || x.track_op()
            || x.rank() != 2
        {
            return Ok(None);
        }
        let rows = x.dim(0)?;
        let x = x.contiguous()?;
        let xv = HostView::new(&x)?;
        let best = match self
            .screen
            .as_ref()
            .and_then(|s| s.argmax(xv.get(), rows, p))
        {
            Some(best) => best,
            None => panel::argmax_panels(xv.get(), rows, p),
        };
        Ok(Some(best.into_iter().map(|(c, _)| c).collect()))
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Inference on the CPU in float32 (no gradient): the panel kernel when packed, else the
    /// skinny kernel for decode-sized inputs; `None` where neither applies.
    fn host(&self, x: &Tensor, rows: usize, k: usize, n: usize) -> Result<Option<Tensor>> {
        if !x.device().is_cpu()
            || self.weight_t.is_variable()
            || x.track_op()
            || x.dtype() != DType::F32
            || (self.packed.is_none() && rows > matmul::SKINNY_MAX_ROWS)
        {
            return Ok(None);
        }
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let y = match &self.packed {
            // Packed: the product stored once (no zero-fill first), then the bias.
            Some(p) => {
                let mut y = panel::matmul_panels_new(&xv, rows, p);
                if let Some(b) = &self.bias {
                    ops::add_rows(&mut y, HostView::new(b)?.get());
                }
                y
            }
            None => {
                let mut y = match &self.bias {
                    Some(b) => b.to_vec1::<f32>()?.repeat(rows),
                    None => vec![0f32; rows * n],
                };
                self.host_weight()?.acc(&xv, rows, &mut y);
                y
            }
        };
        debug_assert_eq!(xv.len(), rows * k);
        Ok(Some(Tensor::from_vec(y, (rows, n), x.device())?))
    }

    /// The weight as the host kernels read it.
    fn host_weight(&self) -> Result<HostWeight<'_>> {
        Ok(match &self.packed {
            Some(p) => HostWeight::Packed(p),
            None => HostWeight::Dense(HostView::new(&self.weight_t)?, self.weight_t.dims2()?),
        })
    }
}

/// A linear layer's weight as the host path reads it: `[in, out]` row-major, or packed.
enum HostWeight<'a> {
    Dense(HostView<'a>, (usize, usize)),
    Packed(&'a Panels),
}

impl HostWeight<'_> {
    /// `y += x W` for `x [m, in]`, `y [m, out]`.
    fn acc(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.product(x, m, y, Epilogue::Add)
    }

    /// `x W` through `epi` into `y` (packed: in the kernel's registers; dense: in passes).
    fn product(&self, x: &[f32], m: usize, y: &mut [f32], epi: Epilogue) {
        match self {
            HostWeight::Packed(p) => panel::matmul_panels_with(x, m, p, y, epi),
            HostWeight::Dense(w, (k, n)) => {
                match epi {
                    Epilogue::Add => {}
                    Epilogue::Store => y.fill(0.0),
                    Epilogue::Bias(b) | Epilogue::BiasGelu(b, _) => ops::fill_rows(y, b),
                }
                ops::matmul_acc(x, w.get(), m, *k, *n, y);
                if let Epilogue::BiasGelu(_, exact) = epi {
                    ops::gelu(y, exact);
                }
            }
        }
    }
}

/// LayerNorm with biased variance.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(src: &mut dyn WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: src.tensor(&format!("{name}.weight"), &[dim], Init::Ones)?,
            bias: src.tensor(&format!("{name}.bias"), &[dim], Init::Zeros)?,
            eps,
        })
    }

    /// Differentiable LayerNorm (candle's fused one has no backward): one custom op with its
    /// own backward on the CPU, the composed ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let x = x.contiguous()?;
            return Ok(x.apply_op3(
                &self.weight,
                &self.bias,
                ops::LayerNormOp {
                    eps: self.eps as f32,
                },
            )?);
        }
        // Statistics in float32 for half-precision inputs.
        let dt = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dt)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }

    /// Fused kernel for inference.
    pub fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?)
    }
}

fn activation(x: &Tensor, act: &str) -> Result<Tensor> {
    Ok(match act {
        "gelu" => x.gelu_erf()?,
        _ => x.gelu()?, // gelu_new / gelu_fast: the tanh approximation
    })
}

/// One GPT-NeoX layer.
#[derive(Clone, Debug)]
pub struct Layer {
    pub input_layernorm: LayerNorm,
    pub post_attention_layernorm: LayerNorm,
    pub query_key_value: Linear,
    pub dense: Linear,
    pub dense_h_to_4h: Linear,
    pub dense_4h_to_h: Linear,
}

impl Layer {
    fn load(src: &mut dyn WeightSource, p: &str, cfg: &NeoXConfig) -> Result<Self> {
        let (w, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let std = 0.02;
        Ok(Layer {
            input_layernorm: LayerNorm::load(src, &format!("{p}.input_layernorm"), w, eps)?,
            post_attention_layernorm: LayerNorm::load(
                src,
                &format!("{p}.post_attention_layernorm"),
                w,
                eps,
            )?,
            query_key_value: Linear::load(
                src,
                &format!("{p}.attention.query_key_value"),
                3 * w,
                w,
                true,
                std,
            )?,
            dense: Linear::load(src, &format!("{p}.attention.dense"), w, w, true, std)?,
            dense_h_to_4h: Linear::load(src, &format!("{p}.mlp.dense_h_to_4h"), f, w, true, std)?,
            dense_4h_to_h: Linear::load(src, &format!("{p}.mlp.dense_4h_to_h"), w, f, true, std)?,
        })
    }

    fn linears(&self) -> [&Linear; 4] {
        [
            &self.query_key_value,
            &self.dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.query_key_value,
            &mut self.dense,
            &mut self.dense_h_to_4h,
            &mut self.dense_4h_to_h,
        ]
    }

    fn mlp(&self, x: &Tensor, act: &str) -> Result<Tensor> {
        let fc1 = &self.dense_h_to_4h;
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        let hidden = match &fc1.bias {
            // Bias and GELU as one op with its own backward (CPU float32, not decode-sized,
            // not quantized).
            Some(b)
                if x.device().is_cpu()
                    && x.dtype() == DType::F32
                    && !fc1.is_q8_0()
                    && (rows > matmul::SKINNY_MAX_ROWS || fc1.weight_t.is_variable()) =>
            {
                let h = fc1.product(x)?.contiguous()?;
                h.apply_op2(
                    b,
                    ops::BiasGeluOp {
                        exact: act == "gelu",
                    },
                )?
            }
            _ => activation(&fc1.forward(x)?, act)?,
        };
        self.dense_4h_to_h.forward(&hidden)
    }
}

/// Most positions one host forward takes at once; larger batches of prompts run in groups of
/// whole rows (the bench's memory model counts the same).
pub const PREFILL_CHUNK: usize = 8192;

/// Row-parallel host steps ([`NeoX::row_parallel`]): at least this many rows per thread, at
/// most this many positions, layers of at most this many bytes.
const ROW_PARALLEL_MIN_ROWS: usize = 16;
const ROW_PARALLEL_MAX_POSITIONS: usize = 1024;
const ROW_PARALLEL_MAX_LAYER_BYTES: usize = 4 << 20;

/// Fresh prompts at least this long compute attention with matmuls ([`attention::prefill_dense`]).
const DENSE_PREFILL_MIN: usize = 64;

/// A GPT-NeoX stack: layers and the final LayerNorm (embeddings live with their owners).
#[derive(Clone, Debug)]
pub struct NeoX {
    pub cfg: NeoXConfig,
    pub layers: Vec<Layer>,
    pub final_layer_norm: LayerNorm,
    pub rotary: Rotary,
    /// The same tables, shared with the training path's attention op.
    rotary_shared: std::sync::Arc<Rotary>,
    /// Activation buffers kept from one host forward to the next.
    workspace: Workspace,
}

impl NeoX {
    /// Loads `{prefix}.layers.{i}.*` and `{prefix}.final_layer_norm.*`.
    pub fn load(src: &mut dyn WeightSource, prefix: &str, cfg: &NeoXConfig) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(src, &format!("{prefix}.layers.{i}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(
            src,
            &format!("{prefix}.final_layer_norm"),
            cfg.hidden_size,
            cfg.layer_norm_eps,
        )?;
        let rotary = Rotary::new(
            cfg.rotary_dims(),
            cfg.rotary_emb_base,
            cfg.max_position_embeddings.max(64),
        );
        Ok(NeoX {
            cfg: cfg.clone(),
            layers,
            final_layer_norm,
            rotary_shared: std::sync::Arc::new(rotary.clone()),
            rotary,
            workspace: Workspace::default(),
        })
    }

    /// Drops the activation buffers kept from earlier host forwards.
    pub fn release_buffers(&self) {
        self.workspace.clear();
    }

    fn heads(&self) -> (usize, usize) {
        (self.cfg.num_attention_heads, self.cfg.head_dim())
    }

    /// Whole-sequence forward with positions `0..T`.
    ///
    /// - `x`: `[B, T, W]` input vectors;
    /// - `key_mask`: `[B, T]` (1 = real, 0 = padding) or `None`.
    ///
    /// Returns the final-LayerNorm hidden states `[B, T, W]`.
    pub fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let bias = attention_bias(b, t, key_mask, x.device())?; // [B, 1, T, T]
        let (cos, sin) = self.rotary_tables(t, x.device())?; // [T, rd/2]
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        // The residual stream is kept as [B*T, W] (no reshape nodes around every linear layer).
        let w = x.dim(2)?;
        let mut h = x.reshape((b * t, w))?;
        for layer in &self.layers {
            h = self.layer_forward(layer, &h, (b, t), &bias, &cos, &sin)?;
        }
        Ok(self.final_layer_norm.forward(&h)?.reshape((b, t, w))?)
    }

    fn rotary_tables(&self, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.rotary.dims / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for f in &self.rotary.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), dev)?,
            Tensor::from_vec(sin, (t, half), dev)?,
        ))
    }

    /// One layer over the residual stream `x [B*T, W]`.
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        (b, t): (usize, usize),
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (nh, hd) = self.heads();
        let a = layer.input_layernorm.forward(x)?;
        let qkv = layer.query_key_value.forward(&a)?; // [B*T, 3W]
        let o = if x.device().is_cpu() && x.dtype() == DType::F32 {
            // One differentiable op on the CPU (see kernels::train_attention).
            qkv.contiguous()?.apply_op2(
                bias,
                CausalAttentionOp {
                    batch: b,
                    seq: t,
                    heads: nh,
                    head_dim: hd,
                    rotary: self.rotary_shared.clone(),
                },
            )?
        } else {
            self.attention_composed(&qkv, (b, t), bias, cos, sin)?
        };
        self.residual_and_mlp(layer, x, &o, LayerNorm::forward)
    }

    /// The rest of a layer after attention `o`: `x + dense(o) + MLP(LN_post(x))` (parallel
    /// residual) or `y = x + dense(o); y + MLP(LN_post(y))`, with `ln` the LayerNorm to use.
    fn residual_and_mlp(
        &self,
        layer: &Layer,
        x: &Tensor,
        o: &Tensor,
        ln: fn(&LayerNorm, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let attn = layer.dense.forward(o)?;
        let act = self.cfg.hidden_act.as_str();
        if self.cfg.use_parallel_residual {
            let mlp = layer.mlp(&ln(&layer.post_attention_layernorm, x)?, act)?;
            Ok(((x + attn)? + mlp)?)
        } else {
            let y = (x + attn)?;
            let mlp = layer.mlp(&ln(&layer.post_attention_layernorm, &y)?, act)?;
            Ok((y + mlp)?)
        }
    }

    /// Attention from candle ops (off the CPU): `qkv [B*T, 3W]` -> `[B*T, W]`.
    fn attention_composed(
        &self,
        qkv: &Tensor,
        (b, t): (usize, usize),
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (nh, hd) = self.heads();
        let rd = self.rotary.dims;
        let qkv = qkv.reshape((b, t, nh, 3 * hd))?.transpose(1, 2)?; // [B, nh, T, 3hd]
        let rot = |z: Tensor| -> Result<Tensor> {
            if rd == 0 {
                return Ok(z.contiguous()?);
            }
            let r = candle_nn::rotary_emb::rope_slow(&z.narrow(3, 0, rd)?.contiguous()?, cos, sin)?;
            if rd == hd {
                Ok(r)
            } else {
                Ok(Tensor::cat(&[&r, &z.narrow(3, rd, hd - rd)?], 3)?.contiguous()?)
            }
        };
        let q = rot(qkv.narrow(3, 0, hd)?)?;
        let k = rot(qkv.narrow(3, hd, hd)?)?;
        let v = qkv.narrow(3, 2 * hd, hd)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Scores and softmax in float32 (the bias holds float32's minimum).
        let raw = q.matmul(&k.t()?)?.to_dtype(DType::F32)?; // [B, nh, T, T]
        let p = candle_nn::ops::softmax(&(raw * scale)?.broadcast_add(bias)?, D::Minus1)?
            .to_dtype(qkv.dtype())?;
        Ok(p.matmul(&v)? // [B, nh, T, hd]
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?)
    }
    /// A new, empty KV cache for one sequence of up to `capacity` positions.
    /// Every layer's linear layers, in order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(Layer::linears)
    }

    /// [`NeoX::linears`], mutable.
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(Layer::linears_mut)
    }

    pub fn new_cache(&self, capacity: usize) -> KvCache {
        self.new_cache_typed(capacity, KvDtype::F32)
    }

    /// A new, empty KV cache with the given element type.
    pub fn new_cache_typed(&self, capacity: usize, dtype: KvDtype) -> KvCache {
        let (nh, hd) = self.heads();
        KvCache::with_dtype(self.cfg.num_hidden_layers, nh, hd, capacity, dtype)
    }

    /// Cached forward over a ragged batch.
    ///
    /// - `x`: `[N, W]`, the new positions of every row back to back (`N = sum(rows.n_new)`);
    /// - `rows[r]`, `caches[r]`: how many positions row `r` brings, their rotary positions,
    ///   and the row's cache (advanced by `n_new`).
    ///
    /// Returns final-LayerNorm hidden states `[N, W]`. Runs on host buffers with fused biases
    /// and residuals (no per-op tensor allocation); numerically the same layer as
    /// [`NeoX::forward`].
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rows: &[RowSpec],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if caches.first().is_some_and(|c| c.slot().is_some()) {
            return self.forward_pooled(x, rows, caches);
        }
        let (n, w) = x.dims2()?;
        let x = x.contiguous()?;
        let xs = HostView::new(&x)?;
        let f = self.cfg.intermediate_size;
        // Rows are independent. A row-parallel step gives each thread one share of whole rows;
        // otherwise a large batch of long prompts runs in groups of at most PREFILL_CHUNK
        // positions (whole rows), so its buffers stay cache-sized, one set serving every group.
        let threads = rayon::current_num_threads();
        let row_parallel = self.row_parallel(n, rows.len(), threads);
        let ends: Vec<usize> = if row_parallel {
            (1..=threads).map(|t| rows.len() * t / threads).collect()
        } else {
            prefill_group_ends(rows)
        };
        // Each part: its rows, their caches, inputs and outputs.
        let mut out = vec![0f32; n * w];
        let mut parts = Vec::with_capacity(ends.len());
        let (mut caches, mut outs, mut r0, mut p0) = (caches, &mut out[..], 0, 0);
        for r1 in ends {
            let len: usize = rows[r0..r1].iter().map(|r| r.n_new).sum();
            let (c, rest_c) = std::mem::take(&mut caches).split_at_mut(r1 - r0);
            let (o, rest_o) = std::mem::take(&mut outs).split_at_mut(len * w);
            parts.push((&rows[r0..r1], c, &xs.get()[p0 * w..(p0 + len) * w], o));
            (caches, outs, r0, p0) = (rest_c, rest_o, r1, p0 + len);
        }
        if row_parallel {
            use rayon::prelude::*;
            parts
                .into_par_iter()
                .try_for_each(|(rows, caches, xs, out)| {
                    crate::kernels::serial(|| {
                        let mut buf = self.workspace.take(xs.len() / w, w, f);
                        let done = self.forward_host(xs, rows, caches, &mut buf, out);
                        self.workspace.put(buf);
                        done
                    })
                })?;
        } else {
            let most = parts.iter().map(|p| p.2.len() / w).max().unwrap_or(0);
            let mut buf = self.workspace.take(most, w, f);
            for (rows, caches, xs, out) in parts {
                self.forward_host(xs, rows, caches, &mut buf, out)?;
            }
            self.workspace.put(buf);
        }
        Ok(Tensor::from_vec(out, (n, w), x.device())?)
    }

    /// Whether a host step runs as one share of whole rows per thread, each thread the whole
    /// stack on its rows with every kernel inside serial, instead of forking each kernel: for
    /// decode-sized steps of stacks whose layers are small. There a kernel's share of work is
    /// a few microseconds, about the cost of a fork/join, while the weights each thread now
    /// reads again stay in the shared L3 (`block_main_b4_5`'s token decoder: ~20 small kernels
    /// a step).
    fn row_parallel(&self, n: usize, rows: usize, threads: usize) -> bool {
        let (w, f) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let layer_bytes = 4 * (4 * w * w + 2 * w * f);
        threads > 1
            && rows >= ROW_PARALLEL_MIN_ROWS * threads
            && n <= ROW_PARALLEL_MAX_POSITIONS
            && layer_bytes <= ROW_PARALLEL_MAX_LAYER_BYTES
    }

    /// [`NeoX::forward_cached`] on host buffers for one group of rows: `x` and `out` are
    /// `[N, W]`.
    fn forward_host(
        &self,
        x: &[f32],
        rows: &[RowSpec],
        caches: &mut [&mut KvCache],
        buf: &mut Scratch,
        out: &mut [f32],
    ) -> Result<()> {
        let w = self.cfg.hidden_size;
        let n = x.len() / w;
        let (nh, hd) = self.heads();
        let f = self.cfg.intermediate_size;
        let eps = self.cfg.layer_norm_eps as f32;
        let exact_gelu = self.cfg.hidden_act == "gelu";
        // Every buffer is overwritten before it is read.
        let h = &mut buf.h[..n * w]; // residual stream [N, W]
        h.copy_from_slice(x);
        let a = &mut buf.a[..n * w]; // LayerNorm output
        let qkv = &mut buf.qkv[..n * 3 * w];
        let o = &mut buf.o[..n * w]; // attention output
        let m = &mut buf.m[..n * f]; // MLP hidden
                                     // Long fresh prompts take the matmul path for attention.
        let dense: Vec<bool> = rows
            .iter()
            .zip(caches.iter())
            .map(|(r, c)| c.len == 0 && r.n_new >= DENSE_PREFILL_MIN)
            .collect();
        for (li, layer) in self.layers.iter().enumerate() {
            let lw = HostLayer::new(layer)?;
            ops::layer_norm(h, lw.ln_in.0.get(), lw.ln_in.1.get(), eps, a);
            lw.qkv.0.product(a, n, qkv, Epilogue::Bias(lw.qkv.1.get()));
            // Attention over the caches for `o` (`qkv` -> `o`).
            let attend = |o: &mut [f32], caches: &mut [&mut KvCache]| -> Result<()> {
                attention::cached_attention_split(
                    qkv,
                    o,
                    rows,
                    caches,
                    li,
                    &self.rotary,
                    nh,
                    hd,
                    &dense,
                );
                let mut first = 0;
                for (r, spec) in rows.iter().enumerate() {
                    if dense[r] {
                        let q = &mut o[first * w..(first + spec.n_new) * w];
                        attention::prefill_dense(q, caches[r], li, spec.n_new)?;
                    }
                    first += spec.n_new;
                }
                Ok(())
            };
            if self.cfg.use_parallel_residual {
                // y = x + dense(o) + MLP(LN_post(x)): the MLP branch does not wait for the
                // attention, so the two run side by side, the attention streaming the caches
                // from memory while the MLP multiplies (at decode sizes one is bound by memory,
                // the other by arithmetic).
                let mut mlp = || {
                    ops::layer_norm(h, lw.ln_post.0.get(), lw.ln_post.1.get(), eps, a);
                    self.mlp_hidden(&lw, a, m, n, exact_gelu);
                    ops::add_rows(h, lw.dense.1.get());
                    ops::add_rows(h, lw.fc2.1.get());
                    lw.fc2.0.acc(m, n, h);
                };
                // Inside a row-parallel share both run on this thread, one after the other.
                let (att, ()) = if !crate::kernels::in_serial() {
                    rayon::join(|| attend(o, caches), mlp)
                } else {
                    let att = attend(o, caches);
                    mlp();
                    (att, ())
                };
                att?;
                lw.dense.0.acc(o, n, h);
            } else {
                // y = x + dense(o); y = y + MLP(LN_post(y))
                attend(o, caches)?;
                ops::add_rows(h, lw.dense.1.get());
                lw.dense.0.acc(o, n, h);
                ops::layer_norm(h, lw.ln_post.0.get(), lw.ln_post.1.get(), eps, a);
                self.mlp_hidden(&lw, a, m, n, exact_gelu);
                ops::add_rows(h, lw.fc2.1.get());
                lw.fc2.0.acc(m, n, h);
            }
        }
        attention::commit(rows, caches);
        let fw = HostView::new(&self.final_layer_norm.weight)?;
        let fb = HostView::new(&self.final_layer_norm.bias)?;
        ops::layer_norm(h, fw.get(), fb.get(), eps, out);
        Ok(())
    }

    /// [`NeoX::forward_cached`] over caches that are slots of one [`KvPool`]: the tensor path
    /// (GPU, or any device and float dtype), every op a candle op in the model's dtype.
    fn forward_pooled(
        &self,
        x: &Tensor,
        rows: &[RowSpec],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let mut slots = Vec::with_capacity(caches.len());
        let mut lens = Vec::with_capacity(caches.len());
        let mut pool: Option<std::sync::Arc<KvPool>> = None;
        for c in caches.iter() {
            let s = c.slot().ok_or_else(|| {
                crate::Error::input("kv cache", "host and pool caches mixed in one step")
            })?;
            match &pool {
                Some(p) if !std::sync::Arc::ptr_eq(p, &s.pool) => {
                    return Err(crate::Error::input(
                        "kv cache",
                        "caches of one step must share a pool",
                    ))
                }
                Some(_) => {}
                None => pool = Some(s.pool.clone()),
            }
            slots.push(s.slot);
            lens.push(c.len);
        }
        let Some(pool) = pool else {
            return Ok(x.clone());
        };
        let step = section("step plan", x.device(), || {
            PoolStep::new(
                &pool,
                rows,
                &slots,
                &lens,
                &self.rotary,
                x.dtype(),
                x.device(),
            )
        })?;
        let mut h = x.clone();
        for (li, layer) in self.layers.iter().enumerate() {
            h = self.layer_pooled(layer, li, &h, &pool, &step)?;
        }
        attention::commit(rows, caches);
        self.final_layer_norm.forward_fused(&h)
    }

    /// One layer of [`NeoX::forward_pooled`]: `x [N, W] -> [N, W]`.
    fn layer_pooled(
        &self,
        layer: &Layer,
        li: usize,
        x: &Tensor,
        pool: &KvPool,
        step: &PoolStep,
    ) -> Result<Tensor> {
        let (nh, _) = self.heads();
        let dev = x.device();
        // [N, nh * 3hd]
        let qkv = section("layer norm + qkv", dev, || {
            layer
                .query_key_value
                .forward(&layer.input_layernorm.forward_fused(x)?)
        })?;
        // [3, nh, N, hd]: queries and keys rotated, values.
        let qkv = section("rotary", dev, || {
            let (rd, cos, sin) = (self.rotary.dims, &step.cos, &step.sin);
            if pool_attention::fused_rotary(dev) {
                pool_attention::qkv_rotary(&qkv, cos, sin, nh, rd)
            } else {
                pool_attention::qkv_rotary_reference(&qkv, cos, sin, nh, rd)
            }
        })?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let o = kv_pool::pooled_attention(pool, li, step, &q, &k, &v)?; // [N, W]
        section("dense + mlp", dev, || {
            self.residual_and_mlp(layer, x, &o, LayerNorm::forward_fused)
        })
    }

    /// `m = gelu(a W_1 + b_1)`.
    fn mlp_hidden(&self, lw: &HostLayer, a: &[f32], m: &mut [f32], n: usize, exact: bool) {
        lw.fc1
            .0
            .product(a, n, m, Epilogue::BiasGelu(lw.fc1.1.get(), exact));
    }
}

/// Ends (exclusive row indices) of the groups of whole rows of at most [`PREFILL_CHUNK`]
/// positions each (a longer row is a group alone).
fn prefill_group_ends(rows: &[RowSpec]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut len = 0;
    for (i, r) in rows.iter().enumerate() {
        if len > 0 && len + r.n_new > PREFILL_CHUNK {
            ends.push(i);
            len = 0;
        }
        len += r.n_new;
    }
    if !rows.is_empty() {
        ends.push(rows.len());
    }
    ends
}

/// The [`Scratch`]es of earlier host forwards, kept for the next: a prompt's buffers run to
/// tens of megabytes, and fresh ones cost a page fault and a kernel zero-fill per page on
/// every call; a row-parallel decode step takes one per thread. A call takes the largest that
/// fits, or makes its own; at most one per pool thread is kept, the smallest dropped first.
#[derive(Default)]
struct Workspace(std::sync::Mutex<Vec<Scratch>>);

impl Workspace {
    /// Buffers for `n` positions of width `w` and MLP width `f`.
    fn take(&self, n: usize, w: usize, f: usize) -> Scratch {
        let Ok(mut kept) = self.0.lock() else {
            return Scratch::new(n, w, f);
        };
        let best = (0..kept.len())
            .filter(|&i| kept[i].positions >= n && kept[i].w == w && kept[i].f == f)
            .max_by_key(|&i| kept[i].positions);
        match best {
            Some(i) => kept.swap_remove(i),
            None => Scratch::new(n, w, f),
        }
    }

    /// Drops every kept buffer.
    fn clear(&self) {
        if let Ok(mut kept) = self.0.lock() {
            kept.clear();
        }
    }

    fn put(&self, s: Scratch) {
        if let Ok(mut kept) = self.0.lock() {
            kept.push(s);
            if kept.len() > rayon::current_num_threads().max(1) {
                let smallest = (0..kept.len()).min_by_key(|&i| kept[i].positions);
                kept.swap_remove(smallest.unwrap_or(0));
            }
        }
    }
}

/// A copy of the model starts with no buffers of its own.
impl Clone for Workspace {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Workspace")
    }
}

/// Activation buffers of [`NeoX::forward_host`], sized for its largest group of positions
/// and reused by every group (no zero-fill and no fresh pages per group).
struct Scratch {
    positions: usize,
    w: usize,
    f: usize,
    h: Vec<f32>,
    a: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
}

impl Scratch {
    /// Room for `n` positions of width `w` and MLP width `f`.
    fn new(n: usize, w: usize, f: usize) -> Self {
        Self {
            positions: n,
            w,
            f,
            h: zeroed(n * w),
            a: zeroed(n * w),
            qkv: zeroed(n * 3 * w),
            o: zeroed(n * w),
            m: zeroed(n * f),
        }
    }
}

/// A CPU float32 contiguous tensor's data, borrowed.
pub(crate) struct HostView<'a> {
    guard: Box<dyn std::ops::Deref<Target = candle_core::Storage> + Sync + 'a>,
    range: std::ops::Range<usize>,
}

impl<'a> HostView<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        if t.dtype() != DType::F32 || !t.device().is_cpu() {
            return Err(crate::Error::input(
                "device",
                "the cached decode path runs on the CPU in float32",
            ));
        }
        let (guard, layout) = t.storage_and_layout();
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| crate::Error::input("weights", "a weight tensor is not contiguous"))?;
        Ok(HostView {
            guard: Box::new(guard),
            range: a..b,
        })
    }

    pub(crate) fn get(&self) -> &[f32] {
        match &**self.guard {
            candle_core::Storage::Cpu(c) => {
                &c.as_slice::<f32>().expect("checked f32")[self.range.clone()]
            }
            _ => unreachable!("checked cpu"),
        }
    }
}

/// One layer's weights, borrowed as host slices: (weight `[in, out]` or gain, bias).
struct HostLayer<'a> {
    ln_in: (HostView<'a>, HostView<'a>),
    ln_post: (HostView<'a>, HostView<'a>),
    qkv: (HostWeight<'a>, HostView<'a>),
    dense: (HostWeight<'a>, HostView<'a>),
    fc1: (HostWeight<'a>, HostView<'a>),
    fc2: (HostWeight<'a>, HostView<'a>),
}

impl<'a> HostLayer<'a> {
    fn new(l: &'a Layer) -> Result<Self> {
        let lin = |x: &'a Linear| -> Result<(HostWeight<'a>, HostView<'a>)> {
            let b = x.bias.as_ref().ok_or_else(|| {
                crate::Error::input("weights", "GPT-NeoX linear layers have biases")
            })?;
            Ok((x.host_weight()?, HostView::new(b)?))
        };
        let ln = |x: &'a LayerNorm| -> Result<(HostView<'a>, HostView<'a>)> {
            Ok((HostView::new(&x.weight)?, HostView::new(&x.bias)?))
        };
        Ok(HostLayer {
            ln_in: ln(&l.input_layernorm)?,
            ln_post: ln(&l.post_attention_layernorm)?,
            qkv: lin(&l.query_key_value)?,
            dense: lin(&l.dense)?,
            fc1: lin(&l.dense_h_to_4h)?,
            fc2: lin(&l.dense_4h_to_h)?,
        })
    }
}

/// Additive attention bias `[B, 1, T, T]` with Hugging Face's arithmetic: causal entries get
/// `finfo.min`, padded keys add another `finfo.min` (so a future padded key is `-inf`).
pub fn attention_bias(
    b: usize,
    t: usize,
    key_mask: Option<&Tensor>,
    dev: &Device,
) -> Result<Tensor> {
    let min = f32::MIN;
    let mask: Option<Vec<f32>> = match key_mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
        None => None,
    };
    let mut bias = vec![0f32; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                let mut v = if j > i { min } else { 0.0 };
                if let Some(m) = &mask {
                    if m[bi * t + j] == 0.0 {
                        v += min;
                    }
                }
                bias[(bi * t + i) * t + j] = v;
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, t), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_keeps_the_largest_buffers_of_the_same_widths() {
        let ws = Workspace::default();
        let big = ws.take(64, 8, 32);
        assert_eq!(big.positions, 64);
        let ptr = big.h.as_ptr();
        ws.put(big);
        // A smaller call reuses the kept buffers, and gives them back.
        let again = ws.take(10, 8, 32);
        assert_eq!((again.positions, again.h.as_ptr()), (64, ptr));
        // Taken: a concurrent call makes its own; a later call gets the largest kept.
        let other = ws.take(16, 8, 32);
        assert_eq!(other.positions, 16);
        ws.put(again);
        ws.put(other);
        let kept = ws.take(1, 8, 32);
        assert_eq!(kept.h.as_ptr(), ptr);
        ws.put(kept);
        // A clone of the model starts with none.
        assert_eq!(ws.clone().take(1, 8, 32).positions, 1);
        // Other widths never get these buffers.
        assert_eq!(ws.take(1, 16, 32).positions, 1);
        // Released (between two measurements of the bench): the next call makes its own.
        ws.clear();
        assert_eq!(ws.take(1, 8, 32).positions, 1);
    }
}
