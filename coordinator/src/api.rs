//! The OpenAI-compatible HTTP API of `shoal serve` (axum): `GET /v1/models`,
//! `POST /v1/completions` and `POST /v1/chat/completions`, each whole or streamed as
//! server-sent events ending with `data: [DONE]`; the Files and Batches endpoints of
//! [`crate::jobs`]; `GET /health` (the whole pipeline can serve) and `GET /metrics`
//! (Prometheus text, [`crate::metrics`]).
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
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_model::chat::{ChatMessage, ChatTemplate};
use shoal_model::engine::{FinishReason, GenerateRequest, Generation, TokenStream};
use shoal_model::sampling::SamplingParams;
use shoal_model::tokenizer::Tokenizer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::pipeline::Sampled;
use crate::cluster::registry::Registry;
use crate::cluster::scheduler::{Priority, Scheduler, Submission, TokenRx};
use crate::metrics::Metrics;

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
    pub metrics: Arc<Metrics>,
    /// The coordinator's registry: `/health` and `/metrics` ask it about the stages.
    pub registry: Option<Registry>,
    /// Files and batch jobs; `None`: no state directory, the endpoints answer 404.
    pub jobs: Option<Arc<crate::jobs::Jobs>>,
}

/// What checking a request needs of the server: its tokenizer, chat template, model id and
/// context length.
pub struct RequestContext<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat: Option<&'a ChatTemplate>,
    pub model: &'a str,
    pub n_ctx: usize,
}

impl ApiState {
    pub fn request_context(&self) -> RequestContext<'_> {
        RequestContext { tokenizer: &self.tokenizer, chat: self.chat.as_deref(), model: &self.model, n_ctx: self.scheduler.n_ctx() }
    }
}

/// Checks a request body for `endpoint` (`/v1/completions` or `/v1/chat/completions`) as
/// the server does before running it: `Ok`, or the HTTP status and message it answers. The
/// entry point of the `api_request` fuzz target.
pub fn check_request(ctx: &RequestContext<'_>, endpoint: &str, body: &[u8]) -> Result<(), (u16, String)> {
    let fail = |e: ApiError| (e.status.as_u16(), e.message);
    let parse = |e: serde_json::Error| (400, format!("the body is not a valid request: {e}"));
    match endpoint {
        "/v1/completions" => prepare_completion(ctx, serde_json::from_slice(body).map_err(parse)?).map(|_| ()).map_err(fail),
        "/v1/chat/completions" => prepare_chat(ctx, serde_json::from_slice(body).map_err(parse)?).map(|_| ()).map_err(fail),
        other => Err((404, format!("no endpoint {other}"))),
    }
}

/// Limits of the API, set by `shoal serve`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest upload to `/v1/files`.
    pub max_file_bytes: usize,
}

/// Longest wait of `/health` and `/metrics` for the workers' answers.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// `GET /health`: 200 `{"status": "ok"}` only when every stage of the pipeline answers, holds
/// its shard and reaches the next stage, and the scheduler runs; else 503 with what is wrong.
async fn health(State(st): State<Arc<ApiState>>) -> Response {
    let mut problems = Vec::new();
    match tokio::time::timeout(PROBE_WAIT, st.scheduler.stats()).await {
        Ok(Ok(stats)) => {
            if let Some(what) = stats.recovering {
                problems.push(format!("{what} (requests are paused, not lost)"));
            }
        }
        _ => problems.push("the scheduler does not answer".to_string()),
    }
    if let Some(reg) = &st.registry {
        match tokio::time::timeout(PROBE_WAIT, reg.status()).await {
            Err(_) => problems.push("the workers did not answer in time".into()),
            Ok(status) => {
                let stages: Vec<_> = status.workers.iter().filter(|w| w.planned).collect();
                if stages.is_empty() {
                    problems.push("no pipeline is loaded".into());
                }
                for w in stages {
                    if !w.reachable {
                        problems.push(format!("stage {} ({}) is unreachable: {}", w.stage, w.addr, w.error));
                    } else if !w.loaded {
                        problems.push(format!("stage {} ({}) holds no shard", w.stage, w.addr));
                    } else if !w.next_stage_error.is_empty() {
                        problems.push(format!("stage {} ({}) cannot reach {}: {}", w.stage, w.addr, w.next_stage, w.next_stage_error));
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "problems": problems}))).into_response()
    }
}

