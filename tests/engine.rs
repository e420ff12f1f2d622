//! The generation engine: consistency with the official forward over many blocks, batch
//! invariance, mixed prompt lengths, rows joining and leaving, exact lengths, EOS, sampling
//! determinism, and bad requests.

mod common;

use blockformer::generate::{
    Engine, EngineOptions, FinishReason, GenRequest, PositionMode, SamplingParams,
};
use blockformer::model::block_transformer::{BlockBatch, ForwardOptions};
use blockformer::model::{Arch, Model};
use candle_core::D;
use common::*;
use std::collections::HashMap;
use std::sync::Arc;

fn models() -> Vec<(String, Arc<Model>)> {
    fixture_dirs()
        .iter()
        .map(|d| {
            let fx = Fixture::load(d);
            (fx.name(), Arc::new(fx.model()))
        })
        .collect()
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 17 + 5) % 300)
        .collect()
}

/// Runs requests through one engine; returns (tokens, finish reason) per request.
fn run(model: &Arc<Model>, reqs: &[GenRequest], max_batch: usize) -> Vec<(Vec<u32>, FinishReason)> {
    let mut e = Engine::new(
        model.clone(),
        EngineOptions {
            positions: PositionMode::Trained,
            max_batch,
            ..Default::default()
        },
    );
    let ids: Vec<u64> = reqs.iter().map(|r| e.add(r.clone()).unwrap()).collect();
    let mut out: HashMap<u64, (Vec<u32>, Option<FinishReason>)> = HashMap::new();
    for ev in e.run_to_completion().unwrap() {
        let o = out.entry(ev.id).or_default();
        assert!(o.1.is_none(), "event after finish");
        o.0.extend(ev.tokens);
        o.1 = ev.finished;
    }
    ids.iter()
        .map(|i| {
            let (t, f) = out.remove(i).unwrap();
            (t, f.expect("finished"))
        })
        .collect()
}

fn sampled(p: Vec<u32>, n: usize, seed: u64) -> GenRequest {
    GenRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            seed,
        },
        ..GenRequest::greedy(p, n)
    }
}

#[test]
fn greedy_generation_equals_argmax_of_the_official_forward() {
    // 600 tokens: long enough for the matmul prefill path in every fixture's decoders.
    for ((name, model), len) in models()
        .into_iter()
        .flat_map(|m| [(m.clone(), 7), (m, 600)])
    {
        let p = prompt(len, 1);
        let (gen, _) = run(&model, &[GenRequest::greedy(p.clone(), 21)], 1).remove(0);
        assert_eq!(gen.len(), 21);
        // The same with the weights packed for the CPU decode kernels.
        let mut packed = (*model).clone();
        packed.pack_for_host().unwrap();
        let packed = Arc::new(packed);
        let (gen_packed, _) = run(&packed, &[GenRequest::greedy(p.clone(), 21)], 1).remove(0);
        assert_eq!(gen_packed, gen, "{name}: packed weights");
        let mut seq = p.clone();
        seq.extend(&gen);
        match &model.arch {
            Arch::Block(bt) => {
                // The engine left-pads to a block boundary, exactly like this batch.
                let l = bt.cfg.block_length;
                let pad = (l - p.len() % l) % l;
                let mut ids = vec![0u32; pad];
                ids.extend(&seq);
                let mut mask = vec![0u8; pad];
                mask.extend(vec![1u8; seq.len()]);
                while !ids.len().is_multiple_of(l) {
                    ids.push(0);
                    mask.push(0);
                }
                let n = ids.len() / l;
                let batch = BlockBatch {
                    batch: 1,
                    n_blocks: n,
                    block_length: l,
                    block_mask: mask.chunks(l).map(|b| b.contains(&1) as u8).collect(),
                    input_ids: ids,
                    attention_mask: mask,
                    labels: None,
                };
                let logits = bt
                    .forward(
                        &batch,
                        ForwardOptions {
                            skip_padding_blocks: false,
                            want_logits: true,
                        },
                    )
                    .unwrap()
                    .logits
                    .unwrap();
                let argmax: Vec<u32> = logits
                    .argmax(D::Minus1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, &t) in gen.iter().enumerate() {
                    let q = pad + p.len() + i; // padded position of generated token i
                    assert_eq!(argmax[q - l], t, "{name}: token {i}");
                }
            }
            Arch::Vanilla(v) => {
                let out = v.forward(&seq, 1, seq.len(), None, None).unwrap();
                let argmax: Vec<u32> = out
                    .logits
                    .argmax(D::Minus1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, &t) in gen.iter().enumerate() {
                    assert_eq!(argmax[p.len() + i - 1], t, "{name}: token {i}");
                }
            }
        }
    }
}

