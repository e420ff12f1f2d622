//! `blockformer bench`: the cost model against hand-computed numbers, the runner on tiny
//! models, batch auto-tuning, and the command line (tiny models, tiny lengths).

use blockformer::bench::roofline::{
    cost, engine_steps, step_bandwidth, BandwidthSample, Kind, Machine, MemoryModel, Part,
    Roofline, Workload,
};
use blockformer::bench::{self, chart, report, BandwidthCheck, BenchReport, BenchSpec, Setting};
use blockformer::config::{BlockConfig, EmbedderConfig, ModelConfig, NeoXConfig, Projection};
use blockformer::kernels::attention::KvDtype;
use blockformer::model::Model;
use candle_core::Device;
use std::process::Command;
use std::sync::Arc;

fn tiny_neox() -> NeoXConfig {
    // layer_params = 4*4 + (3*16 + 12) + (16 + 4) + (32 + 8) + (32 + 4) + 2*4 = 180
    // (rotary_pct 0.5: an even number of rotary dims at head dim 4)
    NeoXConfig {
        rotary_pct: 0.5,
        ..NeoXConfig::pythia(10, 1, 4, 1, 8)
    }
}

fn tiny_block() -> BlockConfig {
    BlockConfig {
        embedder: EmbedderConfig {
            vocab_size: 10,
            hidden_size: 2,
            projection_method: Projection::Concat,
        },
        block_decoder: tiny_neox(),
        token_decoder: tiny_neox(),
        expansion_ratio: 1,
        ..BlockConfig::main(2, 10, 1, 4)
    }
}

fn machine(flops: f64, bandwidth: f64) -> Machine {
    Machine {
        flops,
        bf16_flops: 0.0,
        bandwidth,
        read_bandwidth: bandwidth,
        copy_bandwidth: bandwidth,
        cpu: "test".into(),
        threads: 1,
        matmul_n: 0,
        buffer_mib: 0,
        probed_at: 0,
    }
}

#[test]
fn vanilla_cost_matches_hand_computation() {
    let cfg = ModelConfig::Vanilla(tiny_neox());
    assert_eq!(tiny_neox().layer_params(), 180);
    let w = Workload {
        batch: 2,
        prompt_len: 3,
        new_tokens: 2,
    };
    let k = cost(&cfg, &w);
    assert_eq!(k.len(), 8, "2 steps x (embed, dense, attention, LM head)");
    let fb: Vec<(f64, f64)> = k.iter().map(|k| (k.flops, k.bytes)).collect();
    // Step 0 (prefill of 3 tokens, 2 rows):
    //   embed: read + write 2*3 vectors of 4 floats = 192 B
    //   dense: 2*2*3*180 FLOPs, weights 4*180 B
    //   attention: keys 1+2+3 = 6, 4*W*keys*B = 4*4*6*2 FLOPs; KV write 3 + read 3 positions
    //              x (K, V) x W x 4 B x 2 rows = 384 B
    //   LM head (last position): 2*2*10*4 FLOPs; weights 160 B + logits written and read 160 B
    // Step 1 (1 token over a cache of 3):
    //   embed 64 B; dense 720 FLOPs / 720 B; attention keys 4: 128 FLOPs, (4 + 1) x 2 x 4 x 4 x 2
    //   = 320 B; LM head as before.
    let want = [
        (0.0, 192.0),
        (2160.0, 720.0),
        (192.0, 384.0),
        (160.0, 320.0),
        (0.0, 64.0),
        (720.0, 720.0),
        (128.0, 320.0),
        (160.0, 320.0),
    ];
    assert_eq!(fb, want);
    assert!(k[..4].iter().all(|k| k.prefill()) && !k[4].prefill());
    // One model call per step; max(F/peak, B/bw) per call at 1000 FLOP/s and 1000 B/s:
    // step 0: F 2512, B 1616 -> 2.512 s (compute); step 1: F 1008, B 1424 -> 1.424 s (memory).
    assert!(k.iter().all(|x| x.call == x.step));
    let r = Roofline::bound(&cfg, &w, &machine(1000.0, 1000.0));
    assert!((r.seconds - 3.936).abs() < 1e-9, "{}", r.seconds);
    assert!((r.prefill_s - 2.512).abs() < 1e-9);
    assert!((r.decode_s - 1.424).abs() < 1e-9);
    assert!((r.tokens_per_s - 4.0 / 3.936).abs() < 1e-9);
    assert_eq!(r.flops, 3520.0);
    assert_eq!(r.bytes, 3040.0);
    // Per kernel: 0.192 + 2.16 + 0.384 + 0.32 + 0.064 + 0.72 + 0.32 + 0.32 = 4.48 s.
    assert!((r.kernel_seconds - 4.48).abs() < 1e-9);
    // Step 1 is memory-bound; its KV traffic takes 320 B / 1000 B/s.
    assert!((r.memory_bound_s - 1.424).abs() < 1e-9);
    assert!((r.kv_s - 0.32).abs() < 1e-9, "{}", r.kv_s);
    let parts = r.embedder_s + r.block_decoder_s + r.lm_head_s;
    assert!((parts - r.seconds).abs() < 1e-9 && r.token_decoder_s == 0.0);
    // LM head: all of step 1's share (0.32 of 1.424), 0.32 / 3.056 of step 0's 2.512 s.
    assert!((r.lm_head_s - (0.32 + 2.512 * 0.32 / 3.056)).abs() < 1e-9);
}

