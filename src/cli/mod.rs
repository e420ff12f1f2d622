//! Subcommands, one file each.

mod common;
mod generate;
mod info;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "blockformer",
    version,
    about = "Block Transformer and GPT-NeoX language models: load, generate, inspect"
)]
pub struct Cli {
    /// Worker threads for matmuls and attention (default: all cores).
    #[arg(long, global = true)]
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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Generate(a) => generate::run(a),
    }
}
