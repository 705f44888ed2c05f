//! The OpenAI-compatible HTTP routes (axum): they parse and validate a request, turn it
//! into tokens, reserve an admission place, hand it to the engine thread and stream or
//! collect what comes back. Every error is an OpenAI error body with its status; the
//! server keeps serving everyone else.
//!
//! Bodies are parsed from raw bytes rather than with axum's `Json` extractor, whose
//! rejections are plain text: malformed JSON and wrong field types both become 400 with
//! the serde message.

use std::convert::Infallible;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use openai::{
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessage, CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse,
    Embedding, EmbeddingRequest, EmbeddingResponse, ErrorBody, InputItem, ModelCard, ModelList,
    Usage,
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};

use crate::embed_queue::EmbedRequest;
use crate::metrics::Metrics;
use crate::runner::Task;
use crate::scheduler::{Admission, GenEvent, GenParams, GenRequest};
use crate::worker::{Command, Health, Ready};

/// Shared state of the routes.
pub struct AppState {
    pub served_model_name: String,
    pub health: watch::Receiver<Health>,
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
}

/// All routes of `colocate serve`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .fallback(not_found)
        .with_state(state)
}

/// An error response: an OpenAI error body with the status it names.
#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_string(&self.0).unwrap_or_default();
        (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

fn bad(msg: impl Into<String>, param: Option<&str>) -> ApiError {
    ApiError(ErrorBody::invalid_request(msg, param))
}

type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body into `T`: malformed JSON and wrong field types are 400s.
fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => "malformed JSON body",
            Category::Data => "invalid request body",
        };
        bad(format!("{what}: {e}"), None)
    })
}

async fn not_found() -> ApiError {
    ApiError(ErrorBody::new(
        404,
        "not_found_error",
        "no such route",
        None,
    ))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match &*st.health.borrow() {
        Health::Ready(_) => StatusCode::OK.into_response(),
        Health::Loading => ApiError(ErrorBody::unavailable("the model is loading")).into_response(),
        Health::Failed(e) => {
            ApiError(ErrorBody::unavailable(format!("the engine failed: {e}"))).into_response()
        }
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&st.served_model_name),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let max_len = match &*st.health.borrow() {
        Health::Ready(r) => Some(r.max_model_len),
        _ => None,
    };
    axum::Json(ModelList::new(vec![ModelCard::new(
        st.served_model_name.clone(),
        max_len,
    )]))
    .into_response()
}

impl AppState {
    /// The engine, once loaded; 503 before.
    fn ready(&self) -> ApiResult<Arc<Ready>> {
        match &*self.health.borrow() {
            Health::Ready(r) => Ok(r.clone()),
            Health::Loading => Err(ApiError(ErrorBody::unavailable("the model is loading"))),
            Health::Failed(e) => Err(ApiError(ErrorBody::unavailable(format!(
                "the engine failed: {e}"
            )))),
        }
    }

    /// 404 unless `model` is empty or the served name.
    fn check_model(&self, model: &str) -> ApiResult<()> {
        if model.is_empty() || model == self.served_model_name {
            Ok(())
        } else {
            Err(ApiError(ErrorBody::not_found(format!(
                "the model `{model}` does not exist; this server serves `{}`",
                self.served_model_name
            ))))
        }
    }

    /// Reserves an admission place and sends `cmd` to the engine; 503 when full.
    fn submit(&self, commands: &Sender<Command>, cmd: Command) -> ApiResult<()> {
        if !self.admission.try_enter() {
            self.metrics
                .requests_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError(ErrorBody::unavailable(
                "the server is overloaded: too many requests waiting (--max-waiting); retry later",
            )));
        }
        commands.send(cmd).map_err(|_| {
            self.admission.leave();
            ApiError(ErrorBody::unavailable("the engine has stopped"))
        })
    }
}

