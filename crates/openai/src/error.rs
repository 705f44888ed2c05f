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
        let openai: ErrorBody = serde_json::from_str(
            r#"{"error":{"message":"m","type":"t","param":null,"code":"model_not_found"}}"#,
        )
        .unwrap();
        assert_eq!(openai.status(), 500);
    }
}
