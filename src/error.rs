//! The library's error type. Every variant names what is at fault (file, tensor, field, flag)
//! and what was expected, so the CLI can print it as is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. The I/O error is part of the message and not a
    /// `source` as well, or the binary's error chain would print it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A checkpoint file is malformed or does not match the architecture.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A config (file, preset or inferred) is invalid.
    #[error("config {origin}: {msg}")]
    Config { origin: String, msg: String },
    /// A request or flag value is invalid (prompt, ids, sampling parameters, ...).
    #[error("invalid {field}: {msg}")]
    Input { field: String, msg: String },
    /// Tokenizer loading or encoding failed.
    #[error("tokenizer {origin}: {msg}")]
    Tokenizer { origin: String, msg: String },
    /// An error from the tensor library (in the message, not also a `source`: see `Io`).
    #[error("tensor op: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn input(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Input {
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn config(origin: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            origin: origin.into(),
            msg: msg.into(),
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
}
