//! `POST /v1/completions`: request, response and streamed chunk.

use serde::{Deserialize, Serialize};

use crate::{Input, Stop, StreamOptions, Usage};

/// A completions request. Sampling fields left out take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The served model name; empty means the server's only model.
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub model: String,
    pub prompt: Input,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// vLLM extra: 0 or -1 = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// vLLM extra: keep generating after EOS until `max_tokens`.
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub ignore_eos: bool,
    /// vLLM extra: EOS and stop strings cannot end generation before this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    /// vLLM extra: the prefix cache shares blocks only between requests with the same
    /// salt (a tenant's own), so that no other tenant can time what it has cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<String>,
}

/// One choice of a completion (or of a streamed chunk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// `stop` or `length`; null in streamed chunks until the last one.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A non-streamed completion response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    #[serde(default = "object_text_completion")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default)]
    pub usage: Option<Usage>,
}

fn object_text_completion() -> String {
    "text_completion".into()
}

/// A streamed completion chunk (`data: {...}`). The usage chunk has empty `choices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    pub id: String,
    #[serde(default = "object_text_completion")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl CompletionChunk {
    /// A chunk carrying `text` (and, on the last one, the finish reason).
    pub fn text(
        id: &str,
        created: u64,
        model: &str,
        text: String,
        finish_reason: Option<&str>,
    ) -> Self {
        CompletionChunk {
            id: id.to_string(),
            object: object_text_completion(),
            created,
            model: model.to_string(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish_reason.map(str::to_string),
            }],
            usage: None,
        }
    }

    /// The final usage chunk of a stream with `include_usage`.
    pub fn usage(id: &str, created: u64, model: &str, usage: Usage) -> Self {
        CompletionChunk {
            id: id.to_string(),
            object: object_text_completion(),
            created,
            model: model.to_string(),
            choices: vec![],
            usage: Some(usage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_extras_and_ignores_unknown_fields() {
        let r: CompletionRequest = serde_json::from_str(
            r#"{"model":"m","prompt":"hi","max_tokens":8,"ignore_eos":true,"min_tokens":8,
                "stream":true,"stream_options":{"include_usage":true},"logit_bias":{},"echo":false}"#,
        )
        .unwrap();
        assert!(r.ignore_eos);
        assert_eq!(r.min_tokens, Some(8));
        assert!(r.stream_options.unwrap().include_usage);
    }

    #[test]
    fn wrong_types_are_errors() {
        assert!(serde_json::from_str::<CompletionRequest>(
            r#"{"model":"m","prompt":"hi","max_tokens":"8"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"model":"m"}"#).is_err());
        let r: CompletionRequest =
            serde_json::from_str(r#"{"model":null,"prompt":"hi","stream":null,"ignore_eos":null}"#)
                .unwrap();
        assert!(!r.stream && !r.ignore_eos && r.model.is_empty());
    }
}
