//! An OpenAI-compatible HTTP server (`blockformer serve`) with continuous batching at block
//! granularity.
//!
//! - [`http`]: the axum routes (`POST /v1/completions`, `GET /v1/models`, `GET /health`,
//!   `GET /metrics`), API-key check, request limits, server-sent-event streaming.
//! - [`scheduler`]: the model thread. It owns the same [`crate::generate::Engine`] that
//!   `generate` and `bench` use; requests join the running batch at the next step (one block
//!   for every active row), finished rows leave at once, and a client that disconnects frees
//!   its row. Prompt scoring for `echo` + `logprobs` runs on a second thread with
//!   [`crate::score::token_logprobs`] (the `eval` semantics).
//! - [`api`]: request parsing (errors name the field) and the response JSON.
//! - [`metrics`]: Prometheus text.
//! - [`client`]: a small HTTP/1.1 client (loopback tests and `blockformer loadtest`).

pub mod api;
pub mod client;
pub mod http;
pub mod metrics;
pub mod scheduler;

use crate::generate::{EngineOptions, PositionMode};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Server settings (the `serve` flags).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The id `/v1/models` lists and requests may name.
    pub model_name: String,
    /// Rows decoded together.
    pub max_batch: usize,
    /// Rows admitted beyond the batch before requests get 429.
    pub max_queue: usize,
    /// Largest `max_tokens` (default: the model's context length).
    pub max_tokens: Option<usize>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest number of completions (prompts x n) in one request.
    pub max_choices: usize,
    /// Largest `logprobs`.
    pub max_logprobs: usize,
    /// When set, every request needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Token-decoder positions of the engine.
    pub positions: PositionMode,
    /// After a shutdown signal, running rows get this long to finish before they are
    /// cancelled (finish_reason "abort").
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model_name: "blockformer".into(),
            max_batch: 64,
            max_queue: 256,
            max_tokens: None,
            max_body_bytes: 4 << 20,
            max_choices: 128,
            max_logprobs: 20,
            api_key: None,
            positions: PositionMode::Trained,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves `model` on `listener` until `shutdown` completes, then stops taking requests, lets
/// running ones finish (for at most `shutdown_grace`, then cancels them) and returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    model: Model,
    tokenizer: Option<Tokenizer>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let opts = ServeOptions {
        max_batch: opts.max_batch.max(1),
        ..opts
    };
    let metrics = Arc::new(metrics::Metrics::new(opts.max_batch));
    let model = Arc::new(model);
    let tokenizer = tokenizer.map(Arc::new);
    let worker = scheduler::Worker::start(
        model.clone(),
        tokenizer.clone(),
        EngineOptions {
            positions: opts.positions,
            max_batch: opts.max_batch,
            ..Default::default()
        },
        metrics.clone(),
    )?;
    let state = Arc::new(http::AppState::new(
        opts.clone(),
        tokenizer,
        model.config.vocab_size(),
        model.config.eos_token_id(),
        model.config.context_length(),
        worker,
        metrics,
    ));
    let app = http::router(state.clone());
    let st = state.clone();
    let grace = opts.shutdown_grace;
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing running requests");
        st.shutting_down.store(true, Ordering::Release);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            st.abort_all();
        });
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await;
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.stop_worker()).await;
    served
}

/// A server on its own thread and runtime (tests, benchmarks, embedding).
pub struct Server {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Binds `addr` (e.g. "127.0.0.1:0") and starts serving.
    pub fn start(
        model: Model,
        tokenizer: Option<Tokenizer>,
        opts: ServeOptions,
        addr: &str,
    ) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("blockformer-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(listener)?;
                    run(l, model, tokenizer, opts, async move {
                        let _ = rx.await;
                    })
                    .await
                })
            })?;
        Ok(Server {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down gracefully and waits until the server has stopped.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        self.begin_shutdown();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the server thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.begin_shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