fn require_task(ready: &Ready, task: Task, route: &str, model: &str) -> ApiResult<()> {
    if ready.info.task == task {
        return Ok(());
    }
    let (is, flag) = match ready.info.task {
        Task::Generate => (
            "a generation model (--task generate)",
            "/v1/completions and /v1/chat/completions",
        ),
        Task::Embed => ("an embedding model (--task embed)", "/v1/embeddings"),
    };
    Err(bad(
        format!("`{model}` is {is}: it does not serve {route}; use {flag}"),
        Some("model"),
    ))
}

/// Sampling fields common to completions and chat.
struct Sampling<'a> {
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    n: Option<u32>,
    stop: Option<&'a openai::Stop>,
    seed: Option<u64>,
    ignore_eos: bool,
    min_tokens: Option<u32>,
}

/// Validates the sampling fields against the prompt and the model's limits.
fn gen_params(s: Sampling<'_>, prompt_len: usize, ready: &Ready) -> ApiResult<GenParams> {
    if s.n.unwrap_or(1) != 1 {
        return Err(bad(
            "n > 1 is not supported: send one request per completion",
            Some("n"),
        ));
    }
    if prompt_len == 0 {
        return Err(bad("the prompt is empty", Some("prompt")));
    }
    let max_len = ready.max_model_len;
    if prompt_len >= max_len {
        return Err(bad(
            format!(
                "the prompt is {prompt_len} tokens long but this model's maximum context length is {max_len} tokens (--max-model-len), leaving no room to generate"
            ),
            Some("prompt"),
        ));
    }
    let max_tokens = match s.max_tokens {
        Some(m) if m < 1 => {
            return Err(bad(
                format!("max_tokens must be at least 1, got {m}"),
                Some("max_tokens"),
            ))
        }
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
        None => max_len - prompt_len,
    };
    let temperature = s.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(bad(
            format!("temperature must be >= 0, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let top_k = match s.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(bad(
                format!("top_k must be -1, 0 (off) or positive, got {k}"),
                Some("top_k"),
            ))
        }
    };
    let min_tokens = s.min_tokens.unwrap_or(0) as usize;
    if min_tokens > max_tokens {
        return Err(bad(
            format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            Some("min_tokens"),
        ));
    }
    Ok(GenParams {
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed: s.seed,
        stop: s.stop.map(|s| s.to_vec()).unwrap_or_default(),
        ignore_eos: s.ignore_eos,
        min_tokens,
    })
}

fn check_token_ids(ids: &[u32], ready: &Ready, param: &str) -> ApiResult<()> {
    let vocab = ready.info.vocab_size;
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(bad(
            format!("token id {t} is out of the vocabulary (size {vocab})"),
            Some(param),
        )),
        None => Ok(()),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(ErrorBody::internal(e.to_string()))
}

/// Submits a generation request and returns its event channel.
fn start_generation(
    st: &AppState,
    ready: &Ready,
    prompt: Vec<u32>,
    params: GenParams,
) -> ApiResult<mpsc::UnboundedReceiver<GenEvent>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest {
        prompt,
        params,
        events: tx,
        arrival: Instant::now(),
    };
    st.submit(&ready.commands, Command::Generate(req))?;
    Ok(rx)
}

/// Collects a whole generation: (text, finish reason, usage).
async fn collect(mut rx: mpsc::UnboundedReceiver<GenEvent>) -> ApiResult<(String, String, Usage)> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::Done {
                text: t,
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                text.push_str(&t);
                return Ok((
                    text,
                    finish_reason.to_string(),
                    Usage::new(prompt_tokens, completion_tokens),
                ));
            }
            GenEvent::Error(e) => return Err(internal(e)),
        }
    }
    Err(internal("the engine dropped the request"))
}

