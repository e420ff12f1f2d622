//! The tensor path (the decode path GPUs run) against the official fixtures and the host
//! kernels, on the device named by `BLOCKFORMER_TEST_DEVICE` (`cpu` when unset, `cuda` or
//! `cuda:N` with a CUDA build on a GPU machine).
//!
//! - float32: forward logits and loss equal the official ones (tolerance 1e-4 on the CPU, 1e-3
//!   on CUDA), every official `generate` case is reproduced token for token, and greedy
//!   generation over mixed prompt lengths, joining and cancelled rows equals the host engine;
//! - bfloat16: the loss stays within 1e-2 of the official one, and greedy generations equal the
//!   float32 ones up to the first step whose float32 top-2 margin is too small to decide.

mod common;

use blockformer::generate::{
    official, Backend, Engine, EngineOptions, GenRequest, PositionMode, SamplingParams,
};
use blockformer::model::block_transformer::ForwardOptions;
use blockformer::model::{Arch, Model};
use candle_core::{DType, Device};
use common::*;
use std::collections::HashMap;
use std::sync::Arc;

fn test_device() -> Device {
    match std::env::var("BLOCKFORMER_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok(d) => {
            let n = d
                .strip_prefix("cuda")
                .map(|r| r.trim_start_matches(':').parse().unwrap_or(0))
                .unwrap_or_else(|| panic!("BLOCKFORMER_TEST_DEVICE={d}: expected cpu or cuda[:N]"));
            blockformer::gpu::open_cuda(n).expect("BLOCKFORMER_TEST_DEVICE names a CUDA device")
        }
    }
}

fn logits_tol(dev: &Device) -> f32 {
    if dev.is_cpu() {
        1e-4
    } else {
        1e-3
    }
}

fn to_f32(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The official forward on the fixture batch: (logits, loss).
fn forward(fx: &Fixture, model: &Model) -> (Vec<f32>, f64) {
    let ids = fx.arr("fwd_input_ids");
    match &model.arch {
        Arch::Block(bt) => {
            let batch = fx.block_batch(true);
            let opts = ForwardOptions {
                skip_padding_blocks: true,
                want_logits: true,
            };
            let out = bt.forward(&batch, opts).unwrap();
            let loss = to_f32(out.loss.as_ref().unwrap())[0] as f64;
            (to_f32(out.logits.as_ref().unwrap()), loss)
        }
        Arch::Vanilla(v) => {
            let (b, t) = (ids.shape[0], ids.shape[1]);
            let mask: Vec<u8> = fx.arr("fwd_attention_mask").ints();
            let labels: Vec<i64> = fx.arr("fwd_labels").ints();
            let out = v
                .forward(&ids.ints::<u32>(), b, t, Some(&mask), Some(&labels))
                .unwrap();
            (
                to_f32(&out.logits),
                to_f32(out.loss.as_ref().unwrap())[0] as f64,
            )
        }
    }
}

#[test]
fn float32_forward_matches_official_on_the_test_device() {
    let dev = test_device();
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        let model = fx.model_on(&dev);
        let (logits, loss) = forward(&fx, &model);
        let d = max_abs_diff(&logits, &fx.arr("fwd_logits").f32s());
        let want = fx.arr("fwd_loss").data[0];
        println!(
            "{} on {dev:?}: logits max |diff| {d:e}, loss {loss} vs {want}",
            fx.name()
        );
        assert!(d <= logits_tol(&dev), "{}: logits {d}", fx.name());
        assert!((loss - want).abs() <= 1e-4, "{}: loss {loss}", fx.name());
    }
}

#[test]
fn official_generate_cases_reproduced_on_the_tensor_path() {
    let dev = test_device();
    let mut checked = 0;
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        let model = Arc::new(fx.model_on(&dev));
        for case in fx.generation_cases() {
            let got = official::generate_on(
                model.clone(),
                &case.input_ids,
                case.mask.as_deref(),
                case.limit,
                case.eos,
                Backend::Tensor,
            )
            .unwrap();
            assert_eq!(got, case.output_ids, "{}", case.name);
            checked += 1;
        }
    }
    println!("{checked} official generate cases reproduced on {dev:?}");
    assert!(checked > 0);
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 11 + 3) % 300)
        .collect()
}

