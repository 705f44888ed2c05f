//! Incremental Server-Sent Events parsing for the streaming hot path.
//!
//! The client never deserialises a whole chunk: it splits the byte stream into `data:`
//! lines without copying (only a line cut between two network reads is buffered), and
//! probes each payload for the two facts the metrics need: whether `choices` is non-empty
//! (vLLM's rule for a content chunk) and the `usage` object. The probe skips every other
//! field with `IgnoredAny`, so a chunk costs no allocation.

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

/// Splits a byte stream into SSE `data:` payloads.
#[derive(Debug, Default)]
pub struct SseSplitter {
    /// A line cut by a read boundary.
    partial: Vec<u8>,
}

fn data_payload(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"data:")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

impl SseSplitter {
    /// Feeds one network read; calls `on_data` with each complete `data:` payload in order.
    /// Other SSE lines (comments, `event:`, `id:`, blank separators) are skipped. Each
    /// `data:` line is taken as one event: OpenAI-compatible servers never split a JSON
    /// chunk over several `data:` lines.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_data: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                None => {
                    self.partial.extend_from_slice(chunk);
                    return;
                }
                Some(nl) => {
                    self.partial.extend_from_slice(&chunk[..nl]);
                    if let Some(d) = data_payload(&self.partial) {
                        on_data(d);
                    }
                    self.partial.clear();
                    chunk = &chunk[nl + 1..];
                }
            }
        }
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', chunk) {
            if let Some(d) = data_payload(&chunk[start..nl]) {
                on_data(d);
            }
            start = nl + 1;
        }
        self.partial.extend_from_slice(&chunk[start..]);
    }

    /// The unterminated rest at the end of the stream, if it is a data line.
    pub fn finish(&mut self, on_data: impl FnOnce(&[u8])) {
        if let Some(d) = data_payload(&self.partial) {
            if !d.is_empty() {
                on_data(d);
            }
        }
        self.partial.clear();
    }
}

/// The counts the benchmark reads from `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct UsageCounts {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The length of a JSON array, counted without building it (`null` counts as 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArrayLen(pub usize);

impl<'de> Deserialize<'de> for ArrayLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ArrayLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array or null")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ArrayLen, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(ArrayLen(n))
            }
            fn visit_unit<E>(self) -> Result<ArrayLen, E> {
                Ok(ArrayLen(0))
            }
            fn visit_none<E>(self) -> Result<ArrayLen, E> {
                Ok(ArrayLen(0))
            }
        }
        d.deserialize_any(V)
    }
}

/// What the benchmark needs from one streamed chunk (completions or chat).
#[derive(Debug, Default, Deserialize)]
pub struct ChunkProbe {
    #[serde(default)]
    pub choices: ArrayLen,
    #[serde(default)]
    pub usage: Option<UsageCounts>,
    /// Some servers report an error inside the stream.
    #[serde(default)]
    pub error: Option<IgnoredAny>,
}

/// What the benchmark needs from an embeddings response.
#[derive(Debug, Default, Deserialize)]
pub struct EmbedProbe {
    #[serde(default)]
    pub data: ArrayLen,
    #[serde(default)]
    pub usage: Option<UsageCounts>,
}

/// One classified SSE payload.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// `choices` non-empty: a content chunk (TTFT / ITL timestamps).
    Content,
    /// A chunk with empty `choices`: carries usage, or nothing.
    Usage(Option<UsageCounts>),
    /// `data: [DONE]`.
    Done,
    /// An `error` object in the stream.
    Error,
    /// Not JSON we understand.
    Malformed,
}

/// Classifies one `data:` payload. A chunk with both content and usage (some servers put
/// usage on the last content chunk) reports `Content`; call [`usage_of`] for its usage.
pub fn classify(payload: &[u8]) -> (ChunkKind, Option<UsageCounts>) {
    if payload == b"[DONE]" {
        return (ChunkKind::Done, None);
    }
    match serde_json::from_slice::<ChunkProbe>(payload) {
        Ok(p) if p.error.is_some() => (ChunkKind::Error, None),
        Ok(p) if p.choices.0 > 0 => (ChunkKind::Content, p.usage),
        Ok(p) => (ChunkKind::Usage(p.usage), p.usage),
        Err(_) => (ChunkKind::Malformed, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"he said \\\"hi\\\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
: keep-alive comment\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\n\
data: [DONE]\n\n";

    fn kinds_for_splits(split_every: usize) -> Vec<ChunkKind> {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        for piece in STREAM.chunks(split_every) {
            s.feed(piece, |d| out.push(classify(d).0));
        }
        s.finish(|d| out.push(classify(d).0));
        out
    }

    #[test]
    fn same_events_whatever_the_read_boundaries() {
        let want = vec![
            ChunkKind::Content,
            ChunkKind::Content,
            ChunkKind::Usage(Some(UsageCounts {
                prompt_tokens: 12,
                completion_tokens: 2,
            })),
            ChunkKind::Done,
        ];
        for n in [1, 2, 3, 7, 13, 64, STREAM.len()] {
            assert_eq!(kinds_for_splits(n), want, "split every {n}");
        }
    }

    #[test]
    fn crlf_null_choices_errors_and_garbage() {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        s.feed(
            b"data: {\"choices\":null}\r\n\r\ndata: {\"error\":{\"message\":\"x\"}}\r\ndata: nope\r\n",
            |d| out.push(classify(d).0),
        );
        assert_eq!(
            out,
            vec![
                ChunkKind::Usage(None),
                ChunkKind::Error,
                ChunkKind::Malformed
            ]
        );
    }

    #[test]
    fn unterminated_last_line_is_delivered_at_finish() {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        s.feed(b"data: [DONE]", |d| out.push(classify(d).0));
        assert!(out.is_empty());
        s.finish(|d| out.push(classify(d).0));
        assert_eq!(out, vec![ChunkKind::Done]);
    }

    #[test]
    fn embed_probe_counts_rows() {
        let body = br#"{"object":"list","data":[{"index":0,"embedding":[0.1,-2e-3]},{"index":1,"embedding":[1,2]}],"model":"m","usage":{"prompt_tokens":9,"total_tokens":9}}"#;
        let p: EmbedProbe = serde_json::from_slice(body).unwrap();
        assert_eq!(p.data.0, 2);
        assert_eq!(p.usage.unwrap().prompt_tokens, 9);
    }
}
