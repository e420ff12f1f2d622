//! The OpenAI-compatible server, over real HTTP on loopback: every endpoint, streaming,
//! echo/logprobs against the `eval` scores, concurrency, batch invariance, limits and errors,
//! the queue, auth, client disconnects, graceful shutdown, and the CLI under SIGTERM.

mod common;

use blockformer::checkpoint;
use blockformer::model::Model;
use blockformer::serve::{client, ServeOptions, Server};
use blockformer::tokenizer::Tokenizer;
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const CORPUS: &str = "To be, or not to be, that is the question:\n\
Whether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\n\
Or to take arms against a sea of troubles\n\
And by opposing end them. To die: to sleep;\n";

/// A model folder (config.json, model.safetensors, tokenizer.json) from a fixture, made once.
fn model_dir(fixture: &str) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut g = dirs.lock().unwrap();
    if let Some((_, p)) = g.iter().find(|(f, _)| f == fixture) {
        return p.clone();
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("serve-{fixture}-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let corpus = root.join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(30)).unwrap();
    let tok = root.join("tok.json");
    Tokenizer::train_bpe(&[corpus], 300, &tok).unwrap();
    let model = Fixture::load(&fixture_root().join(fixture)).model();
    let dir = root.join("model");
    checkpoint::save(&model, &dir, Some(&tok)).unwrap();
    g.push((fixture.to_string(), dir.clone()));
    dir
}

fn load(fixture: &str) -> (Model, Tokenizer) {
    let dir = model_dir(fixture);
    let l = checkpoint::load(&dir, None, None, &candle_core::Device::Cpu).unwrap();
    let t = Tokenizer::from_file(&l.tokenizer_path.unwrap()).unwrap();
    (l.model, t)
}

fn start(fixture: &str, opts: ServeOptions) -> Server {
    let (m, t) = load(fixture);
    Server::start(m, Some(t), opts, "127.0.0.1:0").unwrap()
}

/// The vanilla fixture with a context of 30000 tokens and no tokenizer: a request for 20000
/// tokens runs for seconds, so it is surely still running when the test acts on it.
fn start_slow(opts: ServeOptions) -> Server {
    let fx = Fixture::load(&fixture_root().join("vanilla"));
    let mut cfg = fx.config();
    if let blockformer::config::ModelConfig::Vanilla(c) = &mut cfg {
        c.max_position_embeddings = 30_000;
    }
    let file = checkpoint::SafetensorsFile::open(&fx.dir.join("model.safetensors")).unwrap();
    let model =
        checkpoint::load_weights(&file, &cfg, "fixture", &candle_core::Device::Cpu).unwrap();
    Server::start(model, None, opts, "127.0.0.1:0").unwrap()
}

fn opts(max_batch: usize) -> ServeOptions {
    ServeOptions {
        model_name: "test".into(),
        max_batch,
        ..ServeOptions::default()
    }
}

async fn post(addr: SocketAddr, body: Value) -> (u16, Value) {
    let r = client::post_json(addr, "/v1/completions", &[], &body)
        .await
        .unwrap();
    let s = r.status;
    (s, r.json().await.unwrap())
}

/// Streams a request; returns each choice's text reassembled, its finish reason, the chunks.
async fn post_stream(addr: SocketAddr, body: Value) -> (Vec<String>, Vec<String>, Vec<Value>) {
    let mut r = client::post_json(addr, "/v1/completions", &[], &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let mut texts = vec![];
    let mut finish = vec![];
    let mut chunks = vec![];
    let mut done = false;
    while let Some(d) = r.next_event().await.unwrap() {
        assert!(!done, "data after [DONE]");
        if d == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["object"], "text_completion", "{v}");
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if texts.len() <= i {
                texts.resize(i + 1, String::new());
                finish.resize(i + 1, String::new());
            }
            texts[i].push_str(c["text"].as_str().unwrap());
            if let Some(f) = c["finish_reason"].as_str() {
                assert!(finish[i].is_empty(), "two finishes for choice {i}");
                finish[i] = f.to_string();
            }
        }
        chunks.push(v);
    }
    assert!(done, "no [DONE]");
    (texts, finish, chunks)
}

