//! Training from scratch (or from a vanilla checkpoint, uptraining) for both model kinds.
//!
//! - Parameters are `candle_core::Var`s created by [`VarSource`]; linear weights are held in
//!   the `[in, out]` layout the model reads, and converted to the official layout on save.
//! - Forward/backward go through the models' whole-sequence path (composed, differentiable
//!   ops); the loss is the official one (block: [`BlockTransformer::forward`], vanilla: the HF
//!   shifted causal-LM loss).
//! - The optimizer is AdamW as in the official DeepSpeed config (beta 0.9/0.95, weight decay
//!   0.1 on every tensor except biases and LayerNorm gains), kept on the host in f32, with
//!   global gradient-norm clipping, gradient accumulation, and a linear warmup followed by a
//!   cosine decay to `min_lr_ratio` x LR.
//! - A checkpoint holds the weights, the optimizer moments and the data position, so a run
//!   stopped and resumed ends bit for bit where an uninterrupted one does (same machine).
//!
//! [`BlockTransformer::forward`]: crate::model::BlockTransformer::forward

use crate::checkpoint;
use crate::config::{BlockConfig, ModelConfig, Projection};
use crate::data::{make_batch, Batch, PackedDataset, Sampler};
use crate::error::{Error, Result};
use crate::model::block_transformer::ForwardOptions;
pub use crate::model::MapSource;
use crate::model::{Arch, Init, Model, RandomInit, WeightSource};
use candle_core::{Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set (by a Ctrl-C handler) to stop training at the next step boundary, with a checkpoint.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// One trainable tensor.
#[derive(Clone, Debug)]
pub struct ParamVar {
    /// Official state-dict name.
    pub name: String,
    pub var: Var,
    /// Official (PyTorch) shape.
    pub shape: Vec<usize>,
    /// Held as `[in, out]` (the transpose of the official `[out, in...]`).
    pub transposed: bool,
}

impl ParamVar {
    /// The current value in the official layout.
    pub fn official(&self) -> Result<Tensor> {
        let t = self.var.as_detached_tensor();
        Ok(if self.transposed {
            t.t()?.contiguous()?.reshape(self.shape.as_slice())?
        } else {
            t.reshape(self.shape.as_slice())?
        })
    }
}

/// A weight source that turns every tensor from `inner` into a trainable `Var` (linear weights
/// directly in the `[in, out]` layout).
pub struct VarSource<'a> {
    inner: &'a mut dyn WeightSource,
    pub vars: Vec<ParamVar>,
    /// Where the variables live.
    pub device: Device,
}

impl<'a> VarSource<'a> {
    pub fn new(inner: &'a mut dyn WeightSource) -> Self {
        VarSource {
            inner,
            vars: Vec::new(),
            device: Device::Cpu,
        }
    }
}

impl VarSource<'_> {
    /// `t` as a variable on the source's device, recorded under `name`.
    fn variable(
        &mut self,
        name: &str,
        shape: &[usize],
        t: &Tensor,
        transposed: bool,
    ) -> Result<Tensor> {
        let var = Var::from_tensor(&t.to_device(&self.device)?.contiguous()?)?;
        let out = var.as_tensor().clone();
        self.vars.push(ParamVar {
            name: name.to_string(),
            var,
            shape: shape.to_vec(),
            transposed,
        });
        Ok(out)
    }
}

impl WeightSource for VarSource<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = self.inner.tensor(name, shape, init)?;
        self.variable(name, shape, &t, false)
    }

    fn tensor_t(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = self.inner.tensor_t(name, shape, init)?;
        self.variable(name, shape, &t, true)
    }
}

/// Hyper-parameters of a run (saved with every checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub lr: f64,
    /// The cosine decay ends at `min_lr_ratio * lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    /// Optimizer steps; 0 = derived from `time_budget_s` after the first steps.
    pub total_steps: usize,
    /// Wall-clock budget in seconds (used only when `total_steps` is 0).
    pub time_budget_s: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Sequences per forward/backward.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    pub seed: u64,
    /// Validation every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Validation samples (the first N of the validation set).
    pub eval_samples: usize,
    /// Checkpoint every N steps (0 = only at the end and on Ctrl-C).
    pub save_every: usize,
    /// Linear-layer products in bfloat16 (float32 master weights and optimizer).
    #[serde(default)]
    pub autocast_bf16: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            total_steps: 1000,
            time_budget_s: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            micro_batch: 8,
            accum: 1,
            seq_len: 1024,
            seed: 0,
            eval_every: 0,
            eval_samples: 16,
            save_every: 0,
            autocast_bf16: false,
        }
    }
}

