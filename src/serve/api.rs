//! The OpenAI completions API: request parsing with errors that name the field, and the JSON
//! bodies of responses, stream chunks and errors.

use crate::tokenizer::{Tokenizer, EOS_TOKEN, PAD_TOKEN};
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

/// An error answered in the OpenAI format:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 for a bad field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {}", message.into()),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// One prompt of a request: its ids and, for text prompts, the text as sent.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub text: Option<String>,
}

/// A validated `POST /v1/completions` body.
#[derive(Clone, Debug)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompts: Vec<Prompt>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub ignore_eos: bool,
}

/// What parsing needs to know about the served model and the limits.
pub struct ParseLimits<'a> {
    pub tokenizer: Option<&'a Tokenizer>,
    pub vocab_size: usize,
    pub eos_token_id: u32,
    pub context_length: usize,
    pub max_tokens_limit: usize,
    pub max_choices: usize,
    pub max_logprobs: usize,
    pub max_stops: usize,
}

/// OpenAI's default completion length.
pub const DEFAULT_MAX_TOKENS: usize = 16;

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..s.floor_char_boundary(40)])
    } else {
        s
    }
}

fn get_bool(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::field(
            key,
            format!("expected true or false, got {}", describe(v)),
        )),
    }
}

fn get_uint(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) => Ok(Some(x)),
            // 3.0 is accepted as 3, as Python clients may send it.
            None => match v.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(Some(f as u64)),
                _ => Err(ApiError::field(
                    key,
                    format!("expected a non-negative integer, got {}", describe(v)),
                )),
            },
        },
    }
}

fn get_num(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::field(key, format!("expected a number, got {}", describe(v)))),
    }
}

fn token_ids(v: &[Value], what: &str, vocab: usize) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .map(|x| match x.as_u64() {
            Some(t) if (t as usize) < vocab => Ok(t as u32),
            Some(t) => Err(ApiError::field(
                "prompt",
                format!("{what}: token id {t} is out of the vocabulary (size {vocab})"),
            )),
            None => Err(ApiError::field(
                "prompt",
                format!(
                    "{what}: expected token ids (non-negative integers), got {}",
                    describe(x)
                ),
            )),
        })
        .collect()
}

fn text_prompt(text: &str, lim: &ParseLimits) -> Result<Prompt, ApiError> {
    let tok = lim.tokenizer.ok_or_else(|| {
        ApiError::field(
            "prompt",
            "this model has no tokenizer: send the prompt as token ids (a list of integers)",
        )
    })?;
    let mut ids = tok
        .encode(text)
        .map_err(|e| ApiError::field("prompt", format!("could not be tokenized: {e}")))?;
    if ids.is_empty() {
        // As OpenAI: an empty prompt is the end-of-text token.
        ids.push(lim.eos_token_id);
    }
    Ok(Prompt {
        ids,
        text: Some(text.to_string()),
    })
}

fn parse_prompts(v: Option<&Value>, lim: &ParseLimits) -> Result<Vec<Prompt>, ApiError> {
    let v = match v {
        None | Some(Value::Null) => return Err(ApiError::field("prompt", "is required")),
        Some(v) => v,
    };
    let bad = || {
        ApiError::field(
            "prompt",
            format!(
                "expected a string, a list of strings, a list of token ids or a list of lists of token ids, got {}",
                describe(v)
            ),
        )
    };
    match v {
        Value::String(s) => Ok(vec![text_prompt(s, lim)?]),
        Value::Array(items) if items.is_empty() => Err(ApiError::field("prompt", "is empty")),
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::String(s) => text_prompt(s, lim),
                    _ => Err(ApiError::field(
                        "prompt",
                        format!("item {i}: expected a string like the others"),
                    )),
                })
                .collect(),
            Value::Number(_) => Ok(vec![Prompt {
                ids: token_ids(items, "token list", lim.vocab_size)?,
                text: None,
            }]),
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::Array(ids) if ids.is_empty() => {
                        Err(ApiError::field("prompt", format!("item {i} is empty")))
                    }
                    Value::Array(ids) => Ok(Prompt {
                        ids: token_ids(ids, &format!("item {i}"), lim.vocab_size)?,
                        text: None,
                    }),
                    _ => Err(ApiError::field(
                        "prompt",
                        format!("item {i}: expected a list of token ids like the others"),
                    )),
                })
                .collect(),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// Parses and validates a completions body.