fn request_id(prefix: &str) -> String {
    use rand::Rng;
    format!("{prefix}-{:016x}", rand::thread_rng().gen::<u64>())
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> ApiResult<Response> {
    let req: CompletionRequest = parse(&body)?;
    st.check_model(&req.model)?;
    let ready = st.ready()?;
    require_task(
        &ready,
        Task::Generate,
        "/v1/completions",
        &st.served_model_name,
    )?;
    let items = req.prompt.items();
    if items.len() != 1 {
        return Err(bad(
            "exactly one prompt per request is supported",
            Some("prompt"),
        ));
    }
    let prompt = match items[0] {
        InputItem::Text(t) => ready
            .tokenizer
            .encode(t, true)
            .map_err(|e| bad(format!("{e:#}"), Some("prompt")))?,
        InputItem::Tokens(t) => {
            check_token_ids(t, &ready, "prompt")?;
            t.to_vec()
        }
    };
    let params = gen_params(
        Sampling {
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            stop: req.stop.as_ref(),
            seed: req.seed,
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
        },
        prompt.len(),
        &ready,
    )?;
    let rx = start_generation(&st, &ready, prompt, params)?;
    let id = request_id("cmpl");
    let created = openai::unix_now();
    let model = st.served_model_name.clone();
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse(rx, include_usage, move |piece| match piece {
            Piece::Text(t, fin) => to_json(&CompletionChunk::text(&id, created, &model, t, fin)),
            Piece::Usage(u) => to_json(&CompletionChunk::usage(&id, created, &model, u)),
            Piece::Start => None,
        }));
    }
    let (text, finish, usage) = collect(rx).await?;
    Ok(axum::Json(CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason: Some(finish),
        }],
        usage: Some(usage),
    })
    .into_response())
}

async fn chat(State(st): State<Arc<AppState>>, body: Bytes) -> ApiResult<Response> {
    let req: ChatCompletionRequest = parse(&body)?;
    st.check_model(&req.model)?;
    let ready = st.ready()?;
    require_task(
        &ready,
        Task::Generate,
        "/v1/chat/completions",
        &st.served_model_name,
    )?;
    if req.messages.is_empty() {
        return Err(bad("messages must not be empty", Some("messages")));
    }
    let msgs: Vec<(String, String)> = req
        .messages
        .iter()
        .map(|m| (m.role.clone(), m.text()))
        .collect();
    let text = ready
        .tokenizer
        .apply_chat_template(&msgs)
        .map_err(|e| bad(format!("{e:#}"), Some("messages")))?;
    let prompt = ready
        .tokenizer
        .encode(&text, false)
        .map_err(|e| bad(format!("{e:#}"), Some("messages")))?;
    let params = gen_params(
        Sampling {
            max_tokens: req.effective_max_tokens(),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            stop: req.stop.as_ref(),
            seed: req.seed,
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
        },
        prompt.len(),
        &ready,
    )?;
    let rx = start_generation(&st, &ready, prompt, params)?;
    let id = request_id("chatcmpl");
    let created = openai::unix_now();
    let model = st.served_model_name.clone();
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse(rx, include_usage, move |piece| match piece {
            Piece::Start => to_json(&ChatCompletionChunk::delta(
                &id,
                created,
                &model,
                ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                },
                None,
            )),
            Piece::Text(t, fin) => to_json(&ChatCompletionChunk::delta(
                &id,
                created,
                &model,
                ChatDelta {
                    role: None,
                    content: Some(t),
                },
                fin,
            )),
            Piece::Usage(u) => to_json(&ChatCompletionChunk::usage(&id, created, &model, u)),
        }));
    }
    let (text, finish, usage) = collect(rx).await?;
    Ok(axum::Json(ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessage::new("assistant", text),
            finish_reason: Some(finish),
        }],
        usage: Some(usage),
    })
    .into_response())
}

