//! The axum routes: `/v1/completions`, `/v1/models`, `/health`, `/metrics`, with API-key and
//! request-counting middleware.

use super::api::{self, ApiError, LogprobEntry, LogprobsObject, ParseLimits};
use super::metrics::Metrics;
use super::scheduler::{Admission, Finish, Job, RowEvent, RowJob, ScoreJob, Worker};
use super::ServeOptions;
use crate::generate::{GenRequest, SamplingParams, TokenLogprob};
use crate::tokenizer::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Everything the handlers share.
pub struct AppState {
    pub opts: ServeOptions,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub vocab_size: usize,
    pub eos_token_id: u32,
    pub context_length: usize,
    pub created: u64,
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
    next_id: AtomicU64,
    worker: Mutex<Option<Worker>>,
}

impl AppState {
    pub fn new(
        opts: ServeOptions,
        tokenizer: Option<Arc<Tokenizer>>,
        vocab_size: usize,
        eos_token_id: u32,
        context_length: usize,
        worker: Worker,
        metrics: Arc<Metrics>,
    ) -> Self {
        AppState {
            admission: Admission::new(opts.max_batch + opts.max_queue),
            opts,
            tokenizer,
            vocab_size,
            eos_token_id,
            context_length,
            created: now_secs(),
            metrics,
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            worker: Mutex::new(Some(worker)),
        }
    }

    fn with_worker<R>(&self, f: impl FnOnce(&Worker) -> R) -> Option<R> {
        let g = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(f)
    }

    /// Cancels every running row (end of the shutdown grace period).
    pub fn abort_all(&self) {
        self.with_worker(|w| w.submit(Job::AbortAll));
    }

    /// Stops the model threads and waits for them.
    pub fn stop_worker(&self) {
        let w = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = w {
            w.stop();
        }
    }

    fn limits(&self) -> ParseLimits<'_> {
        ParseLimits {
            tokenizer: self.tokenizer.as_deref(),
            vocab_size: self.vocab_size,
            eos_token_id: self.eos_token_id,
            context_length: self.context_length,
            max_tokens_limit: self.opts.max_tokens.unwrap_or(self.context_length),
            max_choices: self.opts.max_choices,
            max_logprobs: self.opts.max_logprobs,
            max_stops: 16,
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(
            state.opts.max_body_bytes,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let ep = endpoint_label(req.uri().path());
    let r = next.run(req).await;
    st.metrics.request(ep, r.status().as_u16());
    r
}

/// Constant-time comparison of the presented key.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|g| same_key(g.as_bytes(), key.as_bytes()));
        if !ok {
            let msg = if given.is_none() {
                "missing API key: send the header `Authorization: Bearer KEY`"
            } else {
                "incorrect API key provided"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg)
                .with_code("invalid_api_key")
                .into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no route {} {} (this server has POST /v1/completions, GET /v1/models, GET /health, GET /metrics)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.opts.model_name,
            "object": "model",
            "created": st.created,
            "owned_by": "blockformer",
            "max_model_len": st.context_length,
        }],
    }))
    .into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let (running, queued) = st.metrics.queue();
    let down = st.shutting_down.load(Ordering::Acquire);
    let alive = st.with_worker(Worker::is_alive) == Some(true);
    let status = if down || !alive {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        status,
        axum::Json(json!({
            "status": if down {
                "shutting_down"
            } else if !alive {
                "model_thread_stopped"
            } else {
                "ok"
            },
            "model": st.opts.model_name,
            "running_rows": running,
            "queued_rows": queued,
            "inflight_rows": st.admission.inflight(),
            "max_batch": st.opts.max_batch,
        })),
    )
        .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = st
        .metrics
        .render(st.admission.inflight(), st.admission.capacity);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completions_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn logprob_entry(tok: Option<&Tokenizer>, lp: &TokenLogprob) -> LogprobEntry {
    LogprobEntry {
        token: api::token_text(tok, lp.token),
        logprob: Some(lp.logprob),
        top: Some(
            lp.top
                .iter()
                .map(|&(t, l)| (api::token_text(tok, t), l))
                .collect(),
        ),
    }
}

/// Per-choice state while the rows run.
struct Choice {
    text: String,
    logprobs: Option<LogprobsObject>,
    offset: usize,
    tokens: usize,
    /// Logprob entries of the echoed prompt.
    prompt_entries: usize,
    finish: Option<Finish>,
}