/// Greedy outputs per request (with the top-2 logprobs of every generated token when
/// `logprobs`), on one engine.
fn run(
    model: &Arc<Model>,
    backend: Backend,
    reqs: &[GenRequest],
    max_batch: usize,
    positions: PositionMode,
    cancel_after_first_step: Option<usize>,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut e = Engine::new(
        model.clone(),
        EngineOptions {
            positions,
            max_batch,
            backend,
            ..Default::default()
        },
    );
    assert_eq!(e.tensor_path(), backend == Backend::Tensor);
    let ids: Vec<u64> = reqs.iter().map(|r| e.add(r.clone()).unwrap()).collect();
    let mut out: HashMap<u64, (Vec<u32>, Vec<f32>)> = HashMap::new();
    let mut first = true;
    while !e.is_idle() {
        for ev in e.step().unwrap() {
            let o = out.entry(ev.id).or_default();
            o.0.extend(&ev.tokens);
            for lp in &ev.logprobs {
                o.1.push(lp.top[0].1 - lp.top.get(1).map_or(f32::NEG_INFINITY, |t| t.1));
            }
        }
        if first {
            if let Some(r) = cancel_after_first_step {
                assert!(e.cancel(ids[r]));
            }
            first = false;
        }
    }
    ids.iter()
        .map(|i| out.remove(i).unwrap_or_default())
        .collect()
}

fn requests(vocab_ok: bool) -> Vec<GenRequest> {
    [1usize, 7, 37, 150, 4, 66]
        .iter()
        .enumerate()
        .map(|(i, &len)| GenRequest {
            logprobs: vocab_ok.then_some(2),
            eos_token_id: None,
            sampling: SamplingParams::greedy(),
            ..GenRequest::greedy(prompt(len, i as u32), 9 + 2 * i)
        })
        .collect()
}

#[test]
fn tensor_path_generation_equals_the_host_engine() {
    let dev = test_device();
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        let host = Arc::new(fx.model());
        let tensor = Arc::new(fx.model_on(&dev));
        let modes: &[PositionMode] = if fx.is_block() {
            &[PositionMode::Trained, PositionMode::Official]
        } else {
            &[PositionMode::Trained]
        };
        for &mode in modes {
            // Six rows through two slots (rows join as others finish), and a cancelled row.
            for (max_batch, cancel) in [(6, None), (2, None), (4, Some(1))] {
                let reqs = requests(false);
                let a = run(&host, Backend::Host, &reqs, max_batch, mode, cancel);
                let b = run(&tensor, Backend::Tensor, &reqs, max_batch, mode, cancel);
                let a: Vec<_> = a.into_iter().map(|x| x.0).collect();
                let b: Vec<_> = b.into_iter().map(|x| x.0).collect();
                assert_eq!(
                    a,
                    b,
                    "{} {mode:?} batch {max_batch} cancel {cancel:?}",
                    fx.name()
                );
            }
        }
        println!("{}: tensor path on {dev:?} = host engine", fx.name());
    }
}

#[test]
fn bfloat16_stays_close_to_float32() {
    let dev = test_device();
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        let f32_model = Arc::new(fx.model());
        let bf16 = Arc::new(fx.model_on(&dev).to(&dev, DType::BF16).unwrap());
        assert_eq!(bf16.dtype(), DType::BF16);
        let (_, loss) = forward(&fx, &bf16);
        let want = fx.arr("fwd_loss").data[0];
        println!("{} bf16 on {dev:?}: loss {loss} vs {want}", fx.name());
        assert!(
            (loss - want).abs() <= 1e-2,
            "{}: bf16 loss {loss}",
            fx.name()
        );

        let reqs = requests(true);
        let want = run(
            &f32_model,
            Backend::Host,
            &reqs,
            6,
            PositionMode::Trained,
            None,
        );
        let got = run(
            &bf16,
            Backend::Tensor,
            &reqs,
            6,
            PositionMode::Trained,
            None,
        );
        let (mut same, mut total) = (0, 0);
        for (r, ((wt, margins), (gt, _))) in want.iter().zip(&got).enumerate() {
            assert_eq!(wt.len(), gt.len(), "row {r}: lengths");
            total += wt.len();
            match wt.iter().zip(gt).position(|(a, b)| a != b) {
                None => same += wt.len(),
                Some(i) => {
                    same += i;
                    // The first difference must be a near tie in float32 (logprob margin).
                    assert!(
                        margins[i] < 0.25,
                        "{} row {r}: bf16 differs at token {i} where float32 is sure (margin {})",
                        fx.name(),
                        margins[i]
                    );
                }
            }
        }
        println!(
            "{}: bf16 greedy tokens equal to float32 up to the first near tie: {same}/{total}",
            fx.name()
        );
    }
}

