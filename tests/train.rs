//! Training: every parameter gets a gradient, finite-difference gradient check per module,
//! exact resume, learning a structured synthetic corpus, the uptraining initialisation.

use blockformer::config::{BlockConfig, ModelConfig, NeoXConfig};
use blockformer::data::{make_batch, Batch, PackedDataset, Packing, TokenCache};
use blockformer::model::{Init, RandomInit, WeightSource};
use blockformer::train::{self, MapSource, RunOptions, TrainConfig, Trainer};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

const V: usize = 48;

fn tiny_block(projection: bool) -> ModelConfig {
    let mut c = BlockConfig::main(4, V, 2, 32);
    for s in [&mut c.block_decoder, &mut c.token_decoder] {
        s.num_attention_heads = 2;
        s.intermediate_size = 64;
        s.max_position_embeddings = 64;
    }
    c.context_length = 64;
    if projection {
        let vc = NeoXConfig::pythia(V, 2, 32, 2, 64);
        c = train::uptrain_config(&vc, 4, 64);
    }
    ModelConfig::Block(c)
}

fn tiny_vanilla() -> ModelConfig {
    let mut c = NeoXConfig::pythia(V, 2, 32, 2, 64);
    c.max_position_embeddings = 64;
    ModelConfig::Vanilla(c)
}

fn packing(cfg: &ModelConfig) -> Packing {
    match cfg {
        ModelConfig::Block(b) => Packing::Block {
            block_length: b.block_length,
        },
        ModelConfig::Vanilla(_) => Packing::Vanilla,
    }
}

/// Documents of an arithmetic pattern: x_{t+1} = 2 + (x_t - 2 + step) mod (V-2), with a
/// per-document step in {1, 2, 3} and random start and length.
fn pattern_docs(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let step = rng.random_range(1..4u32);
            let mut x = rng.random_range(0..(V as u32 - 2));
            let len = rng.random_range(20..60);
            (0..len)
                .map(|_| {
                    let t = 2 + x;
                    x = (x + step) % (V as u32 - 2);
                    t
                })
                .collect()
        })
        .collect()
}

fn dataset(cfg: &ModelConfig, seq_len: usize, seed: u64) -> PackedDataset {
    PackedDataset::new(
        TokenCache::from_docs(&pattern_docs(60, seed)),
        packing(cfg),
        seq_len,
        0,
        0,
        seed,
    )
    .unwrap()
}

fn batch(cfg: &ModelConfig, ds: &PackedDataset, n: usize) -> Batch {
    let samples: Vec<_> = (0..n).map(|k| ds.sample(k)).collect();
    let _ = cfg;
    make_batch(&samples, ds.packing())
}

fn tcfg(steps: usize) -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        warmup_steps: 5,
        total_steps: steps,
        micro_batch: 4,
        accum: 1,
        seq_len: 32,
        eval_samples: 4,
        ..Default::default()
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    for cfg in [tiny_block(false), tiny_block(true), tiny_vanilla()] {
        let tr = Trainer::random(&cfg, 1, tcfg(1)).unwrap();
        let ds = dataset(&cfg, 32, 0);
        let (loss, grads) = tr.gradients(&batch(&cfg, &ds, 4)).unwrap();
        assert!(loss.is_finite());
        assert_eq!(grads.len(), tr.params.len());
        // The stored parameters are exactly the trainable ones.
        assert_eq!(tr.params.len(), tr.current_model().unwrap().params.len());
        for (p, g) in tr.params.iter().zip(&grads) {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no gradient", p.name));
            let norm: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{}: gradient norm {norm}",
                p.name
            );
        }
    }
}

