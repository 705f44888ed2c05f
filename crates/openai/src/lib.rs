//! OpenAI API types as used by colocate: completions, chat, embeddings, streaming chunks,
//! usage and the error body. Shared by the engine (server side), the gateway (routing by
//! `model`) and bench (client side), so every field a client may send is optional where the
//! OpenAI API makes it optional, unknown fields are ignored (serde's default), and responses
//! serialise exactly as OpenAI / vLLM clients expect.
//!
//! vLLM's extras `ignore_eos` and `min_tokens` and the `top_k` sampling field are accepted
//! because benchmarks need fixed output lengths.

pub mod base64;
mod chat;
mod completion;
mod embedding;
mod error;

pub use chat::*;
pub use completion::*;
pub use embedding::*;
pub use error::*;

use serde::{Deserialize, Deserializer, Serialize};

/// Reads `null` as the field's default, as vLLM's `Optional[...] = default` fields do
/// (some clients send `"stream": null`).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `stream_options` of a streamed request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// When true the server sends a last chunk with empty `choices` and the request's
    /// `usage` before `data: [DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Zero for embeddings.
    #[serde(default)]
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    /// Usage with `total_tokens` filled in.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A prompt or embedding input: a string, a list of strings, a list of token ids, or a list
/// of token id lists (OpenAI accepts all four for both `prompt` and `input`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids (0 to 4294967295) or a list of token id lists"
)]
pub enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One item of an [`Input`]: text to tokenize or token ids to use as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputItem<'a> {
    Text(&'a str),
    Tokens(&'a [u32]),
}

impl Input {
    /// The items of this input, one per prompt / per embedding.
    pub fn items(&self) -> Vec<InputItem<'_>> {
        match self {
            Input::Text(s) => vec![InputItem::Text(s)],
            Input::Texts(v) => v.iter().map(|s| InputItem::Text(s)).collect(),
            Input::Tokens(t) => vec![InputItem::Tokens(t)],
            Input::TokenLists(v) => v.iter().map(|t| InputItem::Tokens(t)).collect(),
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        match self {
            Input::Text(_) | Input::Tokens(_) => 1,
            Input::Texts(v) => v.len(),
            Input::TokenLists(v) => v.len(),
        }
    }

    /// True when there are no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Input {
    fn default() -> Self {
        Input::Text(String::new())
    }
}

impl From<&str> for Input {
    fn from(s: &str) -> Self {
        Input::Text(s.to_string())
    }
}

impl From<String> for Input {
    fn from(s: String) -> Self {
        Input::Text(s)
    }
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings, empty ones dropped.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// Why generation ended.
pub mod finish_reason {
    /// EOS or a stop string.
    pub const STOP: &str = "stop";
    /// `max_tokens` or the model's context length reached.
    pub const LENGTH: &str = "length";
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    #[serde(default = "object_model")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
    /// vLLM reports the context length it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

fn object_model() -> String {
    "model".into()
}

impl ModelCard {
    pub fn new(id: impl Into<String>, max_model_len: Option<usize>) -> Self {
        ModelCard {
            id: id.into(),
            object: "model".into(),
            created: unix_now(),
            owned_by: "colocate".into(),
            max_model_len,
        }
    }
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    #[serde(default = "object_list")]
    pub object: String,
    pub data: Vec<ModelCard>,
}

pub(crate) fn object_list() -> String {
    "list".into()
}

impl ModelList {
    pub fn new(data: Vec<ModelCard>) -> Self {
        ModelList {
            object: "list".into(),
            data,
        }
    }
}

/// Seconds since the Unix epoch (the `created` field).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The byte framing of one server-sent event carrying `json`: `data: {json}\n\n`.
pub fn sse_data(json: &str) -> String {
    format!("data: {json}\n\n")
}

/// The last event of every OpenAI stream.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_variants_parse() {
        let t: Input = serde_json::from_str(r#""hi""#).unwrap();
        assert_eq!(t, Input::Text("hi".into()));
        let t: Input = serde_json::from_str(r#"["a","b"]"#).unwrap();
        assert_eq!(t.len(), 2);
        let t: Input = serde_json::from_str(r#"[1,2,3]"#).unwrap();
        assert_eq!(t, Input::Tokens(vec![1, 2, 3]));
        let t: Input = serde_json::from_str(r#"[[1],[2,3]]"#).unwrap();
        assert_eq!(
            t.items(),
            vec![InputItem::Tokens(&[1]), InputItem::Tokens(&[2, 3])]
        );
        assert!(serde_json::from_str::<Input>(r#"[1,"a"]"#).is_err());
        let e = serde_json::from_str::<Input>("5").unwrap_err().to_string();
        assert!(e.contains("a list of token ids"), "{e}");
        assert!(serde_json::from_str::<Input>("[-1]").is_err());
    }

    #[test]
    fn stop_variants() {
        let s: Stop = serde_json::from_str(r#""\n""#).unwrap();
        assert_eq!(s.to_vec(), vec!["\n".to_string()]);
        let s: Stop = serde_json::from_str(r#"["a",""]"#).unwrap();
        assert_eq!(s.to_vec(), vec!["a".to_string()]);
    }

    #[test]
    fn sse_framing() {
        assert_eq!(sse_data("{}"), "data: {}\n\n");
        assert_eq!(SSE_DONE, "data: [DONE]\n\n");
    }
}
