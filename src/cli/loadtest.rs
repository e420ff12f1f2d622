//! `blockformer loadtest`: a bounded load test of a running server on this machine (loopback
//! only). Every request streams, so time to first token and inter-token gaps are measured at
//! the client; throughput counts the tokens the server reports in `usage`.

use anyhow::{bail, Context};
use blockformer::serve::client;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server address (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Requests to send in all (at most 100000).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Tokens to generate per request (EOS is ignored, so every request generates them all).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Random token-id prompts of this length (works without a tokenizer).
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// A text prompt instead of random ids.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Stop sending new requests after this many seconds (at most 3600); requests still
    /// running 60 s after that are abandoned (counted as failed, status 0).
    #[arg(long, default_value_t = 120.0)]
    pub time_limit: f64,
    #[arg(long)]
    pub api_key: Option<String>,
    /// Seed of the prompts and of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Host and port of a loopback URL.
fn loopback_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url}: expected http://HOST:PORT"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .with_context(|| format!("--url {url}: cannot resolve {hostport}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.ip().is_loopback())
        .copied()
        .with_context(|| {
            format!(
                "--url {url}: the load test only talks to this machine (127.0.0.1, ::1, localhost)"
            )
        })?;
    Ok(addr)
}

struct Sample {
    ok: bool,
    status: u16,
    latency: f64,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    completion_tokens: usize,
    prompt_tokens: usize,
}