#[test]
fn bf16_autocast_gradients_track_float32() {
    // Linear products in bfloat16 over float32 master weights (the CUDA training default; here
    // on the CPU): every parameter still gets a gradient, close in direction to float32's.
    for cfg in [tiny_block(false), tiny_vanilla()] {
        let ds = dataset(&cfg, 32, 0);
        let b = batch(&cfg, &ds, 4);
        let f32_tr = Trainer::random(&cfg, 1, tcfg(1)).unwrap();
        let bf16_tr = Trainer::random(
            &cfg,
            1,
            TrainConfig {
                autocast_bf16: true,
                ..tcfg(1)
            },
        )
        .unwrap();
        let (l32, g32) = f32_tr.gradients(&b).unwrap();
        let (l16, g16) = bf16_tr.gradients(&b).unwrap();
        assert!((l32 - l16).abs() < 2e-2, "loss {l32} vs {l16}");
        assert_ne!(l32, l16, "bf16 products must round differently");
        for ((p, a), c) in f32_tr.params.iter().zip(&g32).zip(&g16) {
            let (a, c) = (a.as_ref().unwrap(), c.as_ref().unwrap());
            let dot: f64 = a.iter().zip(c).map(|(&x, &y)| x as f64 * y as f64).sum();
            let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let nc: f64 = c.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let cos = dot / (na * nc);
            assert!(
                cos > 0.95,
                "{}: cosine {cos} between bf16 and f32 gradients",
                p.name
            );
        }
    }
    // The switch is scoped to the trainer's own passes.
    let cfg = tiny_vanilla();
    let tr = Trainer::random(&cfg, 1, tcfg(1)).unwrap();
    let ds = dataset(&cfg, 32, 0);
    let a = tr.gradients(&batch(&cfg, &ds, 4)).unwrap().0;
    let b = tr.gradients(&batch(&cfg, &ds, 4)).unwrap().0;
    assert_eq!(a, b);
}

/// Weights 5x the official init so that every module's gradient is well above f32 noise.
struct Scaled(RandomInit);
impl WeightSource for Scaled {
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> blockformer::Result<Tensor> {
        let init = match init {
            Init::Normal(s) => Init::Normal(s * 5.0),
            o => o,
        };
        self.0.tensor(name, shape, init)
    }
}

#[test]
fn finite_differences_match_the_gradient_of_every_module() {
    for cfg in [tiny_block(false), tiny_block(true), tiny_vanilla()] {
        let mut tr =
            Trainer::new(&cfg, &mut Scaled(RandomInit::new(3, &Device::Cpu)), tcfg(1)).unwrap();
        let ds = dataset(&cfg, 32, 1);
        let b = batch(&cfg, &ds, 2);
        let (_, grads) = tr.gradients(&b).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut worst = 0f64;
        for (i, g) in grads.iter().enumerate() {
            let g = g.as_ref().unwrap();
            let p0 = tr.param_data(i).to_vec();
            // Direction: the gradient plus a random part (unit norm overall).
            let gn = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let r: Vec<f64> = (0..g.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
            let rn = r.iter().map(|x| x * x).sum::<f64>().sqrt();
            let mut d: Vec<f64> = g
                .iter()
                .zip(&r)
                .map(|(&x, &y)| x as f64 / gn + 0.5 * y / rn)
                .collect();
            let dn = d.iter().map(|x| x * x).sum::<f64>().sqrt();
            d.iter_mut().for_each(|x| *x /= dn);
            let analytic: f64 = g.iter().zip(&d).map(|(&x, &y)| x as f64 * y).sum();
            let h = 1e-2;
            let mut eval = |s: f64| -> f64 {
                let p: Vec<f32> = p0
                    .iter()
                    .zip(&d)
                    .map(|(&x, &y)| (x as f64 + s * y) as f32)
                    .collect();
                tr.set_param(i, &p).unwrap();
                tr.loss(&b).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            tr.set_param(i, &p0).unwrap();
            let err = (numeric - analytic).abs() / (analytic.abs().max(1e-2));
            worst = worst.max(err);
            assert!(
                err < 0.05,
                "{}: finite difference {numeric:.6} vs gradient {analytic:.6} (rel. error {err:.3})",
                tr.params[i].name
            );
        }
        println!(
            "max relative error {worst:.2e} over {} tensors",
            tr.params.len()
        );
    }
}

fn run_to_end(tr: &mut Trainer, cfg: &ModelConfig, dir: &std::path::Path, stop: Option<usize>) {
    let ds = dataset(cfg, 32, 5);
    let valid = dataset(cfg, 32, 6);
    train::run(
        tr,
        &ds,
        Some(&valid),
        &RunOptions {
            out_dir: dir.to_path_buf(),
            tokenizer: None,
            quiet: true,
            stop_after: stop,
            header: serde_json::json!({}),
        },
    )
    .unwrap();
}

#[test]
fn resumed_training_is_bit_exact() {
    for cfg in [tiny_block(false), tiny_vanilla()] {
        let tc = TrainConfig {
            accum: 2,
            eval_every: 3,
            save_every: 2,
            ..tcfg(8)
        };
        let a = tempfile::tempdir().unwrap();
        let mut full = Trainer::random(&cfg, 11, tc.clone()).unwrap();
        run_to_end(&mut full, &cfg, a.path(), None);

        let b = tempfile::tempdir().unwrap();
        let mut first = Trainer::random(&cfg, 11, tc.clone()).unwrap();
        run_to_end(&mut first, &cfg, b.path(), Some(5));
        assert_eq!(first.state.step, 5);
        drop(first);
        let mut resumed = Trainer::resume(&b.path().join("checkpoint")).unwrap();
        assert_eq!(resumed.state.step, 5);
        run_to_end(&mut resumed, &cfg, b.path(), None);
        assert_eq!(resumed.state.step, 8);
        assert_eq!(resumed.state.samples_drawn, full.state.samples_drawn);
        for i in 0..full.params.len() {
            let (x, y) = (full.param_data(i), resumed.param_data(i));
            assert!(
                x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: weights differ after resume",
                full.params[i].name
            );
        }
        // The saved final models are identical files.
        assert_eq!(
            std::fs::read(a.path().join("model.safetensors")).unwrap(),
            std::fs::read(b.path().join("model.safetensors")).unwrap()
        );
        // Metrics log and loss curve are written; the resumed log has each step once.
        let log = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("loss").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=8).collect::<Vec<_>>());
        assert!(std::fs::read_to_string(b.path().join("loss.svg"))
            .unwrap()
            .contains("<polyline"));
        // The final model loads back.
        blockformer::checkpoint::load(a.path(), None, None, &Device::Cpu).unwrap();
    }
}