/// How long a stream waits for a token before it asks whether the pipeline is paused.
const PAUSE_NOTICE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// `GET /metrics`: Prometheus text.
async fn metrics(State(st): State<Arc<ApiState>>) -> Response {
    let sched = tokio::time::timeout(PROBE_WAIT, st.scheduler.stats()).await.ok().and_then(|r| r.ok());
    let status = match &st.registry {
        Some(reg) => tokio::time::timeout(PROBE_WAIT, reg.status()).await.ok(),
        None => None,
    };
    let jobs = st.jobs.as_ref().map(|j| j.counts());
    let text = st.metrics.render(sched.as_ref(), status.as_ref(), jobs.as_ref());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The router of the API.
pub fn router(state: Arc<ApiState>, limits: Limits) -> axum::Router {
    use crate::jobs;
    let upload_limit = axum::extract::DefaultBodyLimit::max(limits.max_file_bytes);
    let v1 = axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/files", post(jobs::upload).layer(upload_limit).get(jobs::list_files))
        .route("/v1/files/{id}", get(jobs::get_file).delete(jobs::delete_file))
        .route("/v1/files/{id}/content", get(jobs::file_content))
        .route("/v1/batches", post(jobs::create_batch).get(jobs::list_batches))
        .route("/v1/batches/{id}", get(jobs::get_batch))
        .route("/v1/batches/{id}/cancel", post(jobs::cancel_batch))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authenticate));
    axum::Router::new()
        .route("/health", get(health))
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
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: String) -> ApiError {
        ApiError { status, kind, message, param: None, code: None }
    }

    fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub(crate) fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
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
            crate::cluster::Error::Busy(m) => busy(m),
            e => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string()),
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// Whether the same request could succeed later (busy, or the pipeline failed).
    pub(crate) fn is_retryable(&self) -> bool {
        self.status == StatusCode::TOO_MANY_REQUESTS || self.status.is_server_error()
    }

    /// OpenAI's error body.
    pub(crate) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::info!(status = %self.status, "request refused: {}", self.message);
        let mut r = (self.status, Json(self.body())).into_response();
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
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// `stream_options`: with `include_usage`, the usage comes as a last chunk of its own with
/// no choices, as OpenAI sends it (without, it rides on the finish chunk).
#[derive(Deserialize, Debug, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize, Debug)]
pub(crate) struct CompletionRequest {
    prompt: Prompt,
    /// Log-probabilities of the chosen tokens and this many alternatives (0..=5).
    logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize, Debug)]
pub(crate) struct ChatRequest {
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
    /// The checked request of `kind` for `prompt_tokens` (see [`Common::request`]).
    fn prepared(&self, st: &RequestContext<'_>, prompt_tokens: Vec<u32>, default_max: Option<usize>, kind: Kind, lp: Option<usize>) -> Result<Prepared, ApiError> {
        Ok(Prepared {
            g: self.request(st, prompt_tokens, default_max)?,
            kind,
            lp,
            stream: self.stream,
            n: self.n.unwrap_or(1) as usize,
            usage_chunk: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }

    /// The generation this request asks for, checked. `default_max`: OpenAI's default
    /// (16 for completions, the rest of the context for chat).
    fn request(&self, st: &RequestContext<'_>, prompt_tokens: Vec<u32>, default_max: Option<usize>) -> Result<GenerateRequest, ApiError> {
        if let Some(m) = &self.model
            && !m.is_empty()
            && m != st.model
        {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: format!("the model `{m}` does not exist; this server serves `{}`", st.model),
                param: Some("model"),
                code: Some("model_not_found"),
            });
        }
        match self.n {
            Some(0) => return Err(ApiError::bad("n", "n must be at least 1")),
            Some(n) if n > MAX_N => return Err(ApiError::bad("n", format!("n must be at most {MAX_N}, got {n}"))),
            Some(n) if n > 1 && self.stream => {
                return Err(ApiError::bad("n", "n > 1 is supported without streaming only"));
            }
            _ => {}
        }
        let n_ctx = st.n_ctx;
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

/// Most choices one request may ask for.
const MAX_N: u32 = 16;

/// A checked request, ready to run.
pub(crate) struct Prepared {
    g: GenerateRequest,
    kind: Kind,
    lp: Option<usize>,
    stream: bool,
    n: usize,
    /// Streamed usage as a chunk of its own (`stream_options.include_usage`).
    usage_chunk: bool,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A batch line's body as a request of type `T` (400 as for the same body over HTTP).
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("the body is not a valid request: {e}")))
}

impl Prepared {
    pub(crate) fn streams(&self) -> bool {
        self.stream
    }
}

pub(crate) fn body<T: serde::de::DeserializeOwned>(r: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    // OpenAI answers 400 to any body it cannot use (axum says 422 for valid JSON of the
    // wrong shape); 413 (too large) and 415 (not JSON) keep their status.
    r.map(|Json(t)| t).map_err(|e| {
        let status = if e.status() == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { e.status() };
        ApiError::new(status, "invalid_request_error", e.body_text())
    })
}

