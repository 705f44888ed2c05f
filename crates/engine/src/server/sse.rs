//! Server-sent events: renders one generation's event channel as an SSE response, the
//! chunk shapes left to the route that asks ([`Piece`] in, JSON out).

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use openai::{ErrorBody, Usage};
use tokio::sync::mpsc;

use crate::scheduler::GenEvent;

/// What a stream formatter is asked to render.
pub enum Piece {
    /// Before any text (chat sends the assistant role first).
    Start,
    /// Text, with the finish reason on the last one.
    Text(String, Option<&'static str>),
    /// The usage chunk of `include_usage`.
    Usage(Usage),
}

pub fn to_json<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

/// An SSE response: `data: {chunk}\n\n` per event, the usage chunk when asked, then
/// `data: [DONE]\n\n`. Dropping the body (client gone) drops `rx`, which the scheduler sees
/// as a cancellation and frees the request's KV blocks.
pub fn sse<F>(rx: mpsc::UnboundedReceiver<GenEvent>, include_usage: bool, render: F) -> Response
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