#[test]
fn block_cost_follows_the_engine_steps() {
    let c = tiny_block();
    let cfg = ModelConfig::Block(c.clone());
    cfg.validate("tiny").unwrap();
    // P = 3 -> padded to 4 = 2 blocks; G = 3 -> 2 engine steps (2 tokens, then 1).
    let w = Workload {
        batch: 2,
        prompt_len: 3,
        new_tokens: 3,
    };
    let k = cost(&cfg, &w);
    // Step 0: embed, bd dense, bd attention, td prefix dense, td attention, LM head, then one
    // more token: dense, attention, LM head. Step 1: the first six only (1 token wanted).
    assert_eq!(k.len(), 9 + 6);
    assert_eq!(k.iter().filter(|k| k.kind == Kind::LmHead).count(), 3);
    assert_eq!(k.iter().filter(|k| k.prefill()).count(), 9);
    let (b, n) = (2.0, 180.0);
    // Embedder: 2 rows x 2 blocks x 2 tokens x d_e 2, read and written.
    assert_eq!((k[0].flops, k[0].bytes), (0.0, 2.0 * 4.0 * 8.0 * 2.0));
    // Block decoder over 2 prompt blocks.
    assert_eq!(k[1].part, Part::BlockDecoder);
    assert_eq!((k[1].flops, k[1].bytes), (2.0 * b * 2.0 * n, 4.0 * n));
    // Causal attention over 2 blocks: keys 1 + 2 = 3; KV 2 written + 2 read.
    assert_eq!(
        (k[2].flops, k[2].bytes),
        (b * 4.0 * 4.0 * 3.0, b * 4.0 * 2.0 * 4.0 * 4.0)
    );
    // Token decoder prefix step: expansion D x R*H plus R = 1 position through the stack;
    // the expansion weights and bias and the layers are read once.
    assert_eq!(k[3].part, Part::TokenDecoder);
    assert_eq!(
        (k[3].flops, k[3].bytes),
        (2.0 * b * 16.0 + 2.0 * b * n, 4.0 * 20.0 + 4.0 * n)
    );
    // LM head: 2 rows x V 10 x H 4.
    assert_eq!(
        (k[5].flops, k[5].bytes),
        (2.0 * b * 40.0, 160.0 + 2.0 * 4.0 * b * 10.0)
    );
    // Second token of the block: one position over the prefix: keys 2.
    assert_eq!(
        (k[6].flops, k[6].bytes),
        (2.0 * b * n, 4.0 * n + 4.0 * b * 4.0)
    );
    assert_eq!(
        (k[7].flops, k[7].bytes),
        (b * 4.0 * 4.0 * 2.0, b * 4.0 * 2.0 * 4.0 * 3.0)
    );
    // Step 1: the block decoder runs the generated block over 2 cached blocks: keys 3.
    assert_eq!((k[10].flops, k[10].bytes), (2.0 * b * n, 4.0 * n));
    assert_eq!(
        (k[11].flops, k[11].bytes),
        (b * 4.0 * 4.0 * 3.0, b * 4.0 * 2.0 * 4.0 * 4.0)
    );
    // Calls: block decoder, token decoder (prefix), token decoder (token 1); then the block
    // decoder and the token decoder (prefix) of step 1.
    let calls: Vec<usize> = k.iter().map(|k| k.call).collect();
    assert_eq!(calls, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]);
    let r = Roofline::bound(&cfg, &w, &machine(1e3, 1e3));
    let per_kernel: f64 = k.iter().map(|k| (k.flops / 1e3).max(k.bytes / 1e3)).sum();
    let per_call: f64 = (0..5)
        .map(|c| {
            let f: f64 = k.iter().filter(|k| k.call == c).map(|k| k.flops).sum();
            let b: f64 = k.iter().filter(|k| k.call == c).map(|k| k.bytes).sum();
            (f / 1e3).max(b / 1e3)
        })
        .sum();
    assert!((r.seconds - per_call).abs() < 1e-9);
    assert!((r.kernel_seconds - per_kernel).abs() < 1e-9);
    assert!(r.kernel_seconds >= r.seconds);
    let parts = r.embedder_s + r.block_decoder_s + r.token_decoder_s + r.lm_head_s;
    assert!((parts - r.seconds).abs() < 1e-9);
    assert!(r.lm_head_s > 0.0 && r.token_decoder_s > 0.0);
}

#[test]
fn memory_model_counts_prefill_groups() {
    let cfg = ModelConfig::Block(tiny_block());
    let ModelConfig::Block(c) = &cfg else {
        unreachable!()
    };
    // 4096 prompt blocks per row: two rows per group of PREFILL_CHUNK positions.
    let p = 2 * blockformer::model::gpt_neox::PREFILL_CHUNK * c.block_length;
    let mm = MemoryModel::new(&cfg, p, 4);
    assert_eq!(mm.rows_per_group, 1);
    let mm = MemoryModel::new(&cfg, p / 4, 4);
    assert_eq!(mm.rows_per_group, 2);
    let per = mm.activations_per_sample;
    assert_eq!(mm.activations(1), per);
    assert_eq!(mm.activations(2), 2 * per);
    let four = mm.activations(4);
    assert_eq!(four, 4 * per - 2 * mm.group_buffers_per_sample);
    assert!(four < 4 * per);
    assert_eq!(mm.total(4), mm.weights + 4 * mm.kv_per_sample + four);
}

