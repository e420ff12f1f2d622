//! Model configurations: one `config.json` schema for both model kinds, and the paper's presets.
//!
//! - A vanilla model's config is the Hugging Face GPT-NeoX `config.json` (Pythia) as is
//!   (`"model_type": "gpt_neox"`).
//! - A Block Transformer's config (`"model_type": "block_transformer"`) holds the block length,
//!   the lookup embedder, the two GPT-NeoX decoders (each in the same HF field names) and the
//!   token decoder's prefix settings.
//!
//! Presets follow the official YAMLs plus the official auto-fill rule for heads and MLP width
//! (head dim 32 up to width 256, 64 up to 1536, else 128; MLP = 4 x width), see
//! `official-architecture.md` sections 10.3 and 11.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Vocabulary of every released model (GPT-NeoX-20B tokenizer, padded to a multiple of 128).
pub const PYTHIA_VOCAB: usize = 50304;

fn d_rotary_pct() -> f64 {
    0.25
}
fn d_rotary_base() -> f64 {
    10000.0
}
fn d_ln_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_max_pos() -> usize {
    2048
}
fn d_act() -> String {
    "gelu".to_string()
}
fn d_zero() -> Option<u32> {
    Some(0)
}

/// A GPT-NeoX stack, in the field names of Hugging Face's `GPTNeoXConfig`. Missing optional
/// fields take the Pythia values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NeoXConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "d_rotary_pct")]
    pub rotary_pct: f64,
    #[serde(default = "d_rotary_base")]
    pub rotary_emb_base: f64,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_true")]
    pub use_parallel_residual: bool,
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_zero")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "d_zero")]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl NeoXConfig {
    /// Pythia defaults with the given sizes.
    pub fn pythia(vocab: usize, layers: usize, hidden: usize, heads: usize, mlp: usize) -> Self {
        NeoXConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: mlp,
            rotary_pct: d_rotary_pct(),
            rotary_emb_base: d_rotary_base(),
            layer_norm_eps: d_ln_eps(),
            use_parallel_residual: true,
            attention_bias: true,
            max_position_embeddings: d_max_pos(),
            hidden_act: d_act(),
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            tie_word_embeddings: false,
        }
    }

    /// The official block-mode auto-fill: heads from a head dim of 32/64/128, MLP 4x.
    pub fn auto(vocab: usize, layers: usize, hidden: usize) -> Self {
        Self::pythia(
            vocab,
            layers,
            hidden,
            hidden / auto_head_dim(hidden),
            4 * hidden,
        )
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotary dims per head: `int(head_dim * rotary_pct)`.
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }

    /// Parameters of the layers and the final LayerNorm (no embeddings, no LM head).
    pub fn layer_params(&self) -> usize {
        let w = self.hidden_size;
        let f = self.intermediate_size;
        let per_layer = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * f + f) + (f * w + w);
        self.num_hidden_layers * per_layer + 2 * w
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |m: String| Err(Error::config(origin, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                return err(format!("field `{name}` must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "field `hidden_size` ({}) must be a multiple of `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() > crate::kernels::attention::MAX_HEAD_DIM {
            return err(format!(
                "head dim {} exceeds the supported maximum {}",
                self.head_dim(),
                crate::kernels::attention::MAX_HEAD_DIM
            ));
        }
        let rd = self.rotary_dims();
        if !(0.0..=1.0).contains(&self.rotary_pct) || !rd.is_multiple_of(2) {
            return err(format!(
                "field `rotary_pct` ({}) must give an even number of rotary dims per head (got {rd})",
                self.rotary_pct
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "gelu_fast") {
            return err(format!(
                "field `hidden_act` is `{}`; supported: gelu (exact), gelu_new, gelu_fast",
                self.hidden_act
            ));
        }
        if !self.attention_bias {
            return err("field `attention_bias` = false is not supported (all GPT-NeoX checkpoints have biases)".into());
        }
        if self.tie_word_embeddings {
            return err(
                "field `tie_word_embeddings` = true is not supported (GPT-NeoX is untied)".into(),
            );
        }
        Ok(())
    }
}

/// Head dim of the official auto-fill rule.
pub fn auto_head_dim(hidden: usize) -> usize {
    if hidden <= 256 {
        32
    } else if hidden <= 1536 {
        64
    } else {
        128
    }
}

/// How the embedder turns `L` token vectors into one block vector.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    /// Concatenate the `L` token embeddings (`d_e * L = D`), no parameters.
    Concat,
    /// `Conv1d(d_e -> D, kernel = stride = L)` with bias (the uptraining configs).
    ProjectionLayer,
}

/// The lookup embedder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbedderConfig {
    pub vocab_size: usize,
    /// Embedding width `d_e`.
    pub hidden_size: usize,
    pub projection_method: Projection,
}

/// A Block Transformer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BlockConfig {
    /// Tokens per block (`L_B`).
    pub block_length: usize,
    pub embedder: EmbedderConfig,
    pub block_decoder: NeoXConfig,
    pub token_decoder: NeoXConfig,
    /// Prefix vectors per block embedding (`R = n_embedding_tokens * expansion_ratio`).
    pub expansion_ratio: usize,
    /// Only `prefix` is implemented (the main models).
    #[serde(default = "d_prefix")]
    pub decoding_strategy: String,
    /// Training context in tokens (the official models use 2048).
    #[serde(default = "d_max_pos")]
    pub context_length: usize,
    /// EOS (also BOS and data padding in Pythia): 0.
    #[serde(default)]
    pub eos_token_id: u32,
    /// Padding id used in blocks: 0 (the lookup embedder has no padding row).
    #[serde(default)]
    pub pad_token_id: u32,
    /// The token decoder's generation pad id that the official loader sets (1).
    #[serde(default = "d_one")]
    pub generation_pad_token_id: u32,
}

fn d_prefix() -> String {
    "prefix".to_string()
}
fn d_one() -> u32 {
    1
}

impl BlockConfig {
    /// A main-variant block model (lookup + concat, prefix with expansion ratio 2).
    pub fn main(block_length: usize, vocab: usize, layers: usize, hidden: usize) -> Self {
        BlockConfig {
            block_length,
            embedder: EmbedderConfig {
                vocab_size: vocab,
                hidden_size: hidden / block_length,
                projection_method: Projection::Concat,
            },
            block_decoder: NeoXConfig::auto(vocab, layers, hidden),
            token_decoder: NeoXConfig::auto(vocab, layers, hidden),
            expansion_ratio: 2,
            decoding_strategy: d_prefix(),
            context_length: 2048,
            eos_token_id: 0,
            pad_token_id: 0,
            generation_pad_token_id: 1,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.token_decoder.vocab_size
    }

    /// Reads the official YAML vocabulary (as JSON): `block_length`, `embedder.config`,
    /// `embedder.projection_method`, `block_decoder.config`, `token_decoder.config`,
    /// `token_decoder.expansion_ratio`, `token_decoder.decoding_strategy`, with the official
    /// auto-fill of heads and MLP width where the YAML leaves them out.
    pub fn from_official(v: &serde_json::Value, origin: &str) -> Result<Self> {
        let get = |path: &[&str]| -> Option<&serde_json::Value> {
            path.iter().try_fold(v, |acc, k| acc.get(*k))
        };
        let need_usize = |path: &[&str]| -> Result<usize> {
            get(path)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| {
                    Error::config(
                        origin,
                        format!("missing integer field `{}`", path.join(".")),
                    )
                })
        };
        let stack = |name: &str| -> Result<NeoXConfig> {
            let c = |k: &str| {
                get(&[name, "config", k])
                    .and_then(|x| x.as_u64())
                    .map(|x| x as usize)
            };
            let vocab = c("vocab_size").unwrap_or(PYTHIA_VOCAB);
            let hidden = need_usize(&[name, "config", "hidden_size"])?;
            let layers = need_usize(&[name, "config", "num_hidden_layers"])?;
            let heads =
                c("num_attention_heads").unwrap_or(hidden / auto_head_dim(hidden).min(hidden));
            let mlp = c("intermediate_size").unwrap_or(4 * hidden);
            Ok(NeoXConfig::pythia(vocab, layers, hidden, heads, mlp))
        };
        let block_decoder = stack("block_decoder")?;
        let token_decoder = stack("token_decoder")?;
        let block_length = need_usize(&["block_length"])?;
        let projection_method = match get(&["embedder", "projection_method"]).and_then(|x| x.as_str()) {
            None | Some("concat") => Projection::Concat,
            Some("projection_layer") => Projection::ProjectionLayer,
            Some(other) => {
                return Err(Error::config(
                    origin,
                    format!("field `embedder.projection_method` is `{other}`; expected concat or projection_layer"),
                ))
            }
        };
        if let Some(cls) = get(&["embedder", "cls"]).and_then(|x| x.as_str()) {
            if cls != "lookup" {
                return Err(Error::config(
                    origin,
                    format!(
                        "field `embedder.cls` is `{cls}`; only the lookup embedder is implemented"
                    ),
                ));
            }
        }
        if let Some(n) = get(&["embedder", "n_embedding_tokens"]).and_then(|x| x.as_u64()) {
            if n != 1 {
                return Err(Error::config(
                    origin,
                    format!("field `embedder.n_embedding_tokens` is {n}; only 1 is supported (as in every official config)"),
                ));
            }
        }
        let embedder = EmbedderConfig {
            vocab_size: get(&["embedder", "config", "vocab_size"])
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .unwrap_or(token_decoder.vocab_size),
            hidden_size: need_usize(&["embedder", "config", "hidden_size"])?,
            projection_method,
        };
        Ok(BlockConfig {
            block_length,
            embedder,
            block_decoder,
            token_decoder,
            expansion_ratio: need_usize(&["token_decoder", "expansion_ratio"])?,
            decoding_strategy: get(&["token_decoder", "decoding_strategy"])
                .and_then(|x| x.as_str())
                .unwrap_or("prefix")
                .to_string(),
            context_length: 2048,
            eos_token_id: 0,
            pad_token_id: 0,
            generation_pad_token_id: 1,
        })
    }

    /// Number of prefix vectors the token decoder reads.
    pub fn n_prefix(&self) -> usize {
        self.expansion_ratio
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |m: String| Err(Error::config(origin, m));
        self.block_decoder
            .validate(&format!("{origin} (block_decoder)"))?;
        self.token_decoder
            .validate(&format!("{origin} (token_decoder)"))?;
        if self.block_length == 0 {
            return err("field `block_length` must be positive".into());
        }
        if self.expansion_ratio == 0 {
            return err("field `expansion_ratio` must be positive".into());
        }
        if self.decoding_strategy != "prefix" {
            return err(format!(
                "field `decoding_strategy` is `{}`; only `prefix` is implemented",
                self.decoding_strategy
            ));
        }
        let d = self.block_decoder.hidden_size;
        if self.embedder.projection_method == Projection::Concat
            && self.embedder.hidden_size * self.block_length != d
        {
            return err(format!(
                "concat embedder: `embedder.hidden_size` ({}) x `block_length` ({}) must equal `block_decoder.hidden_size` ({d})",
                self.embedder.hidden_size, self.block_length
            ));
        }
        if self.embedder.vocab_size != self.token_decoder.vocab_size {
            return err(format!(
                "`embedder.vocab_size` ({}) differs from `token_decoder.vocab_size` ({}); both use one tokenizer",
                self.embedder.vocab_size, self.token_decoder.vocab_size
            ));
        }
        if self.context_length == 0 {
            return err("field `context_length` must be positive".into());
        }
        Ok(())
    }

    /// Parameters of the paper's size name: both decoders' layers + final LNs + expansion.
    pub fn non_embedding_params(&self) -> usize {
        let (d, h, r) = (
            self.block_decoder.hidden_size,
            self.token_decoder.hidden_size,
            self.n_prefix(),
        );
        self.block_decoder.layer_params() + self.token_decoder.layer_params() + r * h * d + r * h
    }

    /// Every stored parameter, including the unused block-decoder `embed_in`.
    pub fn total_params(&self) -> usize {
        let v = self.vocab_size();
        let e = &self.embedder;
        let embedder = e.vocab_size * e.hidden_size
            + match e.projection_method {
                Projection::Concat => 0,
                Projection::ProjectionLayer => {
                    self.block_decoder.hidden_size * e.hidden_size * self.block_length
                        + self.block_decoder.hidden_size
                }
            };
        self.non_embedding_params()
            + embedder
            + 2 * v * self.token_decoder.hidden_size
            + self.block_decoder.vocab_size * self.block_decoder.hidden_size
    }
}

/// Either model kind.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum ModelConfig {
    Block(BlockConfig),
    Vanilla(NeoXConfig),
}

impl ModelConfig {
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Block(c) => c.vocab_size(),
            ModelConfig::Vanilla(c) => c.vocab_size,
        }
    }

    pub fn eos_token_id(&self) -> u32 {
        match self {
            ModelConfig::Block(c) => c.eos_token_id,
            ModelConfig::Vanilla(c) => c.eos_token_id.unwrap_or(0),
        }
    }

    /// Context length in tokens.
    pub fn context_length(&self) -> usize {
        match self {
            ModelConfig::Block(c) => c.context_length,
            ModelConfig::Vanilla(c) => c.max_position_embeddings,
        }
    }

    pub fn non_embedding_params(&self) -> usize {
        match self {
            ModelConfig::Block(c) => c.non_embedding_params(),
            ModelConfig::Vanilla(c) => c.layer_params(),
        }
    }

    pub fn total_params(&self) -> usize {
        match self {
            ModelConfig::Block(c) => c.total_params(),
            ModelConfig::Vanilla(c) => c.layer_params() + 2 * c.vocab_size * c.hidden_size,
        }
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        match self {
            ModelConfig::Block(c) => c.validate(origin),
            ModelConfig::Vanilla(c) => c.validate(origin),
        }
    }

    /// Parse a `config.json` (either kind, told apart by `model_type`).
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::config(origin, format!("not valid JSON: {e}")))?;
        if value.get("model_type").is_none() && value.get("token_decoder").is_some() {
            let cfg = ModelConfig::Block(BlockConfig::from_official(&value, origin)?);
            cfg.validate(origin)?;
            return Ok(cfg);
        }
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::config(
                    origin,
                    "missing string field `model_type` (expected `block_transformer` or `gpt_neox`)",
                )
            })?;
        let cfg = match model_type {
            "block_transformer" => ModelConfig::Block(
                serde_json::from_value(value)
                    .map_err(|e| Error::config(origin, format!("block_transformer config: {e}")))?,
            ),
            "gpt_neox" => ModelConfig::Vanilla(
                serde_json::from_value(value)
                    .map_err(|e| Error::config(origin, format!("gpt_neox config: {e}")))?,
            ),
            other => {
                return Err(Error::config(
                    origin,
                    format!(
                    "field `model_type` is `{other}`; expected `block_transformer` or `gpt_neox`"
                ),
                ))
            }
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    pub fn to_json(&self) -> String {
        let mut v = match self {
            ModelConfig::Block(c) => serde_json::to_value(c),
            ModelConfig::Vanilla(c) => serde_json::to_value(c),
        }
        .expect("config serializes");
        let mt = match self {
            ModelConfig::Block(_) => "block_transformer",
            ModelConfig::Vanilla(_) => "gpt_neox",
        };
        v.as_object_mut()
            .expect("object")
            .insert("model_type".into(), mt.into());
        if let ModelConfig::Vanilla(_) = self {
            v.as_object_mut()
                .expect("object")
                .insert("architectures".into(), vec!["GPTNeoXForCausalLM"].into());
        }
        serde_json::to_string_pretty(&v).expect("json")
    }
}

/// Names of all presets, in the paper's order.
pub const PRESETS: &[&str] = &[
    "block_main_b4_5",
    "block_main_b4_19",
    "block_main_b4_85",
    "block_main_b4_300",
    "block_main_b4_800",
    "block_main_b4_1.2b",
    "vanilla_31",
    "vanilla_70",
    "vanilla_160",
    "vanilla_410",
];

/// The paper's models (`conf/trainer/*.yaml` resolved as the official loader does).
pub fn preset(name: &str) -> Result<ModelConfig> {
    let v = PYTHIA_VOCAB;
    let cfg = match name {
        "block_main_b4_5" => ModelConfig::Block(BlockConfig::main(4, v, 3, 256)),
        "block_main_b4_19" => ModelConfig::Block(BlockConfig::main(4, v, 3, 512)),
        "block_main_b4_85" => ModelConfig::Block(BlockConfig::main(4, v, 6, 768)),
        "block_main_b4_300" => ModelConfig::Block(BlockConfig::main(4, v, 12, 1024)),
        "block_main_b4_800" => ModelConfig::Block(BlockConfig::main(4, v, 8, 2048)),
        "block_main_b4_1.2b" => ModelConfig::Block(BlockConfig::main(4, v, 12, 2048)),
        // vanilla_31 keeps pythia-410m's MLP width 4096: the vanilla path does not auto-fill.
        "vanilla_31" => ModelConfig::Vanilla(NeoXConfig::pythia(v, 6, 256, 8, 4096)),
        "vanilla_70" => ModelConfig::Vanilla(NeoXConfig::pythia(v, 6, 512, 8, 2048)),
        "vanilla_160" => ModelConfig::Vanilla(NeoXConfig::pythia(v, 12, 768, 12, 3072)),
        "vanilla_410" => ModelConfig::Vanilla(NeoXConfig::pythia(v, 24, 1024, 16, 4096)),
        other => {
            return Err(Error::input(
                "preset",
                format!("unknown preset `{other}`; known: {}", PRESETS.join(", ")),
            ))
        }
    };
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(x: usize) -> f64 {
        (x as f64 / 1e6 * 100.0).round() / 100.0
    }

    #[test]
    fn preset_parameter_counts_match_the_paper_table() {
        // (name, non-embedding M, total M) from official-architecture.md section 11.
        let table = [
            ("block_main_b4_5", 4.87, 46.72),
            ("block_main_b4_19", 19.44, 103.15),
            ("block_main_b4_85", 86.24, 211.80),
            ("block_main_b4_300", 304.41, 471.82),
            ("block_main_b4_800", 814.13, 1148.96),
            ("block_main_b4_1.2b", 1217.00, 1551.82),
            ("vanilla_31", 14.19, 39.95),
            ("vanilla_70", 18.92, 70.43),
            ("vanilla_160", 85.06, 162.32),
            ("vanilla_410", 302.31, 405.33),
        ];
        assert_eq!(table.len(), PRESETS.len());
        for (name, non_emb, total) in table {
            let cfg = preset(name).unwrap();
            cfg.validate(name).unwrap();
            assert!(
                (m(cfg.non_embedding_params()) - non_emb).abs() < 0.006,
                "{name} non-emb {}",
                cfg.non_embedding_params()
            );
            assert!(
                (m(cfg.total_params()) - total).abs() < 0.006,
                "{name} total {}",
                cfg.total_params()
            );
        }
    }

    #[test]
    fn config_json_round_trips() {
        for name in PRESETS {
            let cfg = preset(name).unwrap();
            let back = ModelConfig::from_json_str(&cfg.to_json(), name).unwrap();
            assert_eq!(cfg, back);
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = ModelConfig::from_json_str("{}", "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type"), "{e}");
        let e = ModelConfig::from_json_str("{\"model_type\": \"llama\"}", "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("llama"), "{e}");
        let mut c = BlockConfig::main(4, 512, 2, 64);
        c.embedder.hidden_size = 15;
        let e = ModelConfig::Block(c).validate("x").unwrap_err().to_string();
        assert!(e.contains("embedder.hidden_size"), "{e}");
        let e = ModelConfig::from_json_str("not json", "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.json") && e.contains("JSON"), "{e}");
    }
}
