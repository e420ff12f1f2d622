//! `blockformer eval`: loss, perplexity, token accuracy and loss by position within the block,
//! for one or more models on exactly the same predicted tokens.

use anyhow::{bail, Context};
use blockformer::checkpoint;
use blockformer::data::{read_documents, DocMode};
use blockformer::eval::{common_window, evaluate, windows, EvalReport};
use blockformer::model::{Arch, Model};
use blockformer::tokenizer::Tokenizer;
use candle_core::DType;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder(s); several are evaluated on the same windows and tokens.
    #[arg(long, num_args = 1.., required = true)]
    pub model: Vec<PathBuf>,
    /// Text files to evaluate on.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// `file`: one file = one document; `blank-line`: blank-line-separated records.
    #[arg(long, default_value = "file")]
    pub doc_mode: String,
    /// Tokenizer (default: the first model folder's tokenizer.json; all models must share it).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Window length in tokens (default: the smallest context minus the largest block length).
    #[arg(long)]
    pub window: Option<usize>,
    /// Windows per forward.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Stop after this many predicted tokens (quick runs).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Write the reports as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub run: super::common::RunArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size 0: expected at least 1 window per forward");
    }
    if a.max_tokens == Some(0) {
        bail!("--max-tokens 0: expected at least 1 predicted token");
    }
    let mode: DocMode = a.doc_mode.parse()?;
    // Evaluation defaults to float32 on every device (exact losses).
    let (dev, dtype) = a.run.device_dtype(DType::F32)?;
    let mut models: Vec<(PathBuf, Model, Option<PathBuf>)> = Vec::new();
    for p in &a.model {
        let l = checkpoint::load(p, None, None, &dev)
            .with_context(|| format!("loading {}", p.display()))?;
        let m = a.run.prepare_unpacked(l.model, &dev, dtype)?;
        models.push((p.clone(), m, l.tokenizer_path));
    }
    let tok_path = a
        .tokenizer
        .clone()
        .or_else(|| models[0].2.clone())
        .context("no tokenizer: give --tokenizer or use model folders with tokenizer.json")?;
    if a.tokenizer.is_none() {
        let first = std::fs::read(&tok_path)?;
        for (p, _, t) in &models[1..] {
            match t {
                Some(t) if std::fs::read(t)? == first => {}
                _ => bail!(
                    "{} does not share the tokenizer of {}; comparisons need the same tokens (pass --tokenizer to force one)",
                    p.display(),
                    models[0].0.display()
                ),
            }
        }
    }
    let tok = Tokenizer::from_file(&tok_path)?;
    let docs_text = read_documents(&a.data, mode)?;
    let docs = docs_text
        .iter()
        .map(|d| tok.encode(d))
        .collect::<blockformer::Result<Vec<_>>>()?;
    let refs: Vec<&Model> = models.iter().map(|m| &m.1).collect();
    let window = a.window.unwrap_or_else(|| common_window(&refs));
    if window < 2 {
        bail!("--window must be at least 2");
    }
    let eos = refs[0].config.eos_token_id();
    let wins = windows(&docs, eos, window, a.max_tokens);
    if wins.is_empty() {
        bail!(
            "--data {}: nothing to evaluate (expected text of at least one token: a document and \
             its end-of-text make the first prediction)",
            a.data
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let pos_len = refs
        .iter()
        .find_map(|m| match &m.arch {
            Arch::Block(b) => Some(b.cfg.block_length),
            Arch::Vanilla(_) => None,
        })
        .unwrap_or(4);
    eprintln!(
        "data: {} files, {} documents, {} windows of up to {window} tokens",
        a.data.len(),
        docs.len(),
        wins.len()
    );
    let mut reports: Vec<(String, EvalReport)> = Vec::new();
    for (p, m, _) in &models {
        let mut r = evaluate(m, &wins, a.batch_size, pos_len)?;
        r.documents = docs.len();
        reports.push((p.display().to_string(), r));
    }
    println!(
        "{:<32} {:>8} {:>9} {:>8} {:>11} {:>9}  loss by position in block (1..L)",
        "model", "kind", "tokens", "loss", "perplexity", "accuracy"
    );
    for (name, r) in &reports {
        println!(
            "{:<32} {:>8} {:>9} {:>8.4} {:>11.3} {:>8.2}%  {}",
            name,
            r.kind,
            r.tokens,
            r.loss,
            r.perplexity,
            100.0 * r.accuracy,
            // A position no window reached has no mean: "-".
            r.loss_by_position
                .iter()
                .zip(&r.count_by_position)
                .map(|(x, &n)| if n == 0 {
                    "-".to_string()
                } else {
                    format!("{x:.3}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let json = serde_json::json!({
        "data": a.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "tokenizer": tok_path.display().to_string(),
        "window": window,
        "models": reports.iter().map(|(n, r)| {
            let mut v = serde_json::to_value(r).expect("json");
            v["model"] = n.clone().into();
            v
        }).collect::<Vec<_>>(),
    });
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