/// Checks a `/v1/completions` body.
pub(crate) fn prepare_completion(st: &RequestContext<'_>, req: CompletionRequest) -> Result<Prepared, ApiError> {
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
    req.common.prepared(st, prompt, Some(16), Kind::Completion, lp)
}

/// Checks a `/v1/chat/completions` body and renders its chat.
pub(crate) fn prepare_chat(st: &RequestContext<'_>, req: ChatRequest) -> Result<Prepared, ApiError> {
    let Some(chat) = st.chat else {
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
    req.common.prepared(st, prompt, None, Kind::Chat, lp)
}

async fn completions(State(st): State<Arc<ApiState>>, req: Result<Json<CompletionRequest>, JsonRejection>) -> Response {
    let t0 = Instant::now();
    let r = async { run(st.clone(), prepare_completion(&st.request_context(), body(req)?)?, t0).await }.await;
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request("completions", resp.status().as_u16());
    resp
}

async fn chat_completions(State(st): State<Arc<ApiState>>, req: Result<Json<ChatRequest>, JsonRejection>) -> Response {
    let t0 = Instant::now();
    let r = async { run(st.clone(), prepare_chat(&st.request_context(), body(req)?)?, t0).await }.await;
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request("chat_completions", resp.status().as_u16());
    resp
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Kind {
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

fn busy(msg: String) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", msg).with_code("rate_limit_exceeded")
}

/// The scheduler's submission for one choice of `p`.
fn submission(p: &Prepared, choice: usize, priority: Priority) -> Submission {
    let mut params = p.g.params.clone();
    if choice > 0 {
        // Choices of one seeded request differ from each other and are each reproducible.
        params.seed = params.seed.map(|s| s.wrapping_add(choice as u64));
    }
    Submission {
        prompt: p.g.prompt_tokens.clone(),
        params,
        logprobs: p.lp.is_some(),
        top_logprobs: p.lp.unwrap_or(0),
        max_tokens: p.g.max_tokens,
        forced: None,
        priority,
    }
}

/// Runs one choice to its end: (text, finish, tokens kept, their samples).
async fn one_choice(st: &ApiState, p: &Prepared, mut rx: TokenRx, t0: Instant) -> Result<(Generation, Vec<Sampled>), ApiError> {
    let mut ts = TokenStream::new(&st.tokenizer, &p.g);
    let mut sink = |_: &str| {};
    let mut sampled = Vec::new();
    while let Some(t) = rx.recv().await {
        let t = t.map_err(ApiError::from_cluster)?;
        if sampled.is_empty() {
            st.metrics.first_token(t0.elapsed());
        }
        let go = ts.push(t.token, &mut sink);
        sampled.push(t);
        if !go {
            break;
        }
    }
    drop(rx);
    let gen_ = ts.finish(&mut sink);
    // The tokens the completion kept (not an end-of-generation token that ended it).
    sampled.truncate(gen_.tokens.len());
    Ok((gen_, sampled))
}

/// Runs a request whole (every choice) and returns its response body. Batch jobs run their
/// lines through here too, at [`Priority::Background`].
pub(crate) async fn answer_whole(st: &ApiState, p: &Prepared, priority: Priority, t0: Instant) -> Result<Value, ApiError> {
    let id = response_id(p.kind);
    let created = now();
    let n_prompt = p.g.prompt_tokens.len();
    let mut choices = Vec::with_capacity(p.n);
    if p.g.max_tokens == 0 {
        for _ in 0..p.n {
            choices.push((Generation { text: String::new(), tokens: Vec::new(), finish: FinishReason::Length, n_prompt }, Vec::new()));
        }
    } else {
        // Every choice is queued before any is awaited, so they share the batch.
        let mut rxs = Vec::with_capacity(p.n);
        for i in 0..p.n {
            rxs.push(st.scheduler.submit(submission(p, i, priority)).await.map_err(ApiError::from_cluster)?);
        }
        for rx in rxs {
            choices.push(one_choice(st, p, rx, t0).await?);
        }
    }
    let n_gen: usize = choices.iter().map(|(g, _)| g.tokens.len()).sum();
    st.metrics.tokens(n_prompt, n_gen);
    let list: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, (gen_, sampled))| {
            let mut c = choice(p.kind, i, &gen_.text, gen_.finish);
            if p.lp.is_some() {
                c["logprobs"] = logprobs_json(&st.tokenizer, p.kind, sampled, 0);
            }
            c
        })
        .collect();
    let object = match p.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    Ok(json!({"id": id, "object": object, "created": created, "model": st.model, "choices": list,
              "usage": usage(n_prompt, n_gen)}))
}

