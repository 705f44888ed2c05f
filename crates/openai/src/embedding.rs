//! `POST /v1/embeddings`: request and response.

use serde::{Deserialize, Serialize};

use crate::{object_list, Input, Usage};

/// An embeddings request: `input` is a string, a list of strings, a list of token ids or a
/// list of token id lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    /// The served model name; empty means the server's only model.
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub model: String,
    pub input: Input,
    /// `float` (the default) or `base64` (little-endian f32 bytes; the official Python
    /// client's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    /// Truncate each embedding to its first `dimensions` values (Matryoshka models). Signed
    /// so that a negative value gets the server's own message rather than serde's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl EmbeddingRequest {
    pub fn new(model: impl Into<String>, input: Input) -> Self {
        EmbeddingRequest {
            model: model.into(),
            input,
            encoding_format: None,
            dimensions: None,
            user: None,
        }
    }
}

/// An embedding as sent: a list of floats, or base64 of little-endian f32 bytes when the
/// request asked for `encoding_format: "base64"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

impl EmbeddingVector {
    /// The values, whichever the encoding; `None` for base64 that does not decode.
    pub fn to_floats(&self) -> Option<Vec<f32>> {
        match self {
            EmbeddingVector::Float(v) => Some(v.clone()),
            EmbeddingVector::Base64(s) => crate::base64::decode_f32_le(s),
        }
    }

    /// Number of values (0 for base64 that does not decode).
    pub fn dimensions(&self) -> usize {
        match self {
            EmbeddingVector::Float(v) => v.len(),
            EmbeddingVector::Base64(s) => crate::base64::decode(s).map_or(0, |b| b.len() / 4),
        }
    }
}

/// One embedding of the response, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    #[serde(default = "object_embedding")]
    pub object: String,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

fn object_embedding() -> String {
    "embedding".into()
}

impl Embedding {
    /// An embedding sent as a list of floats.
    pub fn new(index: u32, embedding: Vec<f32>) -> Self {
        Embedding {
            object: object_embedding(),
            index,
            embedding: EmbeddingVector::Float(embedding),
        }
    }

    /// An embedding sent as base64 of its little-endian f32 bytes.
    pub fn base64(index: u32, embedding: &[f32]) -> Self {
        Embedding {
            object: object_embedding(),
            index,
            embedding: EmbeddingVector::Base64(crate::base64::encode_f32_le(embedding)),
        }
    }
}

/// An embeddings response; `usage.prompt_tokens` counts every input token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    #[serde(default = "object_list")]
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: Usage,
}

impl EmbeddingResponse {
    pub fn new(model: impl Into<String>, data: Vec<Embedding>, prompt_tokens: u32) -> Self {
        EmbeddingResponse {
            object: object_list(),
            data,
            model: model.into(),
            usage: Usage::new(prompt_tokens, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r: EmbeddingRequest =
            serde_json::from_str(r#"{"model":"e","input":["a","b"],"encoding_format":"float"}"#)
                .unwrap();
        assert_eq!(r.input.len(), 2);
        let resp = EmbeddingResponse::new("e", vec![Embedding::new(0, vec![1.0])], 3);
        let v: serde_json::Value = serde_json::to_value(&resp).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 3);
    }

    #[test]
    fn float_and_base64_embeddings_both_parse() {
        let resp = EmbeddingResponse::new(
            "e",
            vec![
                Embedding::new(0, vec![0.5]),
                Embedding::base64(1, &[1.0, -2.5]),
            ],
            2,
        );
        let text = serde_json::to_string(&resp).unwrap();
        assert!(text.contains(r#""embedding":[0.5]"#), "{text}");
        assert!(text.contains(r#""embedding":"AACAPwAAIMA=""#), "{text}");
        let back: EmbeddingResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(back, resp);
        assert_eq!(back.data[1].embedding.to_floats(), Some(vec![1.0, -2.5]));
        assert_eq!(back.data[1].embedding.dimensions(), 2);
        assert_eq!(back.data[0].embedding.dimensions(), 1);
    }
}