impl TrainConfig {
    /// Checks every hyper-parameter's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: String, want: &str| {
            Err(Error::input(field, format!("{v} (expected {want})")))
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "a finite number > 0");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min-lr-ratio", self.min_lr_ratio.to_string(), "0 to 1");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight-decay",
                self.weight_decay.to_string(),
                "a finite number >= 0",
            );
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return bad(
                "grad-clip",
                self.grad_clip.to_string(),
                "a finite number >= 0; 0 = off",
            );
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, b.to_string(), "0 <= beta < 1");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps.to_string(), "a finite number > 0");
        }
        if let Some(t) = self.time_budget_s {
            if !(t.is_finite() && t > 0.0) {
                return bad("time-budget", format!("{t} s"), "a finite time > 0");
            }
        }
        for (field, n) in [
            ("batch-size", self.micro_batch),
            ("accum", self.accum),
            ("eval-samples", self.eval_samples),
        ] {
            if n == 0 {
                return bad(field, "0".into(), "at least 1");
            }
        }
        if self.seq_len < 2 {
            return bad("seq-len", self.seq_len.to_string(), "at least 2 tokens");
        }
        Ok(())
    }

    pub fn tokens_per_step(&self) -> usize {
        self.micro_batch * self.accum * self.seq_len
    }

    /// Learning rate of optimizer step `step` (0-based): linear warmup from `lr / warmup` to
    /// `lr`, then cosine decay to `min_lr_ratio * lr` at `total` steps.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let min = self.min_lr_ratio * self.lr;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Where a run stands (saved with every checkpoint).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Samples drawn from the training sampler so far.
    pub samples_drawn: u64,
    /// Total steps of the schedule (fixed at the start, or after the first steps with a time
    /// budget).
    pub total_steps: usize,
    pub tokens_seen: u64,
    /// Wall-clock seconds spent training, across resumes.
    pub elapsed_s: f64,
    pub last_train_loss: Option<f64>,
    pub last_valid_loss: Option<f64>,
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
}

/// Model + optimizer.
pub struct Trainer {
    pub model: Model,
    pub params: Vec<ParamVar>,
    pub cfg: TrainConfig,
    pub state: TrainerState,
    data: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    decay: Vec<bool>,
}

fn no_decay(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("layernorm") || name.contains("layer_norm")
}

impl Trainer {
    /// Builds the model from `src` (random init, a checkpoint map, an uptraining map).
    pub fn new(
        config: &ModelConfig,
        src: &mut dyn WeightSource,
        cfg: TrainConfig,
    ) -> Result<Trainer> {
        Self::new_on(config, src, cfg, &Device::Cpu)
    }