#[test]
fn tiny_models_learn_a_structured_corpus() {
    for cfg in [tiny_block(false), tiny_vanilla()] {
        let ds = dataset(&cfg, 32, 2);
        // Unigram entropy of the corpus (nats).
        let mut counts = vec![0usize; V];
        let mut n = 0;
        for k in 0..ds.len() {
            let (ids, mask) = ds.sample(k);
            for (i, m) in ids.iter().zip(mask) {
                if m == 1 {
                    counts[*i as usize] += 1;
                    n += 1;
                }
            }
        }
        let h: f64 = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.ln()
            })
            .sum();
        let steps = 300;
        let mut tr = Trainer::random(
            &cfg,
            4,
            TrainConfig {
                lr: 1e-2,
                warmup_steps: 20,
                weight_decay: 0.0,
                micro_batch: 8,
                ..tcfg(steps)
            },
        )
        .unwrap();
        let mut sampler = blockformer::data::Sampler::new(ds.len(), 0);
        let first = tr.eval_loss(&ds, 16).unwrap();
        for _ in 0..steps {
            tr.step(&ds, &mut sampler).unwrap();
        }
        let last = tr.eval_loss(&ds, 16).unwrap();
        println!(
            "{}: unigram entropy {h:.3}, loss {first:.3} -> {last:.3}",
            if matches!(cfg, ModelConfig::Block(_)) {
                "block"
            } else {
                "vanilla"
            }
        );
        assert!(
            last < 0.5 * h,
            "loss {last:.3} not well below the unigram entropy {h:.3}"
        );
    }
}

