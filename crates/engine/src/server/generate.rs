//! The one generation handler behind `/v1/completions` and `/v1/chat/completions`: the two
//! routes differ only in what [`GenRoute`] says (how the body becomes a prompt, the chunk
//! and response shapes); everything else (validation off the runtime, admission, streaming
//! or collecting) is shared.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use openai::{
    ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatMessage,
    CompletionChoice, CompletionChunk, CompletionResponse, ErrorBody, Usage,
};
use tokio::sync::mpsc;

use super::body::JsonBody;
use super::sse::{sse, to_json, Piece};
use super::validate::{self, GenJob, ModelView};
use super::{internal, ApiResult, AppState};
use crate::scheduler::{GenEvent, GenParams, GenRequest};
use crate::worker::{Command, Ready};

/// What sets one generation route apart from the other.
pub trait GenRoute: Send + Sync + 'static {
    /// The prefix of the response id (`cmpl`, `chatcmpl`).
    const ID_PREFIX: &'static str;

    /// Parses, validates and tokenizes the body (the prompt or the chat template).
    fn parse(body: &[u8], view: &ModelView<'_>) -> Result<GenJob, ErrorBody>;

    /// One streamed chunk; `None` for a piece this route does not send.
    fn chunk(head: &Head, piece: Piece) -> Option<String>;

    /// The whole, non-streamed response.
    fn response(head: Head, text: String, finish: String, usage: Usage) -> Response;
}

/// What every chunk and response of one request repeats.
pub struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// `/v1/completions`.
pub struct Completions;

impl GenRoute for Completions {
    const ID_PREFIX: &'static str = "cmpl";

    fn parse(body: &[u8], view: &ModelView<'_>) -> Result<GenJob, ErrorBody> {
        validate::completion(body, view)
    }

    fn chunk(h: &Head, piece: Piece) -> Option<String> {
        match piece {
            Piece::Text(t, fin) => {
                to_json(&CompletionChunk::text(&h.id, h.created, &h.model, t, fin))
            }
            Piece::Usage(u) => to_json(&CompletionChunk::usage(&h.id, h.created, &h.model, u)),
            Piece::Start => None,
        }
    }

    fn response(h: Head, text: String, finish: String, usage: Usage) -> Response {
        axum::Json(CompletionResponse {
            id: h.id,
            object: "text_completion".into(),
            created: h.created,
            model: h.model,
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(finish),
            }],
            usage: Some(usage),
        })
        .into_response()
    }
}

/// `/v1/chat/completions`.
pub struct Chat;

impl GenRoute for Chat {
    const ID_PREFIX: &'static str = "chatcmpl";

    fn parse(body: &[u8], view: &ModelView<'_>) -> Result<GenJob, ErrorBody> {
        validate::chat(body, view)
    }

    fn chunk(h: &Head, piece: Piece) -> Option<String> {
        let delta = |role: Option<String>, content: String, fin: Option<&'static str>| {
            to_json(&ChatCompletionChunk::delta(
                &h.id,
                h.created,
                &h.model,
                ChatDelta {
                    role,
                    content: Some(content),
                },
                fin,
            ))
        };
        match piece {
            Piece::Start => delta(Some("assistant".into()), String::new(), None),
            Piece::Text(t, fin) => delta(None, t, fin),
            Piece::Usage(u) => to_json(&ChatCompletionChunk::usage(&h.id, h.created, &h.model, u)),
        }
    }

    fn response(h: Head, text: String, finish: String, usage: Usage) -> Response {
        axum::Json(ChatCompletionResponse {
            id: h.id,
            object: "chat.completion".into(),
            created: h.created,
            model: h.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessage::new("assistant", text),
                finish_reason: Some(finish),
            }],
            usage: Some(usage),
        })
        .into_response()
    }
}

/// The handler of both routes: validate, submit, then stream or collect.
pub async fn generate<R: GenRoute>(
    State(st): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let ready = st.ready()?;
    let job: GenJob = st.validated(&ready, body, R::parse).await?;
    let rx = start_generation(&st, &ready, job.prompt, job.params, job.stream)?;
    let head = Head {
        id: request_id(R::ID_PREFIX),
        created: openai::unix_now(),
        model: st.served_model_name.clone(),
    };
    if job.stream {
        return Ok(sse(rx, job.include_usage, move |piece| {
            R::chunk(&head, piece)
        }));
    }
    let (text, finish, usage) = collect(rx).await?;
    Ok(R::response(head, text, finish, usage))
}

/// Submits a generation request and returns its event channel.
fn start_generation(
    st: &AppState,
    ready: &Ready,
    prompt: Vec<u32>,
    params: GenParams,
    streamed: bool,
) -> ApiResult<mpsc::UnboundedReceiver<GenEvent>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest {
        prompt,
        params,
        streamed,
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