    /// [`Trainer::new`] with the model's variables (forward and backward) on `device`. The
    /// AdamW update runs on the host over float32 master copies (the optimizer state never
    /// leaves host memory); gradients come down and weights go up once per step.
    pub fn new_on(
        config: &ModelConfig,
        src: &mut dyn WeightSource,
        cfg: TrainConfig,
        device: &Device,
    ) -> Result<Trainer> {
        config.validate("training config")?;
        cfg.validate()?;
        let mut vs = VarSource::new(src);
        vs.device = device.clone();
        let model = Model::build(config, &mut vs)?;
        let params = vs.vars;
        let data = params
            .iter()
            .map(|p| Ok(p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let m = data.iter().map(|d| vec![0f32; d.len()]).collect();
        let v = data.iter().map(|d| vec![0f32; d.len()]).collect();
        let decay = params.iter().map(|p| !no_decay(&p.name)).collect();
        let state = TrainerState {
            total_steps: cfg.total_steps,
            ..Default::default()
        };
        Ok(Trainer {
            model,
            params,
            cfg,
            state,
            data,
            m,
            v,
            decay,
        })
    }

    /// Fresh random weights (official init: N(0, 0.02), LayerNorm 1/0).
    pub fn random(config: &ModelConfig, seed: u64, cfg: TrainConfig) -> Result<Trainer> {
        Self::new(config, &mut RandomInit::new(seed, &Device::Cpu), cfg)
    }

    /// The current model with its parameters in the official layout (for saving, evaluating).
    pub fn current_model(&self) -> Result<Model> {
        let params = self
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), p.official()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            arch: self.model.arch.clone(),
            config: self.model.config.clone(),
            params,
        })
    }

    /// Number of trainable values.
    pub fn n_params(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }

    /// Current value of parameter `i` (its held layout, flattened).
    pub fn param_data(&self, i: usize) -> &[f32] {
        &self.data[i]
    }

    /// Overwrites parameter `i` (held layout, flattened).
    pub fn set_param(&mut self, i: usize, values: &[f32]) -> Result<()> {
        let t = self.params[i].var.as_tensor();
        let (shape, dev) = (t.dims().to_vec(), t.device().clone());
        self.params[i]
            .var
            .set(&Tensor::from_slice(values, shape.as_slice(), &dev)?)?;
        self.data[i].copy_from_slice(values);
        Ok(())
    }

    /// The official training loss of a batch (a scalar tensor, differentiable).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        match (&self.model.arch, batch) {
            (Arch::Block(bt), Batch::Block(b)) => bt
                .forward(b, ForwardOptions::default())?
                .loss
                .ok_or_else(|| Error::input("batch", "no predicted token in the batch")),
            (
                Arch::Vanilla(v),
                Batch::Vanilla {
                    batch,
                    seq_len,
                    ids,
                    mask,
                    labels,
                },
            ) => {
                // The HF shifted causal-LM loss (as `Vanilla::forward`), with the LM head run
                // only on the predicting rows and a fused softmax cross-entropy.
                let (b, t) = (*batch, *seq_len);
                let m = (!mask.iter().all(|&x| x == 1)).then_some(mask.as_slice());
                let (rows, targets): (Vec<u32>, Vec<u32>) = (0..b)
                    .flat_map(|bi| (0..t.saturating_sub(1)).map(move |ti| (bi, ti)))
                    .filter(|&(bi, ti)| labels[bi * t + ti + 1] >= 0)
                    .map(|(bi, ti)| ((bi * t + ti) as u32, labels[bi * t + ti + 1] as u32))
                    .unzip();
                if rows.is_empty() {
                    return Err(Error::input("batch", "no predicted token in the batch"));
                }
                let h = v.hidden(ids, b, t, m)?;
                let w = h.dim(2)?;
                let sel = h
                    .reshape((b * t, w))?
                    .index_select(&Tensor::new(rows.as_slice(), h.device())?, 0)?;
                let head = &v.embed_out.weight_t;
                if sel.device().is_cpu() && !self.cfg.autocast_bf16 {
                    return Ok(lm_head_cross_entropy(&sel, head, targets)?.mean_all()?);
                }
                let logits = v.embed_out.forward(&sel)?.contiguous()?;
                Ok(softmax_cross_entropy(&logits, targets)?.mean_all()?)
            }
            _ => Err(Error::input(
                "batch",
                "batch kind (block / vanilla) differs from the model kind",
            )),
        }
    }

    /// Loss and the gradient of every parameter (held layout, flattened); `None` where the
    /// loss does not depend on the parameter.
    pub fn gradients(&self, batch: &Batch) -> Result<(f64, Vec<Option<Vec<f32>>>)> {
        crate::model::gpt_neox::set_autocast_bf16(self.cfg.autocast_bf16);
        let loss = self.loss(batch);
        crate::model::gpt_neox::set_autocast_bf16(false);
        let loss = loss?;
        let grads = loss.backward()?;
        let out = self
            .params
            .iter()
            .map(|p| match grads.get(p.var.as_tensor()) {
                Some(g) => Ok(Some(g.flatten_all()?.to_vec1::<f32>()?)),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((loss.to_scalar::<f32>()? as f64, out))
    }

    /// Number of predicted tokens of a batch (the loss's denominator).
    pub fn predicted_tokens(batch: &Batch) -> usize {
        match batch {
            Batch::Block(b) => {
                // Target blocks 1..n-1 of every row, kept positions (id != pad or mask 1).
                let (n, l) = (b.n_blocks, b.block_length);
                let mut c = 0;
                for bi in 0..b.batch {
                    for j in 1..n {
                        if b.block_mask[bi * n + j] == 0 {
                            continue;
                        }
                        let base = (bi * n + j) * l;
                        c += (0..l)
                            .filter(|&q| {
                                b.input_ids[base + q] != 0 || b.attention_mask[base + q] == 1
                            })
                            .count();
                    }
                }
                c
            }
            Batch::Vanilla {
                batch,
                seq_len,
                labels,
                ..
            } => (0..*batch)
                .map(|bi| {
                    (1..*seq_len)
                        .filter(|&t| labels[bi * seq_len + t] >= 0)
                        .count()
                })
                .sum(),
        }
    }

    fn draw_batch(&mut self, ds: &PackedDataset, sampler: &mut Sampler) -> Batch {
        let samples: Vec<_> = (0..self.cfg.micro_batch)
            .map(|_| {
                let k = sampler.index(self.state.samples_drawn);
                self.state.samples_drawn += 1;
                ds.sample(k)
            })
            .collect();
        make_batch(&samples, ds.packing())
    }

    /// One optimizer step: `accum` micro-batches, clipping, AdamW.
    pub fn step(&mut self, ds: &PackedDataset, sampler: &mut Sampler) -> Result<StepStats> {
        let accum = self.cfg.accum.max(1);
        let mut acc: Vec<Vec<f32>> = self.data.iter().map(|d| vec![0f32; d.len()]).collect();
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        for _ in 0..accum {
            let batch = self.draw_batch(ds, sampler);
            tokens += batch.n_positions();
            let (loss, grads) = self.gradients(&batch)?;
            loss_sum += loss;
            let scale = 1.0 / accum as f32;
            acc.par_iter_mut().zip(grads.par_iter()).for_each(|(a, g)| {
                if let Some(g) = g {
                    for (x, y) in a.iter_mut().zip(g) {
                        *x += y * scale;
                    }
                }
            });
        }
        let sq: f64 = acc
            .par_iter()
            .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect::<Vec<_>>()
            .iter()
            .sum();
        let grad_norm = sq.sqrt();
        let clip = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            (self.cfg.grad_clip / (grad_norm + 1e-6)) as f32
        } else {
            1.0
        };
        let total = if self.state.total_steps > 0 {
            self.state.total_steps
        } else {
            usize::MAX / 2
        };
        let lr = self.cfg.lr_at(self.state.step, total);
        let t = (self.state.step + 1) as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = (1.0 - b1.powi(t)) as f32;
        let bc2 = (1.0 - b2.powi(t)) as f32;
        let (b1, b2, eps) = (b1 as f32, b2 as f32, self.cfg.eps as f32);
        let (lr32, wd) = (lr as f32, self.cfg.weight_decay as f32);
        let decay = &self.decay;
        self.data
            .par_iter_mut()
            .zip(self.m.par_iter_mut())
            .zip(self.v.par_iter_mut())
            .zip(acc.par_iter())
            .enumerate()
            .for_each(|(i, (((p, m), v), g))| {
                let wdf = if decay[i] { 1.0 - lr32 * wd } else { 1.0 };
                for j in 0..p.len() {
                    let gj = g[j] * clip;
                    m[j] = b1 * m[j] + (1.0 - b1) * gj;
                    v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
                    let mh = m[j] / bc1;
                    let vh = v[j] / bc2;
                    p[j] = p[j] * wdf - lr32 * mh / (vh.sqrt() + eps);
                }
            });
        for (pv, d) in self.params.iter().zip(&self.data) {
            let t = pv.var.as_tensor();
            let (shape, dev) = (t.dims().to_vec(), t.device().clone());
            pv.var
                .set(&Tensor::from_slice(d, shape.as_slice(), &dev)?)?;
        }
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;
        let loss = loss_sum / accum as f64;
        self.state.last_train_loss = Some(loss);
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            tokens,
        })
    }

    /// Mean loss per predicted token over the first `n` samples of `ds` (all if fewer).
    pub fn eval_loss(&self, ds: &PackedDataset, n: usize) -> Result<f64> {
        let n = n.min(ds.len()).max(1);
        let mut sum = 0.0;
        let mut count = 0usize;
        let mb = self.cfg.micro_batch.max(1);
        let mut k = 0;
        while k < n {
            let samples: Vec<_> = (k..(k + mb).min(n)).map(|i| ds.sample(i)).collect();
            k += samples.len();
            let batch = make_batch(&samples, ds.packing());
            let c = Self::predicted_tokens(&batch);
            if c == 0 {
                continue;
            }
            let loss = self.loss(&batch)?.to_scalar::<f32>()? as f64;
            sum += loss * c as f64;
            count += c;
        }
        Ok(sum / count.max(1) as f64)
    }

    /// Writes `config.json` + `model.safetensors` (+ `tokenizer.json`).
    pub fn save_model(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
        checkpoint::save(&self.current_model()?, dir, tokenizer)
    }

    /// Writes a resumable checkpoint: the model files plus `optimizer.safetensors` (AdamW
    /// moments) and `trainer_state.json` (hyper-parameters, step, data position). Written to a
    /// temporary folder first, then renamed over `dir`.
    pub fn save_checkpoint(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        self.save_model(&tmp, tokenizer)?;
        let mut bufs: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            for (kind, x) in [("m", &self.m[i]), ("v", &self.v[i])] {
                let bytes: Vec<u8> = x.iter().flat_map(|f| f.to_le_bytes()).collect();
                bufs.push((format!("{kind}.{}", p.name), bytes, x.len()));
            }
        }
        let views = bufs
            .iter()
            .map(|(n, b, len)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::checkpoint(&tmp, format!("{n}: {e:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let opath = tmp.join("optimizer.safetensors");
        safetensors::tensor::serialize_to_file(views, None, &opath)
            .map_err(|e| Error::checkpoint(&opath, format!("write failed: {e:?}")))?;
        let st = serde_json::json!({
            "train_config": self.cfg,
            "state": self.state,
        });
        let spath = tmp.join("trainer_state.json");
        std::fs::write(&spath, serde_json::to_string_pretty(&st).expect("json"))
            .map_err(|e| Error::io(&spath, e))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    }

    /// Restores a run from a checkpoint folder written by [`Trainer::save_checkpoint`].
    pub fn resume(dir: &Path) -> Result<Trainer> {
        Self::resume_on(dir, &Device::Cpu)
    }

    /// [`Trainer::resume`] with the model on `device`.
    pub fn resume_on(dir: &Path, device: &Device) -> Result<Trainer> {
        let spath = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&spath).map_err(|e| Error::io(&spath, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&spath, format!("not valid JSON: {e}")))?;
        let cfg: TrainConfig = serde_json::from_value(v["train_config"].clone())
            .map_err(|e| Error::checkpoint(&spath, format!("train_config: {e}")))?;
        let state: TrainerState = serde_json::from_value(v["state"].clone())
            .map_err(|e| Error::checkpoint(&spath, format!("state: {e}")))?;
        let loaded = checkpoint::load(dir, None, None, &Device::Cpu)?;
        let mut src = MapSource {
            map: loaded.model.params.iter().cloned().collect(),
            fallback: None,
            origin: dir.display().to_string(),
        };
        let mut tr = Trainer::new_on(&loaded.model.config, &mut src, cfg, device)?;
        tr.state = state;
        let opath = dir.join("optimizer.safetensors");
        let bytes = std::fs::read(&opath).map_err(|e| Error::io(&opath, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::checkpoint(&opath, format!("{e:?}")))?;
        for i in 0..tr.params.len() {
            for kind in ["m", "v"] {
                let name = format!("{kind}.{}", tr.params[i].name);
                let view = st
                    .tensor(&name)
                    .map_err(|e| Error::checkpoint(&opath, format!("{name}: {e:?}")))?;
                let vals: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                let dst = if kind == "m" {
                    &mut tr.m[i]
                } else {
                    &mut tr.v[i]
                };
                if vals.len() != dst.len() {
                    return Err(Error::checkpoint(&opath, format!("{name}: wrong length")));
                }
                *dst = vals;
            }
        }
        Ok(tr)
    }
}

/// Fused softmax cross-entropy with backward: `logits [C, V]` and one target per row ->
/// per-row loss `-log softmax(logits)[target]` (`[C]`). One pass forward; the gradient
/// `softmax - onehot` is written directly (candle's composed `log_softmax` + `gather` take
/// about ten passes over `[C, V]` and as many fresh buffers).
pub fn softmax_cross_entropy(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let (c, v) = logits.dims2()?;
    if targets.len() != c || targets.iter().any(|&t| t as usize >= v) {
        return Err(Error::input(
            "targets",
            "one target in 0..V per row expected",
        ));
    }
    if !logits.device().is_cpu() || logits.dtype() != candle_core::DType::F32 {
        // Composed ops elsewhere (the fused op is a CPU kernel).
        let labels: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        return Ok(crate::model::block_transformer::cross_entropy(logits, &labels)?.0);
    }
    Ok(logits.apply_op1(SoftmaxCe {
        targets: std::sync::Arc::new(targets),
    })?)
}

struct SoftmaxCe {
    targets: std::sync::Arc<Vec<u32>>,
}

fn row_lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln()
}

