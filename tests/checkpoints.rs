//! Checkpoint loading and saving: formats, dtypes, architecture sources, and every bad-file
//! case giving a clear error (never a panic).

mod common;

use blockformer::checkpoint::{self, ArchSource, SafetensorsFile};
use blockformer::config::{self, BlockConfig, ModelConfig};
use blockformer::model::Model;
use candle_core::Device;
use common::*;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn block_fixture() -> Fixture {
    Fixture::load(&fixture_root().join("block_b4"))
}

type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Every tensor of a safetensors file as (dtype, shape, raw bytes).
fn raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write(path: &Path, tensors: &Raw) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

fn load_err(path: &Path, cfg: &ModelConfig) -> String {
    let file = match SafetensorsFile::open(path) {
        Ok(f) => f,
        Err(e) => return e.to_string(),
    };
    match checkpoint::load_weights(&file, cfg, "test config", &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn logits(model: &Model, fx: &Fixture) -> Vec<f32> {
    let blockformer::model::Arch::Block(bt) = &model.arch else {
        unreachable!()
    };
    let ids = fx.arr("fwd_input_ids");
    let batch = blockformer::model::block_transformer::BlockBatch {
        batch: ids.shape[0],
        n_blocks: ids.shape[1],
        block_length: ids.shape[2],
        input_ids: ids.ints(),
        attention_mask: fx.arr("fwd_attention_mask").ints(),
        block_mask: fx.arr("fwd_block_attention_mask").ints(),
        labels: None,
    };
    let opts = blockformer::model::block_transformer::ForwardOptions {
        skip_padding_blocks: true,
        want_logits: true,
    };
    bt.forward(&batch, opts)
        .unwrap()
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn bf16_and_f16_checkpoints_load_and_stay_close() {
    let fx = block_fixture();
    let want = fx.arr("fwd_logits").f32s();
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tol) in [(Dtype::BF16, 0.5f32), (Dtype::F16, 0.05)] {
        let mut t = raw(&fx.dir.join("model.safetensors"));
        for (d, _, b) in t.values_mut() {
            let f: Vec<f32> = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            *b = f
                .iter()
                .flat_map(|&x| match dtype {
                    Dtype::BF16 => half::bf16::from_f32(x).to_bits().to_le_bytes(),
                    _ => half::f16::from_f32(x).to_bits().to_le_bytes(),
                })
                .collect();
            *d = dtype;
        }
        let p = dir.path().join(format!("{dtype:?}.safetensors"));
        write(&p, &t);
        let file = SafetensorsFile::open(&p).unwrap();
        let model = checkpoint::load_weights(&file, &fx.config(), "fixture", &Device::Cpu).unwrap();
        let d = max_abs_diff(&logits(&model, &fx), &want);
        assert!(d < tol, "{dtype:?}: logits differ by {d}");
        assert!(d > 0.0, "{dtype:?}: rounding should be visible");
    }
}

#[test]
fn save_load_round_trip_and_architecture_sources() {
    let fx = block_fixture();
    let model = fx.model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("saved");
    checkpoint::save(&model, &out, None).unwrap();
    // Our folder: config.json is used.
    let l = checkpoint::load(&out, None, None, &Device::Cpu).unwrap();
    assert_eq!(
        l.arch_source,
        ArchSource::ConfigFile(out.join("config.json"))
    );
    assert_eq!(l.model.config, model.config);
    assert_eq!(
        logits(&l.model, &fx),
        logits(&model, &fx),
        "bit-exact after a round trip"
    );
    // Same tensor names and shapes as the official file, minus the unused embed_in.
    let ours = raw(&out.join("model.safetensors"));
    let official = raw(&fx.dir.join("model.safetensors"));
    let mut names: Vec<_> = official
        .keys()
        .filter(|k| !k.ends_with("block_decoder.gpt_neox.embed_in.weight"))
        .collect();
    names.sort();
    assert_eq!(ours.keys().collect::<Vec<_>>(), names);
    for (k, v) in &ours {
        assert_eq!(v.1, official[k].1, "{k} shape");
        assert_eq!(v.2, official[k].2, "{k} bytes");
    }
}

#[test]
fn architecture_is_inferred_from_shapes_with_the_official_rules() {
    // A model whose heads follow the auto-fill rule (width 64 -> head dim 32 -> 2 heads).
    let cfg = ModelConfig::Block(BlockConfig::main(4, 300, 2, 64));
    let model = Model::random(&cfg, 3, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&model, dir.path(), None).unwrap();
    let w = dir.path().join("model.safetensors");
    let l = checkpoint::load(&w, None, None, &Device::Cpu).unwrap();
    assert_eq!(l.arch_source, ArchSource::Inferred);
    assert_eq!(l.model.config, cfg);
    // Vanilla too.
    let cfg = ModelConfig::Vanilla(config::NeoXConfig::pythia(300, 2, 128, 4, 512));
    let model = Model::random(&cfg, 3, &Device::Cpu).unwrap();
    checkpoint::save(&model, dir.path(), None).unwrap();
    let l = checkpoint::load(&w, None, None, &Device::Cpu).unwrap();
    assert_eq!(l.model.config, cfg);
}

#[test]
fn hf_gpt_neox_folder_loads_with_its_config() {
    let dir = fixture_root().join("vanilla");
    let l = checkpoint::load(&dir, None, None, &Device::Cpu).unwrap();
    assert_eq!(
        l.arch_source,
        ArchSource::ConfigFile(dir.join("config.json"))
    );
    assert!(!l.model.is_block());
}

fn temp_copy(name: &str) -> (tempfile::TempDir, PathBuf, Raw) {
    let fx = block_fixture();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    (d, p, raw(&fx.dir.join("model.safetensors")))
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let cfg = block_fixture().config();
    let name = "token_decoder.gpt_neox.layers.1.mlp.dense_h_to_4h.weight";

    let (_d, p, mut t) = temp_copy("missing.safetensors");
    t.remove(name);
    write(&p, &t);
    let e = load_err(&p, &cfg);
    assert!(
        e.contains("missing tensor") && e.contains(name) && e.contains("missing.safetensors"),
        "{e}"
    );

    let (_d, p, mut t) = temp_copy("extra.safetensors");
    t.insert(
        "token_decoder.surprise.weight".into(),
        (Dtype::F32, vec![1], vec![0; 4]),
    );
    write(&p, &t);
    let e = load_err(&p, &cfg);
    assert!(
        e.contains("unexpected tensor") && e.contains("token_decoder.surprise.weight"),
        "{e}"
    );

    let (_d, p, mut t) = temp_copy("shape.safetensors");
    let (d, _, b) = t.remove(name).unwrap();
    t.insert(name.into(), (d, vec![128, 128], b));
    write(&p, &t);
    let e = load_err(&p, &cfg);
    assert!(
        e.contains(name) && e.contains("[128, 128]") && e.contains("[256, 64]"),
        "{e}"
    );
}

#[test]
fn truncated_foreign_and_wrong_dtype_files_are_reported() {
    let cfg = block_fixture().config();
    let (_d, p, t) = temp_copy("m.safetensors");
    write(&p, &t);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p, &cfg);
    assert!(
        e.contains("m.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    std::fs::write(&p, b"PK\x03\x04 this is a zip, not safetensors").unwrap();
    let e = load_err(&p, &cfg);
    assert!(e.contains("not a valid safetensors"), "{e}");

    std::fs::write(&p, b"").unwrap();
    let e = load_err(&p, &cfg);
    assert!(e.contains("not a valid safetensors"), "{e}");

    let (_d, p, mut t) = temp_copy("int.safetensors");
    let name = "embedder.embeddings.weight";
    let (_, s, b) = t.remove(name).unwrap();
    t.insert(name.into(), (Dtype::I32, s, b));
    write(&p, &t);
    let e = load_err(&p, &cfg);
    assert!(
        e.contains(name) && e.contains("I32") && e.contains("F32, BF16 or F16"),
        "{e}"
    );

    let e = checkpoint::load(Path::new("/nonexistent/model"), None, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("/nonexistent/model") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn config_that_contradicts_the_weights_is_reported() {
    let fx = block_fixture();
    // Preset architecture on a tiny checkpoint.
    let e = checkpoint::load(
        &fx.dir.join("model.safetensors"),
        Some("block_main_b4_5"),
        None,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("preset `block_main_b4_5`") && e.contains("expects"),
        "{e}"
    );
    // A config.json with the wrong MLP width.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fx.config();
    if let ModelConfig::Block(b) = &mut cfg {
        b.token_decoder.intermediate_size = 200;
    }
    let c = dir.path().join("config.json");
    std::fs::write(&c, cfg.to_json()).unwrap();
    let e = checkpoint::load(
        &fx.dir.join("model.safetensors"),
        None,
        Some(&c),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("config.json") && e.contains("[200, 64]") && e.contains("[256, 64]"),
        "{e}"
    );
    // A config file with a bad field.
    std::fs::write(&c, r#"{"model_type": "gpt_neox", "vocab_size": 10}"#).unwrap();
    let e = checkpoint::load(
        &fx.dir.join("model.safetensors"),
        None,
        Some(&c),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
}
