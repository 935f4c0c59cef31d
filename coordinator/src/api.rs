//! The OpenAI-compatible HTTP API of `shoal serve` (axum): `GET /v1/models`,
//! `POST /v1/completions` and `POST /v1/chat/completions`, each whole or streamed as
//! server-sent events ending with `data: [DONE]`, and `GET /health`.
//!
//! Every request becomes one sequence of the [`Scheduler`], so concurrent requests are
//! batched into the same pipeline steps. Text is produced by the same
//! [`TokenStream`] as `shoal run` (stop strings, end-of-generation, `max_tokens`, UTF-8 held
//! back until complete). A client that goes away drops its token receiver, which ends its
//! sequence at the next step. Errors use OpenAI's JSON shape with a 4xx for bad requests and
//! 503 when the pipeline fails.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_model::chat::{ChatMessage, ChatTemplate};
use shoal_model::engine::{FinishReason, GenerateRequest, TokenStream};
use shoal_model::sampling::SamplingParams;
use shoal_model::tokenizer::Tokenizer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::pipeline::Sampled;
use crate::cluster::scheduler::{Scheduler, Submission};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub scheduler: Scheduler,
    pub tokenizer: Arc<Tokenizer>,
    pub chat: Option<Arc<ChatTemplate>>,
    /// The id `/v1/models` lists and responses carry.
    pub model: String,
    /// Accepted `Authorization: Bearer` keys; `None`: no authentication (loopback only).
    pub api_keys: Option<Arc<std::collections::HashSet<String>>>,
    /// Requests generating at once; one more is refused with 429 and `Retry-After`.
    pub slots: Arc<tokio::sync::Semaphore>,
}

/// Limits of the API, set by `shoal serve`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
}

/// The router of the API.
pub fn router(state: ApiState, limits: Limits) -> axum::Router {
    let state = Arc::new(state);
    let v1 = axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authenticate));
    axum::Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

/// Checks `Authorization: Bearer KEY` against the configured keys (OpenAI's 401 otherwise).
async fn authenticate(
    State(st): State<Arc<ApiState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(keys) = &st.api_keys {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|k| keys.contains(k)) {
            let msg = if given.is_some() { "incorrect API key provided" } else { "no API key provided (Authorization: Bearer KEY)" };
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg.into())
                .with_code("invalid_api_key")
                .into_response();
        }
    }
    next.run(req).await
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: String) -> ApiError {
        ApiError { status, kind, message, param: None, code: None }
    }

    fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    fn from_cluster(e: crate::cluster::Error) -> ApiError {
        match e {
            crate::cluster::Error::Model(m @ shoal_model::Error::InvalidRequest(_)) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m.to_string())
            }
            e => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::info!(status = %self.status, "request refused: {}", self.message);
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

async fn models(State(st): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": st.model, "object": "model", "created": 0, "owned_by": "shoal"}],
    }))
}

async fn model(State(st): State<Arc<ApiState>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    if id != st.model {
        let msg = format!("the model `{id}` does not exist; this server serves `{}`", st.model);
        return ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", msg).with_code("model_not_found").into_response();
    }
    Json(json!({"id": st.model, "object": "model", "created": 0, "owned_by": "shoal"})).into_response()
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Default)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// `prompt`: text, one-element list of text, or token ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// The fields both endpoints share.
#[derive(Deserialize, Debug)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Stop,
    #[serde(default)]
    stream: bool,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u32>,
}

#[derive(Deserialize, Debug)]
struct CompletionRequest {
    prompt: Prompt,
    /// Log-probabilities of the chosen tokens and this many alternatives (0..=5).
    logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize, Debug)]
struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    logprobs: bool,
    /// With `logprobs`: this many alternatives per token (0..=20).
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

/// What a request wants of log-probabilities: `Some(alternatives)` or none. `top`, named
/// `param`, is checked against `max`.
fn want_logprobs(on: bool, top: Option<u32>, max: u32, param: &'static str) -> Result<Option<usize>, ApiError> {
    match top {
        Some(t) if t > max => Err(ApiError::bad(param, format!("{param} must be at most {max}, got {t}"))),
        _ => Ok(on.then(|| top.unwrap_or(0) as usize)),
    }
}

#[derive(Deserialize, Debug)]
struct ChatMessageIn {
    role: String,
    content: Content,
}