#[test]
fn memory_model_and_auto_tune() {
    let cfg = ModelConfig::Block(tiny_block());
    let mm = MemoryModel::new(&cfg, 3, 3);
    // Block decoder: 2 prompt blocks + 2 generated + 1 = 5 blocks x K,V x 4 wide x 4 B;
    // token decoder: R + L - 1 = 2 positions.
    assert_eq!(mm.kv_per_sample, 5 * 2 * 4 * 4 + 2 * 2 * 4 * 4);
    let per = mm.kv_per_sample + mm.activations_per_sample;
    assert_eq!(
        mm.largest_batch(mm.weights + 100 + 3 * per, 100, 1000),
        Some(3)
    );
    assert_eq!(
        mm.largest_batch(mm.weights + 100 + 21 * per, 100, 1000),
        Some(16)
    );
    assert_eq!(
        mm.largest_batch(mm.weights + 100 + 21 * per, 100, 5),
        Some(5)
    );
    assert_eq!(mm.largest_batch(mm.weights + per - 1, 0, 1000), None);

    let model = Model::random(&cfg, 0, &Device::Cpu).unwrap();
    let mm = bench::memory_model(&model, 3, 3, KvDtype::F32);
    assert_eq!(mm.weights, bench::weight_bytes(&model));
    let per = mm.kv_per_sample + mm.activations_per_sample;
    let (b, why) = bench::auto_batch(
        &model,
        3,
        3,
        KvDtype::F32,
        mm.weights + 7 * per + 50,
        50,
        256,
    )
    .unwrap();
    assert_eq!(b, 7, "{why}");
    assert!(why.contains("batch 7"), "{why}");
    let e = bench::auto_batch(&model, 3, 3, KvDtype::F32, mm.weights / 2, 0, 256)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--memory-budget") && e.contains("one row"),
        "{e}"
    );

    // A given batch is checked against the memory left beside the loaded weights; the
    // suggestion rounds as the auto-tune does (9 rows fit: 8).
    let w = |batch| Workload {
        batch,
        prompt_len: 3,
        new_tokens: 3,
    };
    bench::check_batch_fits(&model, &w(7), KvDtype::F32, 7 * per).unwrap();
    let e = bench::check_batch_fits(&model, &w(40), KvDtype::F32, 9 * per + 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--batch-size")
            && e.contains("batch 40")
            && e.contains("largest batch that fits is 8"),
        "{e}"
    );
    let e = bench::check_batch_fits(&model, &w(2), KvDtype::F32, per / 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not even one row fits"), "{e}");
}

#[test]
fn sizes_parse() {
    assert_eq!(report::parse_bytes("8GiB", None), Ok(8 << 30));
    assert_eq!(report::parse_bytes("512M", None), Ok(512 << 20));
    assert_eq!(report::parse_bytes("1.5 GB", None), Ok(3 << 29));
    assert_eq!(report::parse_bytes("1000", None), Ok(1000));
    assert_eq!(report::parse_bytes("50%", Some(1000)), Ok(500));
    assert!(report::parse_bytes("lots", None).is_err());
    assert!(report::parse_bytes("8 parsecs", None).is_err());
    assert!(report::parse_bytes("150%", Some(1000)).is_err());
    assert_eq!(report::bytes(1536), "1.5 KiB");
    assert_eq!(Setting::of(2048, 128), Setting::PrefillHeavy);
    assert_eq!(Setting::DecodeHeavy.lengths(), (128, 2048));
    assert_eq!(Setting::of(8, 8).name(), "8+8");
}

fn tiny_models() -> Vec<(&'static str, Arc<Model>)> {
    let block = ModelConfig::Block(BlockConfig::main(4, 300, 1, 64));
    let vanilla = ModelConfig::Vanilla(NeoXConfig::pythia(300, 1, 64, 2, 256));
    vec![
        (
            "tiny_block",
            Arc::new(Model::random(&block, 0, &Device::Cpu).unwrap()),
        ),
        (
            "tiny_vanilla",
            Arc::new(Model::random(&vanilla, 0, &Device::Cpu).unwrap()),
        ),
    ]
}

