//! Reading a request body whole within a size limit, answering past it with a 413 that the
//! client can actually read: shared by `colocate serve` and the gateway.
//!
//! Answering while the client is still sending makes the server close a socket with unread
//! data: the kernel then sends a reset and the client sees a dropped connection instead of
//! the response. So past the limit the rest is read and thrown away (bounded in bytes and
//! time) before the 413. A client that sent `Expect: 100-continue` with a too-large
//! `Content-Length` has sent nothing yet: it gets the 413 at once. A body that arrives too
//! slowly is cut by [`body_deadline`](crate::body_deadline), which answers 408 instead.

use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::http::{header, HeaderMap};
use bytes::BytesMut;
use futures::StreamExt as _;
use openai::ErrorBody;

/// Past the limit, at most this much more is read (and dropped) so the client reads the
/// 413; a sender of more gets the 413 and a closed connection.
const MAX_DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// Past the limit, at most this long is spent reading what is left.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The whole body if it holds at most `limit` bytes; else a 413 naming the limit (after
/// draining), or a 400 when the body cannot be read.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ErrorBody> {
    let declared = content_length(headers);
    if declared.is_some_and(|n| n > limit as u64) {
        if !expects_continue(headers) {
            drain(body).await;
        }
        return Err(ErrorBody::payload_too_large(limit));
    }
    let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ErrorBody::invalid_request(format!("cannot read the request body: {e}"), None)
        })?;
        if buf.len() + chunk.len() > limit {
            drain_stream(stream).await;
            return Err(ErrorBody::payload_too_large(limit));
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

async fn drain_stream(mut stream: BodyDataStream) {
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