/// Message content: text, or a list of text parts.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

impl Common {
    /// The generation this request asks for, checked. `default_max`: OpenAI's default
    /// (16 for completions, the rest of the context for chat).
    fn request(&self, st: &ApiState, prompt_tokens: Vec<u32>, default_max: Option<usize>) -> Result<GenerateRequest, ApiError> {
        if let Some(m) = &self.model
            && !m.is_empty()
            && m != &st.model
        {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: format!("the model `{m}` does not exist; this server serves `{}`", st.model),
                param: Some("model"),
                code: Some("model_not_found"),
            });
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
        let n_ctx = st.scheduler.n_ctx();
        if prompt_tokens.is_empty() {
            return Err(ApiError::bad("prompt", "the prompt is empty"));
        }
        if prompt_tokens.len() >= n_ctx {
            return Err(ApiError::bad(
                "prompt",
                format!("the prompt has {} tokens; the context is {n_ctx}", prompt_tokens.len()),
            ));
        }
        let room = n_ctx - prompt_tokens.len();
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(m) if m < 0 => return Err(ApiError::bad("max_tokens", format!("max_tokens must be >= 0, got {m}"))),
            Some(m) => (m as usize).min(room),
            None => default_max.unwrap_or(room).min(room),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad("temperature", format!("temperature must be in [0, 2], got {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if let Some(v) = v
                && !(-2.0..=2.0).contains(&v)
            {
                return Err(ApiError::bad(if name == "presence_penalty" { "presence_penalty" } else { "frequency_penalty" }, format!("{name} must be in [-2, 2], got {v}")));
            }
        }
        let stop = match &self.stop {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) if v.len() > 4 => return Err(ApiError::bad("stop", "at most 4 stop sequences")),
            Stop::Many(v) => v.clone(),
        };
        let params = SamplingParams {
            temperature,
            top_k: 0,
            top_p,
            min_p: 0.0,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
            ..SamplingParams::default()
        };
        params.validate().map_err(|m| ApiError::bad("temperature", m))?;
        Ok(GenerateRequest { prompt_tokens, params, max_tokens, stop, stop_at_eog: true })
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn body<T: serde::de::DeserializeOwned>(r: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    // OpenAI answers 400 to any body it cannot use (axum says 422 for valid JSON of the
    // wrong shape); 413 (too large) and 415 (not JSON) keep their status.
    r.map(|Json(t)| t).map_err(|e| {
        let status = if e.status() == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { e.status() };
        ApiError::new(status, "invalid_request_error", e.body_text())
    })
}

async fn completions(State(st): State<Arc<ApiState>>, req: Result<Json<CompletionRequest>, JsonRejection>) -> Response {
    let r = async {
        let req = body(req)?;
        let text_err = |e: shoal_model::Error| ApiError::bad("prompt", e.to_string());
        let prompt = match req.prompt {
            Prompt::Text(t) => st.tokenizer.encode(&t, true, false).map_err(text_err)?,
            Prompt::Texts(v) if v.len() == 1 => st.tokenizer.encode(&v[0], true, false).map_err(text_err)?,
            Prompt::Texts(_) => return Err(ApiError::bad("prompt", "only one prompt per request is supported")),
            Prompt::Tokens(t) => {
                let n_vocab = st.tokenizer.n_vocab() as u32;
                if let Some(bad) = t.iter().find(|&&t| t >= n_vocab) {
                    return Err(ApiError::bad("prompt", format!("token id {bad} is outside the vocabulary of {n_vocab}")));
                }
                t
            }
        };
        let lp = want_logprobs(req.logprobs.is_some(), req.logprobs, 5, "logprobs")?;
        let g = req.common.request(&st, prompt, Some(16))?;
        run(st.clone(), g, req.common.stream, Kind::Completion, lp).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(st): State<Arc<ApiState>>, req: Result<Json<ChatRequest>, JsonRejection>) -> Response {
    let r = async {
        let req = body(req)?;
        let Some(chat) = &st.chat else {
            return Err(ApiError::bad("messages", "the model file has no chat template; use /v1/completions"));
        };
        if req.messages.is_empty() {
            return Err(ApiError::bad("messages", "messages is empty"));
        }
        let mut messages = Vec::with_capacity(req.messages.len());
        for m in req.messages {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::bad("messages", format!("unknown role {:?}", m.role)));
            }
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(p) => {
                    if let Some(x) = p.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::bad("messages", format!("content part of type {:?} is not supported", x.kind)));
                    }
                    p.into_iter().map(|p| p.text).collect::<Vec<_>>().join("")
                }
            };
            let role = if m.role == "developer" { "system".to_string() } else { m.role };
            messages.push(ChatMessage { role, content });
        }
        let text = chat.render(&messages, true).map_err(|e| ApiError::bad("messages", e.to_string()))?;
        // The template writes BOS itself when the model wants one.
        let prompt = st.tokenizer.encode(&text, false, true).map_err(|e| ApiError::bad("messages", e.to_string()))?;
        if !req.logprobs && req.top_logprobs.is_some() {
            return Err(ApiError::bad("top_logprobs", "top_logprobs needs logprobs: true"));
        }
        let lp = want_logprobs(req.logprobs, req.top_logprobs, 20, "top_logprobs")?;
        let g = req.common.request(&st, prompt, None)?;
        run(st.clone(), g, req.common.stream, Kind::Chat, lp).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

