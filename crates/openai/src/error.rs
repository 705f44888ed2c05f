//! The OpenAI error body `{"error": {"message", "type", "param", "code"}}` with one
//! constructor per HTTP status the servers here answer, so that the status and the `type`
//! always agree.

use serde::{Deserialize, Serialize};

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    #[serde(default)]
    pub param: Option<String>,
    /// The HTTP status as a number here (vLLM does the same); OpenAI itself sends a string
    /// or null, so any JSON value is accepted when parsing.
    #[serde(default)]
    pub code: Option<serde_json::Value>,
}

impl ErrorBody {
    /// An error of `kind` answered with HTTP `status`.
    pub fn new(status: u16, kind: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: Some(serde_json::Value::from(status)),
            },
        }
    }

    /// 400: the request is malformed or asks for something unsupported.
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(400, "invalid_request_error", message, param)
    }

    /// 404: no such model (or route).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found_error", message, Some("model"))
    }

    /// 404: no route at this path.
    pub fn no_such_route(method: &str, path: &str) -> Self {
        Self::new(
            404,
            "not_found_error",
            format!("no route {method} {path}; routes: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models, /health, /metrics"),
            None,
        )
    }

    /// 405: the path exists but not for this method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            format!("method {method} is not allowed on {path}"),
            None,
        )
    }

    /// 413: the body is larger than the server accepts.
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            format!("request body is larger than the limit of {limit_bytes} bytes"),
            None,
        )
    }

    /// 415: the body is not declared as JSON.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "invalid_request_error",
            format!("Content-Type `{content_type}` is not supported: send the JSON body with `Content-Type: application/json`"),
            None,
        )
    }

    /// 503: overloaded (admission queue full), loading, or no healthy replica.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "service_unavailable_error", message, None)
    }

    /// 500: the server failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal_server_error", message, None)
    }

    /// The HTTP status this body was made for (from `code`; 500 when it is not a status).
    pub fn status(&self) -> u16 {
        self.error
            .code
            .as_ref()
            .and_then(|c| c.as_u64())
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| (400..600).contains(c))
            .unwrap_or(500)
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.error.message, self.error.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_status() {
        let e = ErrorBody::invalid_request("bad", Some("max_tokens"));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "max_tokens");
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(e.status(), 400);
        assert_eq!(ErrorBody::not_found("x").status(), 404);
        assert_eq!(ErrorBody::unavailable("x").status(), 503);
        assert_eq!(ErrorBody::payload_too_large(10).status(), 413);
        assert!(ErrorBody::payload_too_large(10)
            .error
            .message
            .contains("10 bytes"));
        assert_eq!(ErrorBody::method_not_allowed("GET", "/x").status(), 405);
        assert_eq!(ErrorBody::no_such_route("GET", "/x").status(), 404);
        assert_eq!(
            ErrorBody::unsupported_media_type("text/plain").status(),
            415
        );
        let openai: ErrorBody = serde_json::from_str(
            r#"{"error":{"message":"m","type":"t","param":null,"code":"model_not_found"}}"#,
        )
        .unwrap();
        assert_eq!(openai.status(), 500);
    }
}