impl candle_core::CustomOp1 for SoftmaxCe {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (c, v) = layout.shape().dims2()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-cross-entropy: logits must be contiguous")
        };
        let x = &storage.as_slice::<f32>()?[a..b];
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| row_lse(row) - row[t as usize])
            .collect();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(c),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (c, v) = arg.dims2()?;
        let mut x: Vec<f32> = arg.flatten_all()?.to_vec1()?;
        ce_grad_in_place(&mut x, v, &self.targets, res, grad_res)?;
        Ok(Some(Tensor::from_vec(x, (c, v), arg.device())?))
    }
}

/// Turns rows of logits (`[C, V]`) into the cross-entropy gradient `g (softmax - onehot)` in
/// place; each row's log-sum-exp comes from the forward's loss (`loss = lse - x[target]`).
fn ce_grad_in_place(
    z: &mut [f32],
    v: usize,
    targets: &[u32],
    loss: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<()> {
    let loss: Vec<f32> = loss.flatten_all()?.to_vec1()?;
    let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
    z.par_chunks_mut(v)
        .zip(targets.par_iter().zip(loss.par_iter().zip(g.par_iter())))
        .for_each(|(row, (&t, (&l, &gi)))| {
            let lse = l + row[t as usize];
            for x in row.iter_mut() {
                *x = gi * (*x - lse).exp();
            }
            row[t as usize] -= gi;
        });
    Ok(())
}

/// LM head and softmax cross-entropy as one differentiable op (CPU, float32): `h [C, H]`,
/// `w [H, V]` (the head held as `W^T`) and one target per row -> per-row loss `[C]`. The
/// logits `[C, V]`, the largest activations of a small model's step, never become graph nodes:
/// the forward keeps them for the backward, which turns them into `g (softmax - onehot)` in
/// place and returns `dh = dlogits W` and `dW^T = h^T dlogits` from two `gemm` calls.
pub fn lm_head_cross_entropy(h: &Tensor, w: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let (c, hd) = h.dims2()?;
    let (wh, v) = w.dims2()?;
    if wh != hd || targets.len() != c || targets.iter().any(|&t| t as usize >= v) {
        return Err(Error::input(
            "targets",
            "h [C, H], w [H, V] and one target in 0..V per row expected",
        ));
    }
    Ok(h.contiguous()?.apply_op2(
        &w.contiguous()?,
        LmHeadCe {
            targets: std::sync::Arc::new(targets),
            logits: std::sync::Mutex::new(None),
        },
    )?)
}

struct LmHeadCe {
    targets: std::sync::Arc<Vec<u32>>,
    /// The forward's logits, taken by the backward (recomputed if absent).
    logits: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LmHeadCe {
    fn logits(&self, h: &[f32], w: &[f32], c: usize, hd: usize, v: usize) -> Vec<f32> {
        let mut z = vec![0f32; c * v];
        crate::kernels::matmul::gemm_strided((c, hd, v), &mut z, h, (hd, 1), w, (v, 1), 1.0, true);
        z
    }
}

impl candle_core::CustomOp2 for LmHeadCe {
    fn name(&self) -> &'static str {
        "lm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (c, hd) = l1.shape().dims2()?;
        let (_, v) = l2.shape().dims2()?;
        let h = crate::kernels::ops::input(s1, l1, self.name())?;
        let w = crate::kernels::ops::input(s2, l2, self.name())?;
        let z = self.logits(h, w, c, hd, v);
        let out: Vec<f32> = z
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| row_lse(row) - row[t as usize])
            .collect();
        if let Ok(mut slot) = self.logits.lock() {
            *slot = Some(z);
        }
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(c),
        ))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (c, hd) = h.dims2()?;
        let (_, v) = w.dims2()?;
        let hv: Vec<f32> = h.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let kept = self.logits.lock().ok().and_then(|mut s| s.take());
        let mut z = kept.unwrap_or_else(|| self.logits(&hv, &wv, c, hd, v));
        ce_grad_in_place(&mut z, v, &self.targets, res, grad)?; // dlogits
        let mut dh = vec![0f32; c * hd];
        let mut dw = vec![0f32; hd * v];
        // dh [C, H] = dlogits [C, V] . W^T [V, H];  dW^T [H, V] = h^T [H, C] . dlogits [C, V].
        crate::kernels::matmul::gemm_strided(
            (c, v, hd),
            &mut dh,
            &z,
            (v, 1),
            &wv,
            (1, v),
            1.0,
            true,
        );
        crate::kernels::matmul::gemm_strided(
            (hd, c, v),
            &mut dw,
            &hv,
            (1, hd),
            &z,
            (v, 1),
            1.0,
            true,
        );
        Ok((
            Some(Tensor::from_vec(dh, (c, hd), h.device())?),
            Some(Tensor::from_vec(dw, (hd, v), w.device())?),
        ))
    }
}

