//! Reading request bodies with a size limit that answers in JSON.
//!
//! axum's `Bytes` extractor rejects past its 2 MB default in plain text, and answering
//! while the client is still sending makes the server close a socket with unread data:
//! the kernel then sends a reset and the client sees a dropped connection instead of the
//! response. So the body is read here: up to [`MAX_REQUEST_BODY_BYTES`] kept, past it the
//! rest read and thrown away (bounded in bytes and time) before a 413 with an OpenAI error
//! body. A client that sent `Expect: 100-continue` with a too-large `Content-Length` has
//! sent nothing yet: it gets the 413 at once.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap};
use bytes::BytesMut;
use futures::StreamExt as _;
use openai::ErrorBody;

use super::ApiError;

/// Largest request body accepted (4 MiB): a full 40,960-token prompt as token ids takes
/// under 300 KB, 2048 embedding inputs of 400 words about 3 MB.
pub const MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Past the limit, at most this much more is read (and dropped) so the client reads the
/// 413; a sender of more gets the 413 and a closed connection.
const MAX_DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// Past the limit, at most this long is spent reading what is left.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body read whole, within [`MAX_REQUEST_BODY_BYTES`], declared as JSON (or not
/// declared at all).
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = read_limited(req, MAX_REQUEST_BODY_BYTES).await?;
        // Checked after reading, so the client never meets a socket closed on its body.
        check_content_type(content_type.as_ref())?;
        Ok(JsonBody(bytes))
    }
}

/// The body of `req` if it holds at most `limit` bytes; else 413 (after draining).
pub async fn read_limited(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let declared = content_length(req.headers());
    let too_large = || ApiError(ErrorBody::payload_too_large(limit));
    if declared.is_some_and(|n| n > limit as u64) {
        if !expects_continue(req.headers()) {
            drain(req.into_body()).await;
        }
        return Err(too_large());
    }
    let capacity = declared.map_or(0, |n| n as usize);
    let mut buf = BytesMut::with_capacity(capacity);
    let mut stream = req.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError(ErrorBody::invalid_request(
                format!("cannot read the request body: {e}"),
                None,
            ))
        })?;
        if buf.len() + chunk.len() > limit {
            drain_stream(stream).await;
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads and drops what is left of `body` (bounded), so an answer can be read by a client
/// that is still sending.
pub async fn drain(body: Body) {
    drain_stream(body.into_data_stream()).await;
}

async fn drain_stream(mut stream: axum::body::BodyDataStream) {
    let read_rest = async {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > MAX_DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, read_rest).await;
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// No `Content-Type`, `application/json` or `application/*+json` (any parameters); 415
/// otherwise, with a message saying what to send.
fn check_content_type(value: Option<&header::HeaderValue>) -> Result<(), ApiError> {
    let Some(value) = value else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let mime = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json =
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(ApiError(ErrorBody::unsupported_media_type(&text)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn request(body: &'static [u8], headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().method("POST").uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(body)).unwrap()
    }

    fn status(r: Result<Bytes, ApiError>) -> u16 {
        r.map_or_else(|e| e.0.status(), |_| 200)
    }

    #[tokio::test]
    async fn bodies_within_the_limit_are_read_whole() {
        let got = read_limited(request(b"0123456789", &[]), 10).await;
        assert_eq!(&got.unwrap()[..], b"0123456789");
    }

    #[tokio::test]
    async fn bodies_past_the_limit_are_413_declared_or_not() {
        assert_eq!(
            status(read_limited(request(b"0123456789x", &[]), 10).await),
            413
        );
        let declared = request(b"0123456789x", &[("content-length", "11")]);
        let e = read_limited(declared, 10).await.unwrap_err();
        assert_eq!(e.0.status(), 413);
        assert!(e.0.error.message.contains("limit of 10 bytes"), "{}", e.0);
        let expecting = request(
            b"",
            &[("content-length", "99999999"), ("expect", "100-continue")],
        );
        assert_eq!(status(read_limited(expecting, 10).await), 413);
    }

    #[test]
    fn json_content_types_only() {
        let ok = |v: &str| check_content_type(Some(&HeaderValue::from_str(v).unwrap())).is_ok();
        assert!(check_content_type(None).is_ok());
        assert!(ok("application/json"));
        assert!(ok("Application/JSON; charset=utf-8"));
        assert!(ok("application/vnd.api+json"));
        assert!(!ok("text/plain"));
        assert!(!ok("application/x-www-form-urlencoded"));
        assert!(!ok("multipart/form-data; boundary=x"));
        let raw = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        assert!(check_content_type(Some(&raw)).is_err());
    }
}