pub fn parse_completion(body: &[u8], lim: &ParseLimits) -> Result<CompletionRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let obj = match v {
        Value::Object(o) => o,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body must be a JSON object, got {}", describe(&other)),
            ))
        }
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(ApiError::field(
                "model",
                format!("expected a string, got {}", describe(v)),
            ))
        }
    };
    for (key, neutral) in [("presence_penalty", 0.0), ("frequency_penalty", 0.0)] {
        if let Some(x) = get_num(&obj, key)? {
            if x != neutral {
                return Err(ApiError::field(key, "is not supported (only 0)"));
            }
        }
    }
    if let Some(v) = obj.get("suffix").filter(|v| !v.is_null()) {
        if v.as_str() != Some("") {
            return Err(ApiError::field("suffix", "is not supported"));
        }
    }
    if let Some(v) = obj.get("logit_bias").filter(|v| !v.is_null()) {
        if !v.as_object().is_some_and(|m| m.is_empty()) {
            return Err(ApiError::field("logit_bias", "is not supported"));
        }
    }

    let prompts = parse_prompts(obj.get("prompt"), lim)?;
    let max_tokens = get_uint(&obj, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS as u64);
    if max_tokens > lim.max_tokens_limit as u64 {
        return Err(ApiError::field(
            "max_tokens",
            format!(
                "{max_tokens} is more than this server allows ({})",
                lim.max_tokens_limit
            ),
        ));
    }
    let max_tokens = max_tokens as usize;
    let temperature = get_num(&obj, "temperature")?.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
        return Err(ApiError::field(
            "temperature",
            format!("{temperature} (expected a number >= 0; 0 = greedy)"),
        ));
    }
    let top_p = get_num(&obj, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field(
            "top_p",
            format!("{top_p} (expected 0 < top_p <= 1)"),
        ));
    }
    let top_k = match obj.get("top_k") {
        Some(v) if v.as_i64() == Some(-1) => 0,
        _ => get_uint(&obj, "top_k")?.unwrap_or(0) as usize,
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(x), _) => Some(x),
            (None, Some(x)) => Some(x as u64),
            _ => {
                return Err(ApiError::field(
                    "seed",
                    format!("expected an integer, got {}", describe(v)),
                ))
            }
        },
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::field("stop", format!("expected strings, got {}", describe(x)))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::field(
                "stop",
                format!(
                    "expected a string or a list of strings, got {}",
                    describe(v)
                ),
            ))
        }
    };
    if stop.len() > lim.max_stops {
        return Err(ApiError::field(
            "stop",
            format!("at most {} stop sequences", lim.max_stops),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", "stop sequences must not be empty"));
    }
    let n = get_uint(&obj, "n")?.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::field("n", "must be at least 1"));
    }
    if let Some(b) = get_uint(&obj, "best_of")? {
        if b != n {
            return Err(ApiError::field(
                "best_of",
                "is not supported (only best_of = n)",
            ));
        }
    }
    let choices = (n as usize).saturating_mul(prompts.len());
    if choices > lim.max_choices {
        return Err(ApiError::field(
            "n",
            format!(
                "{} prompts x n = {n} asks for {choices} completions; this server allows {} per request",
                prompts.len(),
                lim.max_choices
            ),
        ));
    }
    let stream = get_bool(&obj, "stream", false)?;
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => get_bool(o, "include_usage", false)
            .map_err(|_| ApiError::field("stream_options", "include_usage must be a boolean"))?,
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("expected an object, got {}", describe(v)),
            ))
        }
    };
    let logprobs = match obj.get("logprobs") {
        // `false` as the chat API spells "off".
        Some(Value::Bool(false)) => None,
        _ => get_uint(&obj, "logprobs")?.map(|x| x as usize),
    };
    if let Some(k) = logprobs {
        if k > lim.max_logprobs {
            return Err(ApiError::field(
                "logprobs",
                format!("{k} is more than the {} allowed", lim.max_logprobs),
            ));
        }
    }
    let echo = get_bool(&obj, "echo", false)?;
    let ignore_eos = get_bool(&obj, "ignore_eos", false)?;

    let ctx = lim.context_length;
    for (i, p) in prompts.iter().enumerate() {
        let which = if prompts.len() > 1 {
            format!("prompt {i}")
        } else {
            "the prompt".into()
        };
        if p.ids.len() > ctx {
            return Err(ApiError::field(
                "prompt",
                format!(
                    "{which} has {} tokens, more than the model's maximum context length of {ctx} tokens",
                    p.ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        if p.ids.len() + max_tokens > ctx {
            return Err(ApiError::field(
                "max_tokens",
                format!(
                    "this model's maximum context length is {ctx} tokens, however you requested {} tokens ({} in {which}; {max_tokens} for the completion)",
                    p.ids.len() + max_tokens,
                    p.ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
    }
    Ok(CompletionRequest {
        model,
        prompts,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed,
        stop,
        n: n as usize,
        stream,
        include_usage,
        logprobs,
        echo,
        ignore_eos,
    })
}

/// The text of one token as the `logprobs.tokens` list shows it. Without a tokenizer, a
/// token is shown as a space and its id (so that the pieces still concatenate to the text).
pub fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    match tok {
        None => format!(" {id}"),
        Some(t) => match t.decode(&[id]) {
            Ok(s) if !s.is_empty() => s,
            _ if t.token_id(EOS_TOKEN) == Some(id) => EOS_TOKEN.to_string(),
            _ if t.token_id(PAD_TOKEN) == Some(id) => PAD_TOKEN.to_string(),
            Ok(s) => s,
            Err(_) => String::new(),
        },
    }
}

/// The text of a list of ids (see [`token_text`] for models without a tokenizer).
pub fn ids_text(tok: Option<&Tokenizer>, ids: &[u32]) -> String {
    match tok {
        None => ids.iter().map(|i| format!(" {i}")).collect(),
        Some(t) => t.decode(ids).unwrap_or_default(),
    }
}

/// One token's entry in an OpenAI `logprobs` object. `None` logprob: the first prompt token.
#[derive(Clone, Debug, PartialEq)]
pub struct LogprobEntry {
    pub token: String,
    pub logprob: Option<f32>,
    pub top: Option<Vec<(String, f32)>>,
}

/// The legacy completions `logprobs` object; offsets start at `offset0`.
#[derive(Clone, Debug, Default)]
pub struct LogprobsObject {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<Vec<(String, f32)>>>,
    pub text_offset: Vec<usize>,
}

impl LogprobsObject {
    pub fn push(&mut self, e: LogprobEntry, offset: usize) {
        self.tokens.push(e.token);
        self.token_logprobs.push(e.logprob);
        self.top_logprobs.push(e.top);
        self.text_offset.push(offset);
    }

    pub fn extend(&mut self, entries: Vec<LogprobEntry>, offset: &mut usize) {
        for e in entries {
            let len = e.token.len();
            self.push(e, *offset);
            *offset += len;
        }
    }

    pub fn to_json(&self) -> Value {
        let top: Vec<Value> = self
            .top_logprobs
            .iter()
            .map(|t| match t {
                None => Value::Null,
                Some(list) => {
                    let mut m = Map::new();
                    for (s, lp) in list {
                        // Two ids with the same text: the more likely one (listed first) wins.
                        m.entry(s.clone()).or_insert_with(|| json!(lp));
                    }
                    Value::Object(m)
                }
            })
            .collect();
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": top,
            "text_offset": self.text_offset,
        })
    }
}

/// Builds a `text_completion` object (a whole response or one stream chunk).
pub fn completion_json(
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    usage: Option<Value>,
) -> Value {
    let mut v = json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

pub fn choice_json(
    index: usize,
    text: &str,
    logprobs: Option<&LogprobsObject>,
    finish: Option<&str>,
) -> Value {
    json!({
        "index": index,
        "text": text,
        "logprobs": logprobs.map(LogprobsObject::to_json),
        "finish_reason": finish,
    })
}

pub fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}