/// The official uptraining initialisation (`load_block_from_vanilla_checkpoint`, spec 11.3):
/// official-layout tensors of a block model made from a vanilla model. Block-decoder layer
/// `i` <- vanilla layer `i`, token-decoder layer `i` <- vanilla layer `Lb + i`; embedder and
/// token-decoder embeddings, token-decoder final LayerNorm and LM head <- the vanilla ones;
/// mean-embedder projection `W[o, i, k] = delta_oi / L`; identity expansion stacked `R` times.
/// The block-decoder final LayerNorm is left to the fresh initialisation.
pub fn uptrain_tensors(vanilla: &Model, block: &BlockConfig) -> Result<HashMap<String, Tensor>> {
    let ModelConfig::Vanilla(vc) = &vanilla.config else {
        return Err(Error::input(
            "init-from-vanilla",
            "the checkpoint is not a vanilla model",
        ));
    };
    let w = vc.hidden_size;
    let (lb, lt) = (
        block.block_decoder.num_hidden_layers,
        block.token_decoder.num_hidden_layers,
    );
    let bad = |m: String| Err(Error::input("init-from-vanilla", m));
    if block.embedder.projection_method != Projection::ProjectionLayer
        || block.embedder.hidden_size != w
        || block.block_decoder.hidden_size != w
        || block.token_decoder.hidden_size != w
    {
        return bad(format!(
            "uptraining needs a projection-layer embedder of width {w} and both decoders of width {w}"
        ));
    }
    if lb + lt != vc.num_hidden_layers {
        return bad(format!(
            "layer partition: block decoder {lb} + token decoder {lt} layers != vanilla {} layers",
            vc.num_hidden_layers
        ));
    }
    if block.vocab_size() != vc.vocab_size {
        return bad(format!(
            "vocabulary {} differs from the vanilla model's {}",
            block.vocab_size(),
            vc.vocab_size
        ));
    }
    let src: HashMap<&str, &Tensor> = vanilla
        .params
        .iter()
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    let get = |n: &str| -> Result<Tensor> {
        src.get(n)
            .map(|t| (*t).clone())
            .ok_or_else(|| Error::input("init-from-vanilla", format!("missing tensor `{n}`")))
    };
    let mut out = HashMap::new();
    let emb = get("gpt_neox.embed_in.weight")?;
    out.insert("embedder.embeddings.weight".to_string(), emb.clone());
    out.insert("token_decoder.gpt_neox.embed_in.weight".to_string(), emb);
    let l = block.block_length;
    let dev = Device::Cpu;
    let mut proj = vec![0f32; w * w * l];
    for o in 0..w {
        for k in 0..l {
            proj[(o * w + o) * l + k] = 1.0 / l as f32;
        }
    }
    out.insert(
        "embedder.projection_layer.weight".to_string(),
        Tensor::from_vec(proj, (w, w, l), &dev)?,
    );
    out.insert(
        "embedder.projection_layer.bias".to_string(),
        Tensor::zeros(w, candle_core::DType::F32, &dev)?,
    );
    for (name, t) in &vanilla.params {
        if let Some(rest) = name.strip_prefix("gpt_neox.layers.") {
            let (idx, tail) = rest.split_once('.').expect("layer.tensor");
            let i: usize = idx.parse().map_err(|_| {
                Error::input("init-from-vanilla", format!("bad tensor name `{name}`"))
            })?;
            let dst = if i < lb {
                format!("block_decoder.gpt_neox.layers.{i}.{tail}")
            } else {
                format!("token_decoder.gpt_neox.layers.{}.{tail}", i - lb)
            };
            out.insert(dst, t.clone());
        }
    }
    out.insert(
        "token_decoder.gpt_neox.final_layer_norm.weight".to_string(),
        get("gpt_neox.final_layer_norm.weight")?,
    );
    out.insert(
        "token_decoder.gpt_neox.final_layer_norm.bias".to_string(),
        get("gpt_neox.final_layer_norm.bias")?,
    );
    out.insert(
        "token_decoder.embed_out.weight".to_string(),
        get("embed_out.weight")?,
    );
    let r = block.n_prefix();
    let mut exp = vec![0f32; r * w * w];
    for rr in 0..r {
        for i in 0..w {
            exp[(rr * w + i) * w + i] = 1.0;
        }
    }
    out.insert(
        "token_decoder.expansion_layer.weight".to_string(),
        Tensor::from_vec(exp, (r * w, w, 1), &dev)?,
    );
    out.insert(
        "token_decoder.expansion_layer.bias".to_string(),
        Tensor::zeros(r * w, candle_core::DType::F32, &dev)?,
    );
    Ok(out)
}