fn texts(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

fn err_of(v: &Value) -> (String, Value) {
    let e = &v["error"];
    assert!(e["type"].is_string(), "{v}");
    (
        e["message"].as_str().unwrap().to_string(),
        e["param"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_in_the_openai_format() {
    let s = start("block_b4", opts(8));
    let a = s.addr();
    let r = client::get(a, "/health", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json().await.unwrap()["status"], "ok");

    let r = client::get(a, "/v1/models", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    let m = r.json().await.unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "test");

    let (st, v) = post(
        a,
        json!({"model": "test", "prompt": "To be, or not", "max_tokens": 9, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    assert_eq!(v["usage"]["completion_tokens"], 9);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 9
    );

    // Prompt forms: a list of strings, token ids, lists of token ids; n; logprobs.
    let (st, v) = post(
        a,
        json!({"prompt": ["To be", "The slings"], "max_tokens": 5, "temperature": 0, "n": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let t = texts(&v);
    assert_eq!(t.len(), 4);
    assert_eq!(t[0], t[1], "greedy choices of one prompt agree");
    let (st, v) = post(
        a,
        json!({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 6, "temperature": 0.9, "seed": 3, "logprobs": 3}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    for c in v["choices"].as_array().unwrap() {
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
        assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 6);
        for (lp, top) in lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(lp["top_logprobs"].as_array().unwrap())
        {
            assert!(lp.as_f64().unwrap() <= 0.0);
            let top = top.as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 3);
        }
        assert_eq!(
            lp["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect::<String>(),
            c["text"].as_str().unwrap()
        );
    }
    let (st, v) = post(a, json!({"prompt": [5, 6, 7], "max_tokens": 0})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(texts(&v), vec![String::new()]);

    let r = client::get(a, "/metrics", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let m = r.text().await.unwrap();
    for name in [
        "blockformer_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 4",
        "blockformer_prompt_tokens_total",
        "blockformer_generation_tokens_total",
        "blockformer_batch_occupancy",
        "blockformer_queue_depth",
        "blockformer_time_to_first_token_seconds_bucket",
        "blockformer_inter_token_latency_seconds_count",
        "blockformer_step_batch_rows_bucket",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_reassemble_to_the_whole_text() {
    for fixture in ["block_b4", "vanilla"] {
        let s = start(fixture, opts(8));
        let a = s.addr();
        let body = json!({"prompt": ["Whether 'tis nobler", "And by"], "max_tokens": 23,
            "temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 11, "n": 2, "echo": true});
        let (st, whole) = post(a, body.clone()).await;
        assert_eq!(st, 200, "{whole}");
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let (streamed, finish, chunks) = post_stream(a, sbody).await;
        assert_eq!(streamed, texts(&whole), "{fixture}");
        assert!(finish.iter().all(|f| f == "length"), "{finish:?}");
        assert!(chunks.len() > 4, "{fixture}: {} chunks", chunks.len());
        assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);
        assert!(streamed[0].starts_with("Whether 'tis nobler"));
        assert_ne!(streamed[0], streamed[1], "seeds differ per choice");
        // Stop strings end the text before them, streamed or not.
        let free = texts(&whole)[2].clone();
        let gen = &free["And by".len()..];
        let cut: Vec<(usize, char)> = gen
            .char_indices()
            .filter(|(_, c)| *c != '\u{FFFD}')
            .collect();
        if cut.len() >= 8 {
            let stop: String = gen[cut[4].0..].chars().take(2).collect();
            let expect = &gen[..gen.find(&stop).unwrap()];
            let b = json!({"prompt": "And by", "max_tokens": 23, "temperature": 0.8,
                "top_k": 50, "top_p": 0.95, "seed": 13, "stop": [stop.clone(), "\u{1}never"]});
            let (st, v) = post(a, b.clone()).await;
            assert_eq!(st, 200);
            assert_eq!(texts(&v)[0], expect, "{fixture}: stop {stop:?} in {gen:?}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            let mut b = b;
            b["stream"] = json!(true);
            let (t, f, _) = post_stream(a, b).await;
            assert_eq!(t[0], expect);
            assert_eq!(f[0], "stop");
        } else {
            panic!("{fixture}: generated text too short for the stop test: {gen:?}");
        }
        s.shutdown().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_equal_the_eval_scores() {
    for fixture in ["block_b4", "block_b8", "vanilla"] {
        // block_b8 has its own vocabulary of 320: still above the tokenizer's 300.
        let (model, tok) = load(fixture);
        let s = start(fixture, opts(4));
        let a = s.addr();
        let text = "The slings and arrows of outrageous fortune, to sleep";
        let ids = tok.encode(text).unwrap();
        let want = blockformer::score::token_logprobs(&model, &ids, 2).unwrap();
        for prompt in [json!(text), json!(ids)] {
            let (st, v) = post(
                a,
                json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2, "temperature": 0}),
            )
            .await;
            assert_eq!(st, 200, "{v}");
            let c = &v["choices"][0];
            assert_eq!(c["text"], text);
            let lp = &c["logprobs"];
            let got = lp["token_logprobs"].as_array().unwrap();
            assert_eq!(got.len(), ids.len());
            assert!(got[0].is_null(), "the first token has no logprob");
            assert!(lp["top_logprobs"][0].is_null());
            for i in 1..ids.len() {
                let w = want[i].as_ref().unwrap();
                let g = got[i].as_f64().unwrap() as f32;
                assert!(
                    (g - w.logprob).abs() < 1e-5,
                    "{fixture} token {i}: {g} vs {}",
                    w.logprob
                );
                let top = lp["top_logprobs"][i].as_object().unwrap();
                let best = top
                    .values()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .fold(f32::MIN, f32::max);
                assert!((best - w.top[0].1).abs() < 1e-5);
            }
            let joined: String = lp["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            assert_eq!(joined, text);
            let offs: Vec<u64> = lp["text_offset"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert_eq!(offs[0], 0);
            assert!(offs.windows(2).all(|w| w[0] <= w[1]));
        }
        // Echo with generation: the prompt's scores, then the generated tokens'.
        let (st, v) = post(
            a,
            json!({"prompt": text, "max_tokens": 5, "echo": true, "logprobs": 1, "temperature": 0}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        assert_eq!(
            lp["token_logprobs"].as_array().unwrap().len(),
            ids.len() + 5
        );
        assert!(v["choices"][0]["text"].as_str().unwrap().starts_with(text));
        s.shutdown().unwrap();
    }
}

/// 32 clients at once get the same answers as each request alone: output does not depend on
/// the rest of the batch (texts equal, logprobs equal within float rounding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_batch_invariant_answers() {
    for fixture in ["block_b4", "vanilla"] {
        let bodies: Vec<Value> = (0..32)
            .map(|i| {
                let words = [
                    "To be",
                    "or not",
                    "the question",
                    "Whether 'tis",
                    "nobler in",
                ];
                let prompt = format!("{} {}", words[i % 5], words[(i / 5) % 5]);
                json!({"prompt": prompt, "max_tokens": 7 + (i % 9), "logprobs": 1,
                    "temperature": if i % 3 == 0 { 0.0 } else { 0.9 }, "seed": i as u64 * 7,
                    "stream": i % 4 == 1})
            })
            .collect();
        // Alone, one at a time, batch of one.
        let s = start(fixture, opts(1));
        let mut alone = vec![];
        for b in &bodies {
            alone.push(run_one(s.addr(), b.clone()).await);
        }
        s.shutdown().unwrap();
        // All at once, batch of 8 (so rows join and leave at different steps).
        let s = start(fixture, opts(8));
        let a = s.addr();
        let tasks: Vec<_> = bodies
            .iter()
            .cloned()
            .map(|b| tokio::spawn(run_one(a, b)))
            .collect();
        let mut together = vec![];
        for t in tasks {
            together.push(t.await.unwrap());
        }
        for (i, ((t1, l1), (t2, l2))) in alone.iter().zip(&together).enumerate() {
            assert_eq!(t1, t2, "{fixture} request {i}: text depends on the batch");
            assert_eq!(l1.len(), l2.len());
            let n = bodies[i]["max_tokens"].as_u64().unwrap() as usize;
            assert!(l1.len() <= n && !l1.is_empty());
            for (x, y) in l1.iter().zip(l2) {
                assert!((x - y).abs() < 1e-4, "{fixture} request {i}: {x} vs {y}");
            }
        }
        let m = client::get(a, "/metrics", &[])
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line = m
            .lines()
            .find(|l| l.starts_with("blockformer_step_batch_rows_sum"))
            .unwrap();
        let steps = m
            .lines()
            .find(|l| l.starts_with("blockformer_step_batch_rows_count"))
            .unwrap();
        let rows: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        let steps: f64 = steps.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(rows / steps > 1.5, "{fixture}: mean batch {}", rows / steps);
        s.shutdown().unwrap();
    }
}

/// Text and the sampled tokens' logprobs of one request, streamed or not.
async fn run_one(a: SocketAddr, b: Value) -> (String, Vec<f64>) {
    if b["stream"] == json!(true) {
        let mut r = client::post_json(a, "/v1/completions", &[], &b)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let (mut text, mut lps) = (String::new(), vec![]);
        while let Some(d) = r.next_event().await.unwrap() {
            if d == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(&d).unwrap();
            let c = &v["choices"][0];
            text.push_str(c["text"].as_str().unwrap());
            if let Some(l) = c["logprobs"]["token_logprobs"].as_array() {
                lps.extend(l.iter().map(|x| x.as_f64().unwrap()));
            }
        }
        (text, lps)
    } else {
        let (st, v) = post(a, b).await;
        assert_eq!(st, 200, "{v}");
        let c = &v["choices"][0];
        let lps = c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        (c["text"].as_str().unwrap().to_string(), lps)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_with_the_field_named() {
    let s = start(
        "block_b4",
        ServeOptions {
            max_tokens: Some(100),
            max_body_bytes: 20_000,
            ..opts(4)
        },
    );
    let a = s.addr();
    // Malformed JSON.
    let r = client::send(a, "POST", "/v1/completions", &[], Some(b"{\"prompt\": "))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let (msg, _) = err_of(&r.json().await.unwrap());
    assert!(msg.contains("JSON"), "{msg}");
    let long: Vec<u32> = vec![7; 2049];
    let cases = [
        (json!([1, 2]), "", 400),
        (json!({"max_tokens": 3}), "prompt", 400),
        (json!({"prompt": {"a": 1}}), "prompt", 400),
        (json!({"prompt": []}), "prompt", 400),
        (json!({"prompt": [1, "x"]}), "prompt", 400),
        (json!({"prompt": [1, 99999]}), "prompt", 400),
        (
            json!({"prompt": "hi", "max_tokens": "ten"}),
            "max_tokens",
            400,
        ),
        (json!({"prompt": "hi", "max_tokens": -1}), "max_tokens", 400),
        (
            json!({"prompt": "hi", "max_tokens": 101}),
            "max_tokens",
            400,
        ),
        (
            json!({"prompt": "hi", "temperature": -1}),
            "temperature",
            400,
        ),
        (
            json!({"prompt": "hi", "temperature": "hot"}),
            "temperature",
            400,
        ),
        (json!({"prompt": "hi", "top_p": 0}), "top_p", 400),
        (json!({"prompt": "hi", "top_k": 1.5}), "top_k", 400),
        (json!({"prompt": "hi", "n": 0}), "n", 400),
        (json!({"prompt": "hi", "n": 500}), "n", 400),
        (json!({"prompt": "hi", "logprobs": 100}), "logprobs", 400),
        (json!({"prompt": "hi", "stop": 5}), "stop", 400),
        (json!({"prompt": "hi", "stop": [""]}), "stop", 400),
        (json!({"prompt": "hi", "stream": "yes"}), "stream", 400),
        (json!({"prompt": "hi", "echo": 1}), "echo", 400),
        (json!({"prompt": "hi", "seed": "x"}), "seed", 400),
        (
            json!({"prompt": "hi", "presence_penalty": 1.0}),
            "presence_penalty",
            400,
        ),
        (json!({"prompt": long, "max_tokens": 0}), "prompt", 400),
        (
            json!({"prompt": vec![7; 2000], "max_tokens": 60}),
            "max_tokens",
            400,
        ),
        (json!({"prompt": "hi", "model": "gpt-4"}), "model", 404),
    ];
    for (body, param, status) in cases {
        let (st, v) = post(a, body.clone()).await;
        assert_eq!(st, status, "{body}: {v}");
        let (msg, p) = err_of(&v);
        if !param.is_empty() {
            assert_eq!(p, json!(param), "{body}: {v}");
            assert!(msg.contains(param), "{body}: {msg}");
        }
    }
    let (_, v) = post(a, json!({"prompt": long, "max_tokens": 0})).await;
    assert!(err_of(&v).0.contains("context length"), "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Too large a body: 413 in the same format.
    let big = json!({"prompt": "x".repeat(30_000)});
    let (st, v) = post(a, big).await;
    assert_eq!(st, 413, "{v}");
    assert!(err_of(&v).0.contains("limit"));
    // Unknown route.
    let r = client::get(a, "/v1/chat", &[]).await.unwrap();
    assert_eq!(r.status, 404);
    err_of(&r.json().await.unwrap());
    // The server still works.
    let (st, _) = post(a, json!({"prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(st, 200);
    let m = client::get(a, "/metrics", &[])
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("endpoint=\"/v1/completions\",status=\"400\""),
        "{m}"
    );
    s.shutdown().unwrap();
}

async fn wait_until(a: SocketAddr, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let v = client::get(a, "/health", &[])
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if f(&v) {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gets_429_and_disconnects_free_their_slots() {
    let s = start_slow(ServeOptions {
        max_queue: 1,
        ..opts(1)
    });
    let a = s.addr();
    let long = json!({"prompt": [3, 4, 5], "max_tokens": 20000, "temperature": 0, "stream": true, "ignore_eos": true});
    let mut first = client::post_json(a, "/v1/completions", &[], &long)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert!(first.next_event().await.unwrap().is_some());
    let second = client::post_json(a, "/v1/completions", &[], &long)
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    wait_until(a, "two rows in flight", |v| v["inflight_rows"] == 2).await;
    let r = client::post_json(
        a,
        "/v1/completions",
        &[],
        &json!({"prompt": [1], "max_tokens": 1}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    let (msg, _) = err_of(&r.json().await.unwrap());
    assert!(msg.contains("queue"), "{msg}");
    // Streaming clients leave (one running, one queued): their rows are cancelled and the
    // slots free.
    drop(first);
    drop(second);
    wait_until(a, "slots freed", |v| v["inflight_rows"] == 0).await;
    // A non-streaming client that hangs up mid-request frees its slot too.
    {
        use std::io::Write;
        let body =
            json!({"prompt": [3, 4, 5], "max_tokens": 20000, "temperature": 0, "ignore_eos": true})
                .to_string();
        let mut c = std::net::TcpStream::connect(a).unwrap();
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        wait_until(a, "row running", |v| v["inflight_rows"] == 1).await;
    }
    wait_until(a, "slot freed after hang-up", |v| v["inflight_rows"] == 0).await;
    let m = client::get(a, "/metrics", &[])
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("blockformer_completions_finished_total{reason=\"abort\"} 3"),
        "{m}"
    );
    let (st, _) = post(a, json!({"prompt": [1], "max_tokens": 1})).await;
    assert_eq!(st, 200);
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let s = start(
        "block_b4",
        ServeOptions {
            api_key: Some("sekret".into()),
            ..opts(2)
        },
    );
    let a = s.addr();
    let body = json!({"prompt": "To be", "max_tokens": 2});
    for (hdr, want) in [
        (None, 401),
        (Some("Bearer wrong"), 401),
        (Some("sekret"), 401),
        (Some("Bearer sekret"), 200),
    ] {
        let h: Vec<(&str, &str)> = hdr.map(|h| vec![("authorization", h)]).unwrap_or_default();
        let r = client::post_json(a, "/v1/completions", &h, &body)
            .await
            .unwrap();
        assert_eq!(r.status, want, "{hdr:?}");
        if want == 401 {
            let (msg, _) = err_of(&r.json().await.unwrap());
            assert!(msg.contains("API key"), "{msg}");
        }
        for path in ["/v1/models", "/health", "/metrics"] {
            let r = client::get(a, path, &h).await.unwrap();
            assert_eq!(r.status, want, "{path} {hdr:?}");
        }
    }
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_requests() {
    let mut s = start("block_b4", opts(4));
    let a = s.addr();
    let body = json!({"prompt": [3, 4, 5], "max_tokens": 400, "temperature": 0, "stream": true, "ignore_eos": true, "stream_options": {"include_usage": true}});
    let mut r = client::post_json(a, "/v1/completions", &[], &body)
        .await
        .unwrap();
    assert!(r.next_event().await.unwrap().is_some());
    s.begin_shutdown();
    // New requests are refused (503 while draining, or the connection is refused).
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Ok(r2) = client::post_json(a, "/v1/completions", &[], &json!({"prompt": [1]})).await {
        assert_eq!(r2.status, 503);
    }
    let mut usage = Value::Null;
    let mut done = false;
    while let Some(d) = r.next_event().await.unwrap() {
        if d == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    assert!(done);
    assert_eq!(
        usage["completion_tokens"], 400,
        "the running request completed"
    );
    tokio::task::spawn_blocking(move || s.shutdown().unwrap())
        .await
        .unwrap();
    assert!(
        client::get(a, "/health", &[]).await.is_err(),
        "still listening"
    );
}

#[test]
fn cli_serves_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = model_dir("block_b4");
    let mut child = Command::new(env!("CARGO_BIN_EXE_blockformer"))
        .args(["serve", "--model"])
        .arg(&dir)
        .args(["--port", "0", "--max-batch", "4", "--threads", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    for _ in 0..20 {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if let Some(rest) = line.strip_prefix("listening on http://") {
            addr = Some(
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap(),
            );
            break;
        }
    }
    let Some(addr) = addr else {
        let _ = child.kill();
        panic!("no address in the log:\n{log}");
    };
    assert!(addr.ip().is_loopback());
    assert!(log.contains("served as `model`"), "{log}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (st, v) = rt.block_on(post(
        addr,
        json!({"model": "model", "prompt": "To be", "max_tokens": 4}),
    ));
    assert_eq!(st, 200, "{v}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let t0 = Instant::now();
    let code = loop {
        if let Some(c) = child.try_wait().unwrap() {
            break c;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("server did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert!(code.success(), "exit {code:?}: {rest}");
    assert!(rest.contains("server stopped"), "{rest}");
}

/// A model without a tokenizer takes token ids and shows each token as " ID"; a stop string
/// cuts the text and the logprobs of the tokens after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_id_models_and_stop_strings_trim_logprobs() {
    let (model, _) = load("vanilla");
    let s = Server::start(model, None, opts(4), "127.0.0.1:0").unwrap();
    let a = s.addr();
    let (st, v) = post(a, json!({"prompt": "hello", "max_tokens": 3})).await;
    assert_eq!(st, 400);
    assert!(err_of(&v).0.contains("token ids"), "{v}");
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 20, "temperature": 0.9, "seed": 5,
        "logprobs": 1, "ignore_eos": true});
    let (st, full) = post(a, body.clone()).await;
    assert_eq!(st, 200, "{full}");
    let c = &full["choices"][0];
    let text = c["text"].as_str().unwrap();
    let toks: Vec<&str> = c["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(toks.len(), 20);
    assert_eq!(toks.concat(), text);
    // Stop at the text of tokens 5 and 6 (its first occurrence).
    let stop = format!("{}{}", toks[5], toks[6]);
    let p = text.find(&stop).unwrap();
    let mut starts = vec![];
    let mut off = 0;
    for t in &toks {
        starts.push(off);
        off += t.len();
    }
    let keep = starts.iter().filter(|&&s0| s0 < p).count();
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!(stop);
        b["stream"] = json!(stream);
        let (got_text, got_lps) = run_one(a, b).await;
        assert_eq!(got_text, text[..p], "stream {stream}");
        if !stream {
            assert_eq!(got_lps.len(), keep, "stream {stream}");
        }
        let want: Vec<f64> = c["logprobs"]["token_logprobs"].as_array().unwrap()[..keep]
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got_lps[..keep], want[..]);
    }
    // Echo of a token-id prompt shows the ids.
    let (_, v) = post(
        a,
        json!({"prompt": [5, 6, 7], "max_tokens": 0, "echo": true}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"], " 5 6 7");
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_the_grace_period_cancels_running_requests() {
    let mut s = start_slow(ServeOptions {
        shutdown_grace: Duration::ZERO,
        ..opts(2)
    });
    let a = s.addr();
    let body = json!({"prompt": [3, 4, 5], "max_tokens": 20000, "temperature": 0, "stream": true, "ignore_eos": true});
    let mut r = client::post_json(a, "/v1/completions", &[], &body)
        .await
        .unwrap();
    assert!(r.next_event().await.unwrap().is_some());
    let t0 = Instant::now();
    s.begin_shutdown();
    let mut finish = None;
    while let Some(d) = r.next_event().await.unwrap() {
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("abort"));
    tokio::task::spawn_blocking(move || s.shutdown().unwrap())
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn loadtest_command_reports_throughput_and_latency() {
    use std::process::Command;
    let s = start("block_b4", opts(4));
    let json_out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadtest-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_blockformer"))
        .args(["loadtest", "--url", &format!("http://{}", s.addr())])
        .args([
            "--requests",
            "12",
            "--concurrency",
            "4",
            "--max-tokens",
            "9",
        ])
        .args(["--prompt-len", "5", "--time-limit", "60", "--json"])
        .arg(&json_out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("12 ok"), "{stdout}");
    assert!(
        stdout.contains("output tokens/s") && stdout.contains("p99"),
        "{stdout}"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    assert_eq!(v["output_tokens"], 12 * 9);
    assert!(v["ttft_s"]["p50"].as_f64().unwrap() > 0.0);
    // Only loopback addresses are load-tested.
    let out = Command::new(env!("CARGO_BIN_EXE_blockformer"))
        .args([
            "loadtest",
            "--url",
            "http://192.0.2.1:8080",
            "--requests",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only talks to this machine"));
    s.shutdown().unwrap();
}