fn usage(n_prompt: usize, n_gen: usize) -> Value {
    json!({"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen})
}

/// Runs one generation and answers it whole or as a stream.
/// The `logprobs` object of a choice for `tokens` (those of one chunk, or all), in OpenAI's
/// shape for `kind`; `offset` is the completion text's length before them.
fn logprobs_json(tok: &Tokenizer, kind: Kind, tokens: &[Sampled], offset: usize) -> Value {
    let text = |id: u32| String::from_utf8_lossy(&tok.token_bytes(id, false)).into_owned();
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|s| {
                    let top: Vec<Value> = s
                        .top
                        .iter()
                        .map(|&(t, lp)| json!({"token": text(t), "logprob": lp, "bytes": tok.token_bytes(t, false)}))
                        .collect();
                    json!({"token": text(s.token), "logprob": s.logprob, "bytes": tok.token_bytes(s.token, false),
                           "top_logprobs": top})
                })
                .collect();
            json!({"content": content})
        }
        Kind::Completion => {
            let mut off = offset;
            let mut offsets = Vec::new();
            let mut texts = Vec::new();
            for s in tokens {
                let t = text(s.token);
                offsets.push(off);
                off += t.len();
                texts.push(t);
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|s| Value::Object(s.top.iter().map(|&(t, lp)| (text(t), json!(lp))).collect()))
                .collect();
            let lps: Vec<Option<f32>> = tokens.iter().map(|s| s.logprob).collect();
            json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets})
        }
    }
}