#[test]
fn outputs_do_not_depend_on_the_batch() {
    for (name, model) in models() {
        let reqs: Vec<GenRequest> = [1usize, 4, 5, 8, 13, 2]
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                if i % 2 == 0 {
                    GenRequest::greedy(prompt(len, i as u32), 10 + i)
                } else {
                    sampled(prompt(len, i as u32), 10 + i, 40 + i as u64)
                }
            })
            .collect();
        let alone: Vec<_> = reqs
            .iter()
            .map(|r| run(&model, std::slice::from_ref(r), 1).remove(0))
            .collect();
        for max_batch in [2, 3, 6] {
            let together = run(&model, &reqs, max_batch);
            assert_eq!(together, alone, "{name}: max_batch {max_batch}");
        }
    }
}

#[test]
fn max_new_tokens_is_honoured_exactly() {
    for (name, model) in models() {
        let reqs: Vec<GenRequest> = (0..10)
            .map(|n| GenRequest::greedy(prompt(3 + n % 4, 2), n))
            .collect();
        for (n, (toks, fin)) in run(&model, &reqs, 4).into_iter().enumerate() {
            assert_eq!(toks.len(), n, "{name}: max_new_tokens {n}");
            assert_eq!(fin, FinishReason::Length);
        }
    }
}

#[test]
fn eos_ends_a_row_and_others_go_on() {
    for (name, model) in models() {
        let p = prompt(6, 3);
        let (free, _) = run(&model, &[GenRequest::greedy(p.clone(), 12)], 1).remove(0);
        let eos = free[6]; // stop at the 7th generated token (first occurrence may be earlier)
        let first = free.iter().position(|&t| t == eos).unwrap();
        let reqs = [
            GenRequest {
                eos_token_id: Some(eos),
                ..GenRequest::greedy(p.clone(), 12)
            },
            GenRequest::greedy(prompt(9, 4), 12),
        ];
        let out = run(&model, &reqs, 2);
        assert_eq!(
            out[0],
            (free[..first].to_vec(), FinishReason::Eos),
            "{name}"
        );
        assert_eq!(out[1].0.len(), 12, "{name}: the other row continues");
    }
}

#[test]
fn same_seed_same_text_other_seed_other_text() {
    for (name, model) in models() {
        let a = run(&model, &[sampled(prompt(5, 1), 24, 7)], 1);
        let b = run(&model, &[sampled(prompt(5, 1), 24, 7)], 1);
        let c = run(&model, &[sampled(prompt(5, 1), 24, 8)], 1);
        assert_eq!(a, b, "{name}");
        assert_ne!(a, c, "{name}");
    }
}

#[test]
fn rows_join_mid_run_and_cancelled_rows_leave() {
    for (name, model) in models() {
        let a = GenRequest::greedy(prompt(6, 5), 64);
        let b = GenRequest::greedy(prompt(3, 6), 9);
        let alone_b = run(&model, std::slice::from_ref(&b), 1).remove(0).0;
        let mut e = Engine::new(model.clone(), EngineOptions::default());
        let ia = e.add(a).unwrap();
        e.step().unwrap();
        e.step().unwrap();
        let ib = e.add(b).unwrap();
        let mut got_b = Vec::new();
        let mut a_cancelled = false;
        while !e.is_idle() {
            for ev in e.step().unwrap() {
                if ev.id == ib {
                    got_b.extend(ev.tokens);
                    if ev.finished.is_some() && !a_cancelled {
                        assert!(e.cancel(ia));
                        a_cancelled = true;
                    }
                } else if ev.finished == Some(FinishReason::Cancelled) {
                    assert_eq!(ev.id, ia);
                }
            }
        }
        assert_eq!(got_b, alone_b, "{name}: joined row");
        assert!(a_cancelled && !e.cancel(ia), "{name}");
        assert_eq!(e.kv_cache_bytes(), 0);
    }
}