#[test]
fn runner_measures_tiny_models() {
    let m = machine(1e10, 1e10);
    let spec = BenchSpec {
        runs: 2,
        warmup: 1,
        seed: 3,
        ..Default::default()
    };
    // --min-time: timed runs go on until they add up to the time asked for.
    let (_, model) = &tiny_models()[0];
    let w = Workload {
        batch: 1,
        prompt_len: 8,
        new_tokens: 8,
    };
    let timed = BenchSpec {
        runs: 1,
        warmup: 0,
        min_seconds: 0.05,
        ..Default::default()
    };
    let r = bench::bench_model(model, "t", w, &timed, None, (0, 0), |_| {}).unwrap();
    assert!(r.runs.len() > 1, "{} runs", r.runs.len());
    let total: f64 = r.runs.iter().map(|x| x.seconds).sum();
    assert!(total >= 0.05, "{total}");
    assert!(
        r.runs[..r.runs.len() - 1]
            .iter()
            .map(|x| x.seconds)
            .sum::<f64>()
            < 0.05
    );
    assert!(r.bandwidth_check.is_none() && r.bound.is_none());

    let mut rows = Vec::new();
    for (name, model) in tiny_models() {
        for batch in [1, 2] {
            let w = Workload {
                batch,
                prompt_len: 8,
                new_tokens: 8,
            };
            let mut lines = 0;
            let r = bench::bench_model(&model, name, w, &spec, Some(&m), (0, 0), |_| lines += 1)
                .unwrap();
            assert_eq!(lines, 3, "one progress line per run");
            assert_eq!(r.runs.len(), 2);
            assert_eq!(r.setting, "8+8");
            assert!(r.tokens_per_s > 0.0 && r.tokens_per_s.is_finite());
            assert!(r.tokens_per_s_min <= r.tokens_per_s && r.tokens_per_s <= r.tokens_per_s_max);
            assert_eq!(r.stats.tokens, batch * 8);
            let bound = r.bound.unwrap();
            assert!(bound.tokens_per_s > 0.0);
            assert!(r.efficiency.unwrap() > 0.0);
            // The per-kernel bound is the stricter one.
            assert!(r.kernel_efficiency.unwrap() >= r.efficiency.unwrap() * (1.0 - 1e-9));
            let c = r.bandwidth_check.unwrap();
            assert!(c.before > 0.0 && c.after > 0.0 && c.probe == m.bandwidth);
            // The memory model's KV bytes are what the engine allocates.
            let mm = bench::memory_model(&model, 8, 8, KvDtype::F32);
            assert_eq!(r.kv_bytes_per_sample, mm.kv_per_sample, "{name}");
            assert_eq!(r.kv_elem_bytes, 4);
            assert!(r.memory.peak_rss > 0 && r.memory.expected >= mm.weights);
            rows.push(r);
        }
    }
    // A machine whose bandwidth fell during a measurement is called out; one within the
    // tolerance is not.
    rows[0].bandwidth_check = Some(BandwidthCheck {
        probe: 50e9,
        before: 49e9,
        after: 30e9,
    });
    for r in &mut rows[1..] {
        r.bandwidth_check = Some(BandwidthCheck {
            probe: 50e9,
            before: 47e9,
            after: 55e9,
        });
    }
    let rep = BenchReport {
        machine: Some(m),
        threads: 1,
        runs: 2,
        min_seconds: 0.0,
        warmup: 1,
        ratios: bench::ratios(&rows[..2], &rows[2..]),
        compare: Some(("tiny_block".into(), "tiny_vanilla".into())),
        rows,
        notes: vec![],
    };
    assert_eq!(rep.ratios.len(), 2);
    assert_eq!(rep.ratios[1].batch_a, 2);
    let v: serde_json::Value = serde_json::from_str(&report::json(&rep)).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 4);
    assert!(v["rows"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["rows"][0]["bound"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["rows"][3]["stats"]["lm_head_s"].as_f64().is_some());
    let text = report::text(&rep);
    assert!(text.contains("tiny_vanilla") && text.contains("tiny_block / tiny_vanilla"));
    assert!(text.contains("kernel eff"));
    let warnings: Vec<&str> = text.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("tiny_block 8+8 batch 1")
            && warnings[0].contains("49.0 GB/s before and 30.0 after")
            && warnings[0].contains("probe's 50.0"),
        "{}",
        warnings[0]
    );
    let svg = chart::svg(&rep.rows, "t");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 4, "2 lines + 2 bounds");
    assert_eq!(svg.matches("<svg").count(), 1);
}

