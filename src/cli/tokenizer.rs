//! `blockformer tokenizer train`: a byte-level BPE tokenizer with Pythia's special ids.

use anyhow::bail;
use blockformer::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Train a byte-level BPE tokenizer on text files (ids 0 = <|endoftext|> (EOS, BOS and
    /// padding, as in Pythia), 1 = <|padding|>).
    Train(TrainArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Vocabulary size, special tokens included (at least 260).
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Output tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Training text files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        Sub::Train(t) => {
            if t.files.is_empty() {
                bail!("no training files given");
            }
            let start = std::time::Instant::now();
            let tok = Tokenizer::train_bpe(&t.files, t.vocab_size, &t.out)?;
            println!(
                "wrote {} ({} tokens, trained on {} files in {:.1}s)",
                t.out.display(),
                tok.vocab_size(),
                t.files.len(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}
