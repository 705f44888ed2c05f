//! The output stage of one generation request: turns its token ids into text and events.
//!
//! Incremental detokenization is a port of vLLM's incremental detokenizer: decode a short
//! window of recent tokens twice (with and without the newest) and take the difference,
//! holding the text back while it ends in U+FFFD (a UTF-8 character split across tokens),
//! so a stream never carries broken characters. Stop strings are searched in the decoded
//! text; the output is truncated at the stop string. While streaming, the last
//! `max_stop_len - 1` bytes are held back so a stop string that arrives split over tokens
//! is never half-sent.
//!
//! [`RequestOutput`] runs on the engine thread, once per sampled token, in the step that
//! sampled it: a stop string must end the sequence in that same step, so that the
//! scheduler frees its KV blocks at once and counts exactly the tokens it generated. The
//! scheduler only decides EOS and length and hears back "a stop string ended it".

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::scheduler::GenEvent;

/// Anything that turns token ids back into text (the engine's tokenizer, or a test one).
pub trait Detokenize: Send + Sync {
    fn decode(&self, ids: &[u32]) -> anyhow::Result<String>;
}

impl Detokenize for crate::tokenizer::Tokenizer {
    fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        crate::tokenizer::Tokenizer::decode(self, ids)
    }
}

/// The text state of one sequence's output.
#[derive(Debug, Default)]
pub struct OutputText {
    /// Everything decoded so far (truncated at a stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    prefix_offset: usize,
    read_offset: usize,
    stop: Vec<String>,
    /// Longest stop string in bytes.
    max_stop_len: usize,
}

impl OutputText {
    pub fn new(stop: Vec<String>) -> Self {
        let max_stop_len = stop.iter().map(String::len).max().unwrap_or(0);
        OutputText {
            stop,
            max_stop_len,
            ..Default::default()
        }
    }