#[test]
fn rows_reusing_the_caches_of_finished_and_cancelled_rows_decode_the_same() {
    for (name, model) in models() {
        let reqs = [
            GenRequest::greedy(prompt(7, 1), 9),
            GenRequest::greedy(prompt(13, 2), 5),
            GenRequest::greedy(prompt(3, 3), 12),
            // Fits the cancelled row's cache.
            GenRequest::greedy(prompt(20, 5), 10),
        ];
        let fresh = run(&model, &reqs, 4);
        let mut e = Engine::new(model.clone(), EngineOptions::default());
        // A cancelled row leaves a half-filled cache behind.
        let long = e.add(GenRequest::greedy(prompt(11, 4), 40)).unwrap();
        e.step().unwrap();
        e.step().unwrap();
        assert!(e.cancel(long));
        e.step().unwrap();
        for round in 0..3 {
            let ids: Vec<u64> = reqs.iter().map(|r| e.add(r.clone()).unwrap()).collect();
            let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
            for ev in e.run_to_completion().unwrap() {
                got.entry(ev.id).or_default().extend(ev.tokens);
            }
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(got[id], fresh[i].0, "{name}: round {round}, request {i}");
            }
        }
    }
}

#[test]
fn bad_requests_are_rejected_with_the_field_named() {
    let (_, model) = models().remove(0);
    let vocab = model.config.vocab_size() as u32;
    let ctx = model.config.context_length();
    let mut e = Engine::new(model, EngineOptions::default());
    let cases: Vec<(GenRequest, &str)> = vec![
        (GenRequest::greedy(vec![], 4), "empty prompt"),
        (
            GenRequest::greedy(vec![1, vocab], 4),
            "out of the vocabulary",
        ),
        (
            GenRequest::greedy(vec![1; ctx + 1], 4),
            "longer than the model's context",
        ),
        (
            GenRequest {
                prompt_mask: Some(vec![1]),
                ..GenRequest::greedy(vec![1, 2], 4)
            },
            "attention_mask",
        ),
        (
            GenRequest {
                prompt_mask: Some(vec![1, 0]),
                ..GenRequest::greedy(vec![1, 2], 4)
            },
            "only left padding",
        ),
        (
            GenRequest {
                sampling: SamplingParams {
                    temperature: f32::NAN,
                    ..SamplingParams::greedy()
                },
                ..GenRequest::greedy(vec![1], 4)
            },
            "temperature",
        ),
        (
            GenRequest {
                sampling: SamplingParams {
                    top_p: 1.5,
                    ..SamplingParams::greedy()
                },
                ..GenRequest::greedy(vec![1], 4)
            },
            "top_p",
        ),
    ];
    for (req, want) in cases {
        let err = e.add(req).unwrap_err().to_string();
        assert!(err.contains(want), "expected `{want}` in `{err}`");
    }
    assert!(e.is_idle());
}

#[test]
fn f16_kv_cache_stays_close_to_f32() {
    use blockformer::kernels::attention::KvDtype;
    for (name, model) in models() {
        let p = prompt(90, 9);
        let mut agree = 0;
        let mut total = 0;
        let run_with = |dtype| {
            let mut e = Engine::new(
                model.clone(),
                EngineOptions {
                    max_batch: 2,
                    kv_dtype: dtype,
                    ..Default::default()
                },
            );
            e.add(GenRequest {
                logprobs: Some(0),
                ..GenRequest::greedy(p.clone(), 16)
            })
            .unwrap();
            e.run_to_completion()
                .unwrap()
                .into_iter()
                .flat_map(|ev| ev.logprobs)
                .collect::<Vec<_>>()
        };
        let (a, b) = (run_with(KvDtype::F32), run_with(KvDtype::F16));
        assert_eq!(a.len(), 16);
        // Compare the chosen token's log-probability while the two runs agree on tokens.
        for (x, y) in a.iter().zip(&b) {
            total += 1;
            if x.token != y.token {
                break;
            }
            agree += 1;
            assert!(
                (x.logprob - y.logprob).abs() < 2e-2,
                "{name}: {} vs {}",
                x.logprob,
                y.logprob
            );
        }
        assert!(
            agree >= total / 2,
            "{name}: f16 cache diverged early ({agree}/{total})"
        );
    }
}

