//! `blockformer serve`: an OpenAI-compatible completions server with continuous batching.

use super::common::ModelArgs;
use super::generate::Compat;
use anyhow::Context;
use blockformer::generate::PositionMode;
use blockformer::serve::{self, ServeOptions};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind; loopback by default. Binding elsewhere without --api-key is allowed
    /// but warned about.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Rows (completions) decoded together; more wait in the queue.
    #[arg(long, default_value_t = 64, value_parser = super::at_least_one)]
    pub max_batch: usize,
    /// Rows admitted beyond the batch; past that, requests get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// When set, every request needs `Authorization: Bearer KEY` (401 otherwise).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model id that /v1/models lists and requests name (default: the model folder's or
    /// preset's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Largest max_tokens a request may ask for (default: the model's context length).
    #[arg(long, value_parser = super::at_least_one)]
    pub max_tokens_limit: Option<usize>,
    /// Largest request body in bytes (413 past it).
    #[arg(long, default_value_t = 4 << 20, value_parser = super::at_least_one)]
    pub max_body_bytes: usize,
    /// Largest number of completions (prompts x n) in one request.
    #[arg(long, default_value_t = 128, value_parser = super::at_least_one)]
    pub max_choices: usize,
    /// Seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Token-decoder position rule of the engine.
    #[arg(long, value_enum, default_value_t = Compat::Trained)]
    pub compat: Compat,
}

fn default_name(a: &ModelArgs) -> String {
    if let Some(p) = &a.model {
        let p = if p.is_file() {
            p.parent().unwrap_or(p)
        } else {
            p.as_path()
        };
        if let Some(n) = p.file_name() {
            return n.to_string_lossy().into_owned();
        }
    }
    a.preset.clone().unwrap_or_else(|| "blockformer".into())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !(a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0) {
        anyhow::bail!("--shutdown-grace must be a number of seconds >= 0");
    }
    let loaded = a.model.load()?;
    let name = a
        .model_name
        .clone()
        .unwrap_or_else(|| default_name(&a.model));
    eprintln!("model: {} (served as `{name}`)", loaded.description);
    if loaded.tokenizer.is_none() {
        eprintln!("note: no tokenizer; prompts must be token ids and text shows ids");
    }
    let loopback = matches!(a.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    if !loopback && a.api_key.is_none() {
        eprintln!(
            "warning: binding {} without --api-key exposes the model to the network",
            a.host
        );
    }
    let opts = ServeOptions {
        model_name: name,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        max_tokens: a.max_tokens_limit,
        max_body_bytes: a.max_body_bytes,
        max_choices: a.max_choices,
        api_key: a.api_key.clone(),
        positions: match a.compat {
            Compat::Trained => PositionMode::Trained,
            Compat::Official => PositionMode::Official,
        },
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        ..ServeOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot bind {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "listening on http://{addr} (max batch {}, queue {}{})",
            opts.max_batch,
            opts.max_queue,
            if opts.api_key.is_some() {
                ", API key required"
            } else {
                ""
            }
        );
        serve::run(
            listener,
            loaded.model,
            loaded.tokenizer,
            opts,
            shutdown_signal(),
        )
        .await?;
        eprintln!("server stopped");
        Ok(())
    })
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutdown signal received: finishing running requests");
}