async fn completions_inner(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than this server's limit of {} bytes",
                st.opts.max_body_bytes
            )
        } else {
            format!("could not read the request body: {}", r.body_text())
        };
        ApiError::new(status, "invalid_request_error", msg)
    })?;
    if st.shutting_down.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        ));
    }
    let req = api::parse_completion(&body, &st.limits())?;
    if let Some(m) = &req.model {
        if m != &st.opts.model_name {
            return Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "model: `{m}` does not exist; this server serves `{}`",
                        st.opts.model_name
                    ),
                )
                .with_code("model_not_found")
            });
        }
    }
    let tok = st.tokenizer.clone();
    let n_prompts = req.prompts.len();
    let scoring = req.echo && req.logprobs.is_some();
    let gen_rows = if req.max_tokens > 0 {
        n_prompts * req.n
    } else {
        0
    };
    let n_score = if scoring { n_prompts } else { 0 };
    if gen_rows + n_score > st.admission.capacity {
        return Err(ApiError::field(
            "n",
            format!(
                "the request needs {} rows but this server admits at most {} at once",
                gen_rows + n_score,
                st.admission.capacity
            ),
        ));
    }
    let mut permits = st.admission.try_admit(gen_rows + n_score).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server's queue is full ({} rows in flight, capacity {}); retry later",
                st.admission.inflight(),
                st.admission.capacity
            ),
        )
        .with_code("queue_full")
    })?;
    let prompt_tokens: usize = req.prompts.iter().map(|p| p.ids.len()).sum();
    st.metrics.prompt_tokens(prompt_tokens);

    // Echo + logprobs: the prompt's token log-likelihoods, scored as `eval` does.
    let mut prompt_lps: Vec<Option<Vec<LogprobEntry>>> = vec![None; n_prompts];
    if scoring {
        let top_n = req.logprobs.unwrap_or(0);
        let mut waits = Vec::with_capacity(n_prompts);
        for p in &req.prompts {
            let (tx, rx) = oneshot::channel();
            st.metrics.scoring_waiting(1);
            let job = ScoreJob {
                ids: p.ids.clone(),
                top_n,
                reply: tx,
                permit: permits.pop().expect("permit"),
            };
            if st.with_worker(|w| w.score(job)) != Some(true) {
                st.metrics.scoring_waiting(-1);
                return Err(stopped());
            }
            waits.push(rx);
        }
        for (i, rx) in waits.into_iter().enumerate() {
            let scores = rx
                .await
                .map_err(|_| stopped())?
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e))?;
            let ids = &req.prompts[i].ids;
            let entries = ids
                .iter()
                .zip(scores)
                .map(|(&id, s)| match s {
                    None => LogprobEntry {
                        token: api::token_text(tok.as_deref(), id),
                        logprob: None,
                        top: None,
                    },
                    Some(lp) => logprob_entry(tok.as_deref(), &lp),
                })
                .collect();
            prompt_lps[i] = Some(entries);
        }
    }

    // The choices, echo included.
    let mut choices = Vec::with_capacity(n_prompts * req.n);
    for (pi, p) in req.prompts.iter().enumerate() {
        for _ in 0..req.n {
            let mut c = Choice {
                text: String::new(),
                logprobs: req.logprobs.map(|_| LogprobsObject::default()),
                offset: 0,
                tokens: 0,
                prompt_entries: 0,
                finish: None,
            };
            if req.echo {
                c.text = p
                    .text
                    .clone()
                    .unwrap_or_else(|| api::ids_text(tok.as_deref(), &p.ids));
                if let (Some(lp), Some(entries)) = (c.logprobs.as_mut(), &prompt_lps[pi]) {
                    lp.extend(entries.clone(), &mut c.offset);
                    c.prompt_entries = entries.len();
                }
                c.offset = c.text.len();
            }
            if req.max_tokens == 0 {
                c.finish = Some(Finish::Length);
            }
            choices.push(c);
        }
    }

    // Generation rows: one per prompt and choice, seeded seed + index.
    let (tx, rx) = mpsc::unbounded_channel::<RowEvent>();
    if gen_rows > 0 {
        let eos = (!req.ignore_eos).then_some(st.eos_token_id);
        for (pi, p) in req.prompts.iter().enumerate() {
            for j in 0..req.n {
                let index = pi * req.n + j;
                let seed = match req.seed {
                    Some(s) => s.wrapping_add(index as u64),
                    None => rand::random(),
                };
                let job = RowJob {
                    index,
                    req: GenRequest {
                        prompt: p.ids.clone(),
                        prompt_mask: None,
                        max_new_tokens: req.max_tokens,
                        sampling: SamplingParams {
                            temperature: req.temperature,
                            top_k: req.top_k,
                            top_p: req.top_p,
                            seed,
                        },
                        eos_token_id: eos,
                        logprobs: req.logprobs,
                    },
                    stop: req.stop.clone(),
                    tx: tx.clone(),
                    permit: permits.pop().expect("permit"),
                };
                if st.with_worker(|w| w.submit(Job::Row(Box::new(job)))) != Some(true) {
                    return Err(stopped());
                }
            }
        }
    }
    drop(tx);
    let id = format!(
        "cmpl-{:x}{:08x}",
        st.created,
        st.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let run = Run {
        id,
        model: st.opts.model_name.clone(),
        created: now_secs(),
        tok,
        prompt_tokens,
        choices,
        rx,
        pending: gen_rows,
    };
    if req.stream {
        Ok(stream_response(run, req.include_usage))
    } else {
        run.collect().await
    }
}

