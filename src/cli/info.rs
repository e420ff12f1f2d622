//! `blockformer info`: architecture and parameter counts.

use super::common::{millions, ModelArgs};
use blockformer::config::{ModelConfig, NeoXConfig, Projection};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the config and counts as JSON.
    #[arg(long)]
    pub json: bool,
}

fn stack(name: &str, c: &NeoXConfig) -> String {
    format!(
        "{name}: {} layers, width {}, {} heads (head dim {}), MLP {}, rotary {} dims (base {}), LayerNorm eps {:e}, {} residual, {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.head_dim(),
        c.intermediate_size,
        c.rotary_dims(),
        c.rotary_emb_base,
        c.layer_norm_eps,
        if c.use_parallel_residual { "parallel" } else { "sequential" },
        c.hidden_act
    )
}

pub fn describe(cfg: &ModelConfig) -> Vec<String> {
    let mut out = Vec::new();
    match cfg {
        ModelConfig::Block(b) => {
            out.push(format!(
                "kind: Block Transformer, block length {}, prefix vectors R = {}, context {} tokens, vocab {}",
                b.block_length,
                b.n_prefix(),
                b.context_length,
                b.vocab_size()
            ));
            out.push(format!(
                "embedder: lookup, width {}, {}",
                b.embedder.hidden_size,
                match b.embedder.projection_method {
                    Projection::Concat => "concat".to_string(),
                    Projection::ProjectionLayer =>
                        format!("projection layer -> {}", b.block_decoder.hidden_size),
                }
            ));
            out.push(stack("block decoder", &b.block_decoder));
            out.push(stack("token decoder", &b.token_decoder));
        }
        ModelConfig::Vanilla(v) => {
            out.push(format!(
                "kind: GPT-NeoX causal LM (vanilla), context {} tokens, vocab {}",
                v.max_position_embeddings, v.vocab_size
            ));
            out.push(stack("decoder", v));
        }
    }
    out.push(format!(
        "parameters: non-embedding {} ({}), total {} ({})",
        millions(cfg.non_embedding_params()),
        cfg.non_embedding_params(),
        millions(cfg.total_params()),
        cfg.total_params()
    ));
    out
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Presets and configs need no weights; a checkpoint is loaded to check it.
    let (cfg, source) = match (&a.model.model, &a.model.preset, &a.model.config) {
        (None, Some(p), None) => (blockformer::config::preset(p)?, format!("preset {p}")),
        (None, None, Some(c)) => (ModelConfig::from_file(c)?, c.display().to_string()),
        _ => {
            let l = a.model.load()?;
            (l.model.config.clone(), l.description)
        }
    };
    if a.json {
        let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json())?;
        v["non_embedding_params"] = cfg.non_embedding_params().into();
        v["total_params"] = cfg.total_params().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model: {source}");
        for line in describe(&cfg) {
            println!("{line}");
        }
    }
    Ok(())
}