async fn embeddings(State(st): State<Arc<AppState>>, body: Bytes) -> ApiResult<Response> {
    let req: EmbeddingRequest = parse(&body)?;
    st.check_model(&req.model)?;
    let ready = st.ready()?;
    require_task(&ready, Task::Embed, "/v1/embeddings", &st.served_model_name)?;
    if let Some(f) = req.encoding_format.as_deref() {
        if f != "float" {
            return Err(bad(
                format!("encoding_format `{f}` is not supported; use `float`"),
                Some("encoding_format"),
            ));
        }
    }
    if req.dimensions.is_some() {
        return Err(bad("dimensions is not supported", Some("dimensions")));
    }
    if req.input.is_empty() {
        return Err(bad("input must not be empty", Some("input")));
    }
    let max_len = ready.max_model_len;
    let mut inputs = Vec::with_capacity(req.input.len());
    for (i, item) in req.input.items().into_iter().enumerate() {
        let ids = match item {
            InputItem::Text(t) => ready
                .tokenizer
                .encode(t, true)
                .map_err(|e| bad(format!("{e:#}"), Some("input")))?,
            InputItem::Tokens(t) => {
                check_token_ids(t, &ready, "input")?;
                t.to_vec()
            }
        };
        if ids.is_empty() {
            return Err(bad(format!("input {i} is empty"), Some("input")));
        }
        if ids.len() > max_len {
            return Err(bad(
                format!(
                    "input {i} is {} tokens long but this model's maximum context length is {max_len} tokens (--max-model-len)",
                    ids.len()
                ),
                Some("input"),
            ));
        }
        inputs.push(ids);
    }
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let (tx, rx) = oneshot::channel();
    st.submit(
        &ready.commands,
        Command::Embed(EmbedRequest { inputs, reply: tx }),
    )?;
    let vectors = rx
        .await
        .map_err(|_| internal("the engine dropped the request"))?
        .map_err(|e| internal(format!("{e:#}")))?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| Embedding::new(i as u32, v))
        .collect();
    Ok(axum::Json(EmbeddingResponse::new(
        st.served_model_name.clone(),
        data,
        prompt_tokens as u32,
    ))
    .into_response())
}

/// What a stream formatter is asked to render.
enum Piece {
    /// Before any text (chat sends the assistant role first).
    Start,
    /// Text, with the finish reason on the last one.
    Text(String, Option<&'static str>),
    /// The usage chunk of `include_usage`.
    Usage(Usage),
}

fn to_json<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

/// An SSE response: `data: {chunk}\n\n` per event, the usage chunk when asked, then
/// `data: [DONE]\n\n`. Dropping the body (client gone) drops `rx`, which the scheduler sees
/// as a cancellation and frees the request's KV blocks.
fn sse<F>(rx: mpsc::UnboundedReceiver<GenEvent>, include_usage: bool, render: F) -> Response
where
    F: Fn(Piece) -> Option<String> + Send + 'static,
{
    struct St<F> {
        rx: mpsc::UnboundedReceiver<GenEvent>,
        render: F,
        started: bool,
        finished: bool,
    }
    let st = St {
        rx,
        render,
        started: false,
        finished: false,
    };
    let stream = futures::stream::unfold(st, move |mut st| async move {
        if st.finished {
            return None;
        }
        let mut out = String::new();
        if !st.started {
            st.started = true;
            if let Some(j) = (st.render)(Piece::Start) {
                out.push_str(&openai::sse_data(&j));
            }
        }
        match st.rx.recv().await {
            Some(GenEvent::Text(t)) => {
                if let Some(j) = (st.render)(Piece::Text(t, None)) {
                    out.push_str(&openai::sse_data(&j));
                }
            }
            Some(GenEvent::Done {
                text,
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                if let Some(j) = (st.render)(Piece::Text(text, Some(finish_reason))) {
                    out.push_str(&openai::sse_data(&j));
                }
                if include_usage {
                    if let Some(j) =
                        (st.render)(Piece::Usage(Usage::new(prompt_tokens, completion_tokens)))
                    {
                        out.push_str(&openai::sse_data(&j));
                    }
                }
                out.push_str(openai::SSE_DONE);
                st.finished = true;
            }
            Some(GenEvent::Error(e)) => {
                if let Some(j) = to_json(&ErrorBody::internal(e)) {
                    out.push_str(&openai::sse_data(&j));
                }
                out.push_str(openai::SSE_DONE);
                st.finished = true;
            }
            None => {
                if let Some(j) = to_json(&ErrorBody::internal("the engine dropped the request")) {
                    out.push_str(&openai::sse_data(&j));
                }
                out.push_str(openai::SSE_DONE);
                st.finished = true;
            }
        }
        Some((Ok::<Bytes, Infallible>(Bytes::from(out)), st))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
