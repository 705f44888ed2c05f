//! A client's request as far as the gateway reads it: the body, whole and within
//! [`MAX_BODY_BYTES`], and the `model` it is routed by. Everything else in the body is the
//! engine's to judge; these checks only keep what the gateway itself needs well-formed,
//! answering each fault with its status and an OpenAI error body.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// The largest request body the gateway reads: the built-in engine's own limit (4 MiB), so
/// that the gateway refuses exactly what `colocate serve` would, in the same words, before
/// buffering it; and a client cannot make the gateway hold more than this per connection.
pub const MAX_BODY_BYTES: usize = engine::server::MAX_REQUEST_BODY_BYTES;

/// An error answer with an OpenAI body.
pub(super) fn error(status: StatusCode, body: openai::ErrorBody) -> Response {
    (status, axum::Json(body)).into_response()
}

/// The whole body, or the answer to give instead: 413 when it is (or declares itself)
/// over the limit, 400 when it cannot be read; read as the engine reads its own
/// (`http_guard::limited_body`: past the limit the rest is drained, so the client reads
/// the 413). A body that arrives too slowly is cut by `http_guard`, which answers 408.
pub(super) async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    http_guard::limited_body::read_limited(headers, body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            error(status, e)
        })
}

/// Why a body cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Unroutable {
    /// Not a JSON object (empty, invalid UTF-8, bad syntax, too deep, not an object).
    NotJson(String),
    /// No `model` field.
    NoModel,
    /// `model` is not a string.
    ModelNotString(&'static str),
}

impl Unroutable {
    /// The 400 answer.
    pub(super) fn response(&self) -> Response {
        let body = match self {
            Unroutable::NotJson(why) => openai::ErrorBody::invalid_request(why.clone(), None),
            Unroutable::NoModel => openai::ErrorBody::invalid_request(
                "`model` is required: the gateway routes by it",
                Some("model"),
            ),
            Unroutable::ModelNotString(got) => openai::ErrorBody::invalid_request(
                format!("`model` must be a string, got {got}"),
                Some("model"),
            ),
        };
        error(StatusCode::BAD_REQUEST, body)
    }
}

/// The `model` a body is routed by. serde_json's recursion limit (128) turns a deeply
/// nested body into an error, not a stack overflow.
pub(super) fn routing_model(body: &[u8]) -> Result<String, Unroutable> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Unroutable::NotJson(
            "the body is empty: send a JSON object with `model`".into(),
        ));
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(Unroutable::NotJson(format!(
            "the body is not valid UTF-8 (byte {})",
            e.valid_up_to()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Unroutable::NotJson(format!("the body is not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(Unroutable::NotJson(format!(
            "the body must be a JSON object, got {}",
            kind(&v)
        )));
    };
    match map.get("model") {
        None | Some(serde_json::Value::Null) => Err(Unroutable::NoModel),
        Some(serde_json::Value::String(m)) => Ok(m.clone()),
        Some(other) => Err(Unroutable::ModelNotString(kind(other))),
    }
}

/// "a number", "an array", ...: a JSON value's type as an error message names it.
fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    fn why(body: &[u8]) -> String {
        match routing_model(body) {
            Err(Unroutable::NotJson(w)) => w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_model_is_read_from_a_json_object() {
        assert_eq!(
            routing_model(br#"{"model": "m", "prompt": [1, 2]}"#).unwrap(),
            "m"
        );
        assert_eq!(
            routing_model(br#"{"prompt": "x"}"#),
            Err(Unroutable::NoModel)
        );
        assert_eq!(
            routing_model(br#"{"model": null}"#),
            Err(Unroutable::NoModel)
        );
        assert_eq!(
            routing_model(br#"{"model": 5}"#),
            Err(Unroutable::ModelNotString("a number"))
        );
        assert_eq!(
            routing_model(br#"{"model": ["m"]}"#),
            Err(Unroutable::ModelNotString("an array"))
        );
    }

    #[test]
    fn bodies_that_are_not_a_json_object_say_why() {
        assert!(why(b"").contains("empty"));
        assert!(why(b" \n").contains("empty"));
        assert!(why(b"{\"model\": \"\xff\xfe\"}").contains("not valid UTF-8 (byte 11)"));
        assert!(why(b"{\"model\": ").contains("not valid JSON"));
        assert!(why(br#"["model", "m"]"#).contains("got an array"));
        assert!(why(b"42").contains("got a number"));
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(why(deep.as_bytes()).contains("recursion limit"));
        let deep_obj = format!(
            "{{\"model\":\"m\",\"x\":{}1{}}}",
            "{\"a\":".repeat(10_000),
            "}".repeat(10_000)
        );
        assert!(why(deep_obj.as_bytes()).contains("recursion limit"));
    }

    #[tokio::test]
    async fn bodies_over_the_limit_get_413_declared_or_not() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_LENGTH,
            (MAX_BODY_BYTES + 1).to_string().parse().unwrap(),
        );
        headers.insert(header::EXPECT, "100-continue".parse().unwrap());
        let r = read_body(&headers, Body::empty()).await.unwrap_err();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let big = Body::from(vec![b' '; MAX_BODY_BYTES + 1]);
        let r = read_body(&HeaderMap::new(), big).await.unwrap_err();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let bytes = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["code"], 413);
        assert_eq!(
            v,
            serde_json::to_value(openai::ErrorBody::payload_too_large(MAX_BODY_BYTES)).unwrap()
        );
        let ok = read_body(&HeaderMap::new(), Body::from("{}"))
            .await
            .unwrap();
        assert_eq!(&ok[..], b"{}");
    }
}