/// The uptraining block config for a vanilla model: projection-layer embedder of the vanilla
/// width, layers split half/half, the vanilla's heads and MLP, expansion ratio 2.
pub fn uptrain_config(
    vanilla: &crate::config::NeoXConfig,
    block_length: usize,
    context: usize,
) -> BlockConfig {
    let w = vanilla.hidden_size;
    let lb = vanilla.num_hidden_layers / 2;
    let mut bd = vanilla.clone();
    bd.num_hidden_layers = lb;
    let mut td = vanilla.clone();
    td.num_hidden_layers = vanilla.num_hidden_layers - lb;
    BlockConfig {
        embedder: crate::config::EmbedderConfig {
            vocab_size: vanilla.vocab_size,
            hidden_size: w,
            projection_method: Projection::ProjectionLayer,
        },
        block_decoder: bd,
        token_decoder: td,
        context_length: context,
        ..BlockConfig::main(block_length, vanilla.vocab_size, 1, w.max(block_length))
    }
}

/// Options of [`run`] that are not hyper-parameters.
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// No progress bar (tests).
    pub quiet: bool,
    /// Stop (with a checkpoint) after this step, as an interruption would (tests).
    pub stop_after: Option<usize>,
    /// Extra fields written into `metrics.jsonl`'s header line.
    pub header: serde_json::Value,
}

