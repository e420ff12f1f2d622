//! Generation against the official fixtures: every official `generate` case token for token in
//! the compatibility mode, vanilla greedy generations, and the default mode's token-decoder
//! logits against the official forward.

mod common;

use blockformer::generate::{official, PositionMode};
use blockformer::model::Arch;
use common::*;
use std::sync::Arc;

#[test]
fn official_generate_cases_reproduced_token_for_token() {
    let mut checked = 0;
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        // As loaded, and packed for the CPU decode kernels (what generate, bench and serve run).
        let mut packed = fx.model();
        packed.pack_for_host().unwrap();
        assert!(packed.packed_bytes() > 0);
        for (label, model) in [("", Arc::new(fx.model())), (" (packed)", Arc::new(packed))] {
            for case in fx.generation_cases() {
                let got = official::generate(
                    model.clone(),
                    &case.input_ids,
                    case.mask.as_deref(),
                    case.limit,
                    case.eos,
                )
                .unwrap();
                let (name, want) = (&case.name, &case.output_ids);
                assert_eq!(&got, want, "{name}{label}");
                println!(
                    "{name}{label}: {} rows x {} ids reproduced",
                    want.len(),
                    want[0].len()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
}

/// Per-step logits of the token decoder for one block, driven by the engine's step functions.
fn stepwise_logits(fx: &Fixture, mode: PositionMode) -> (Vec<Vec<f32>>, Vec<u32>) {
    let model = fx.model();
    let Arch::Block(bt) = &model.arch else {
        unreachable!()
    };
    let td = &bt.token_decoder;
    let emb = fx.arr("td_block_embedding");
    let d = *emb.shape.last().unwrap();
    let s = candle_core::Tensor::from_vec(emb.f32s(), (1, d), &candle_core::Device::Cpu).unwrap();
    let seq: Vec<u32> = fx.json["token_decoder_step"]["sequence"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let l = seq.len() - 1;
    let mut cache = td.new_block_cache(l);
    let mut out = vec![td.start_block(&s, &mut [&mut cache], mode).unwrap()];
    for k in 1..l {
        out.push(
            td.continue_block(&seq[k..k + 1], k, &mut [&mut cache], mode)
                .unwrap(),
        );
    }
    let rows = out
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    (rows, seq[1..].to_vec())
}

#[test]
fn token_decoder_step_logits_match_official_paths() {
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        if !fx.is_block() {
            continue;
        }
        let v = *fx.arr("td_forward_logits").shape.last().unwrap();
        // Default mode = the positions of the training forward.
        let (steps, _) = stepwise_logits(&fx, PositionMode::Trained);
        let fwd = fx.arr("td_forward_logits").f32s();
        for (k, row) in steps.iter().enumerate() {
            let d = max_abs_diff(row, &fwd[k * v..(k + 1) * v]);
            assert!(d <= 1e-4, "{} trained step {k}: {d}", fx.name());
        }
        // Compatibility mode = the official generate's positions.
        let (steps, _) = stepwise_logits(&fx, PositionMode::Official);
        let gen = fx.arr("td_generate_scores").f32s();
        let mut worst_vs_forward = 0f32;
        for (k, row) in steps.iter().enumerate() {
            let d = max_abs_diff(row, &gen[k * v..(k + 1) * v]);
            assert!(d <= 1e-4, "{} official step {k}: {d}", fx.name());
            worst_vs_forward = worst_vs_forward.max(max_abs_diff(row, &fwd[k * v..(k + 1) * v]));
        }
        // The two position rules really differ (spec 9.2), so the test can tell them apart.
        assert!(
            worst_vs_forward > 1e-2,
            "{}: modes indistinguishable",
            fx.name()
        );
    }
}
