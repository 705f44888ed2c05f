//! Prompts of a requested token length, without the server's tokenizer.
//!
//! Prompts are random words from a fixed vocabulary, cut to a byte length. The byte length
//! comes from a per-endpoint linear fit `tokens = overhead + bytes * tokens_per_byte`
//! measured before the warm-up (two probe requests whose `usage.prompt_tokens` the server
//! reports, see `client::calibrate`): exact for byte-level tokenizers (the built-in dummy
//! models), close for WordPiece/BPE. The results report what `usage` says was sent.

use std::path::Path;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Common English words: every tokenizer knows them, so token counts are stable.
const VOCAB: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "that", "for", "it", "with", "as", "his", "on",
    "be", "at", "by", "had", "are", "but", "from", "or", "have", "an", "they", "which", "one",
    "you", "were", "her", "all", "she", "there", "would", "their", "we", "him", "been", "has",
    "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about",
    "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two",
    "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me",
    "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back",
    "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just",
    "those", "people", "how", "too", "little", "state", "good", "very", "make", "world", "still",
    "own", "see", "men", "work", "long", "get", "here", "between", "both", "life", "being",
    "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great",
    "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take",
    "three", "house", "water", "river", "light", "small", "number", "place", "city", "music",
    "story", "garden", "window", "table", "system", "paper", "school", "market", "family", "money",
    "night", "point", "morning", "question", "history", "road", "summer", "winter", "science",
    "language", "mountain", "ocean", "energy", "friend",
];

/// The fitted relation between prompt bytes and the server's prompt tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub tokens_per_byte: f64,
    /// Tokens the server adds around any prompt (chat template, [CLS]/[SEP]).
    pub overhead_tokens: f64,
    /// False when the server gave no usable usage and the defaults were assumed.
    pub measured: bool,
}

impl Default for Calibration {
    /// A typical BPE tokenizer: about 4 bytes of English per token.
    fn default() -> Self {
        Calibration {
            tokens_per_byte: 0.25,
            overhead_tokens: 0.0,
            measured: false,
        }
    }
}

impl Calibration {
    /// Fits a line through two (bytes, tokens) probes; `None` when the data is unusable.
    pub fn fit(b1: usize, t1: u64, b2: usize, t2: u64) -> Option<Calibration> {
        if b2 <= b1 || t2 <= t1 {
            return None;
        }
        let slope = (t2 - t1) as f64 / (b2 - b1) as f64;
        Some(Calibration {
            tokens_per_byte: slope,
            overhead_tokens: (t1 as f64 - slope * b1 as f64).max(0.0),
            measured: true,
        })
    }

    /// The byte length expected to give `tokens` prompt tokens.
    pub fn bytes_for(&self, tokens: u32) -> usize {
        let content = (tokens as f64 - self.overhead_tokens).max(1.0);
        ((content / self.tokens_per_byte).round() as usize).max(1)
    }

    /// The client's estimate of the tokens of a `bytes`-long prompt.
    pub fn tokens_for(&self, bytes: usize) -> u64 {
        (self.overhead_tokens + bytes as f64 * self.tokens_per_byte).round() as u64
    }
}

/// Random words, joined by spaces, cut to exactly `bytes` bytes (ASCII).
pub fn random_text(rng: &mut impl Rng, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(VOCAB[rng.gen_range(0..VOCAB.len())]);
    }
    s.truncate(bytes);
    // Never end on a space: some servers strip it, which would change the count.
    if s.ends_with(' ') {
        s.pop();
        s.push('a');
    }
    s
}

/// The source of prompt texts for one workload.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Random words sized by the calibration.
    Random(Calibration),
    /// Lines of a file, in a seeded order.
    Lines(std::sync::Arc<Vec<String>>),
    /// One fixed text, as the seed studies' clients sent: `{i}` becomes the input's index
    /// within its request (an embedding batch numbers its sentences 0, 1, ...).
    Template(PromptTemplate),
}

