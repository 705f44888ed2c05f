//! The OpenAI-compatible HTTP routes (axum): they read the body within a size limit
//! ([`body`]), parse and validate it ([`validate`]: pure functions, property-tested), turn
//! it into tokens, reserve an admission place, hand it to the engine thread and stream or
//! collect what comes back. Every error is an OpenAI error body with its status (including
//! 404 for unknown routes, 405 for wrong methods, 413 for large bodies); the server keeps
//! serving everyone else.
//!
//! A client that goes away cancels its request: hyper drops the handler (non-streamed) or
//! the response body (streamed), which drops the request's event channel; the scheduler
//! sees it closed at its next step and frees the request's KV blocks and slot.

pub mod body;
pub mod validate;

use std::convert::Infallible;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use openai::{
    ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatMessage,
    CompletionChoice, CompletionChunk, CompletionResponse, EmbeddingResponse, ErrorBody, ModelCard,
    ModelList, Usage,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::embed_queue::EmbedRequest;
use crate::metrics::Metrics;
use crate::scheduler::{Admission, GenEvent, GenParams, GenRequest};
use crate::worker::{Command, Health, Ready};
use body::JsonBody;
use validate::{GenJob, ModelView};

pub use body::MAX_REQUEST_BODY_BYTES;

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
        .method_not_allowed_fallback(method_not_allowed)
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

impl From<ErrorBody> for ApiError {
    fn from(e: ErrorBody) -> Self {
        ApiError(e)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// 404 in JSON; the body (if any) is read first so the client sees the answer.
async fn not_found(req: Request) -> ApiError {
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    body::drain(req.into_body()).await;
    ApiError(ErrorBody::no_such_route(&method, &path))
}

/// 405 in JSON (axum's own has no body).
async fn method_not_allowed(req: Request) -> ApiError {
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    body::drain(req.into_body()).await;
    ApiError(ErrorBody::method_not_allowed(&method, &path))
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
    let mut text = st.metrics.render(&st.served_model_name);
    text.push_str(&crate::metrics::render_admission(
        &st.served_model_name,
        st.admission.waiting(),
        st.admission.capacity(),
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
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

    /// Runs `check` (parse, validate, tokenize) on `body` on a blocking thread: tokenizing
    /// megabytes of text takes a while and must not stall the runtime's few threads (the
    /// health probe and every stream share them); a panic there would be a 500, not a
    /// dead server.
    async fn validated<T, F>(&self, ready: &Arc<Ready>, body: Bytes, check: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&[u8], &ModelView<'_>) -> Result<T, ErrorBody> + Send + 'static,
    {
        let ready = ready.clone();
        let served_model_name = self.served_model_name.clone();
        let job = tokio::task::spawn_blocking(move || {
            let view = ModelView {
                served_model_name: &served_model_name,
                info: &ready.info,
                max_model_len: ready.max_model_len,
                tokenizer: &ready.tokenizer,
            };
            check(&body, &view)
        });
        match job.await {
            Ok(result) => result.map_err(ApiError),
            Err(e) => Err(internal(format!("request validation failed: {e}"))),
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

/// Collects a whole generation: (text, finish reason, usage). If the client goes away,
/// hyper drops this future and with it `rx`: the scheduler then cancels the request.
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

async fn completions(
    State(st): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let ready = st.ready()?;
    let job: GenJob = st.validated(&ready, body, validate::completion).await?;
    let rx = start_generation(&st, &ready, job.prompt, job.params)?;
    let id = request_id("cmpl");
    let created = openai::unix_now();
    let model = st.served_model_name.clone();
    if job.stream {
        return Ok(sse(rx, job.include_usage, move |piece| match piece {
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

async fn chat(State(st): State<Arc<AppState>>, JsonBody(body): JsonBody) -> ApiResult<Response> {
    let ready = st.ready()?;
    let job: GenJob = st.validated(&ready, body, validate::chat).await?;
    let rx = start_generation(&st, &ready, job.prompt, job.params)?;
    let id = request_id("chatcmpl");
    let created = openai::unix_now();
    let model = st.served_model_name.clone();
    if job.stream {
        return Ok(sse(rx, job.include_usage, move |piece| match piece {
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

async fn embeddings(
    State(st): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let ready = st.ready()?;
    let mut job = st.validated(&ready, body, validate::embedding).await?;
    let prompt_tokens = u32::try_from(job.prompt_tokens()).unwrap_or(u32::MAX);
    let inputs = std::mem::take(&mut job.inputs);
    let (tx, rx) = oneshot::channel();
    st.submit(
        &ready.commands,
        Command::Embed(EmbedRequest { inputs, reply: tx }),
    )?;
    let vectors = rx
        .await
        .map_err(|_| internal("the engine dropped the request"))?
        .map_err(|e| internal(format!("{e:#}")))?;
    let data = validate::shape_embeddings(vectors, &job)?;
    Ok(axum::Json(EmbeddingResponse::new(
        st.served_model_name.clone(),
        data,
        prompt_tokens,
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