fn stopped() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the model worker has stopped (the server is shutting down)",
    )
}

struct Run {
    id: String,
    model: String,
    created: u64,
    tok: Option<Arc<Tokenizer>>,
    prompt_tokens: usize,
    choices: Vec<Choice>,
    rx: mpsc::UnboundedReceiver<RowEvent>,
    pending: usize,
}

impl Run {
    /// Applies one row event; returns the chunk's logprobs for streaming.
    fn apply(&mut self, ev: &RowEvent) -> Option<LogprobsObject> {
        let tok = self.tok.clone();
        let c = &mut self.choices[ev.index];
        c.text.push_str(&ev.text);
        // Past a stop string: no logprobs for the tokens after it.
        let shown = match ev.keep_tokens {
            Some(k) => k.saturating_sub(c.tokens).min(ev.logprobs.len()),
            None => ev.logprobs.len(),
        };
        let before = c.tokens;
        c.tokens += ev.tokens.len();
        let chunk = c.logprobs.as_mut().map(|lp| {
            if let Some(k) = ev.keep_tokens {
                if k < before {
                    let n = c.prompt_entries + k;
                    lp.tokens.truncate(n);
                    lp.token_logprobs.truncate(n);
                    lp.top_logprobs.truncate(n);
                    lp.text_offset.truncate(n);
                }
            }
            let entries: Vec<LogprobEntry> = ev.logprobs[..shown]
                .iter()
                .map(|l| logprob_entry(tok.as_deref(), l))
                .collect();
            let mut part = LogprobsObject::default();
            let mut off = c.offset;
            part.extend(entries.clone(), &mut off);
            lp.extend(entries, &mut c.offset);
            part
        });
        if ev.finish.is_some() {
            c.finish = ev.finish.clone();
            self.pending -= 1;
        }
        chunk
    }

    fn usage(&self) -> Value {
        api::usage_json(
            self.prompt_tokens,
            self.choices.iter().map(|c| c.tokens).sum(),
        )
    }

    async fn collect(mut self) -> Result<Response, ApiError> {
        while self.pending > 0 {
            match self.rx.recv().await {
                Some(ev) => {
                    if let Some(Finish::Error(e)) = &ev.finish {
                        return Err(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "server_error",
                            e.clone(),
                        ));
                    }
                    self.apply(&ev);
                }
                None => return Err(stopped()),
            }
        }
        let choices = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                api::choice_json(
                    i,
                    &c.text,
                    c.logprobs.as_ref(),
                    c.finish.as_ref().map(Finish::reason),
                )
            })
            .collect();
        let body = api::completion_json(
            &self.id,
            self.created,
            &self.model,
            choices,
            Some(self.usage()),
        );
        Ok(axum::Json(body).into_response())
    }

    fn chunk(&self, choice: Value) -> Event {
        let v = api::completion_json(&self.id, self.created, &self.model, vec![choice], None);
        Event::default().data(v.to_string())
    }
}

/// Server-sent events in the OpenAI format: one chunk per row and step, `data: [DONE]` last.
fn stream_response(mut run: Run, include_usage: bool) -> Response {
    let (etx, erx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        // Echo (and the prompt's logprobs) first; choices without rows end here.
        for i in 0..run.choices.len() {
            let c = &run.choices[i];
            if !c.text.is_empty() || c.finish.is_some() {
                let ch = api::choice_json(
                    i,
                    &c.text,
                    c.logprobs.as_ref(),
                    c.finish.as_ref().map(Finish::reason),
                );
                if etx.send(run.chunk(ch)).await.is_err() {
                    return;
                }
            }
        }
        while run.pending > 0 {
            let Some(ev) = run.rx.recv().await else {
                let e = stopped();
                let _ = etx.send(Event::default().data(e.body().to_string())).await;
                return;
            };
            if let Some(Finish::Error(msg)) = &ev.finish {
                let e = ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    msg.clone(),
                );
                let _ = etx.send(Event::default().data(e.body().to_string())).await;
                return;
            }
            let lp = run.apply(&ev);
            if ev.text.is_empty() && ev.finish.is_none() && lp.is_none() {
                continue; // nothing to show yet (text held back for a stop string or a UTF-8 tail)
            }
            let ch = api::choice_json(
                ev.index,
                &ev.text,
                lp.as_ref(),
                ev.finish.as_ref().map(Finish::reason),
            );
            if etx.send(run.chunk(ch)).await.is_err() {
                return; // the client left: dropping `run` cancels its rows
            }
        }
        if include_usage {
            let mut v = api::completion_json(&run.id, run.created, &run.model, vec![], None);
            v["usage"] = run.usage();
            if etx
                .send(Event::default().data(v.to_string()))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = etx.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::unfold(erx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream).into_response()
}
