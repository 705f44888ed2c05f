//! Text <-> token ids. Wraps a Hugging Face `tokenizer.json` (the `tokenizers` crate), or a
//! byte-level fallback for dummy models that ship no tokenizer (one token per byte).
//! Cheap to clone (an `Arc` inside) and shareable across threads.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

/// Vocabulary size of the byte-level tokenizer: 256 bytes + specials.
pub const BYTE_LEVEL_VOCAB: usize = 260;
/// End-of-sequence id of the byte-level tokenizer.
pub const BYTE_LEVEL_EOS: u32 = 256;

#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    ByteLevel,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.inner {
            Inner::Hf(_) => write!(f, "Tokenizer(tokenizer.json, vocab {})", self.vocab_size()),
            Inner::ByteLevel => write!(f, "Tokenizer(byte-level)"),
        }
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`. Padding is switched off (the engine packs sequences) and
    /// truncation set to `truncate_to` (sentence-transformers' `max_seq_length` for
    /// encoders; `None` for generators, whose prompts are length-checked instead).
    pub fn from_file(path: &Path, truncate_to: Option<usize>) -> anyhow::Result<Self> {
        let mut tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("cannot read tokenizer {}: {e}", path.display()))?;
        tok.with_padding(None);
        let trunc = truncate_to.map(|max_length| tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        });
        tok.with_truncation(trunc).map_err(|e| {
            anyhow::anyhow!("tokenizer {}: cannot set truncation: {e}", path.display())
        })?;
        Ok(Self {
            inner: Arc::new(Inner::Hf(Box::new(tok))),
        })
    }

    /// One token per UTF-8 byte (ids 0..=255); [`BYTE_LEVEL_EOS`] ends a sequence.
    pub fn byte_level() -> Self {
        Self {
            inner: Arc::new(Inner::ByteLevel),
        }
    }

    /// Whether this is the byte-level fallback.
    pub fn is_byte_level(&self) -> bool {
        matches!(&*self.inner, Inner::ByteLevel)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<u32>> {
        match &*self.inner {
            Inner::Hf(tok) => {
                let enc = tok
                    .encode(text, add_special_tokens)
                    .map_err(|e| anyhow::anyhow!("cannot tokenize input: {e}"))?;
                Ok(enc.get_ids().to_vec())
            }
            Inner::ByteLevel => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// Decodes ids, skipping special tokens. Byte-level: ids >= 256 are specials; invalid
    /// UTF-8 (a sequence cut inside a character) decodes lossily.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        match &*self.inner {
            Inner::Hf(tok) => tok
                .decode(ids, true)
                .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}")),
            Inner::ByteLevel => {
                // A dummy model with a real vocabulary (151,936 ids) mostly samples ids past
                // the bytes; each still shows as one printable character, so a stream carries
                // a character per token as it would with a real tokenizer (and streaming
                // metrics such as ITL stay meaningful). The special ids are skipped.
                let bytes: Vec<u8> = ids
                    .iter()
                    .filter_map(|&i| match i {
                        0..=255 => Some(i as u8),
                        i if i >= BYTE_LEVEL_VOCAB as u32 => Some(b'!' + (i % 94) as u8),
                        _ => None,
                    })
                    .collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// Qwen3's ChatML template: `<|im_start|>role\ncontent<|im_end|>\n` per message, then
    /// the generation prompt `<|im_start|>assistant\n`.
    pub fn apply_chat_template(&self, messages: &[(String, String)]) -> anyhow::Result<String> {
        let mut out = String::new();
        for (role, content) in messages {
            out.push_str("<|im_start|>");
            out.push_str(role);
            out.push('\n');
            out.push_str(content);
            out.push_str("<|im_end|>\n");
        }
        out.push_str("<|im_start|>assistant\n");
        Ok(out)
    }

    /// Ids the tokenizer can produce (including added tokens).
    pub fn vocab_size(&self) -> usize {
        match &*self.inner {
            Inner::Hf(tok) => tok.get_vocab_size(true),
            Inner::ByteLevel => BYTE_LEVEL_VOCAB,
        }
    }
}

/// Reads `tokenizer.json` in `dir` when present.
pub fn load_dir(dir: &Path, truncate_to: Option<usize>) -> anyhow::Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    Tokenizer::from_file(&path, truncate_to)
        .map(Some)
        .with_context(|| format!("loading {}", path.display()))
}

/// The tokenizer `--tokenizer PATH` names: a `tokenizer.json`, or a folder holding one (a
/// Hugging Face model folder, as vLLM's `--tokenizer` takes). Errors name the flag.
pub fn load_flag(path: &Path, truncate_to: Option<usize>) -> anyhow::Result<Tokenizer> {
    let named = || format!("--tokenizer {}", path.display());
    if path.is_dir() {
        return load_dir(path, truncate_to)
            .with_context(named)?
            .ok_or_else(|| anyhow::anyhow!("{}: this folder has no tokenizer.json", named()));
    }
    if !path.is_file() {
        anyhow::bail!("{}: no such file or folder", named());
    }
    Tokenizer::from_file(path, truncate_to).with_context(named)
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_level_shows_ids_past_the_bytes_and_skips_specials() {
        let t = super::Tokenizer::byte_level();
        assert_eq!(t.decode(&[104, 105]).unwrap(), "hi");
        assert_eq!(t.decode(&[super::BYTE_LEVEL_EOS]).unwrap(), "");
        let past = t.decode(&[151_000, 300]).unwrap();
        assert_eq!(past.chars().count(), 2, "{past:?}");
        assert!(past.chars().all(|c| c.is_ascii_graphic()), "{past:?}");
    }

    use super::*;

    #[test]
    fn byte_level_round_trips_utf8() {
        let t = Tokenizer::byte_level();
        let ids = t.encode("héllo ✓", true).unwrap();
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(ids.len(), "héllo ✓".len());
        let mut with_eos = ids.clone();
        with_eos.push(BYTE_LEVEL_EOS);
        assert_eq!(t.decode(&with_eos).unwrap(), "héllo ✓");
        assert!((BYTE_LEVEL_EOS as usize) < t.vocab_size());
    }

    fn testdata(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(name)
    }

    #[test]
    fn the_tokenizer_flag_takes_a_file_or_a_folder_and_names_itself_when_wrong() {
        let dir = testdata("gpt2-tiny");
        let by_dir = load_flag(&dir, None).unwrap();
        let by_file = load_flag(&dir.join("tokenizer.json"), None).unwrap();
        assert!(!by_dir.is_byte_level());
        let ids = by_dir.encode("hello world", false).unwrap();
        assert_eq!(ids, by_file.encode("hello world", false).unwrap());
        assert!(ids.len() < "hello world".len(), "{ids:?}");

        let empty = testdata("qwen3-tiny");
        let e = load_flag(&empty, None).unwrap_err().to_string();
        assert!(
            e.starts_with("--tokenizer ") && e.contains("no tokenizer.json"),
            "{e}"
        );
        let e = load_flag(&testdata("no-such-thing"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tokenizer") && e.contains("no such file"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load_flag(&empty.join("config.json"), None).unwrap_err()
        );
        assert!(
            e.starts_with("--tokenizer ") && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn chat_template_is_chatml() {
        let t = Tokenizer::byte_level();
        let s = t
            .apply_chat_template(&[
                ("system".into(), "be brief".into()),
                ("user".into(), "hi".into()),
            ])
            .unwrap();
        assert_eq!(s, "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }
}
