//! `POST /v1/embeddings`: request and response.

use serde::{Deserialize, Serialize};

use crate::{object_list, Input, Usage};

/// An embeddings request: `input` is a string, a list of strings, a list of token ids or a
/// list of token id lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    /// The served model name; empty means the server's only model.
    #[serde(default)]
    pub model: String,
    pub input: Input,
    /// Only `float` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
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

/// One embedding of the response, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    #[serde(default = "object_embedding")]
    pub object: String,
    pub index: u32,
    pub embedding: Vec<f32>,
}

fn object_embedding() -> String {
    "embedding".into()
}

impl Embedding {
    pub fn new(index: u32, embedding: Vec<f32>) -> Self {
        Embedding {
            object: object_embedding(),
            index,
            embedding,
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
}
