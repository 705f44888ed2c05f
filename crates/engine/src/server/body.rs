//! Reading request bodies with a size limit that answers in JSON.
//!
//! axum's `Bytes` extractor rejects past its 2 MB default in plain text. So the body is
//! read by `http_guard::limited_body` (shared with the gateway): up to
//! [`MAX_REQUEST_BODY_BYTES`] kept, past it the rest drained before a 413 with an OpenAI
//! error body; and only JSON (or no `Content-Type`) is accepted, as vLLM does.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use openai::ErrorBody;

use super::ApiError;

/// Largest request body accepted (4 MiB): a full 40,960-token prompt as token ids takes
/// under 300 KB, 2048 embedding inputs of 400 words about 3 MB.
pub const MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;

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
    let (parts, body) = req.into_parts();
    http_guard::limited_body::read_limited(&parts.headers, body, limit)
        .await
        .map_err(ApiError)
}

pub use http_guard::limited_body::drain;

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
    use axum::body::Body;
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
