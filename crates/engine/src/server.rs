//! The OpenAI-compatible HTTP routes (axum) and their shared state: the route table, the
//! error responses, health, metrics, models and embeddings. The parts have rooms of their
//! own: the body read within a size limit ([`body`]), parsing, validation and tokenization
//! ([`validate`]: pure functions, property-tested, run off the runtime), the one handler of
//! both generation routes ([`generate`]) and the event stream ([`sse`]). Every error is an
//! OpenAI error body with its status (including 404 for unknown routes, 405 for wrong
//! methods, 413 for large bodies); the server keeps serving everyone else.
//!
//! A client that goes away cancels its request: hyper drops the handler (non-streamed) or
//! the response body (streamed), which drops the request's event channel; the scheduler
//! sees it closed at its next step and frees the request's KV blocks and slot.

pub mod body;
pub mod generate;
pub mod share;
pub mod sse;
pub mod validate;

use std::sync::mpsc::Sender;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use openai::{EmbeddingResponse, ErrorBody, ModelCard, ModelList};
use tokio::sync::{oneshot, watch};

use crate::embed_queue::EmbedRequest;
use crate::metrics::Metrics;
use crate::scheduler::Admission;
use crate::worker::{Command, EngineState, Ready};
use body::JsonBody;
use generate::{generate, Chat, Completions};
pub use share::ComputeShare;
use validate::ModelView;

pub use body::MAX_REQUEST_BODY_BYTES;

/// Shared state of the routes.
pub struct AppState {
    pub served_model_name: String,
    pub health: watch::Receiver<EngineState>,
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    /// The compute share: the admin route moves it, the embedding route and the engine's
    /// embedding queue obey it.
    pub share: Arc<ComputeShare>,
}

/// All routes of `colocate serve`; `/admin/compute-share` moves the engine's compute
/// share at run time ([`share`]).
pub fn router(state: Arc<AppState>) -> Router {
    let share = state.share.clone();
    Router::new()
        .route(
            "/admin/compute-share",
            get(share::get_share).post(share::set_share),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(generate::<Completions>))
        .route("/v1/chat/completions", post(generate::<Chat>))
        .route("/v1/embeddings", post(embeddings))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(Extension(share))
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
        EngineState::Ready(_) => StatusCode::OK.into_response(),
        EngineState::Loading => {
            ApiError(ErrorBody::unavailable("the model is loading")).into_response()
        }
        EngineState::Failed(e) => {
            ApiError(ErrorBody::unavailable(format!("the engine failed: {e}"))).into_response()
        }
    }
}

async fn metrics(
    State(st): State<Arc<AppState>>,
    Extension(share): Extension<Arc<ComputeShare>>,
) -> Response {
    let mut text = st.metrics.render(&st.served_model_name);
    text.push_str(&share::render(&st.served_model_name, &share.status()));
    text.push_str(&crate::metrics::render_admission(
        &st.served_model_name,
        st.admission.waiting(),
        st.admission.capacity(),
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let max_len = match &*st.health.borrow() {
        EngineState::Ready(r) => Some(r.max_model_len),
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
            EngineState::Ready(r) => Ok(r.clone()),
            EngineState::Loading => Err(ApiError(ErrorBody::unavailable("the model is loading"))),
            EngineState::Failed(e) => Err(ApiError(ErrorBody::unavailable(format!(
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

async fn embeddings(
    State(st): State<Arc<AppState>>,
    Extension(share): Extension<Arc<ComputeShare>>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let ready = st.ready()?;
    let mut job = st.validated(&ready, body, validate::embedding).await?;
    // Within the compute share: held until the vectors are back (or the client leaves).
    let _inside = share.enter(job.prompt_tokens()).await;
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
