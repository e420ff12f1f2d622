//! The model thread: owns the [`Engine`], takes rows from the HTTP handlers over a channel,
//! steps the engine (one block for every active row; new rows join at the next step, finished
//! ones leave at once), turns tokens into text (stop strings included) and routes each row's
//! output to its request. A second thread scores prompts for `echo` + `logprobs`.

use super::metrics::Metrics;
use crate::generate::{Engine, EngineOptions, FinishReason, GenRequest, SeqId, TokenLogprob};
use crate::model::Model;
use crate::score;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{mpsc as tmpsc, oneshot};

/// One admitted row (a completion or a prompt to score); releases its slot when dropped.
#[derive(Debug)]
pub struct Permit {
    counter: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Admission control: at most `capacity` rows in flight (running + queued).
#[derive(Debug)]
pub struct Admission {
    counter: Arc<AtomicUsize>,
    pub capacity: usize,
}

impl Admission {
    pub fn new(capacity: usize) -> Self {
        Admission {
            counter: Arc::new(AtomicUsize::new(0)),
            capacity,
        }
    }

    pub fn inflight(&self) -> usize {
        self.counter.load(Ordering::Acquire)
    }

    /// `n` permits, or `None` when they do not fit.
    pub fn try_admit(&self, n: usize) -> Option<Vec<Permit>> {
        let mut cur = self.counter.load(Ordering::Acquire);
        loop {
            if cur + n > self.capacity {
                return None;
            }
            match self
                .counter
                .compare_exchange(cur, cur + n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(c) => cur = c,
            }
        }
        Some(
            (0..n)
                .map(|_| Permit {
                    counter: self.counter.clone(),
                })
                .collect(),
        )
    }
}

/// How a row ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    /// EOS or a stop string (OpenAI's "stop").
    Stop,
    Length,
    /// Cancelled by the server (shutdown).
    Abort,
    Error(String),
}

impl Finish {
    pub fn reason(&self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Abort => "abort",
            Finish::Error(_) => "error",
        }
    }
}

/// What one step produced for one row: new text, the new token ids, their logprobs when
/// asked for, and the end.
#[derive(Clone, Debug)]
pub struct RowEvent {
    pub index: usize,
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<Finish>,
    /// Set when a stop string ended the text: the completion's tokens whose text starts
    /// before it (their logprobs are shown; the rest are not).
    pub keep_tokens: Option<usize>,
}

/// A row to generate.
pub struct RowJob {
    /// The choice index in its response.
    pub index: usize,
    pub req: GenRequest,
    pub stop: Vec<String>,
    pub tx: tmpsc::UnboundedSender<RowEvent>,
    pub permit: Permit,
}

pub type ScoreResult = Result<Vec<Option<TokenLogprob>>, String>;

/// A prompt to score (echo + logprobs).
pub struct ScoreJob {
    pub ids: Vec<u32>,
    pub top_n: usize,
    pub reply: oneshot::Sender<ScoreResult>,
    pub permit: Permit,
}

pub enum Job {
    Row(Box<RowJob>),
    /// Cancel every row (end of the shutdown grace period).
    AbortAll,
}

/// Handles to the model and scoring threads.
pub struct Worker {
    jobs: mpsc::Sender<Job>,
    scores: mpsc::Sender<ScoreJob>,
    threads: Vec<JoinHandle<()>>,
}

impl Worker {
    pub fn start(
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        opts: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (jtx, jrx) = mpsc::channel();
        let (stx, srx) = mpsc::channel::<ScoreJob>();
        let engine = Engine::new(model.clone(), opts);
        let m = metrics.clone();
        let gen = std::thread::Builder::new()
            .name("blockformer-model".into())
            .spawn(move || ModelLoop::new(engine, opts, tokenizer, m).run(jrx))?;
        let scorer = std::thread::Builder::new()
            .name("blockformer-score".into())
            .spawn(move || {
                while let Ok(job) = srx.recv() {
                    metrics.scoring_waiting(-1);
                    if job.reply.is_closed() {
                        continue;
                    }
                    let r = score::token_logprobs(&model, &job.ids, job.top_n)
                        .map_err(|e| e.to_string());
                    metrics.scored_tokens(job.ids.len());
                    let _ = job.reply.send(r);
                    drop(job.permit);
                }
            })?;
        Ok(Worker {
            jobs: jtx,
            scores: stx,
            threads: vec![gen, scorer],
        })
    }