/// A fixed prompt text with an optional `{i}` placeholder, and its nominal token count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    pub text: std::sync::Arc<str>,
    /// The client's estimate of its tokens (the server's `usage` replaces it).
    pub tokens: u64,
}

impl PromptTemplate {
    pub fn new(text: &str, tokens: u64) -> PromptTemplate {
        PromptTemplate {
            text: text.into(),
            tokens,
        }
    }

    /// The text of input `index` of a request.
    pub fn render(&self, index: usize) -> String {
        self.text.replace("{i}", &index.to_string())
    }
}

/// Reads the non-empty lines of a prompt file.
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read input file {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if lines.is_empty() {
        bail!("input file {} has no non-empty line", path.display());
    }
    Ok(lines)
}

/// A per-request random generator: request `i` of workload `w` under `seed` always draws
/// the same prompt and output length, whatever the order the requests are issued in.
pub fn request_rng(seed: u64, workload: usize, request: u64) -> StdRng {
    // SplitMix64-style mixing so that nearby indices give unrelated streams.
    let mut x = seed
        ^ (workload as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ request.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(x ^ (x >> 31))
}

impl PromptSource {
    /// One prompt of about `tokens` tokens, with the client's token estimate.
    pub fn prompt(&self, rng: &mut StdRng, tokens: u32) -> (String, u64) {
        self.prompt_at(rng, tokens, 0)
    }

    /// Input `index` of a request (only a [`PromptSource::Template`] uses the index).
    pub fn prompt_at(&self, rng: &mut StdRng, tokens: u32, index: usize) -> (String, u64) {
        match self {
            PromptSource::Template(t) => (t.render(index), t.tokens),
            PromptSource::Random(c) => {
                let bytes = c.bytes_for(tokens);
                (random_text(rng, bytes), c.tokens_for(bytes))
            }
            PromptSource::Lines(lines) => {
                let l = lines.choose(rng).cloned().unwrap_or_default();
                let est = Calibration::default().tokens_for(l.len());
                (l, est)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_the_exact_byte_length_and_is_repeatable() {
        for n in [1, 2, 5, 100, 513] {
            let t = random_text(&mut request_rng(1, 0, n as u64), n);
            assert_eq!(t.len(), n);
            assert!(!t.ends_with(' ') && !t.starts_with(' '));
        }
        let a = random_text(&mut request_rng(9, 1, 5), 200);
        let b = random_text(&mut request_rng(9, 1, 5), 200);
        let c = random_text(&mut request_rng(9, 1, 6), 200);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn templates_number_the_inputs_of_a_request() {
        let t = PromptTemplate::new("Query: sentence number {i} for embedding benchmark.", 25);
        let src = PromptSource::Template(t);
        let mut rng = request_rng(0, 0, 0);
        let (a, est) = src.prompt_at(&mut rng, 999, 0);
        let (b, _) = src.prompt_at(&mut rng, 999, 7);
        assert_eq!(a, "Query: sentence number 0 for embedding benchmark.");
        assert_eq!(b, "Query: sentence number 7 for embedding benchmark.");
        assert_eq!(
            est, 25,
            "the template's own estimate, whatever length was asked"
        );
        let fixed = PromptSource::Template(PromptTemplate::new("no placeholder", 3));
        assert_eq!(fixed.prompt(&mut rng, 1).0, "no placeholder");
    }

    #[test]
    fn calibration_fit_inverts() {
        // Byte-level with a 10-token chat template.
        let c = Calibration::fit(200, 210, 400, 410).unwrap();
        assert_eq!(c.bytes_for(128), 118);
        assert_eq!(c.tokens_for(118), 128);
        // WordPiece-like: ~0.17 tokens per byte, 2 special tokens.
        let w = Calibration::fit(300, 52, 600, 102).unwrap();
        assert!((w.tokens_for(w.bytes_for(512)) as i64 - 512).abs() <= 1);
        assert!(Calibration::fit(200, 50, 400, 50).is_none());
    }
}
