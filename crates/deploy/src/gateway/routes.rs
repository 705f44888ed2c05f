//! The gateway's router: its own routes (`/v1/models`, `/health`, `/metrics`), the
//! OpenAI routes it forwards, and OpenAI error bodies for every other method and path
//! (405 with `Allow`, 404), so that a client never gets an empty or plain-text answer.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;

use super::health::ready_models;
use super::proxy::{forward, forward_other};
use super::request::error;
use super::Shared;

/// The OpenAI routes forwarded to the engines; other POST routes are forwarded too
/// (engines have extras: vLLM's `/tokenize`, TEI's `/embed`) when the body names a
/// served model.
pub(super) const FORWARDED: &[&str] =
    &["/v1/completions", "/v1/chat/completions", "/v1/embeddings"];

/// The whole router.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    let mut r = Router::new()
        .route("/v1/models", only("GET", get(list_models)))
        .route("/health", only("GET", get(health)))
        .route("/metrics", only("GET", get(metrics)));
    for path in FORWARDED {
        r = r.route(path, only("POST", post(forward)));
    }
    r.fallback(forward_other).with_state(shared)
}

/// `methods` with a 405 JSON answer for any other method.
fn only(allow: &'static str, methods: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    methods.fallback(move |method: Method, uri: Uri| async move {
        method_not_allowed(&method, uri.path(), allow)
    })
}

/// 405 with `Allow`.
fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Response {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        openai::ErrorBody::new(
            405,
            "invalid_request_error",
            format!("method {method} is not allowed on {path}; use {allow}"),
            None,
        ),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// 404 for a path the gateway neither serves nor forwards.
pub(super) fn no_route(method: &Method, path: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        openai::ErrorBody::new(
            404,
            "not_found_error",
            format!(
                "no route {method} {path}; routes: {}, /v1/models, /health, /metrics",
                FORWARDED.join(", ")
            ),
            None,
        ),
    )
}

async fn list_models(State(s): State<Arc<Shared>>) -> Response {
    let cards = ready_models(&s.models, &s.workers)
        .into_iter()
        .map(|m| openai::ModelCard::new(m.to_string(), None))
        .collect();
    axum::Json(openai::ModelList::new(cards)).into_response()
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    let workers: serde_json::Map<String, serde_json::Value> = s
        .workers
        .iter()
        .map(|w| (w.spec.name.clone(), serde_json::Value::Bool(w.routable())))
        .collect();
    let any = s.workers.iter().any(|w| w.routable());
    let status = if any {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "workers": workers })),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut text = s.stats.lock().render(&s.workers);
    if s.control.active() {
        s.control.snapshot().render(&mut text);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
