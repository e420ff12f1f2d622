//! Text <-> token ids with any Hugging Face `tokenizer.json` (the Pythia / GPT-NeoX-20B one
//! included), and training of a byte-level BPE tokenizer with Pythia's special ids
//! (0 = `<|endoftext|>`, 1 = `<|padding|>`).

use crate::error::{Error, Result};
use std::path::Path;

pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const PAD_TOKEN: &str = "<|padding|>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    origin: String,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer {
                origin: path.display().to_string(),
                msg: "file not found".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            origin: path.display().to_string(),
            msg: format!("not a valid tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            origin: path.display().to_string(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            origin: self.origin.clone(),
            msg: e.to_string(),
        }
    }

    /// Encodes without adding special tokens (the GPT-NeoX default).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Trains a byte-level BPE tokenizer on `files` and saves it to `out`.
    pub fn train_bpe(
        files: &[std::path::PathBuf],
        vocab_size: usize,
        out: &Path,
    ) -> Result<Tokenizer> {
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::{decoders, pre_tokenizers, processors, AddedToken, TokenizerBuilder};
        let origin = out.display().to_string();
        let fail = |m: String| Error::Tokenizer {
            origin: origin.clone(),
            msg: m,
        };
        if vocab_size < 260 {
            return Err(Error::input(
                "vocab-size",
                format!("{vocab_size} is too small for a byte-level BPE (at least 260)"),
            ));
        }
        let mut bytes = 0u64;
        for f in files {
            match std::fs::metadata(f) {
                Ok(m) if m.is_file() => bytes += m.len(),
                _ => {
                    return Err(Error::io(
                        f,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "training file not found",
                        ),
                    ))
                }
            }
        }
        if bytes == 0 {
            return Err(Error::input(
                "files",
                format!(
                    "{}: empty, no text to learn merges from",
                    files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ));
        }
        let specials = vec![
            AddedToken::from(EOS_TOKEN, true),
            AddedToken::from(PAD_TOKEN, true),
        ];
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(
                pre_tokenizers::byte_level::ByteLevel::alphabet()
                    .into_iter()
                    .collect(),
            )
            .build();
        let mut tok = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(pre_tokenizers::byte_level::ByteLevel::new(
                false, true, true,
            )))
            .with_post_processor(Some(processors::byte_level::ByteLevel::new(
                false, true, true,
            )))
            .with_decoder(Some(decoders::byte_level::ByteLevel::new(
                false, true, true,
            )))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        tok.train_from_files(&mut trainer, names)
            .map_err(|e| fail(format!("training failed: {e}")))?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        tok.save(out, false)
            .map_err(|e| fail(format!("save failed: {e}")))?;
        let t = Tokenizer::from_file(out)?;
        if t.token_id(EOS_TOKEN) != Some(0) || t.token_id(PAD_TOKEN) != Some(1) {
            return Err(fail("special tokens did not get ids 0 and 1".into()));
        }
        Ok(t)
    }
}

/// Turns a growing list of ids into text pieces as they become printable (a byte-level token
/// can end in the middle of a UTF-8 character).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: String,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, ids: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(ids);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.printed) {
            return Ok(String::new());
        }
        let new = text[self.printed.len()..].to_string();
        self.printed = text;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.txt");
        let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n".repeat(50);
        std::fs::write(&corpus, &text).unwrap();
        let out = dir.path().join("tok/tokenizer.json");
        let t = Tokenizer::train_bpe(&[corpus], 300, &out).unwrap();
        let t2 = Tokenizer::from_file(&out).unwrap();
        let s = "To be, or not to be — ünïcode too";
        let ids = t2.encode(s).unwrap();
        assert_eq!(t2.decode(&ids).unwrap(), s);
        assert_eq!(t.encode(s).unwrap(), ids);
        assert_eq!(t2.token_id(EOS_TOKEN), Some(0));
        assert!(t2.vocab_size() <= 300 && t2.vocab_size() > 256);
        let mut sd = StreamDecoder::default();
        let streamed: String = ids.iter().map(|&i| sd.push(&t2, &[i]).unwrap()).collect();
        assert_eq!(streamed, s);
    }

    #[test]
    fn bad_tokenizer_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        let e = Tokenizer::from_file(&p).err().unwrap().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("not found"),
            "{e}"
        );
        std::fs::write(&p, "{oops").unwrap();
        let e = Tokenizer::from_file(&p).err().unwrap().to_string();
        assert!(e.contains("not a valid tokenizer.json"), "{e}");
    }
}