/// A fresh response id for `kind`.
fn response_id(kind: Kind) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    }
}

async fn run(st: Arc<ApiState>, p: Prepared, t0: Instant) -> Result<Response, ApiError> {
    // Held until the answer is complete (streamed ones included).
    let permit = Arc::clone(&st.slots)
        .try_acquire_owned()
        .map_err(|_| busy("the server is at its limit of concurrent requests; retry shortly".into()))?;
    if !p.stream || p.g.max_tokens == 0 {
        let out = answer_whole(&st, &p, Priority::Interactive, t0).await?;
        drop(permit);
        if p.stream {
            // Nothing to generate: the stream is the finish chunk alone.
            let ch = Chunks::new(p.kind, &out, p.lp.is_some());
            let mut last = ch.json(if p.kind == Kind::Chat { json!({}) } else { json!("") }, Some("length"));
            let mut chunks = Vec::new();
            if p.usage_chunk {
                chunks.push(last);
                last = ch.usage_only(out["usage"].clone());
            } else {
                last["usage"] = out["usage"].clone();
            }
            chunks.push(last);
            let events: Vec<Result<Event, Infallible>> = chunks
                .into_iter()
                .map(|c| Ok(Event::default().data(c.to_string())))
                .chain([Ok(Event::default().data("[DONE]"))])
                .collect();
            return Ok(Sse::new(tokio_stream::iter(events)).into_response());
        }
        return Ok(Json(out).into_response());
    }
    let sub = submission(&p, 0, Priority::Interactive);
    let Prepared { g, kind, lp, usage_chunk, .. } = p;
    let id = response_id(kind);
    let created = now();
    let n_prompt = g.prompt_tokens.len();
    let mut rx = st.scheduler.submit(sub).await.map_err(ApiError::from_cluster)?;
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
        let mut first = true;
        let mut told: Option<String> = None;
        loop {
            // A pause of the pipeline (a recovery) is said to the client as an SSE comment,
            // which clients skip: it also keeps the connection alive.
            let t = match tokio::time::timeout(PAUSE_NOTICE_AFTER, rx.recv()).await {
                Ok(Some(t)) => t,
                Ok(None) => break,
                Err(_) => {
                    let what = tokio::time::timeout(PROBE_WAIT, st.scheduler.stats()).await.ok().and_then(|r| r.ok()).and_then(|s| s.recovering);
                    if let Some(what) = what.filter(|w| told.as_ref() != Some(w)) {
                        if tx.send(Ok(Event::default().comment(format!("paused: {what}")))).await.is_err() {
                            return;
                        }
                        told = Some(what);
                    }
                    continue;
                }
            };
            let t = match t {
                Ok(t) => t,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if first {
                first = false;
                st.metrics.first_token(t0.elapsed());
            }
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
        st.metrics.tokens(n_prompt, gen_.tokens.len());
        for p in pending.drain(..).filter(|p| !p.is_empty()) {
            if send(ch.text(&st.tokenizer, &p)).await.is_err() {
                return;
            }
        }
        let u = usage(n_prompt, gen_.tokens.len());
        let mut last = ch.last(&st.tokenizer, gen_.finish, u.clone());
        if usage_chunk {
            if let Some(o) = last.as_object_mut() {
                o.remove("usage");
            }
            if send(last).await.is_err() {
                return;
            }
            last = ch.usage_only(u);
        }
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
    /// The chunks of the answer whose whole body is `out`.
    fn new(kind: Kind, out: &Value, lp: bool) -> Chunks {
        Chunks {
            kind,
            id: out["id"].as_str().unwrap_or_default().to_string(),
            created: out["created"].as_u64().unwrap_or_default(),
            model: out["model"].as_str().unwrap_or_default().to_string(),
            lp,
            lp_pending: Vec::new(),
            sent: 0,
        }
    }

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

    /// The chunk of `stream_options.include_usage`: no choices, the whole request's usage.
    fn usage_only(&self, usage: Value) -> Value {
        let mut v = self.json(json!(""), None);
        v["choices"] = json!([]);
        v["usage"] = usage;
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

/// Choice `index` of a whole answer, without logprobs.
fn choice(kind: Kind, index: usize, text: &str, finish: FinishReason) -> Value {
    match kind {
        Kind::Completion => json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish.as_str()}),
        Kind::Chat => json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": null,
                             "finish_reason": finish.as_str()}),
    }
}
