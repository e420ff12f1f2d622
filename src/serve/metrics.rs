//! Server metrics in the Prometheus text format (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// A Prometheus histogram with fixed upper bounds.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, x: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| x <= b) {
            self.counts[i] += 1;
        }
        self.sum += x;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ROW_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    scored_tokens: u64,
    running_rows: usize,
    waiting_rows: usize,
    scoring_waiting: usize,
    steps: u64,
    step_rows: Histogram,
    step_seconds: Histogram,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    finished: BTreeMap<&'static str, u64>,
}

/// Everything `/metrics` shows; shared by the HTTP layer and the model thread.
#[derive(Debug)]
pub struct Metrics {
    max_batch: usize,
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new(max_batch: usize) -> Self {
        Metrics {
            max_batch,
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                prompt_tokens: 0,
                generation_tokens: 0,
                scored_tokens: 0,
                running_rows: 0,
                waiting_rows: 0,
                scoring_waiting: 0,
                steps: 0,
                step_rows: Histogram::new(ROW_BOUNDS),
                step_seconds: Histogram::new(LATENCY_BOUNDS),
                ttft: Histogram::new(LATENCY_BOUNDS),
                itl: Histogram::new(LATENCY_BOUNDS),
                e2e: Histogram::new(LATENCY_BOUNDS),
                finished: BTreeMap::new(),
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|m| {
            *m.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1
        });
    }
    pub fn prompt_tokens(&self, n: usize) {
        self.with(|m| m.prompt_tokens += n as u64);
    }
    pub fn scored_tokens(&self, n: usize) {
        self.with(|m| m.scored_tokens += n as u64);
    }
    pub fn scoring_waiting(&self, delta: isize) {
        self.with(|m| m.scoring_waiting = m.scoring_waiting.saturating_add_signed(delta));
    }
    /// One engine step: rows decoded together, its duration, and the batch state after it.
    pub fn step(&self, rows: usize, secs: f64, running: usize, waiting: usize) {
        self.with(|m| {
            m.steps += 1;
            m.step_rows.observe(rows as f64);
            m.step_seconds.observe(secs);
            m.running_rows = running;
            m.waiting_rows = waiting;
        });
    }
    pub fn batch_state(&self, running: usize, waiting: usize) {
        self.with(|m| {
            m.running_rows = running;
            m.waiting_rows = waiting;
        });
    }
    /// Tokens of one row in one step, `ttft` for its first, else the gap per token.
    pub fn tokens(&self, n: usize, ttft: Option<f64>, gap: Option<f64>) {
        self.with(|m| {
            m.generation_tokens += n as u64;
            if let Some(t) = ttft {
                m.ttft.observe(t);
            }
            if let Some(g) = gap {
                if n > 0 {
                    for _ in 0..n {
                        m.itl.observe(g / n as f64);
                    }
                }
            }
        });
    }
    pub fn row_finished(&self, reason: &'static str, secs: f64) {
        self.with(|m| {
            *m.finished.entry(reason).or_default() += 1;
            m.e2e.observe(secs);
        });
    }

    /// Rows decoding now and rows queued (batch and scoring).
    pub fn queue(&self) -> (usize, usize) {
        self.with(|m| (m.running_rows, m.waiting_rows + m.scoring_waiting))
    }

    /// The Prometheus text exposition.
    pub fn render(&self, inflight_rows: usize, capacity: usize) -> String {
        let mut out = String::new();
        self.with(|m| {
            let o = &mut out;
            let _ = writeln!(o, "# HELP blockformer_requests_total HTTP requests by endpoint and status.\n# TYPE blockformer_requests_total counter");
            for ((ep, st), n) in &m.requests {
                let _ = writeln!(
                    o,
                    "blockformer_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
                );
            }
            let counters = [
                ("blockformer_prompt_tokens_total", "Prompt tokens received (completions).", m.prompt_tokens),
                ("blockformer_generation_tokens_total", "Tokens generated.", m.generation_tokens),
                ("blockformer_scored_tokens_total", "Prompt tokens scored for echo logprobs.", m.scored_tokens),
                ("blockformer_engine_steps_total", "Engine steps (one block, or one token for vanilla models, for every active row).", m.steps),
            ];
            for (name, help, v) in counters {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
            }
            let _ = writeln!(o, "# HELP blockformer_completions_finished_total Completions (rows) by finish reason.\n# TYPE blockformer_completions_finished_total counter");
            for (r, n) in &m.finished {
                let _ = writeln!(
                    o,
                    "blockformer_completions_finished_total{{reason=\"{r}\"}} {n}"
                );
            }
            let gauges = [
                ("blockformer_batch_rows", "Rows in the running batch.", m.running_rows),
                ("blockformer_batch_capacity", "Rows the batch can hold (--max-batch).", self.max_batch),
                ("blockformer_queue_depth", "Rows waiting for a batch slot or for scoring.", m.waiting_rows + m.scoring_waiting),
                ("blockformer_inflight_rows", "Rows admitted and not finished.", inflight_rows),
                ("blockformer_admission_capacity", "Rows admitted at most (--max-batch + --max-queue).", capacity),
            ];
            for (name, help, v) in gauges {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
            let occ = if self.max_batch > 0 {
                m.running_rows as f64 / self.max_batch as f64
            } else {
                0.0
            };
            let _ = writeln!(o, "# HELP blockformer_batch_occupancy Running rows / batch capacity.\n# TYPE blockformer_batch_occupancy gauge\nblockformer_batch_occupancy {occ}");
            m.step_rows.render(o, "blockformer_step_batch_rows", "Rows decoded together per engine step (batch occupancy).");
            m.step_seconds.render(o, "blockformer_step_seconds", "Duration of one engine step.");
            m.ttft.render(o, "blockformer_time_to_first_token_seconds", "From admission to a completion's first generated token.");
            m.itl.render(o, "blockformer_inter_token_latency_seconds", "Gap between a completion's consecutive steps, per token (a block's tokens share the gap).");
            m.e2e.render(o, "blockformer_completion_seconds", "From admission to a completion's end.");
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for x in [0.5, 1.5, 1.7, 9.0] {
            h.observe(x);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count 4\n"), "{s}");
    }
}