#[test]
fn q8_0_stays_close_to_float32() {
    // The fixture models with their decoder layers and LM head as int8 blocks: greedy
    // continuations mostly unchanged.
    for (name, model) in models() {
        let mut q = (*model).clone();
        if let Err(e) = q.quantize_q8_0() {
            // Block widths must be multiples of 32 (block_b8's token decoder is 48 wide).
            assert!(e.to_string().contains("multiple of 32"), "{name}: {e}");
            continue;
        }
        assert!(q.quantized_bytes() > 0);
        let reqs: Vec<GenRequest> = (0..3)
            .map(|i| GenRequest::greedy(prompt(20 + 9 * i, i as u32), 12))
            .collect();
        let a = run(&model, &reqs, 3);
        let b = run(&Arc::new(q), &reqs, 3);
        let same: usize = a
            .iter()
            .zip(&b)
            .map(|((x, _), (y, _))| x.iter().zip(y).take_while(|(p, r)| p == r).count())
            .sum();
        let total: usize = a.iter().map(|(x, _)| x.len()).sum();
        println!("{name}: q8_0, greedy tokens equal up to the first difference: {same}/{total}");
        assert!(same * 10 >= total * 7, "{name}: {same}/{total}");
    }
    // Only float32 models are quantized.
    let (_, model) = models().remove(0);
    let mut half = model
        .to(&candle_core::Device::Cpu, candle_core::DType::BF16)
        .unwrap();
    let err = half.quantize_q8_0().unwrap_err().to_string();
    assert!(err.contains("--quantize"), "{err}");
}

#[test]
fn long_prompt_batches_prefill_in_groups_with_the_same_result() {
    use blockformer::config::{ModelConfig, NeoXConfig};
    // 5 rows x 1900 prompt positions: more than one prefill group of PREFILL_CHUNK positions.
    // The rows run alone afterwards reuse the activation buffers the stack kept from the first
    // run (larger than they need, holding its values).
    let cfg = ModelConfig::Vanilla(NeoXConfig {
        rotary_pct: 0.5,
        ..NeoXConfig::pythia(300, 2, 16, 2, 32)
    });
    let total = 5 * 1900;
    assert!(total > blockformer::model::gpt_neox::PREFILL_CHUNK);
    let mut model = Model::random(&cfg, 3, &candle_core::Device::Cpu).unwrap();
    model.pack_for_host().unwrap();
    let model = Arc::new(model);
    let reqs: Vec<GenRequest> = (0..5)
        .map(|i| GenRequest::greedy(prompt(1900, i), 6))
        .collect();
    let together = run(&model, &reqs, 5);
    for (i, r) in reqs.iter().enumerate() {
        let alone = run(&model, std::slice::from_ref(r), 1).remove(0);
        assert_eq!(together[i], alone, "row {i}");
    }
}

#[test]
fn wide_batches_split_by_rows_across_threads_decode_the_same() {
    // 36 rows on 2 threads: decode steps of these small stacks run one share of rows per
    // thread (`NeoX::row_parallel`, from 16 rows a thread); every row must decode as it does
    // alone.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        for (name, model) in models() {
            let reqs: Vec<GenRequest> = (0..36)
                .map(|i| GenRequest::greedy(prompt(1 + (i * 7) % 13, i as u32), 9))
                .collect();
            let together = run(&model, &reqs, 36);
            for (i, r) in reqs.iter().enumerate() {
                let alone = run(&model, std::slice::from_ref(r), 1).remove(0);
                assert_eq!(together[i], alone, "{name}: row {i}");
            }
        }
    });
}

#[test]
fn greedy_rows_through_the_lm_head_screen_pick_the_same_tokens() {
    use blockformer::config::{BlockConfig, ModelConfig, NeoXConfig};
    use blockformer::kernels::screen;
    // Vocabularies just above the screen's minimum (odd sizes: a partial last tile); 20 rows:
    // several register tiles, the last one partial.
    let v = screen::MIN_COLUMNS + 7;
    for cfg in [
        ModelConfig::Vanilla(NeoXConfig::pythia(v, 2, 64, 4, 256)),
        ModelConfig::Block(BlockConfig::main(4, v + 2, 1, 64)),
    ] {
        let mut model = Model::random(&cfg, 9, &candle_core::Device::Cpu).unwrap();
        model.pack_for_host().unwrap();
        assert_eq!(model.lm_head_screened(), screen::supported());
        let mut plain = model.clone();
        match &mut plain.arch {
            Arch::Vanilla(v) => v.embed_out.screen = None,
            Arch::Block(bt) => bt.token_decoder.embed_out.screen = None,
        }
        assert!(!plain.lm_head_screened());
        let reqs: Vec<GenRequest> = (0..20)
            .map(|i| GenRequest::greedy(prompt(9 + i as usize, i), 13))
            .collect();
        let (model, plain) = (Arc::new(model), Arc::new(plain));
        assert_eq!(run(&model, &reqs, 20), run(&plain, &reqs, 20), "{cfg:?}");
    }
}
