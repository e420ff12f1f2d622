//! blockformer: Block Transformer (Ho et al., NeurIPS 2024) and GPT-NeoX language models,
//! exact to the official implementation, with a batched generation engine.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod score;
pub mod serve;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
