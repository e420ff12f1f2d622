//! Evaluation: equals the official forward's loss on the fixtures; block and vanilla models are
//! scored on the same predicted tokens; the block scoring equals the official harness's.

mod common;

use blockformer::config::{BlockConfig, ModelConfig, NeoXConfig};
use blockformer::eval::{accumulate_block, accumulate_vanilla, evaluate, windows, Accum};
use blockformer::model::{Arch, Model};
use candle_core::Device;
use common::*;

#[test]
fn eval_equals_the_official_forward_loss_on_the_fixtures() {
    for dir in fixture_dirs() {
        let fx = Fixture::load(&dir);
        let model = fx.model();
        let want = fx.arr("fwd_loss").data[0];
        let ids = fx.arr("fwd_input_ids");
        let mut acc;
        match &model.arch {
            Arch::Block(bt) => {
                let l = ids.shape[2];
                let batch = fx.block_batch(true);
                acc = Accum::new(l);
                accumulate_block(bt, &batch, &mut acc).unwrap();
                for (j, (got, w)) in acc
                    .loss_by_position()
                    .iter()
                    .zip(&fx.arr("fwd_loss_by_position").data)
                    .enumerate()
                {
                    assert!(
                        (got.is_nan() && w.is_nan()) || (got - w).abs() < 1e-5,
                        "{} position {j}: {got} vs {w}",
                        fx.name()
                    );
                }
            }
            Arch::Vanilla(v) => {
                let (b, t) = (ids.shape[0], ids.shape[1]);
                let mask: Vec<u8> = fx.arr("fwd_attention_mask").ints();
                let labels: Vec<i64> = fx.arr("fwd_labels").ints();
                acc = Accum::new(4);
                accumulate_vanilla(
                    v,
                    &ids.ints::<u32>(),
                    b,
                    t,
                    Some(&mask),
                    &labels,
                    &|_, j| j % 4,
                    &mut acc,
                )
                .unwrap();
            }
        }
        println!("{}: eval loss {} vs official {want}", fx.name(), acc.loss());
        assert!(
            (acc.loss() - want).abs() < 1e-5,
            "{}: {} vs {want}",
            fx.name(),
            acc.loss()
        );
    }
}

fn tiny_pair() -> (Model, Model) {
    let v = 64;
    let mut bc = BlockConfig::main(4, v, 2, 32);
    bc.context_length = 32;
    for s in [&mut bc.block_decoder, &mut bc.token_decoder] {
        s.num_attention_heads = 2;
        s.intermediate_size = 64;
    }
    let mut vc = NeoXConfig::pythia(v, 2, 32, 2, 64);
    vc.max_position_embeddings = 32;
    (
        Model::random(&ModelConfig::Block(bc), 1, &Device::Cpu).unwrap(),
        Model::random(&ModelConfig::Vanilla(vc), 2, &Device::Cpu).unwrap(),
    )
}

#[test]
fn block_and_vanilla_are_scored_on_the_same_tokens() {
    let (block, vanilla) = tiny_pair();
    let docs: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            (0..(7 + 13 * i))
                .map(|j| (2 + (i * 7 + j * 3) % 60) as u32)
                .collect()
        })
        .collect();
    let w = blockformer::eval::common_window(&[&block, &vanilla]);
    assert_eq!(w, 28);
    let wins = windows(&docs, 0, w, None);
    let expected: usize = wins.iter().map(|x| x.len() - 1).sum();
    for batch in [1, 3] {
        let rb = evaluate(&block, &wins, batch, 4).unwrap();
        let rv = evaluate(&vanilla, &wins, batch, 4).unwrap();
        assert_eq!(rb.tokens, expected);
        assert_eq!(rv.tokens, expected);
        assert_eq!(rb.count_by_position, rv.count_by_position);
        assert!(rb.loss.is_finite() && rv.loss.is_finite());
        assert!((rb.perplexity - rb.loss.exp()).abs() < 1e-9);
    }
    // Batching does not change the numbers.
    let a = evaluate(&block, &wins, 1, 4).unwrap();
    let b = evaluate(&block, &wins, 4, 4).unwrap();
    assert!((a.loss - b.loss).abs() < 1e-5);
    let a = evaluate(&vanilla, &wins, 1, 4).unwrap();
    let b = evaluate(&vanilla, &wins, 4, 4).unwrap();
    assert!((a.loss - b.loss).abs() < 1e-5);
    // A max-token cap predicts exactly that many tokens.
    let capped = windows(&docs, 0, w, Some(50));
    assert_eq!(evaluate(&vanilla, &capped, 2, 4).unwrap().tokens, 50);
}

#[test]
fn window_loss_equals_the_official_harness_scoring() {
    // The block model's mean loss over one window equals minus the mean log-probability that
    // the official harness scoring (score::token_logprobs) gives tokens 1.. of the window.
    let (block, vanilla) = tiny_pair();
    let w: Vec<u32> = (0..20).map(|j| (2 + (j * 5) % 60) as u32).collect();
    for m in [&block, &vanilla] {
        let r = evaluate(m, std::slice::from_ref(&w), 1, 4).unwrap();
        let lp = blockformer::score::token_logprobs(m, &w, 0).unwrap();
        let mean =
            -lp.iter().flatten().map(|t| t.logprob as f64).sum::<f64>() / (w.len() - 1) as f64;
        assert!((r.loss - mean).abs() < 1e-4, "{} vs {mean}", r.loss);
    }
}