/// How a run ended.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub tokens: u64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub final_train_loss: Option<f64>,
    pub final_valid_loss: Option<f64>,
    pub interrupted: bool,
}

fn append_jsonl(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{v}").map_err(|e| Error::io(path, e))
}

/// Keeps the metrics lines up to `step` (a resumed run rewrites what came after its
/// checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s as usize <= step)
        })
        .collect();
    let mut s = kept.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// The training loop: steps, progress bar, JSONL metrics, periodic validation, checkpoints
/// (every `save_every` steps, at the end and on Ctrl-C), the loss-curve picture, and the final
/// model in `out_dir`.
pub fn run(
    tr: &mut Trainer,
    train: &PackedDataset,
    valid: Option<&PackedDataset>,
    opts: &RunOptions,
) -> Result<RunSummary> {
    let out = &opts.out_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let metrics = out.join("metrics.jsonl");
    let ckpt = out.join("checkpoint");
    if tr.state.step == 0 {
        let _ = std::fs::remove_file(&metrics);
        let mut h = serde_json::json!({
            "event": "start",
            "train_config": tr.cfg,
            "model_config": serde_json::from_str::<serde_json::Value>(&tr.model.config.to_json()).expect("json"),
            "params": tr.n_params(),
            "non_embedding_params": tr.model.config.non_embedding_params(),
            "train_samples": train.len(),
            "train_tokens": train.cache().n_tokens(),
        });
        if let (Some(o), Some(hh)) = (opts.header.as_object(), h.as_object_mut()) {
            for (k, v) in o {
                hh.insert(k.clone(), v.clone());
            }
        }
        append_jsonl(&metrics, &h)?;
    } else {
        truncate_metrics(&metrics, tr.state.step)?;
    }
    let mut sampler = Sampler::new(train.len(), tr.cfg.seed);
    let tok = opts.tokenizer.as_deref();
    let start_step = tr.state.step;
    let start_elapsed = tr.state.elapsed_s;
    let t0 = Instant::now();
    let len_for_bar = if tr.state.total_steps > 0 {
        tr.state.total_steps
    } else {
        tr.cfg.warmup_steps.max(10)
    };
    let bar = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(len_for_bar as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps | {msg} | {elapsed_precise} ETA {eta_precise}",
            )
            .expect("template"),
        );
        b.set_position(start_step as u64);
        b
    };
    let mut interrupted = false;
    let mut step_times: Vec<f64> = Vec::new();
    let mut tok_s = 0.0;
    loop {
        if tr.state.total_steps > 0 && tr.state.step >= tr.state.total_steps {
            break;
        }
        let ts = Instant::now();
        let s = tr.step(train, &mut sampler)?;
        let dt = ts.elapsed().as_secs_f64();
        tr.state.elapsed_s = start_elapsed + t0.elapsed().as_secs_f64();
        step_times.push(dt);
        tok_s = s.tokens as f64 / dt;
        // A time budget fixes the schedule's length after the first steps.
        if tr.state.total_steps == 0 && step_times.len() >= 4 {
            let budget = tr.cfg.time_budget_s.unwrap_or(0.0);
            let avg = step_times[1..].iter().sum::<f64>() / (step_times.len() - 1) as f64;
            let left = ((budget - tr.state.elapsed_s) / avg).floor().max(0.0) as usize;
            tr.state.total_steps = (tr.state.step + left).max(tr.cfg.warmup_steps + 1);
            bar.set_length(tr.state.total_steps as u64);
            append_jsonl(
                &metrics,
                &serde_json::json!({"event": "schedule", "step": tr.state.step, "total_steps": tr.state.total_steps, "step_time_s": avg}),
            )?;
        }
        append_jsonl(
            &metrics,
            &serde_json::json!({
                "step": tr.state.step,
                "tokens": tr.state.tokens_seen,
                "loss": s.loss,
                "lr": s.lr,
                "grad_norm": s.grad_norm,
                "tokens_per_s": tok_s,
                "elapsed_s": tr.state.elapsed_s,
            }),
        )?;
        bar.set_position(tr.state.step as u64);
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s | lr {:.2e}",
            s.loss, tok_s, s.lr
        ));
        let done = tr.state.total_steps > 0 && tr.state.step >= tr.state.total_steps;
        if let Some(v) = valid {
            if done || (tr.cfg.eval_every > 0 && tr.state.step.is_multiple_of(tr.cfg.eval_every)) {
                let vl = tr.eval_loss(v, tr.cfg.eval_samples)?;
                tr.state.last_valid_loss = Some(vl);
                append_jsonl(
                    &metrics,
                    &serde_json::json!({"step": tr.state.step, "valid_loss": vl, "valid_ppl": vl.exp()}),
                )?;
                bar.println(format!(
                    "step {}: train loss {:.4}, valid loss {:.4} (ppl {:.2})",
                    tr.state.step,
                    s.loss,
                    vl,
                    vl.exp()
                ));
            }
        }
        let stop_now = STOP.load(Ordering::SeqCst) || opts.stop_after == Some(tr.state.step);
        if stop_now {
            interrupted = true;
        }
        if done
            || stop_now
            || (tr.cfg.save_every > 0 && tr.state.step.is_multiple_of(tr.cfg.save_every))
        {
            tr.save_checkpoint(&ckpt, tok)?;
            write_loss_svg(&metrics, &out.join("loss.svg"))?;
        }
        if stop_now {
            break;
        }
    }
    bar.finish_and_clear();
    if !interrupted {
        tr.save_model(out, tok)?;
        append_jsonl(
            &metrics,
            &serde_json::json!({"event": "end", "step": tr.state.step, "tokens": tr.state.tokens_seen, "elapsed_s": tr.state.elapsed_s}),
        )?;
    }
    write_loss_svg(&metrics, &out.join("loss.svg"))?;
    let wall = tr.state.elapsed_s;
    Ok(RunSummary {
        steps: tr.state.step,
        total_steps: tr.state.total_steps,
        tokens: tr.state.tokens_seen,
        wall_s: wall,
        tokens_per_s: if step_times.is_empty() {
            tok_s
        } else {
            (tr.state.step - start_step) as f64 * tr.cfg.tokens_per_step() as f64
                / step_times.iter().sum::<f64>()
        },
        final_train_loss: tr.state.last_train_loss,
        final_valid_loss: tr.state.last_valid_loss,
        interrupted,
    })
}