    /// Whether the model and scoring threads are still running.
    pub fn is_alive(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Sends a job to the model thread; false when it has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    pub fn score(&self, job: ScoreJob) -> bool {
        self.scores.send(job).is_ok()
    }

    /// Closes the channels and waits for both threads (rows still running are dropped: their
    /// requests see the stream end without a finish).
    pub fn stop(self) {
        let Worker {
            jobs,
            scores,
            threads,
        } = self;
        drop(jobs);
        drop(scores);
        for t in threads {
            let _ = t.join();
        }
    }
}

struct Row {
    index: usize,
    tx: tmpsc::UnboundedSender<RowEvent>,
    stop: Vec<String>,
    ids: Vec<u32>,
    /// Incremental detokenisation: text of `ids[prefix..read]` is already in `text`.
    prefix: usize,
    read: usize,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    /// Length of `text` once token `i` was in it.
    tok_end: Vec<usize>,
    admitted: Instant,
    last: Option<Instant>,
    _permit: Permit,
}

impl Row {
    /// Appends new tokens to the text, as far as they form complete characters.
    fn push(&mut self, tok: Option<&Tokenizer>, new: &[u32]) {
        self.ids.extend_from_slice(new);
        let Some(t) = tok else {
            for id in new {
                self.text.push_str(&format!(" {id}"));
                self.tok_end.push(self.text.len());
            }
            self.prefix = self.ids.len();
            self.read = self.ids.len();
            return;
        };
        let before = t
            .decode(&self.ids[self.prefix..self.read])
            .unwrap_or_default();
        let after = t.decode(&self.ids[self.prefix..]).unwrap_or_default();
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            if after.starts_with(&before) {
                self.text.push_str(&after[before.len()..]);
            } else {
                // A decoder that is not concatenative here: fall back to the whole text.
                let all = t.decode(&self.ids).unwrap_or_default();
                if all.len() > self.sent && all.is_char_boundary(self.sent) {
                    self.text = all;
                }
            }
            self.prefix = self.read;
            self.read = self.ids.len();
            self.tok_end.resize(self.ids.len(), self.text.len());
        }
    }

    /// At the end: whatever is left, incomplete characters included.
    fn flush(&mut self, tok: Option<&Tokenizer>) {
        if let Some(t) = tok {
            if self.prefix < self.ids.len() {
                let before = t
                    .decode(&self.ids[self.prefix..self.read])
                    .unwrap_or_default();
                let after = t.decode(&self.ids[self.prefix..]).unwrap_or_default();
                if after.len() > before.len() && after.starts_with(&before) {
                    self.text.push_str(&after[before.len()..]);
                }
                self.prefix = self.ids.len();
                self.read = self.ids.len();
                self.tok_end.resize(self.ids.len(), self.text.len());
            }
        }
    }

    /// Tokens whose text starts before byte `p`.
    fn tokens_before(&self, p: usize) -> usize {
        if p == 0 {
            return 0;
        }
        let c = self.tok_end.iter().take_while(|&&e| e < p).count();
        1 + c.min(self.ids.len().saturating_sub(1))
    }

    /// Where the first stop string starts (not before the text already sent).
    fn find_stop(&self) -> Option<usize> {
        let hay = &self.text[self.sent..];
        self.stop
            .iter()
            .filter_map(|s| hay.find(s.as_str()))
            .min()
            .map(|p| self.sent + p)
    }

    /// End of the text that can be sent: the tail that could begin a stop string is held back.
    fn safe_end(&self) -> usize {
        let tail = &self.text[self.sent..];
        let mut hold = 0;
        for s in &self.stop {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && k <= tail.len() && tail.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        self.text.len() - hold
    }
}

struct ModelLoop {
    engine: Engine,
    opts: EngineOptions,
    tok: Option<Arc<Tokenizer>>,
    metrics: Arc<Metrics>,
    rows: HashMap<SeqId, Row>,
}

impl ModelLoop {
    fn new(
        engine: Engine,
        opts: EngineOptions,
        tok: Option<Arc<Tokenizer>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ModelLoop {
            engine,
            opts,
            tok,
            metrics,
            rows: HashMap::new(),
        }
    }

    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        loop {
            if self.engine.is_idle() {
                self.metrics.batch_state(0, 0);
                match jobs.recv() {
                    Ok(j) => self.handle(j),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(j) => self.handle(j),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            // Clients that went away free their slot now.
            let gone: Vec<SeqId> = self
                .rows
                .iter()
                .filter(|(_, r)| r.tx.is_closed())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                self.engine.cancel(id);
            }
            if self.engine.is_idle() {
                continue;
            }
            let rows = (self.engine.active() + self.engine.waiting()).min(self.opts.max_batch);
            let t0 = Instant::now();
            let result = self.engine.step();
            self.metrics.step(
                rows,
                t0.elapsed().as_secs_f64(),
                self.engine.active(),
                self.engine.waiting(),
            );
            match result {
                Ok(events) => {
                    for ev in events {
                        self.route(ev);
                    }
                }
                Err(e) => {
                    tracing::error!("engine step failed: {e}");
                    let msg = format!("generation failed: {e}");
                    for (_, row) in self.rows.drain() {
                        let _ = row.tx.send(RowEvent {
                            index: row.index,
                            text: String::new(),
                            tokens: vec![],
                            logprobs: vec![],
                            finish: Some(Finish::Error(msg.clone())),
                            keep_tokens: None,
                        });
                    }
                    self.engine = Engine::new(self.engine.model().clone(), self.opts);
                }
            }
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Row(j) => {
                let j = *j;
                if j.tx.is_closed() {
                    // The client left before its row started.
                    self.metrics.row_finished("abort", 0.0);
                    return;
                }
                match self.engine.add(j.req) {
                    Ok(id) => {
                        self.rows.insert(
                            id,
                            Row {
                                index: j.index,
                                tx: j.tx,
                                stop: j.stop,
                                ids: Vec::new(),
                                prefix: 0,
                                read: 0,
                                text: String::new(),
                                sent: 0,
                                tok_end: Vec::new(),
                                admitted: Instant::now(),
                                last: None,
                                _permit: j.permit,
                            },
                        );
                    }
                    Err(e) => {
                        let _ = j.tx.send(RowEvent {
                            index: j.index,
                            text: String::new(),
                            tokens: vec![],
                            logprobs: vec![],
                            finish: Some(Finish::Error(e.to_string())),
                            keep_tokens: None,
                        });
                    }
                }
            }
            Job::AbortAll => {
                let ids: Vec<SeqId> = self.rows.keys().copied().collect();
                for id in ids {
                    self.engine.cancel(id);
                }
            }
        }
    }