async fn one(addr: SocketAddr, body: Value, auth: Option<String>, max_tokens: usize) -> Sample {
    let t0 = Instant::now();
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let mut s = Sample {
        ok: false,
        status: 0,
        latency: 0.0,
        ttft: None,
        gaps: vec![],
        completion_tokens: 0,
        prompt_tokens: 0,
    };
    let mut resp = match client::post_json(addr, "/v1/completions", &headers, &body).await {
        Ok(r) => r,
        Err(_) => return s,
    };
    s.status = resp.status;
    if resp.status != 200 {
        let _ = resp.text().await;
        s.latency = t0.elapsed().as_secs_f64();
        return s;
    }
    let mut last: Option<Instant> = None;
    let mut done = false;
    while let Ok(Some(data)) = resp.next_event().await {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            break;
        };
        if v.get("error").is_some() {
            break;
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            s.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let has_text = v["choices"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty()))
        });
        if has_text {
            let now = Instant::now();
            match last {
                None => s.ttft = Some((now - t0).as_secs_f64()),
                Some(l) => s.gaps.push((now - l).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    s.latency = t0.elapsed().as_secs_f64();
    s.ok = done && (s.completion_tokens == max_tokens || max_tokens == 0);
    s
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
    xs[i.min(xs.len() - 1)]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.requests == 0 || a.requests > 100_000 {
        bail!("--requests must be between 1 and 100000");
    }
    if a.concurrency == 0 || a.concurrency > 1024 {
        bail!("--concurrency must be between 1 and 1024");
    }
    if !(a.time_limit > 0.0 && a.time_limit <= 3600.0) {
        bail!("--time-limit must be between 0 and 3600 seconds");
    }
    let addr = loopback_addr(&a.url)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let auth = a.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let hdr: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|v| vec![("authorization", v)])
            .unwrap_or_default();
        let models = tokio::time::timeout(Duration::from_secs(10), client::get(addr, "/v1/models", &hdr))
            .await
            .map_err(|_| anyhow::anyhow!("the server at {} did not answer GET /v1/models in 10 s", a.url))?
            .with_context(|| format!("cannot reach the server at {}", a.url))?;
        if models.status != 200 {
            bail!("GET /v1/models answered {}", models.status);
        }
        let models = models.json().await?;
        let model = models["data"][0]["id"].as_str().unwrap_or("").to_string();
        let deadline = Instant::now() + Duration::from_secs_f64(a.time_limit);
        // Requests still running this long after the last one was sent are abandoned.
        let hard_deadline = tokio::time::Instant::from_std(deadline + Duration::from_secs(60));
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..a.concurrency.min(a.requests) {
            let next = next.clone();
            let auth = auth.clone();
            let prompt = a.prompt.clone();
            let model = model.clone();
            let (n, plen, max_tokens, temp, seed) =
                (a.requests, a.prompt_len, a.max_tokens, a.temperature, a.seed);
            tasks.push(tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (w as u64) << 32);
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || Instant::now() >= deadline {
                        break;
                    }
                    let p: Value = match &prompt {
                        Some(t) => json!(t),
                        None => json!((0..plen.max(1))
                            .map(|_| rng.random_range(2u32..256))
                            .collect::<Vec<_>>()),
                    };
                    let body = json!({
                        "model": model,
                        "prompt": p,
                        "max_tokens": max_tokens,
                        "temperature": temp,
                        "seed": seed.wrapping_add(i as u64),
                        "stream": true,
                        "stream_options": {"include_usage": true},
                        "ignore_eos": true,
                    });
                    let r = tokio::time::timeout_at(
                        hard_deadline,
                        one(addr, body, auth.clone(), max_tokens),
                    )
                    .await;
                    out.push(r.unwrap_or(Sample {
                        ok: false,
                        status: 0,
                        latency: f64::NAN,
                        ttft: None,
                        gaps: vec![],
                        completion_tokens: 0,
                        prompt_tokens: 0,
                    }));
                }
                out
            }));
        }
        let mut samples = Vec::new();
        for t in tasks {
            samples.extend(t.await?);
        }
        let wall = t0.elapsed().as_secs_f64();
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
        let failed = samples.len() - ok.len();
        let out_tokens: usize = ok.iter().map(|s| s.completion_tokens).sum();
        let in_tokens: usize = ok.iter().map(|s| s.prompt_tokens).sum();
        let mut lat: Vec<f64> = ok.iter().map(|s| s.latency).collect();
        let mut ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
        let mut gaps: Vec<f64> = ok.iter().flat_map(|s| s.gaps.iter().copied()).collect();
        let mut statuses: std::collections::BTreeMap<u16, usize> = Default::default();
        for s in &samples {
            *statuses.entry(s.status).or_default() += 1;
        }
        let summary = json!({
            "model": model,
            "requests_sent": samples.len(),
            "requests_ok": ok.len(),
            "requests_failed": failed,
            "statuses": statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "concurrency": a.concurrency,
            "prompt_len": if a.prompt.is_some() { Value::Null } else { json!(a.prompt_len) },
            "max_tokens": a.max_tokens,
            "wall_s": wall,
            "requests_per_s": ok.len() as f64 / wall,
            "output_tokens_per_s": out_tokens as f64 / wall,
            "prompt_tokens": in_tokens,
            "output_tokens": out_tokens,
            "latency_s": {"p50": pct(&mut lat, 50.0), "p90": pct(&mut lat, 90.0), "p99": pct(&mut lat, 99.0)},
            "ttft_s": {"p50": pct(&mut ttft, 50.0), "p90": pct(&mut ttft, 90.0), "p99": pct(&mut ttft, 99.0)},
            "chunk_gap_s": {"p50": pct(&mut gaps, 50.0), "p90": pct(&mut gaps, 90.0), "p99": pct(&mut gaps, 99.0)},
        });
        println!(
            "model {model}: {} requests ({} ok, {} failed; statuses {:?}) in {wall:.2} s, concurrency {}",
            samples.len(),
            ok.len(),
            failed,
            statuses,
            a.concurrency
        );
        println!(
            "throughput: {:.2} requests/s, {:.1} output tokens/s ({out_tokens} tokens)",
            ok.len() as f64 / wall,
            out_tokens as f64 / wall
        );
        let ms = |v: &Value| {
            format!(
                "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
                v["p50"].as_f64().unwrap_or(f64::NAN) * 1e3,
                v["p90"].as_f64().unwrap_or(f64::NAN) * 1e3,
                v["p99"].as_f64().unwrap_or(f64::NAN) * 1e3
            )
        };
        println!("latency:        {}", ms(&summary["latency_s"]));
        println!("first token:    {}", ms(&summary["ttft_s"]));
        println!("gap per chunk:  {}", ms(&summary["chunk_gap_s"]));
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&summary)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        if ok.is_empty() {
            bail!("no request succeeded");
        }
        Ok(())
    })
}