/// Draws the training (blue) and validation (red) loss against steps as an SVG.
pub fn write_loss_svg(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(x) = v.get("loss").and_then(|s| s.as_f64()) {
            train.push((step, x));
        }
        if let Some(x) = v.get("valid_loss").and_then(|s| s.as_f64()) {
            valid.push((step, x));
        }
    }
    let (w, h, m) = (800.0, 480.0, 60.0);
    let all: Vec<&(f64, f64)> = train.iter().chain(&valid).collect();
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = all.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let ymin = all.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let (ymin, ymax) = if all.is_empty() {
        (0.0, 1.0)
    } else if ymax - ymin < 1e-9 {
        (ymin - 0.5, ymax + 0.5)
    } else {
        (ymin, ymax)
    };
    let px = |x: f64| m + (x / xmax) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y - ymin) / (ymax - ymin) * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{0}\" stroke=\"black\"/>\n",
        h - m,
        w - m
    );
    for i in 0..=4 {
        let y = ymin + (ymax - ymin) * i as f64 / 4.0;
        s += &format!(
            "<text x=\"5\" y=\"{:.1}\">{y:.3}</text><line x1=\"{m}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\n",
            py(y),
            w - m
        );
        let x = xmax * i as f64 / 4.0;
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x:.0}</text>\n",
            px(x),
            h - m + 18.0
        );
    }
    let line = |pts: &[(f64, f64)]| -> String {
        pts.iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    s += &format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1\" points=\"{}\"/>\n",
        line(&train)
    );
    s += &format!(
        "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"{}\"/>\n",
        line(&valid)
    );
    for &(x, y) in &valid {
        s += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>\n",
            px(x),
            py(y)
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"20\" font-size=\"14\">loss vs step (blue: train, red: validation)</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n</svg>\n",
        m,
        w / 2.0,
        h - 10.0
    );
    std::fs::write(out, s).map_err(|e| Error::io(out, e))
}

/// Writes a model like [`checkpoint::save`] but with float16 weights (half the size; loading
/// converts back to float32). For shipping small models.
pub fn save_f16(model: &Model, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
    checkpoint::save(model, dir, tokenizer)?;
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(model.params.len());
    for (name, t) in &model.params {
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes = data
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        bufs.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::checkpoint(dir, format!("tensor `{n}`: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let wpath = dir.join("model.safetensors");
    safetensors::tensor::serialize_to_file(views, Some(meta), &wpath)
        .map_err(|e| Error::checkpoint(&wpath, format!("write failed: {e:?}")))
}