#[test]
fn training_runs_on_the_test_device() {
    // A tiny vanilla model learns a repeating pattern on the device (bf16 autocast on CUDA,
    // float32 on the CPU); every parameter gets a gradient.
    use blockformer::config::{ModelConfig, NeoXConfig};
    use blockformer::data::{PackedDataset, Packing, Sampler, TokenCache};
    use blockformer::model::RandomInit;
    use blockformer::train::{TrainConfig, Trainer};
    let dev = test_device();
    let mut c = NeoXConfig::pythia(32, 2, 32, 2, 64);
    c.max_position_embeddings = 64;
    let cfg = ModelConfig::Vanilla(c);
    let docs: Vec<Vec<u32>> = (0..40u32)
        .map(|d| (0..40u32).map(|t| 2 + (d + 3 * t) % 30).collect())
        .collect();
    let ds =
        PackedDataset::new(TokenCache::from_docs(&docs), Packing::Vanilla, 32, 0, 0, 0).unwrap();
    let tc = TrainConfig {
        lr: 3e-3,
        warmup_steps: 2,
        total_steps: 30,
        micro_batch: 4,
        seq_len: 32,
        autocast_bf16: !dev.is_cpu(),
        ..Default::default()
    };
    let mut tr = Trainer::new_on(&cfg, &mut RandomInit::new(0, &Device::Cpu), tc, &dev).unwrap();
    assert!(tr.params.iter().all(|p| p.var.device().same_device(&dev)));
    let mut sampler = Sampler::new(ds.len(), 0);
    let first = tr.step(&ds, &mut sampler).unwrap().loss;
    let mut last = first;
    for _ in 1..30 {
        last = tr.step(&ds, &mut sampler).unwrap().loss;
    }
    println!("training on {dev:?}: loss {first:.3} -> {last:.3}");
    assert!(last < first - 1.0, "loss {first} -> {last}");
}

/// The tensor path's fused masked softmax (a CUDA kernel on a GPU) equals its composed twin
/// (float32 cast, scale, -1e30 mask, softmax, cast back) in every dtype, for decode rows (one
/// query, long rows), causal prompt blocks and short rows.
#[test]
fn masked_softmax_equals_its_composed_twin_on_the_test_device() {
    use blockformer::kernels::pool_attention::{masked_softmax, reference};
    use candle_core::Tensor;
    let dev = test_device();
    // (span, heads, n_q, t, limit of (slot, query))
    type Limit = fn(usize, usize) -> u32;
    let cases: [(usize, usize, usize, usize, Limit); 3] = [
        (5, 4, 1, 1000, |s, _| (200 * s + 7) as u32),
        (2, 3, 64, 64, |_, q| q as u32),
        (7, 2, 3, 5, |s, q| (s + q) as u32),
    ];
    for (span, heads, n_q, t, lim) in cases {
        let scores = Tensor::randn(0f32, 4.0, (span, heads, n_q, t), &dev).unwrap();
        let limit: Vec<u32> = (0..span * n_q).map(|i| lim(i / n_q, i % n_q)).collect();
        let limit = Tensor::from_vec(limit, (span, 1, n_q, 1), &dev).unwrap();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let s = scores.to_dtype(dt).unwrap();
            let got = masked_softmax(&s, &limit, 0.125).unwrap();
            let want = reference(&s, &limit, 0.125).unwrap();
            assert_eq!(got.dtype(), dt);
            let diff = max_tensor_diff(&got, &want);
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            println!(
                "masked softmax {span}x{heads}x{n_q}x{t} {dt:?} on {dev:?}: max |diff| {diff}"
            );
            assert!(
                diff <= tol,
                "{span}x{heads}x{n_q}x{t} {dt:?}: max |diff| {diff}"
            );
        }
    }
}

/// The tensor path's decode attention (a CUDA kernel on a GPU) equals its composed twin (the
/// batched matmuls around the masked softmax) for every head size it takes, in every dtype, with
/// limits at the first position, mid-row, at the last position and past it, from a slot > 0.
#[test]
fn decode_attention_equals_its_composed_twin_on_the_test_device() {
    use blockformer::kernels::pool_attention::{decode_attention, decode_reference};
    use candle_core::Tensor;
    let dev = test_device();
    let (slots, heads, cap, lo, span) = (9, 3, 300, 2, 6);
    for hd in [32, 64, 128] {
        let q = Tensor::randn(0f32, 1.0, (span, heads, 1, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (slots, heads, cap, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (slots, heads, cap, hd), &dev).unwrap();
        let limit = Tensor::new(&[0u32, 17, 150, 299, 1000, 63], &dev).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2), (DType::F16, 2e-2)] {
            let (q, k, v) = (
                q.to_dtype(dt).unwrap(),
                k.to_dtype(dt).unwrap(),
                v.to_dtype(dt).unwrap(),
            );
            let got = decode_attention(&q, &k, &v, lo, &limit, scale).unwrap();
            let want = decode_reference(&q, &k, &v, lo, &limit, scale).unwrap();
            assert_eq!(got.dims(), &[span, heads, 1, hd]);
            assert_eq!(got.dtype(), dt);
            let diff = max_tensor_diff(&got, &want);
            println!("decode attention head_dim {hd} {dt:?} on {dev:?}: max |diff| {diff}");
            assert!(diff <= tol, "head_dim {hd} {dt:?}: max |diff| {diff}");
        }
    }
}

