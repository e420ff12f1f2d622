//! Parity with the official implementation on every fixture folder
//! (`$BLOCKFORMER_FIXTURES` or tests/fixtures/official).

mod common;

use blockformer::model::block_transformer::ForwardOptions;
use blockformer::model::Arch;
use common::*;

const LOGITS_TOL: f32 = 1e-4;
const LOSS_TOL: f64 = 1e-5;

#[test]
fn block_forward_matches_official() {
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        if !fx.is_block() {
            continue;
        }
        let model = fx.model();
        let Arch::Block(bt) = &model.arch else {
            panic!("block model expected")
        };
        let name = fx.name();

        // Logits, block embeddings and block-decoder states (no labels).
        for (skip, key) in [(true, "fwd_logits"), (false, "fwd_logits_no_skip")] {
            let out = bt
                .forward(
                    &fx.block_batch(false),
                    ForwardOptions {
                        skip_padding_blocks: skip,
                        want_logits: true,
                    },
                )
                .unwrap();
            let got: Vec<f32> = out
                .logits
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let d = max_abs_diff(&got, &fx.arr(key).f32s());
            println!("{name} {key}: max |diff| = {d:e}");
            assert!(d <= LOGITS_TOL, "{name} {key}: max |diff| {d}");
            if skip {
                let emb: Vec<f32> = out
                    .block_embeddings
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let d = max_abs_diff(&emb, &fx.arr("fwd_block_embeddings").f32s());
                assert!(d <= LOGITS_TOL, "{name} block embeddings: {d}");
                // Hidden states at queries whose every key is padding are not comparable
                // (spec section 5); compare real blocks only.
                let hid: Vec<f32> = out.block_hidden.flatten_all().unwrap().to_vec1().unwrap();
                let want = fx.arr("fwd_block_decoder_hidden").f32s();
                let bm: Vec<u8> = fx.arr("fwd_block_attention_mask").ints();
                let dmodel = hid.len() / bm.len();
                let mut worst = 0f32;
                for (i, &m) in bm.iter().enumerate() {
                    if m == 1 {
                        let r = i * dmodel..(i + 1) * dmodel;
                        worst = worst.max(max_abs_diff(&hid[r.clone()], &want[r]));
                    }
                }
                println!("{name} block-decoder states: max |diff| = {worst:e}");
                assert!(worst <= LOGITS_TOL, "{name} block-decoder states: {worst}");
            }
        }

        // Loss and loss by position (with labels).
        let out = bt
            .forward(&fx.block_batch(true), ForwardOptions::default())
            .unwrap();
        let loss = out.loss.as_ref().unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = fx.arr("fwd_loss").data[0];
        println!("{name} loss: {loss} vs {want}");
        assert!(
            (loss - want).abs() <= LOSS_TOL,
            "{name} loss {loss} vs {want}"
        );
        for (j, (got, want)) in out
            .loss_by_position()
            .iter()
            .zip(&fx.arr("fwd_loss_by_position").data)
            .enumerate()
        {
            assert!(
                (got.is_nan() && want.is_nan()) || (got - want).abs() <= LOSS_TOL,
                "{name} loss by position {j}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn vanilla_forward_matches_official() {
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        if fx.is_block() {
            continue;
        }
        let model = fx.model();
        let Arch::Vanilla(v) = &model.arch else {
            panic!("vanilla model expected")
        };
        let ids = fx.arr("fwd_input_ids");
        let (b, t) = (ids.shape[0], ids.shape[1]);
        let mask: Vec<u8> = fx.arr("fwd_attention_mask").ints();
        let labels: Vec<i64> = fx.arr("fwd_labels").ints();
        let out = v
            .forward(&ids.ints::<u32>(), b, t, Some(&mask), Some(&labels))
            .unwrap();
        let got: Vec<f32> = out.logits.flatten_all().unwrap().to_vec1().unwrap();
        let d = max_abs_diff(&got, &fx.arr("fwd_logits").f32s());
        println!("{} logits: max |diff| = {d:e}", fx.name());
        assert!(d <= LOGITS_TOL, "{} logits {d}", fx.name());
        let loss = out.loss.unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = fx.arr("fwd_loss").data[0];
        assert!(
            (loss - want).abs() <= LOSS_TOL,
            "{} loss {loss} vs {want}",
            fx.name()
        );
    }
}