async fn run(st: Arc<ApiState>, g: GenerateRequest, stream: bool, kind: Kind, lp: Option<usize>) -> Result<Response, ApiError> {
    let id = match kind {
        Kind::Completion => format!("cmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        Kind::Chat => format!("chatcmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
    };
    let created = now();
    let n_prompt = g.prompt_tokens.len();
    // Held until the answer is complete (streamed ones included).
    let permit = Arc::clone(&st.slots).try_acquire_owned().map_err(|_| {
        let msg = "the server is at its limit of concurrent requests; retry shortly";
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", msg.into()).with_code("rate_limit_exceeded")
    })?;
    if g.max_tokens == 0 {
        let out = whole(kind, &id, created, &st.model, "", FinishReason::Length, usage(n_prompt, 0));
        return Ok(Json(out).into_response());
    }
    let sub = Submission {
        prompt: g.prompt_tokens.clone(),
        params: g.params.clone(),
        logprobs: lp.is_some(),
        top_logprobs: lp.unwrap_or(0),
        max_tokens: g.max_tokens,
        forced: None,
    };
    let mut rx = st.scheduler.submit(sub).await.map_err(ApiError::from_cluster)?;
    if !stream {
        let mut ts = TokenStream::new(&st.tokenizer, &g);
        let mut sink = |_: &str| {};
        let mut sampled = Vec::new();
        while let Some(t) = rx.recv().await {
            let t = t.map_err(ApiError::from_cluster)?;
            let go = ts.push(t.token, &mut sink);
            sampled.push(t);
            if !go {
                break;
            }
        }
        drop(rx);
        let gen_ = ts.finish(&mut sink);
        let mut out = whole(kind, &id, created, &st.model, &gen_.text, gen_.finish, usage(n_prompt, gen_.tokens.len()));
        if lp.is_some() {
            // The tokens the completion kept (not an end-of-generation token that ended it).
            sampled.truncate(gen_.tokens.len());
            out["choices"][0]["logprobs"] = logprobs_json(&st.tokenizer, kind, &sampled, 0);
        }
        return Ok(Json(out).into_response());
    }
    let (tx, events) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let mut ch = Chunks { kind, id, created, model: st.model.clone(), lp: lp.is_some(), lp_pending: Vec::new(), sent: 0 };
        let send = |v: Value| tx.send(Ok(Event::default().data(v.to_string())));
        if kind == Kind::Chat && send(ch.json(json!({"role": "assistant", "content": ""}), None)).await.is_err() {
            return;
        }
        let mut ts = TokenStream::new(&st.tokenizer, &g);
        let mut pending: Vec<String> = Vec::new();
        let mut failed = None;
        while let Some(t) = rx.recv().await {
            let t = match t {
                Ok(t) => t,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let n_before = ts.len();
            let go = ts.push(t.token, &mut |s: &str| pending.push(s.to_string()));
            if ts.len() > n_before {
                ch.accepted(t);
            }
            for p in pending.drain(..).filter(|p| !p.is_empty()) {
                if send(ch.text(&st.tokenizer, &p)).await.is_err() {
                    return; // the client is gone; dropping rx ends the sequence
                }
            }
            if !go {
                break;
            }
        }
        drop(rx);
        if let Some(e) = failed {
            let err = json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": null}});
            let _ = send(err).await;
            return;
        }
        let gen_ = ts.finish(&mut |s: &str| pending.push(s.to_string()));
        for p in pending.drain(..).filter(|p| !p.is_empty()) {
            if send(ch.text(&st.tokenizer, &p)).await.is_err() {
                return;
            }
        }
        let last = ch.last(&st.tokenizer, gen_.finish, usage(n_prompt, gen_.tokens.len()));
        if send(last).await.is_ok() {
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        }
    });
    Ok(Sse::new(ReceiverStream::new(events)).into_response())
}

/// The chunks of one streamed answer, in OpenAI's shape for its kind. With logprobs, each
/// text chunk carries those of the tokens accepted since the previous one.
struct Chunks {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    lp: bool,
    lp_pending: Vec<Sampled>,
    /// Text length sent so far (the completions `text_offset` of the next token).
    sent: usize,
}

impl Chunks {
    fn json(&self, delta: Value, finish: Option<&str>) -> Value {
        let (id, created, model) = (&self.id, self.created, &self.model);
        match self.kind {
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": delta, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Chat => json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            }),
        }
    }

    /// A token the completion kept.
    fn accepted(&mut self, t: Sampled) {
        if self.lp {
            self.lp_pending.push(t);
        }
    }

    fn take_logprobs(&mut self, v: &mut Value, tok: &Tokenizer) {
        if self.lp && !self.lp_pending.is_empty() {
            v["choices"][0]["logprobs"] = logprobs_json(tok, self.kind, &self.lp_pending, self.sent);
            self.lp_pending.clear();
        }
    }

    fn text(&mut self, tok: &Tokenizer, t: &str) -> Value {
        let delta = match self.kind {
            Kind::Completion => json!(t),
            Kind::Chat => json!({"content": t}),
        };
        let mut v = self.json(delta, None);
        self.take_logprobs(&mut v, tok);
        self.sent += t.len();
        v
    }

    /// The finish chunk; the usage of the whole request rides on it.
    fn last(&mut self, tok: &Tokenizer, finish: FinishReason, usage: Value) -> Value {
        let empty = match self.kind {
            Kind::Completion => json!(""),
            Kind::Chat => json!({}),
        };
        let mut v = self.json(empty, Some(finish.as_str()));
        v["usage"] = usage;
        self.take_logprobs(&mut v, tok);
        v
    }
}

fn whole(kind: Kind, id: &str, created: u64, model: &str, text: &str, finish: FinishReason, usage: Value) -> Value {
    match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str()}],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null,
                         "finish_reason": finish.as_str()}],
            "usage": usage,
        }),
    }
}