    /// Decodes the newest of `output` (all output ids so far). Returns true when a stop
    /// string was found (the text is then truncated before it) and `check_stop` is true.
    pub fn push(
        &mut self,
        tok: &dyn Detokenize,
        output: &[u32],
        check_stop: bool,
    ) -> anyhow::Result<bool> {
        let prefix = tok.decode(&output[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&output[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // The window's prefix can re-decode differently (rare with byte-level BPE);
            // fall back to the common prefix so nothing is duplicated or split.
            let cut = if full.starts_with(&prefix) {
                prefix.len()
            } else {
                common_prefix_len(&prefix, &full)
            };
            let old_len = self.text.len();
            self.text.push_str(&full[cut..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = output.len();
            if check_stop && !self.stop.is_empty() {
                let from = floor_char_boundary(
                    &self.text,
                    old_len.saturating_sub(self.max_stop_len.saturating_sub(1)),
                );
                let hit = self
                    .stop
                    .iter()
                    .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
                    .min();
                if let Some(pos) = hit {
                    self.text.truncate(pos);
                    self.sent = self.sent.min(pos);
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The text that may be sent now: everything when `finished`, else all but what could
    /// still become the start of a stop string. Advances the sent mark.
    pub fn take_delta(&mut self, finished: bool) -> &str {
        let limit = if finished || self.max_stop_len <= 1 {
            self.text.len()
        } else {
            floor_char_boundary(
                &self.text,
                self.text.len().saturating_sub(self.max_stop_len - 1),
            )
        };
        if limit <= self.sent {
            return "";
        }
        let start = self.sent;
        self.sent = limit;
        &self.text[start..limit]
    }

    /// All text decoded so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The output side of one request: its text state, the detokenizer and its event channel.
pub struct RequestOutput {
    text: OutputText,
    detok: Arc<dyn Detokenize>,
    /// Decode token by token; else the whole output once, when the request ends.
    incremental: bool,
    events: UnboundedSender<GenEvent>,
}

impl RequestOutput {
    /// A request that is `streamed` or has `stop` strings is decoded token by token (its
    /// text goes out as it comes, a stop string must end it in the step that made it). Any
    /// other request is decoded once when it ends: its tokens cost the engine thread
    /// nothing meanwhile (two window decodes a token otherwise: 0.5 ms a step at 512
    /// sequences with Qwen3's tokenizer, `examples/sched_bench.rs`). Its text is the
    /// tokenizer's decode of all its ids less a trailing U+FFFD (a character the last token
    /// cut), which is what the incremental text adds up to: that holds such a tail back.
    pub fn new(
        detok: Arc<dyn Detokenize>,
        stop: Vec<String>,
        streamed: bool,
        events: UnboundedSender<GenEvent>,
    ) -> Self {
        RequestOutput {
            incremental: streamed || !stop.is_empty(),
            text: OutputText::new(stop),
            detok,
            events,
        }
    }

    /// Whether the client has gone away (its receiver dropped).
    pub fn is_closed(&self) -> bool {
        self.events.is_closed()
    }

    /// Decodes the newest of `output` (all output ids so far). True when a stop string ends
    /// the text, looked for only when `check_stop`.
    pub fn push(&mut self, output: &[u32], check_stop: bool) -> anyhow::Result<bool> {
        if !self.incremental {
            return Ok(false);
        }
        self.text.push(&*self.detok, output, check_stop)
    }

    /// Sends what may go out now: with `finish`, the rest of the text in `Done`; without,
    /// the new text if there is any. `output` is all output ids so far. False when the
    /// client has gone away.
    pub fn emit(
        &mut self,
        finish: Option<&'static str>,
        output: &[u32],
        prompt_tokens: u32,
        completion_tokens: u32,
    ) -> bool {
        if !self.incremental {
            let Some(reason) = finish else {
                return !self.events.is_closed();
            };
            let text = match self.detok.decode(output) {
                Ok(text) => text.trim_end_matches('\u{FFFD}').to_string(),
                Err(e) => {
                    self.fail(format!("cannot decode output: {e:#}"));
                    return true;
                }
            };
            return self
                .events
                .send(GenEvent::Done {
                    text,
                    finish_reason: reason,
                    prompt_tokens,
                    completion_tokens,
                })
                .is_ok();
        }
        let delta = self.text.take_delta(finish.is_some());
        let sent = match finish {
            Some(reason) => self.events.send(GenEvent::Done {
                text: delta.to_string(),
                finish_reason: reason,
                prompt_tokens,
                completion_tokens,
            }),
            None if delta.is_empty() => Ok(()),
            None => self.events.send(GenEvent::Text(delta.to_string())),
        };
        sent.is_ok()
    }

    /// Ends the request with an error.
    pub fn fail(&self, message: String) {
        let _ = self.events.send(GenEvent::Error(message));
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    floor_char_boundary(b, n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One token per byte; ids >= 256 are specials that decode to nothing (like the
    /// engine's byte-level tokenizer).
    pub struct Bytes;

    impl Detokenize for Bytes {
        fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
            let b: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
    }

    fn feed(o: &mut OutputText, ids: &[u32]) -> (String, bool) {
        let mut out = String::new();
        for n in 1..=ids.len() {
            let stopped = o.push(&Bytes, &ids[..n], true).unwrap();
            out.push_str(o.take_delta(stopped));
            if stopped {
                return (out, true);
            }
        }
        out.push_str(o.take_delta(true));
        (out, false)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let s = "a€b😀";
        let ids: Vec<u32> = s.bytes().map(u32::from).collect();
        let mut o = OutputText::new(vec![]);
        let mut deltas = vec![];
        for n in 1..=ids.len() {
            o.push(&Bytes, &ids[..n], true).unwrap();
            let d = o.take_delta(false).to_string();
            assert!(!d.contains('\u{FFFD}'));
            deltas.push(d);
        }
        assert_eq!(deltas.concat(), s);
        assert_eq!(deltas[1], "", "first byte of € held back");
    }

    #[test]
    fn stop_string_truncates_and_is_not_sent() {
        let ids: Vec<u32> = "hello world, bye".bytes().map(u32::from).collect();
        let mut o = OutputText::new(vec!["wor".into(), "zz".into()]);
        let (out, stopped) = feed(&mut o, &ids);
        assert!(stopped);
        assert_eq!(out, "hello ");
        assert_eq!(o.text(), "hello ");
    }

    fn events(
        streamed: bool,
        stop: &[&str],
        ids: &[u32],
    ) -> (
        Vec<GenEvent>,
        tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = stop.iter().map(|s| s.to_string()).collect();
        let mut o = RequestOutput::new(Arc::new(Bytes), stop, streamed, tx);
        for n in 1..=ids.len() {
            let stopped = o.push(&ids[..n], true).unwrap();
            let finish = (stopped || n == ids.len()).then_some("stop");
            assert!(o.emit(finish, &ids[..n], 3, n as u32));
            if stopped {
                break;
            }
        }
        let mut got = vec![];
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        (got, rx)
    }

    fn text_of(evs: &[GenEvent]) -> String {
        evs.iter()
            .map(|e| match e {
                GenEvent::Text(t) | GenEvent::Done { text: t, .. } => t.as_str(),
                GenEvent::Error(m) => panic!("{m}"),
            })
            .collect()
    }

    #[test]
    fn an_unstreamed_request_without_stop_strings_is_decoded_once_at_its_end() {
        let mut ids: Vec<u32> = "héllo, world".bytes().map(u32::from).collect();
        // A last token that cuts a character (the first byte of "€") is held back in both.
        ids.push(0xE2);
        let (whole, _) = events(false, &[], &ids);
        assert_eq!(whole.len(), 1, "one Done event and nothing before it");
        assert!(matches!(
            &whole[0],
            GenEvent::Done { text, completion_tokens: 14, .. } if text == "héllo, world"
        ));
        // Streamed, or with a stop string to look for: token by token, the same text.
        let (streamed, _) = events(true, &[], &ids);
        assert!(streamed.len() > 1);
        assert_eq!(text_of(&streamed), "héllo, world");
        let (stopped, _) = events(false, &[", w"], &ids);
        assert_eq!(text_of(&stopped), "héllo");
    }

    #[test]
    fn an_unstreamed_request_still_hears_its_client_leave() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut o = RequestOutput::new(Arc::new(Bytes), vec![], false, tx);
        assert!(o.emit(None, &[104], 3, 1));
        drop(rx);
        assert!(!o.emit(None, &[104, 105], 3, 2));
    }

    #[test]
    fn no_stop_sends_everything() {
        let ids: Vec<u32> = "abc".bytes().map(u32::from).chain([256]).collect();
        let mut o = OutputText::new(vec!["xyz".into()]);
        let (out, stopped) = feed(&mut o, &ids);
        assert!(!stopped);
        assert_eq!(out, "abc");
    }
}