/// `--retry-unsteady`: a measurement during which the machine's bandwidth moved away from the
/// probe's is repeated against the bandwidth measured again, and the report says what it
/// discarded; without retries the first measurement stands, flagged.
#[test]
fn unsteady_measurements_are_repeated_against_the_bandwidth_measured_again() {
    // A probe no machine reaches: the first measurement always reads as moved.
    let m = machine(1e10, 1e15);
    let (_, model) = &tiny_models()[1];
    let w = Workload {
        batch: 1,
        prompt_len: 8,
        new_tokens: 8,
    };
    let spec = BenchSpec {
        runs: 1,
        warmup: 0,
        unsteady_retries: 1,
        ..Default::default()
    };
    let mut lines = Vec::new();
    let r = bench::bench_model(model, "t", w, &spec, Some(&m), (0, 0), |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert_eq!(r.discarded.len(), 1);
    let first = r.discarded[0].bandwidth_check;
    assert!(first.probe == 1e15 && first.moved());
    assert!(r.discarded[0].tokens_per_s > 0.0);
    // The kept measurement's bound uses the bandwidth measured again.
    let c = r.bandwidth_check.unwrap();
    assert!(c.probe > 0.0 && c.probe < 1e15, "{}", c.probe);
    let again = Machine {
        bandwidth: c.probe,
        ..m.clone()
    };
    let want = bench::roofline_bound(model, &w, &again, KvDtype::F32);
    assert_eq!(r.bound.unwrap().tokens_per_s, want.tokens_per_s);
    assert!(
        lines.iter().any(|l| l.contains("measuring again (1/1)")),
        "{lines:?}"
    );
    let note = report::discarded_note(&r).unwrap();
    assert!(
        note.contains("t 8+8 batch 1: measured 2 times")
            && note.contains("probe 1000000.0 GB/s")
            && note.contains(&format!("against {:.1} GB/s measured again", c.probe / 1e9)),
        "{note}"
    );

    let once = BenchSpec {
        unsteady_retries: 0,
        ..spec
    };
    let r = bench::bench_model(model, "t", w, &once, Some(&m), (0, 0), |_| {}).unwrap();
    assert!(r.discarded.is_empty() && report::discarded_note(&r).is_none());
    assert!(r.bandwidth_check.unwrap().moved());
    assert!(report::bandwidth_warning(&r).is_some());
}

#[test]
fn each_step_is_bound_by_the_bandwidth_read_around_it() {
    let at = |step, gbs: f64| BandwidthSample {
        step,
        bandwidth: gbs * 1e9,
    };
    let samples = [at(0, 40.0), at(3, 60.0), at(5, 80.0)];
    // Steps 0-2 lie between the readings after 0 and 3 steps, steps 3-4 between 3 and 5.
    for (step, want) in [
        (0, 50.0),
        (2, 50.0),
        (3, 70.0),
        (4, 70.0),
        (5, 80.0),
        (9, 80.0),
    ] {
        assert_eq!(
            step_bandwidth(&samples, step),
            Some(want * 1e9),
            "step {step}"
        );
    }
    assert_eq!(step_bandwidth(&samples[1..], 0), Some(60e9));
    assert_eq!(step_bandwidth(&[], 0), None);

    // A memory-bound run: steady readings give the plain bound at that bandwidth; a faster
    // second half shortens exactly the steps it covers.
    let cfg = ModelConfig::Vanilla(tiny_neox());
    let w = Workload {
        batch: 2,
        prompt_len: 3,
        new_tokens: 4,
    };
    let m = machine(1e15, 1e9);
    let elems = (4.0, 4.0, 4.0);
    let steady = [at(0, 2.0), at(2, 2.0), at(4, 2.0)];
    let plain = Roofline::bound_typed(&cfg, &w, &machine(1e15, 2e9), 4.0, 4.0, 4.0);
    let sampled = Roofline::bound_sampled(&cfg, &w, &m, elems, &steady);
    assert!((sampled.seconds - plain.seconds).abs() <= 1e-12 * plain.seconds);
    assert_eq!(Roofline::bound_sampled(&cfg, &w, &m, elems, &[]).seconds, {
        Roofline::bound_typed(&cfg, &w, &m, 4.0, 4.0, 4.0).seconds
    });
    let faster = [at(0, 2.0), at(2, 2.0), at(4, 6.0)];
    let got = Roofline::bound_sampled(&cfg, &w, &m, elems, &faster).seconds;
    let bytes_of = |steps: std::ops::Range<usize>| -> f64 {
        cost(&cfg, &w)
            .iter()
            .filter(|k| steps.contains(&k.step))
            .map(|k| k.bytes)
            .sum()
    };
    let want = bytes_of(0..2) / 2e9 + bytes_of(2..4) / 4e9;
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
}

#[test]
fn bandwidth_read_during_runs_bounds_their_steps() {
    let (_, model) = &tiny_models()[1];
    let w = Workload {
        batch: 2,
        prompt_len: 8,
        new_tokens: 6,
    };
    let spec = BenchSpec {
        runs: 2,
        warmup: 0,
        // A reading after every step.
        sample_every: 1e-9,
        ..Default::default()
    };
    let m = Machine {
        buffer_mib: 1,
        ..machine(1e15, 1e15)
    };
    // Readings sit between the engine steps the cost model counts, block models too.
    for (name, model) in tiny_models() {
        let r = bench::bench_model(&model, name, w, &spec, Some(&m), (0, 0), |_| {}).unwrap();
        let steps = engine_steps(&model.config, w.new_tokens);
        for run in &r.runs {
            let at: Vec<usize> = run.bandwidth.iter().map(|s| s.step).collect();
            assert_eq!(at, (0..=steps).collect::<Vec<_>>(), "{name}");
            assert!(run
                .bandwidth
                .iter()
                .all(|s| s.bandwidth > 0.0 && s.bandwidth < 1e15));
        }
    }
    let r = bench::bench_model(model, "t", w, &spec, Some(&m), (0, 0), |_| {}).unwrap();
    let steps = engine_steps(&model.config, w.new_tokens);
    // The median run's readings bound it, not the probe's 1e15 B/s; the check around the
    // measurement is left out.
    let med = r
        .runs
        .iter()
        .find(|x| x.seconds == r.seconds)
        .expect("the median run");
    let want = bench::roofline_bound_sampled(model, &w, &m, KvDtype::F32, &med.bandwidth);
    assert_eq!(r.bound.unwrap().tokens_per_s, want.tokens_per_s);
    assert!(
        r.bound.unwrap().tokens_per_s
            < bench::roofline_bound(model, &w, &m, KvDtype::F32).tokens_per_s
    );
    assert!(r.bandwidth_check.is_none() && r.discarded.is_empty());
    let s = r.sampled_bandwidth.unwrap();
    assert_eq!(s.readings, steps + 1);
    assert!(s.min <= s.mean && s.mean <= s.max);
    // The sampler's buffers (two of 1 MiB) are counted in the expected memory.
    assert_eq!(r.memory.sampler, 2 << 20);
    assert!(r.memory.expected >= r.memory.weights + r.memory.kv_cache + r.memory.sampler);
    let note = report::sampled_note(&r).unwrap();
    assert!(
        note.contains(&format!(
            "t 8+6 batch 2: bound at the bandwidth read every {} s",
            1e-9
        )) && note.contains(&format!("({} readings)", steps + 1)),
        "{note}"
    );
    assert!(report::row_notes(&r).any(|l| l == note));
}

#[test]
fn probe_measures_positive_speeds() {
    let m = Machine::probe_with(64, 4, 1).unwrap();
    assert!(m.flops > 0.0 && m.bandwidth > 0.0 && m.threads >= 1);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sub").join("probe.json");
    // (the standard probe takes seconds: only the cached path is exercised here)
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let cached = Machine {
        threads: rayon::current_num_threads(),
        cpu: blockformer::bench::roofline::cpu_model(),
        // A bfloat16 rate too: a cache without one is probed again on a CPU that has one.
        bf16_flops: 3e10,
        ..machine(1.5e10, 2.5e10)
    };
    std::fs::write(&p, serde_json::to_string(&cached).unwrap()).unwrap();
    let (got, src) = Machine::load_or_probe(Some(&p), false).unwrap();
    assert_eq!(got, cached);
    assert!(matches!(
        src,
        blockformer::bench::roofline::ProbeSource::Cache(_)
    ));
}

fn bf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blockformer"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_compares_two_model_folders() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, model) in tiny_models() {
        let p = dir.path().join(name);
        blockformer::checkpoint::save(&model, &p, None).unwrap();
        paths.push(p.display().to_string());
    }
    // A cached probe for 1 thread, so the command does not measure the machine.
    let probe = dir.path().join("probe.json");
    let m = Machine {
        threads: 1,
        cpu: blockformer::bench::roofline::cpu_model(),
        bf16_flops: 4e10,
        ..machine(2e10, 1e10)
    };
    std::fs::write(&probe, serde_json::to_string(&m).unwrap()).unwrap();
    // One thread, 8 + 8 tokens, one timed run and no warm-up, at batch sizes `batch`.
    let tiny_bench = |models: &[&str], batch: &str, extra: &[&str]| {
        let mut args = vec!["bench", "--threads", "1"];
        args.extend_from_slice(models);
        args.extend_from_slice(&[
            "--prompt-len",
            "8",
            "--new-tokens",
            "8",
            "--batch-size",
            batch,
            "--runs",
            "1",
            "--warmup",
            "0",
        ]);
        args.extend_from_slice(extra);
        bf(&args)
    };
    let chart = dir.path().join("c.svg");
    let (ok, out, err) = tiny_bench(
        &["--compare", &paths[0], &paths[1]],
        "1,2",
        &[
            "--probe-cache",
            probe.to_str().unwrap(),
            "--chart",
            chart.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("cached in"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 4);
    assert_eq!(v["ratios"].as_array().unwrap().len(), 2);
    assert_eq!(v["compare"][0], "tiny_block");
    assert!(v["rows"][0]["efficiency"].as_f64().unwrap() > 0.0);
    assert_eq!(v["machine"]["flops"].as_f64(), Some(2e10));
    assert!(v["rows"][0]["bandwidth_check"]["after"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.contains("tiny_vanilla") && svg.contains("</svg>"));

    // The readable report ends with each part's efficiency; a block model's LM head has its
    // own.
    let (ok, out, err) = tiny_bench(
        &["--model", &paths[0]],
        "1",
        &["--probe-cache", probe.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let parts = out
        .split("Efficiency by part")
        .nth(1)
        .unwrap_or_else(|| panic!("{out}"));
    let row = parts
        .lines()
        .find(|l| l.starts_with("tiny_block"))
        .unwrap_or_else(|| panic!("{parts}"));
    assert!(row.matches('%').count() >= 5, "{row}");

    // A bandwidth given by flag is not this machine's: no check against it.
    let (ok, out, err) = tiny_bench(
        &["--model", &paths[1]],
        "1",
        &[
            "--probe-cache",
            probe.to_str().unwrap(),
            "--bandwidth-gbs",
            "20",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert!(!err.contains("warning:"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["machine"]["bandwidth"].as_f64(), Some(2e10));
    assert!(v["rows"][0]["bandwidth_check"].is_null());

    // A probe before every measurement: each row carries the one its bound started from, and
    // the cached probe is replaced by the newest.
    let fresh = dir.path().join("fresh-probe.json");
    let (ok, out, err) = tiny_bench(
        &["--model", &paths[1]],
        "1,2",
        &[
            "--probe-cache",
            fresh.to_str().unwrap(),
            "--reprobe-each",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("probing this machine again").count(),
        1,
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert!(r["probe"]["flops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["probe"]["bandwidth"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(
            r["bandwidth_check"]["probe"].as_f64(),
            r["probe"]["bandwidth"].as_f64()
        );
    }
    assert!(v["notes"][0].as_str().unwrap().contains("--reprobe-each"));
    let cached: Machine = serde_json::from_str(&std::fs::read_to_string(&fresh).unwrap()).unwrap();
    assert_eq!(Some(cached.flops), rows[1]["probe"]["flops"].as_f64());

    // The bound alone, at given speeds.
    let (ok, out, err) = bf(&[
        "bench",
        "--threads",
        "1",
        "--model",
        &paths[0],
        "--prompt-len",
        "8",
        "--new-tokens",
        "8",
        "--batch-size",
        "4",
        "--dry-run",
        "--peak-gflops",
        "100",
        "--bandwidth-gbs",
        "20",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let model =
        blockformer::checkpoint::load(std::path::Path::new(&paths[0]), None, None, &Device::Cpu)
            .unwrap()
            .model;
    let w = Workload {
        batch: 4,
        prompt_len: 8,
        new_tokens: 8,
    };
    // The bench packs the model for the CPU; a head this narrow keeps no bfloat16 screen, so
    // the bound is the plain float32 one.
    let screened = v[0]["lm_head_screened"].as_bool().unwrap();
    assert!(!screened, "a {}-column head", model.config.vocab_size());
    let want = Roofline::bound(&model.config, &w, &machine(1e11, 2e10));
    let got = v[0]["bound"]["tokens_per_s"].as_f64().unwrap();
    assert!(
        (got / want.tokens_per_s - 1.0).abs() < 1e-9,
        "{got} vs {}",
        want.tokens_per_s
    );

    // Tables, auto-tuned batch, no roofline.
    let (ok, out, err) = bf(&[
        "bench",
        "--threads",
        "1",
        "--model",
        &paths[1],
        "--setting",
        "custom",
        "--prompt-len",
        "4",
        "--new-tokens",
        "4",
        "--memory-budget",
        "4GiB",
        "--max-batch",
        "3",
        "--runs",
        "1",
        "--no-roofline",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("batch 3") && err.contains("capped"), "{err}");
    assert!(
        out.contains("tokens/s") && out.contains("tiny_vanilla"),
        "{out}"
    );
    assert!(out.contains("peak RSS"), "{out}");
    assert!(!out.contains("Efficiency by part"), "{out}");
}

#[test]
fn cli_rejects_bad_flags() {
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "--preset", "nope"], "unknown preset"),
        (
            &["bench", "--compare", "nope", "vanilla_31"],
            "neither a model folder nor a preset",
        ),
        (
            &["bench", "--preset", "vanilla_31", "--batch-size", "0"],
            "at least 1",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--batch-size",
                "8",
                "--memory-budget",
                "1GiB",
            ],
            "cannot be used with",
        ),
        (
            &["bench", "--preset", "vanilla_31", "--setting", "custom"],
            "--prompt-len",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--setting",
                "prefill-heavy",
                "--batch-size",
                "100000000",
                "--no-roofline",
            ],
            "largest batch that fits",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--prompt-len",
                "8",
                "--setting",
                "decode-heavy",
            ],
            "belong to --setting custom",
        ),
        (
            &["bench", "--preset", "vanilla_31", "--memory-budget", "lots"],
            "--memory-budget",
        ),
        (
            &["bench", "--preset", "vanilla_31", "--chart", "x.png"],
            "SVG",
        ),
        (&["bench"], "no model"),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--reprobe-each",
                "--no-roofline",
            ],
            "cannot be used with",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--reprobe-each",
                "--peak-gflops",
                "100",
            ],
            "cannot be used with",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--retry-unsteady",
                "2",
                "--bandwidth-gbs",
                "50",
            ],
            "cannot be used with",
        ),
        (
            &["bench", "--preset", "vanilla_31", "--retry-unsteady", "two"],
            "--retry-unsteady",
        ),
        (
            &["bench", "--preset", "vanilla_31", "--sample-bandwidth", "0"],
            "--sample-bandwidth 0: expected a positive number of seconds",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--sample-bandwidth",
                "2",
                "--retry-unsteady",
                "1",
            ],
            "cannot be used with",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--sample-bandwidth",
                "2",
                "--no-roofline",
            ],
            "cannot be used with",
        ),
        (
            &["bench", "--preset", "vanilla_31", "--min-time", "nan"],
            "--min-time NaN: expected seconds",
        ),
        (
            &[
                "bench",
                "--preset",
                "vanilla_31",
                "--prompt-len",
                "4096",
                "--new-tokens",
                "1",
                "--batch-size",
                "1",
                "--no-roofline",
            ],
            "longer than the model's context",
        ),
    ];
    for (args, want) in cases {
        let (ok, _, err) = bf(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn float16_caches_halve_the_cache_traffic_the_bound_counts() {
    // vanilla_70 at 128+2048, batch 16: every attention byte halves, nothing else moves.
    let cfg = blockformer::config::preset("vanilla_70").unwrap();
    let w = Workload {
        batch: 16,
        prompt_len: 128,
        new_tokens: 2048,
    };
    let f32s = blockformer::bench::roofline::cost_typed(&cfg, &w, 4.0, 4.0, 4.0);
    let f16s = blockformer::bench::roofline::cost_typed(&cfg, &w, 4.0, 4.0, 2.0);
    assert_eq!(f32s.len(), f16s.len());
    for (a, b) in f32s.iter().zip(&f16s) {
        assert_eq!(a.flops, b.flops);
        let want = if a.kind == Kind::Attention {
            a.bytes / 2.0
        } else {
            a.bytes
        };
        assert!((b.bytes - want).abs() <= 1e-9 * want, "{:?}", a.kind);
    }
    let m = machine(4e11, 5e10);
    let (a, b) = (
        Roofline::bound_typed(&cfg, &w, &m, 4.0, 4.0, 4.0),
        Roofline::bound_typed(&cfg, &w, &m, 4.0, 4.0, 2.0),
    );
    assert!(
        b.tokens_per_s > 1.5 * a.tokens_per_s,
        "{} vs {}",
        b.tokens_per_s,
        a.tokens_per_s
    );

    // The runner: the engine's float16 caches are what the memory model says.
    let spec = BenchSpec {
        runs: 1,
        warmup: 0,
        kv_dtype: KvDtype::F16,
        ..Default::default()
    };
    for (name, model) in tiny_models() {
        let w = Workload {
            batch: 2,
            prompt_len: 8,
            new_tokens: 8,
        };
        let r = bench::bench_model(&model, name, w, &spec, Some(&m), (0, 0), |_| {}).unwrap();
        let mm = bench::memory_model(&model, 8, 8, KvDtype::F16);
        let full = bench::memory_model(&model, 8, 8, KvDtype::F32);
        assert_eq!(r.kv_elem_bytes, 2, "{name}");
        assert_eq!(r.kv_bytes_per_sample, mm.kv_per_sample, "{name}");
        assert!(mm.kv_per_sample < full.kv_per_sample, "{name}");
        assert_eq!(r.stats.tokens, 16);
    }
}

#[test]
fn q8_0_weights_count_8_5_bits_in_the_bound_and_the_memory_model() {
    // vanilla_70 at 128+128, batch 8: the layers' and the LM head's weights shrink to 34 bytes
    // per 32, caches and activations stay.
    let cfg = blockformer::config::preset("vanilla_70").unwrap();
    let w = Workload {
        batch: 8,
        prompt_len: 128,
        new_tokens: 128,
    };
    let q = 34.0 / 32.0;
    let f32s = blockformer::bench::roofline::cost_typed(&cfg, &w, 4.0, 4.0, 4.0);
    let q8s = blockformer::bench::roofline::cost_typed(&cfg, &w, 4.0, q, 4.0);
    let ModelConfig::Vanilla(c) = &cfg else {
        unreachable!()
    };
    for (a, b) in f32s.iter().zip(&q8s) {
        assert_eq!(a.flops, b.flops);
        let want = match a.kind {
            Kind::Dense => a.bytes * q / 4.0,
            Kind::LmHead => a.bytes - (4.0 - q) * (c.vocab_size * c.hidden_size) as f64,
            _ => a.bytes,
        };
        assert!((b.bytes - want).abs() <= 1e-9 * want, "{:?}", a.kind);
    }

    // A model: all layers or none (a width that is not a multiple of 32 is named).
    let mut narrow = Model::random(&ModelConfig::Vanilla(tiny_neox()), 0, &Device::Cpu).unwrap();
    let e = narrow.quantize_q8_0().unwrap_err().to_string();
    assert!(e.contains("--quantize") && e.contains("width 4"), "{e}");
    assert_eq!(narrow.quantized_bytes(), 0);
    let cfg = ModelConfig::Vanilla(NeoXConfig::pythia(50, 2, 32, 2, 64));
    let f32_model = Model::random(&cfg, 0, &Device::Cpu).unwrap();
    let mut model = f32_model.clone();
    model.quantize_q8_0().unwrap();
    model.pack_for_host().unwrap();
    assert_eq!(model.linear_bytes_per_weight(), q);
    assert_eq!(model.packed_bytes(), 0, "nothing left in float32 panels");
    // Per layer: QKV 32x96, dense 32x32, fc1 32x64, fc2 64x32; the head 32x50 (two panels).
    let panels = |k: usize, n: usize| n.div_ceil(32) * 32 * (k + k / 16);
    let layer = panels(32, 96) + panels(32, 32) + panels(32, 64) + panels(64, 32);
    assert_eq!(model.quantized_bytes(), 2 * layer + panels(32, 50));
    let mm = bench::memory_model(&model, 8, 8, KvDtype::F32);
    assert_eq!(mm.weights, bench::weight_bytes(&model));
    // The runner's bound reads the quantized widths.
    let m = machine(4e11, 5e10);
    let spec = BenchSpec {
        runs: 1,
        warmup: 0,
        ..Default::default()
    };
    let w = Workload {
        batch: 2,
        prompt_len: 8,
        new_tokens: 8,
    };
    let mut f32_model = f32_model;
    f32_model.pack_for_host().unwrap();
    let a = bench::bench_model(
        &Arc::new(f32_model),
        "f32",
        w,
        &spec,
        Some(&m),
        (0, 0),
        |_| {},
    );
    let b = bench::bench_model(&Arc::new(model), "q8", w, &spec, Some(&m), (0, 0), |_| {});
    let (a, b) = (a.unwrap().bound.unwrap(), b.unwrap().bound.unwrap());
    assert!(b.bytes < a.bytes && b.flops == a.flops, "{b:?} vs {a:?}");
}

/// A measurement's peak memory is its own: the activation buffers a longer prompt left in the
/// model (tens of megabytes here) are released before the next measurement of the same
/// invocation, so its peak stays near what the bench expects for it (it read 1.54x before).
#[test]
fn each_measurement_starts_without_the_last_ones_buffers() {
    let (ok, out, err) = bf(&[
        "bench",
        "--threads",
        "2",
        "--preset",
        "vanilla_31",
        "--prompt-len",
        "1024",
        "--new-tokens",
        "2",
        "--batch-size",
        "16,1",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--no-roofline",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let ratio = r["memory"]["ratio"].as_f64().unwrap();
        assert!(
            (0.85..1.15).contains(&ratio),
            "batch {}: peak / expected {ratio}",
            r["batch"]
        );
    }
}

#[test]
fn a_screened_lm_head_counts_bfloat16_weights_at_the_bfloat16_rate() {
    use blockformer::bench::roofline::screen_lm_head;
    let cfg = ModelConfig::Vanilla(tiny_neox());
    let w = Workload {
        batch: 3,
        prompt_len: 5,
        new_tokens: 4,
    };
    let plain = cost(&cfg, &w);
    let mut screened = plain.clone();
    screen_lm_head(&mut screened, &cfg, 4.0);
    let ModelConfig::Vanilla(c) = &cfg else {
        unreachable!()
    };
    let (v, h) = (c.vocab_size as f64, c.hidden_size as f64);
    for (p, s) in plain.iter().zip(&screened) {
        if p.kind == Kind::LmHead {
            assert_eq!(s.kind, Kind::ScreenedLmHead);
            assert_eq!(s.flops, p.flops);
            // float32 weights out, bfloat16 weights and two bound terms per column in.
            let want = p.bytes - 4.0 * v * h + 2.0 * v * h + 8.0 * v;
            assert!((s.bytes - want).abs() < 1e-6, "{} vs {want}", s.bytes);
        } else {
            assert_eq!(s, p);
        }
    }
    // Compute-bound (slow arithmetic, fast memory): the head's FLOPs at twice the rate.
    let mut m = machine(1e3, 1e15);
    let r = Roofline::of_kernels(&plain, &w, &m, &[]);
    m.bf16_flops = 2e3;
    let q = Roofline::of_kernels(&screened, &w, &m, &[]);
    let head: f64 = plain
        .iter()
        .filter(|k| k.kind == Kind::LmHead)
        .map(|k| k.flops)
        .sum();
    let want = r.seconds - head / 1e3 + head / 2e3;
    assert!(
        (q.seconds - want).abs() < 1e-9 * want,
        "{} vs {want}",
        q.seconds
    );
    // Without a bfloat16 rate the head counts at the float32 rate.
    m.bf16_flops = 0.0;
    let f = Roofline::of_kernels(&screened, &w, &m, &[]);
    assert!((f.seconds - r.seconds).abs() < 1e-9 * r.seconds);
}
