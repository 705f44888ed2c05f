//! `POST /v1/chat/completions`: request, response and streamed chunk (`delta`).

use serde::{Deserialize, Serialize};

use crate::{Stop, StreamOptions, Usage};

/// Message content: a string or a list of parts (only `text` parts carry text here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a string or a list of content parts like {\"type\": \"text\", \"text\": \"...\"}"
)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl MessageContent {
    /// The text of the message (text parts concatenated).
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(s) => s.clone(),
            MessageContent::Parts(p) => p.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(MessageContent::Text(content.into())),
        }
    }

    /// The text of the message, empty when there is none.
    pub fn text(&self) -> String {
        self.content.as_ref().map(|c| c.text()).unwrap_or_default()
    }
}

/// A chat completions request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The served model name; empty means the server's only model.
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens`; wins when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<i64>,
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

impl ChatCompletionRequest {
    /// `max_completion_tokens` if given, else `max_tokens`.
    pub fn effective_max_tokens(&self) -> Option<i64> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A non-streamed chat completion response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    #[serde(default = "object_chat")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    #[serde(default)]
    pub usage: Option<Usage>,
}

fn object_chat() -> String {
    "chat.completion".into()
}

fn object_chat_chunk() -> String {
    "chat.completion.chunk".into()
}

/// The incremental part of a streamed chat choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A streamed chat chunk (`data: {...}`). The usage chunk has empty `choices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[serde(default = "object_chat_chunk")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl ChatCompletionChunk {
    /// A chunk with one choice whose delta is `delta`.
    pub fn delta(
        id: &str,
        created: u64,
        model: &str,
        delta: ChatDelta,
        finish_reason: Option<&str>,
    ) -> Self {
        ChatCompletionChunk {
            id: id.to_string(),
            object: object_chat_chunk(),
            created,
            model: model.to_string(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                finish_reason: finish_reason.map(str::to_string),
            }],
            usage: None,
        }
    }

    /// The final usage chunk of a stream with `include_usage`.
    pub fn usage(id: &str, created: u64, model: &str, usage: Usage) -> Self {
        ChatCompletionChunk {
            id: id.to_string(),
            object: object_chat_chunk(),
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
    fn content_parts_and_strings() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"},
               {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
               "max_completion_tokens":3,"max_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].text(), "hi");
        assert_eq!(r.messages[1].text(), "ab");
        assert_eq!(r.effective_max_tokens(), Some(3));
    }

    #[test]
    fn delta_skips_absent_fields() {
        let c = ChatCompletionChunk::delta(
            "x",
            0,
            "m",
            ChatDelta {
                role: None,
                content: Some("a".into()),
            },
            None,
        );
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains(r#""delta":{"content":"a"}"#), "{s}");
        assert!(!s.contains("usage"));
    }
}
