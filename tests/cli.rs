//! The command line, run as a user would.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

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

/// The command `args` fails with `want` in its error, and without a panic.
fn refused(args: &[&str], want: &str) {
    let (ok, _, err) = bf(args);
    assert!(
        !ok && err.contains(want),
        "{args:?}: expected `{want}` in `{err}`"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A model folder (config.json + model.safetensors + tokenizer.json) made from the block fixture.
fn model_dir(dir: &Path) -> String {
    let fx = Fixture::load(&fixture_root().join("block_b4"));
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        "the quick brown fox jumps over the lazy dog\n".repeat(40),
    )
    .unwrap();
    let tok = dir.join("tok.json");
    blockformer::tokenizer::Tokenizer::train_bpe(&[corpus], 300, &tok).unwrap();
    let out = dir.join("model");
    blockformer::checkpoint::save(&fx.model(), &out, Some(&tok)).unwrap();
    out.display().to_string()
}

#[test]
fn info_prints_parameter_counts() {
    let (ok, out, _) = bf(&["info", "--preset", "block_main_b4_85"]);
    assert!(
        ok && out.contains("86.24M") && out.contains("211.80M"),
        "{out}"
    );
    let (ok, out, _) = bf(&["info", "--preset", "vanilla_410", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["non_embedding_params"], 302_311_424);
    let (ok, _, err) = bf(&["info", "--preset", "block_main_b4_7"]);
    assert!(
        !ok && err.contains("unknown preset") && err.contains("block_main_b4_85"),
        "{err}"
    );
}

#[test]
fn generate_ids_text_and_official_compat() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    let (ok, out, err) = bf(&[
        "generate",
        "--model",
        &m,
        "--ids",
        "1 2 3",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
    ]);
    assert!(ok, "{err}");
    let ids: Vec<u32> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(ids.len(), 8, "{out}");
    assert_eq!(&ids[..3], &[1, 2, 3]);
    assert!(err.contains("tokens/s"), "{err}");

    let (ok, out, err) = bf(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert!(ok && out.starts_with("the quick"), "{out} {err}");
    let (_, again, _) = bf(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert_eq!(out, again, "same seed, same text");

    // Several prompts: one line per row.
    let (ok, out, err) = bf(&[
        "generate",
        "--model",
        &m,
        "--ids",
        "1 2",
        "3 4 5",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
    ]);
    assert!(
        ok && out.lines().count() == 2 && out.contains("[0] 1 2") && out.contains("[1] 3 4 5"),
        "{out} {err}"
    );

    // --compat official reproduces the official generate of the fixture.
    let fx = Fixture::load(&fixture_root().join("block_b4"));
    let case = fx.json["generation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "aligned_no_mask")
        .unwrap();
    let input: Vec<String> = case["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    let want: Vec<String> = case["output_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    let new = (want.len() - input.len()).to_string();
    let (ok, out, err) = bf(&[
        "generate",
        "--model",
        &m,
        "--ids",
        &input.join(" "),
        "--max-new-tokens",
        &new,
        "--compat",
        "official",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), want);
}

#[test]
fn bad_flags_and_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (&["--ids", "1 x"], "--ids: `x` is not a token id"),
        (&["--ids", "1 99999"], "out of the vocabulary"),
        (&["--ids", ""], "empty prompt"),
        (&["--ids", "1", "--temperature", "-1"], "temperature"),
        (&["--ids", "1", "--top-p", "0"], "top_p"),
        (&["--ids", "1", "--device", "cuda"], "without CUDA support"),
        (&["--ids", "1", "--device", "cuda:x"], "expected cuda:N"),
        (&["--ids", "1", "--device", "tpu"], "unknown device"),
        (
            &["--ids", "1", "--dtype", "f8"],
            "--dtype f8: expected f32, bf16 or f16",
        ),
        (&["--ids", "1", "--batch-size", "0"], "--batch-size"),
        // Refused before one copy of the prompt per row is made.
        (
            &["--ids", "1", "--batch-size", "18446744073709551615"],
            "largest batch that fits",
        ),
        (&[], "nothing to generate from"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["generate", "--model", &m];
        args.extend_from_slice(extra);
        refused(&args, want);
    }
    let long = vec!["7"; 2049].join(" ");
    let (ok, _, err) = bf(&["generate", "--model", &m, "--ids", &long]);
    assert!(
        !ok && err.contains("longer than the model's context"),
        "{err}"
    );
    refused(
        &["generate", "--model", "/nonexistent", "--ids", "1"],
        "/nonexistent",
    );
    refused(
        &["generate", "--preset", "block_main_b4_5", "--prompt", "hi"],
        "needs a tokenizer",
    );
    // The device flags of the other commands.
    for args in [
        &[
            "bench",
            "--preset",
            "block_main_b4_5",
            "--device",
            "cuda",
            "--batch-size",
            "1",
        ][..],
        &["eval", "--model", &m, "--data", &m, "--device", "cuda"][..],
        &["info", "--model", &m, "--device", "cuda:1"][..],
    ] {
        refused(args, "without CUDA support");
    }
    // Evaluation on files with no text: an error naming them, not a row of zeros.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    let (ok, out, err) = bf(&["eval", "--model", &m, "--data", empty]);
    assert!(
        !ok && err.contains("nothing to evaluate") && err.contains(empty),
        "{out} {err}"
    );
    for (flag, want) in [
        ("--batch-size", "--batch-size 0: expected at least 1"),
        ("--max-tokens", "--max-tokens 0: expected at least 1"),
    ] {
        refused(&["eval", "--model", &m, "--data", &m, flag, "0"], want);
    }
    // A tokenizer from empty files: an error, not a bytes-only vocabulary.
    let tk = dir.path().join("tk.json");
    refused(
        &["tokenizer", "train", "--out", tk.to_str().unwrap(), empty],
        "no text to learn merges from",
    );
    // Serving limits of 0 would refuse every request: refused at start instead.
    for flag in [
        "--max-batch",
        "--max-tokens-limit",
        "--max-body-bytes",
        "--max-choices",
    ] {
        refused(&["serve", "--model", &m, flag, "0"], "expected at least 1");
    }
    // A missing file: its path and the reason, once.
    let (ok, _, err) = bf(&["eval", "--model", &m, "--data", "/nonexistent.txt"]);
    assert!(
        !ok && err.contains("/nonexistent.txt") && err.matches("os error 2").count() == 1,
        "{err}"
    );
    // One prediction: the positions in the block no window reached print "-", not NaN.
    let one = dir.path().join("one.txt");
    std::fs::write(&one, "a").unwrap();
    let (ok, out, err) = bf(&["eval", "--model", &m, "--data", one.to_str().unwrap()]);
    assert!(
        ok && out.contains(" -") && !out.contains("NaN"),
        "{out} {err}"
    );
    refused(
        &["bench", "--preset", "block_main_b4_5", "--dtype", "int4"],
        "--dtype int4",
    );
    let tok = format!("{m}/tokenizer.json");
    // One training step of vanilla_31 into `out`, with `extra` flags.
    fn train<'a>(tok: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "train",
            "--config",
            "vanilla_31",
            "--tokenizer",
            tok,
            "--data",
            tok,
            "--out",
            out,
            "--steps",
            "1",
        ];
        args.extend_from_slice(extra);
        args
    }
    // Training into a path that is a file.
    refused(&train(&tok, &tok, &[]), "exists and is not a folder");
    let out = dir.path().join("train-out");
    let out = out.to_str().unwrap();
    for (flag, value, want) in [
        ("--autocast", "fp8", "--autocast fp8: expected bf16 or off"),
        ("--device", "cuda", "without CUDA support"),
        (
            "--batch-size",
            "0",
            "--batch-size <BATCH_SIZE>': expected at least 1",
        ),
        (
            "--seq-len",
            "0",
            "--seq-len <SEQ_LEN>': expected at least 1",
        ),
        (
            "--seq-len",
            "1",
            "invalid seq-len: 1 (expected at least 2 tokens)",
        ),
        (
            "--lr",
            "nan",
            "invalid lr: NaN (expected a finite number > 0)",
        ),
        (
            "--min-lr-ratio",
            "2",
            "invalid min-lr-ratio: 2 (expected 0 to 1)",
        ),
        (
            "--valid-fraction",
            "1",
            "--valid-fraction 1: expected 0 <= fraction < 1",
        ),
        (
            "--threads",
            "0",
            "--threads <THREADS>': expected at least 1",
        ),
    ] {
        refused(&train(&tok, out, &[flag, value]), want);
    }
}