    fn route(&mut self, ev: crate::generate::StepEvent) {
        let tok = self.tok.clone();
        let tok = tok.as_deref();
        let Some(row) = self.rows.get_mut(&ev.id) else {
            return; // finished by a stop string, or its client left
        };
        let now = Instant::now();
        let n = ev.tokens.len();
        if n > 0 {
            let ttft = row
                .last
                .is_none()
                .then(|| (now - row.admitted).as_secs_f64());
            let gap = row.last.map(|l| (now - l).as_secs_f64());
            self.metrics.tokens(n, ttft, gap);
            row.last = Some(now);
        }
        let mut logprobs = ev.logprobs;
        // The EOS token is not part of the output; neither is its logprob.
        logprobs.truncate(n);
        row.push(tok, &ev.tokens);
        let mut finish = match ev.finished {
            None => None,
            Some(FinishReason::Eos) => Some(Finish::Stop),
            Some(FinishReason::Length) => Some(Finish::Length),
            Some(FinishReason::Cancelled) => Some(Finish::Abort),
        };
        if finish.is_some() {
            row.flush(tok);
        }
        let mut keep_tokens = None;
        let end = if let Some(p) = row.find_stop() {
            if finish.is_none() {
                self.engine.cancel(ev.id);
            }
            finish = Some(Finish::Stop);
            keep_tokens = Some(row.tokens_before(p));
            p
        } else if finish.is_some() {
            row.text.len()
        } else {
            row.safe_end()
        };
        let text = row.text[row.sent..end].to_string();
        row.sent = end;
        let done = finish.is_some();
        let sent = row.tx.send(RowEvent {
            index: row.index,
            text,
            tokens: ev.tokens,
            logprobs,
            finish: finish.clone(),
            keep_tokens,
        });
        if done {
            let row = self.rows.remove(&ev.id).expect("row");
            self.metrics.row_finished(
                finish.as_ref().map_or("abort", Finish::reason),
                row.admitted.elapsed().as_secs_f64(),
            );
        } else if sent.is_err() {
            self.engine.cancel(ev.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stop: &[&str]) -> Row {
        let (tx, _rx) = tmpsc::unbounded_channel();
        Row {
            index: 0,
            tx,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ids: vec![],
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
            tok_end: Vec::new(),
            admitted: Instant::now(),
            last: None,
            _permit: Admission::new(1).try_admit(1).unwrap().pop().unwrap(),
        }
    }

    #[test]
    fn stop_strings_hold_back_possible_prefixes() {
        let mut r = row(&["END", "xyz"]);
        r.text = "hello EN".into();
        assert_eq!(r.find_stop(), None);
        assert_eq!(r.safe_end(), "hello ".len());
        r.sent = r.safe_end();
        r.text.push_str("D more");
        assert_eq!(r.find_stop(), Some("hello ".len()));
        let mut r = row(&["é!"]);
        r.text = "caféé".into();
        assert_eq!(r.safe_end(), "café".len());
        // Tokens " 1", " 22", " 3": text " 1 22 3".
        let mut r = row(&[]);
        r.push(None, &[1, 22, 3]);
        assert_eq!(r.text, " 1 22 3");
        assert_eq!(r.tokens_before(0), 0);
        assert_eq!(r.tokens_before(2), 1);
        assert_eq!(r.tokens_before(3), 2);
        assert_eq!(r.tokens_before(5), 2);
        assert_eq!(r.tokens_before(6), 3);
    }

    #[test]
    fn admission_is_bounded() {
        let a = Admission::new(3);
        let p = a.try_admit(2).unwrap();
        assert!(a.try_admit(2).is_none());
        let q = a.try_admit(1).unwrap();
        assert_eq!(a.inflight(), 3);
        drop(p);
        assert_eq!(a.inflight(), 1);
        drop(q);
        assert_eq!(a.inflight(), 0);
    }
}
