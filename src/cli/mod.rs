//! Subcommands, one file each.

mod bench;
mod common;
mod eval;
mod generate;
mod info;
mod loadtest;
mod serve;
mod tokenizer;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "blockformer",
    version,
    about = "Block Transformer and GPT-NeoX language models: load, generate, inspect"
)]
pub struct Cli {
    /// Worker threads for matmuls and attention (default: all cores).
    #[arg(long, global = true, value_parser = at_least_one)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a model's architecture and parameter counts.
    Info(info::Args),
    /// Generate text (or token ids) from prompts, batched.
    Generate(generate::Args),
    /// Serve a model over an OpenAI-compatible HTTP API (continuous batching).
    Serve(serve::Args),
    /// Load-test a running server on this machine (bounded; loopback only).
    Loadtest(loadtest::Args),
    /// Tokenizer tools: `tokenizer train` (byte-level BPE, Pythia special ids).
    Tokenizer(tokenizer::Args),
    /// Train a block or vanilla model (from scratch, resumed, or uptrained from a vanilla one).
    Train(train::Args),
    /// Loss, perplexity, accuracy and loss by position of models on the same tokens.
    Eval(eval::Args),
    /// Copy a model folder with float16 (or float32) weights.
    Export(train::ExportArgs),
    /// Throughput benchmark (the paper's settings) with a roofline bound of this machine.
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Generate(a) => on_pool(|| generate::run(a)),
        Command::Serve(a) => serve::run(a),
        Command::Loadtest(a) => loadtest::run(a),
        Command::Tokenizer(a) => tokenizer::run(a),
        Command::Train(a) => on_pool(|| train::run(a)),
        Command::Eval(a) => on_pool(|| eval::run(a)),
        Command::Export(a) => train::export(a),
        Command::Bench(a) => on_pool(|| bench::run(a)),
    }
}

/// Runs a compute command on a worker of rayon's pool, so that its parallel loops split work
/// with the other workers directly instead of each waking the pool from outside and sleeping
/// until it ends. Not for commands that wait on other threads using the pool (serve).
fn on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| f())
}

/// A count flag's value: a whole number of at least 1.
pub(crate) fn at_least_one(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(0) => Err("expected at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{v}` is not a whole number")),
    }
}