#[test]
fn uptraining_initialises_the_block_model_from_the_vanilla_one() {
    let vc = NeoXConfig::pythia(V, 4, 32, 2, 64);
    let vanilla =
        blockformer::model::Model::random(&ModelConfig::Vanilla(vc.clone()), 8, &Device::Cpu)
            .unwrap();
    let bc = train::uptrain_config(&vc, 4, 64);
    assert_eq!(bc.block_decoder.num_hidden_layers, 2);
    assert_eq!(bc.token_decoder.num_hidden_layers, 2);
    let mut src = MapSource {
        map: train::uptrain_tensors(&vanilla, &bc).unwrap(),
        fallback: Some(RandomInit::new(0, &Device::Cpu)),
        origin: "test".into(),
    };
    let tr = Trainer::new(&ModelConfig::Block(bc.clone()), &mut src, tcfg(1)).unwrap();
    let block = tr.current_model().unwrap();
    let get = |m: &blockformer::model::Model, n: &str| -> Vec<f32> {
        m.params
            .iter()
            .find(|p| p.0 == n)
            .unwrap_or_else(|| panic!("{n}"))
            .1
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for (b, v) in [
        ("embedder.embeddings.weight", "gpt_neox.embed_in.weight"),
        (
            "token_decoder.gpt_neox.embed_in.weight",
            "gpt_neox.embed_in.weight",
        ),
        (
            "block_decoder.gpt_neox.layers.1.attention.query_key_value.weight",
            "gpt_neox.layers.1.attention.query_key_value.weight",
        ),
        (
            "token_decoder.gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
            "gpt_neox.layers.2.mlp.dense_4h_to_h.weight",
        ),
        (
            "token_decoder.gpt_neox.layers.1.input_layernorm.bias",
            "gpt_neox.layers.3.input_layernorm.bias",
        ),
        (
            "token_decoder.gpt_neox.final_layer_norm.weight",
            "gpt_neox.final_layer_norm.weight",
        ),
        ("token_decoder.embed_out.weight", "embed_out.weight"),
    ] {
        assert_eq!(get(&block, b), get(&vanilla, v), "{b} <- {v}");
    }
    // The embedder gives the mean of the block's token embeddings; the expansion layer copies
    // the block vector into every prefix vector.
    let blockformer::model::Arch::Block(bt) = &block.arch else {
        panic!()
    };
    let ids = Tensor::new(&[[3u32, 7, 9, 11]], &Device::Cpu).unwrap();
    let e: Vec<f32> = bt
        .embedder
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let emb = get(&vanilla, "gpt_neox.embed_in.weight");
    for c in 0..32 {
        let mean = [3usize, 7, 9, 11]
            .iter()
            .map(|&t| emb[t * 32 + c])
            .sum::<f32>()
            / 4.0;
        assert!((e[c] - mean).abs() < 1e-6);
    }
    let s = Tensor::from_slice(&e, (1, e.len()), &Device::Cpu).unwrap();
    let p: Vec<f32> = bt
        .token_decoder
        .expand(&s)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(p.len(), 2 * 32);
    for r in 0..2 {
        for c in 0..32 {
            assert!((p[r * 32 + c] - e[c]).abs() < 1e-6);
        }
    }
}

#[test]
fn training_loss_equals_the_model_forward_loss() {
    // The trainer's vanilla loss (LM head on predicting rows + fused softmax cross-entropy)
    // equals Vanilla::forward's HF loss; the block loss is the official forward's.
    let cfg = tiny_vanilla();
    let tr = Trainer::random(&cfg, 5, tcfg(1)).unwrap();
    let ds = dataset(&cfg, 32, 4);
    let b = batch(&cfg, &ds, 3);
    let Batch::Vanilla {
        batch: n,
        seq_len,
        ids,
        labels,
        ..
    } = &b
    else {
        panic!()
    };
    let blockformer::model::Arch::Vanilla(v) = &tr.model.arch else {
        panic!()
    };
    let want = v
        .forward(ids, *n, *seq_len, None, Some(labels))
        .unwrap()
        .loss
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let got = tr.loss(&b).unwrap().to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // Fused cross-entropy: value and gradient against the composed ops.
    let logits = Tensor::randn(0f32, 3.0, (5, 11), &Device::Cpu).unwrap();
    let var = candle_core::Var::from_tensor(&logits).unwrap();
    let t = vec![0u32, 10, 3, 3, 7];
    let fused = train::softmax_cross_entropy(var.as_tensor(), t.clone()).unwrap();
    let gf = fused.sum_all().unwrap().backward().unwrap();
    let (ce, _) = blockformer::model::block_transformer::cross_entropy(
        var.as_tensor(),
        &t.iter().map(|&x| x as i64).collect::<Vec<_>>(),
    )
    .unwrap();
    let gc = ce.sum_all().unwrap().backward().unwrap();
    let d = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert!(d(&fused, &ce) < 1e-5);
    assert!(
        d(
            gf.get(var.as_tensor()).unwrap(),
            gc.get(var.as_tensor()).unwrap()
        ) < 1e-5
    );
    // LM head + cross-entropy in one op: value and both gradients against matmul + the
    // composed cross-entropy.
    let h = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap())
        .unwrap();
    let w =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 11), &Device::Cpu).unwrap())
            .unwrap();
    let fused = train::lm_head_cross_entropy(h.as_tensor(), w.as_tensor(), t.clone()).unwrap();
    let gf = (fused.clone() * Tensor::new(&[1f32, 2., 3., 4., 5.], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (ce, _) = blockformer::model::block_transformer::cross_entropy(
        &h.as_tensor().matmul(w.as_tensor()).unwrap(),
        &t.iter().map(|&x| x as i64).collect::<Vec<_>>(),
    )
    .unwrap();
    let gc = (ce.clone() * Tensor::new(&[1f32, 2., 3., 4., 5.], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(d(&fused, &ce) < 1e-5);
    for v in [&h, &w] {
        assert!(
            d(
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap()
            ) < 1e-5
        );
    }
}
