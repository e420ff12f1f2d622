//! Shared helpers for the fixture-based tests.
#![allow(dead_code)]

use blockformer::config::ModelConfig;
use blockformer::model::block_transformer::BlockBatch;
use blockformer::model::Model;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Fixture root: `$BLOCKFORMER_FIXTURES`, or the repo's copy of the official fixtures.
pub fn fixture_root() -> PathBuf {
    std::env::var_os("BLOCKFORMER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/official"))
}

/// Every fixture folder (a sub-folder holding `fixture.json`), block and vanilla.
pub fn fixture_dirs() -> Vec<PathBuf> {
    let root = fixture_root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixture root {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("fixture.json").exists())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no fixture folders under {}",
        root.display()
    );
    dirs
}

pub struct Fixture {
    pub dir: PathBuf,
    pub json: serde_json::Value,
    pub io: HashMap<String, Array>,
}

impl Fixture {
    pub fn load(dir: &Path) -> Fixture {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap())
                .unwrap();
        Fixture {
            dir: dir.to_path_buf(),
            json,
            io: read_arrays(&dir.join("io.safetensors")),
        }
    }

    pub fn name(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    pub fn is_block(&self) -> bool {
        self.json
            .get("official_config_vocabulary")
            .and_then(|v| v.get("block_length"))
            .is_some()
    }

    /// The architecture: the official YAML vocabulary for block models, `config.json` for
    /// vanilla ones.
    pub fn config(&self) -> ModelConfig {
        if self.is_block() {
            let v = &self.json["official_config_vocabulary"];
            ModelConfig::from_json_str(&v.to_string(), "fixture").unwrap()
        } else {
            ModelConfig::from_file(&self.dir.join("config.json")).unwrap()
        }
    }

    pub fn model(&self) -> Model {
        self.model_on(&candle_core::Device::Cpu)
    }

    pub fn model_on(&self, dev: &candle_core::Device) -> Model {
        let file =
            blockformer::checkpoint::SafetensorsFile::open(&self.dir.join("model.safetensors"))
                .unwrap();
        blockformer::checkpoint::load_weights(&file, &self.config(), "fixture", dev).unwrap()
    }

    /// The fixture's forward batch (block models).
    pub fn block_batch(&self, with_labels: bool) -> BlockBatch {
        let ids = self.arr("fwd_input_ids");
        let (b, n, l) = (ids.shape[0], ids.shape[1], ids.shape[2]);
        BlockBatch {
            batch: b,
            n_blocks: n,
            block_length: l,
            input_ids: ids.ints(),
            attention_mask: self.arr("fwd_attention_mask").ints(),
            block_mask: self.arr("fwd_block_attention_mask").ints(),
            labels: with_labels.then(|| self.arr("fwd_labels").ints()),
        }
    }

    /// The official `generate` cases recorded in the fixture.
    pub fn generation_cases(&self) -> Vec<GenCase> {
        self.json["generation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|case| {
                let mask = case
                    .get("attention_mask")
                    .filter(|m| !m.is_null())
                    .map(|m| {
                        ids_2d(m)
                            .into_iter()
                            .map(|r| r.into_iter().map(|x| x as u8).collect())
                            .collect()
                    });
                let (limit, eos) = if self.is_block() {
                    (
                        case["max_length"].as_u64().unwrap() as usize,
                        case["eos_token_id_override"].as_u64().map(|x| x as u32),
                    )
                } else {
                    (case["max_new_tokens"].as_u64().unwrap() as usize, None)
                };
                GenCase {
                    name: format!("{}/{}", self.name(), case["case"].as_str().unwrap()),
                    input_ids: ids_2d(&case["input_ids"]),
                    mask,
                    limit,
                    eos,
                    output_ids: ids_2d(&case["output_ids"]),
                }
            })
            .collect()
    }

    pub fn arr(&self, name: &str) -> &Array {
        self.io
            .get(name)
            .unwrap_or_else(|| panic!("{}: io tensor {name} missing", self.name()))
    }
}

/// One official `generate` call: block models take `limit` as `max_length`, vanilla ones as
/// `max_new_tokens`.
pub struct GenCase {
    pub name: String,
    pub input_ids: Vec<Vec<u32>>,
    pub mask: Option<Vec<Vec<u8>>>,
    pub limit: usize,
    pub eos: Option<u32>,
    pub output_ids: Vec<Vec<u32>>,
}

/// A tensor from io.safetensors, as f64 values (ints included) with its shape.
#[derive(Clone, Debug)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Array {
    pub fn ints<T: TryFrom<i64>>(&self) -> Vec<T>
    where
        T::Error: std::fmt::Debug,
    {
        self.data
            .iter()
            .map(|&x| T::try_from(x as i64).unwrap())
            .collect()
    }
    pub fn f32s(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }
}

pub fn read_arrays(path: &Path) -> HashMap<String, Array> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            use safetensors::Dtype;
            let d = view.data();
            let data: Vec<f64> = match view.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: dtype {other:?}"),
            };
            (
                name,
                Array {
                    shape: view.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

/// Max |a - b| (NaN-aware: NaN equals NaN).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

pub fn ids_2d(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}
