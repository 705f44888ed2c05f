//! A deadline on receiving a request body. hyper bounds the time to read a request's head
//! but not its body, so a client that trickles its body one byte at a time would hold a
//! connection and a handler for ever. [`DeadlineBody`] fails the body once its deadline
//! passes; the server then answers `408` in place of whatever the handler made of the
//! failed read (see [`timeout_response`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error a body read gets once the deadline has passed.
#[derive(Debug)]
pub struct BodyTimeout(pub Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {}",
            crate::human(self.0)
        )
    }
}

impl std::error::Error for BodyTimeout {}

pin_project! {
    /// `inner`, failing with [`BodyTimeout`] once `deadline` passes before its end. Sets
    /// `expired` when it does, so that the server knows to answer 408.
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        #[pin]
        deadline: Sleep,
        limit: Duration,
        expired: Arc<AtomicBool>,
    }
}

impl<B> DeadlineBody<B> {
    /// `inner` must end within `limit` from now.
    pub fn new(inner: B, limit: Duration, expired: Arc<AtomicBool>) -> Self {
        DeadlineBody {
            inner,
            deadline: tokio::time::sleep(limit),
            limit,
            expired,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.deadline.poll(cx).is_ready() {
                    this.expired.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(*this.limit)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `408 Request Timeout` with an OpenAI error body, closing the connection (the rest of
/// the body may still be on its way).
pub fn timeout_response(limit: Duration) -> Response {
    let body = openai::ErrorBody::new(408, "timeout_error", BodyTimeout(limit).to_string(), None);
    let mut resp = (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;

    /// A body that yields one frame and then never ends.
    struct Stalled(bool);

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 {
                Poll::Pending
            } else {
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_body_fails_at_the_deadline_and_says_so() {
        let expired = Arc::new(AtomicBool::new(false));
        let body = DeadlineBody::new(Stalled(false), Duration::from_millis(50), expired.clone());
        let err = axum::body::to_bytes(axum::body::Body::new(body), 1024)
            .await
            .unwrap_err();
        assert!(expired.load(Ordering::Relaxed));
        assert!(
            err.to_string().contains("did not arrive within 50ms"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_whole_body_passes_untouched() {
        let expired = Arc::new(AtomicBool::new(false));
        let inner = axum::body::Body::from("hello");
        let body = DeadlineBody::new(inner, Duration::from_secs(5), expired.clone());
        let bytes = axum::body::to_bytes(axum::body::Body::new(body), 1024)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"hello");
        assert!(!expired.load(Ordering::Relaxed));
    }
}