/// Models whose head size the decode kernel takes (32: `block_main_b4_5`, 64: `vanilla_70`),
/// with random weights: the tensor path on the test device generates what the host engine
/// does, rows joining and leaving (on the CPU through the composed ops, or the kernels' plain
/// loops with `BLOCKFORMER_POOL_KERNELS=1`).
#[test]
fn tensor_path_with_the_decode_kernel_equals_the_host_engine() {
    let dev = test_device();
    for name in ["block_main_b4_5", "vanilla_70"] {
        let cfg = blockformer::config::preset(name).unwrap();
        let host = Model::random(&cfg, 7, &Device::Cpu).unwrap();
        let tensor = Arc::new(host.to(&dev, DType::F32).unwrap());
        let host = Arc::new(host);
        let reqs = requests(false);
        for max_batch in [6, 2] {
            let a = run(
                &host,
                Backend::Host,
                &reqs,
                max_batch,
                PositionMode::Trained,
                None,
            );
            let b = run(
                &tensor,
                Backend::Tensor,
                &reqs,
                max_batch,
                PositionMode::Trained,
                None,
            );
            let a: Vec<_> = a.into_iter().map(|x| x.0).collect();
            let b: Vec<_> = b.into_iter().map(|x| x.0).collect();
            assert_eq!(a, b, "{name} batch {max_batch}");
        }
        println!("{name}: tensor path with the decode kernel on {dev:?} = host engine");
    }
}

/// The tensor path's QKV split with rotary (a CUDA kernel on a GPU) equals its composed twin
/// (per-head views, candle's rope, concatenation) for partial, full and no rotary dims, in
/// every dtype.
#[test]
fn qkv_rotary_equals_its_composed_twin_on_the_test_device() {
    use blockformer::kernels::pool_attention::{qkv_rotary, qkv_rotary_reference};
    use candle_core::Tensor;
    let dev = test_device();
    // (positions, heads, head_dim, rotary dims)
    for (n, heads, hd, rd) in [
        (37, 3, 64, 16),
        (5, 2, 32, 32),
        (9, 4, 16, 0),
        (300, 2, 128, 32),
    ] {
        if rd == 0 && !dev.is_cpu() {
            // candle cannot allocate the empty cos/sin tensors on CUDA (CUDA_ERROR_INVALID_VALUE).
            continue;
        }
        let qkv = Tensor::randn(0f32, 1.0, (n, heads * 3 * hd), &dev).unwrap();
        let angles = Tensor::rand(0f32, std::f32::consts::TAU, (n, rd / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        // 16-bit: the composed rope rounds after each product; up to two steps of the type at |x| < 8.
        for (dt, tol) in [
            (DType::F32, 1e-6),
            (DType::BF16, 6.25e-2),
            (DType::F16, 8e-3),
        ] {
            let (x, c, s) = (
                qkv.to_dtype(dt).unwrap(),
                cos.to_dtype(dt).unwrap(),
                sin.to_dtype(dt).unwrap(),
            );
            let got = qkv_rotary(&x, &c, &s, heads, rd).unwrap();
            let want = qkv_rotary_reference(&x, &c, &s, heads, rd).unwrap();
            assert_eq!(got.dims(), &[3, heads, n, hd]);
            let diff = max_tensor_diff(&got, &want);
            println!("qkv rotary {n}x{heads}x{hd} rd {rd} {dt:?} on {dev:?}: max |diff| {diff}");
            assert!(
                diff <= tol,
                "{n}x{heads}x{hd} rd {rd} {dt:?}: max |diff| {diff}"
            );
        }
    }
}

/// Largest elementwise difference of two tensors of one shape, in float32.
fn max_tensor_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs_diff(&to_f32(a), &to_f32(b))
}
