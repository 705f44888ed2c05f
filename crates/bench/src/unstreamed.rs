//! Non-streamed completions: one JSON response per request, as the seed studies' clients
//! read them (`"stream": false`).
//!
//! Without chunks there is no first token to time: TTFT, TPOT and ITL stay undefined
//! (`first_token` is `None`, so every statistic built on them skips the request), E2EL is
//! send to the whole response, and the record is marked `whole`: its
//! `usage.completion_tokens` are spread uniformly over its lifetime `[sent, end]` and a
//! window counts the share it overlaps (`RequestRecord::output_tokens_in` says why that is
//! the assumption), its prompt tokens count at the send. The runner waits, after the
//! window, for the whole responses that were in flight at its end, so the share is exact
//! there too: the window's output throughput estimates the tokens generated inside it,
//! not the tokens of the requests that happened to end inside it.

use crate::client::Clock;
use crate::metrics::RequestRecord;

/// The parts of a completion response a record needs.
#[derive(Debug, serde::Deserialize)]
struct Body {
    #[serde(default)]
    choices: Vec<serde::de::IgnoredAny>,
    usage: Option<Usage>,
}

#[derive(Debug, serde::Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Fills `rec` from a finished non-streamed response (`status`, `body`) that ended at `end`.
pub fn record_response(rec: &mut RequestRecord, status: u16, body: &[u8], end: f64) {
    rec.whole = true;
    rec.end = end;
    if !(200..300).contains(&status) {
        rec.error = Some(format!("http_{status}"));
        return;
    }
    let parsed: Body = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(_) => {
            rec.error = Some("malformed_response".into());
            return;
        }
    };
    if parsed.choices.is_empty() {
        rec.error = Some("empty_response".into());
        return;
    }
    let Some(u) = parsed.usage else {
        // Without usage the tokens are unknown: the request cannot count for throughput.
        rec.error = Some("no_usage".into());
        return;
    };
    rec.prompt_tokens = Some(u.prompt_tokens);
    rec.prompt_tokens_estimated = false;
    rec.output_tokens = Some(u.completion_tokens);
    rec.first_token = None;
    rec.last_token = Some(end);
    rec.chunk_times = vec![end];
    rec.chunks = 1;
    rec.success = true;
}

/// Sends one non-streamed gen request (`body` built with `stream = false`) and fills `rec`.
/// `on_tokens` gets the completion tokens when the response arrives (live progress only;
/// the window's figures spread them, see the module's note).
pub async fn run_gen_unstreamed(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    clock: &Clock,
    rec: &mut RequestRecord,
    on_tokens: &(dyn Fn(u64) + Sync),
) {
    // Whole even if cut before its answer: then it carries no tokens.
    rec.whole = true;
    rec.sent = clock.now();
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            rec.end = clock.now();
            rec.error = Some(crate::client::send_error_kind(&e).into());
            return;
        }
    };
    let status = resp.status().as_u16();
    match resp.bytes().await {
        Ok(bytes) => {
            record_response(rec, status, &bytes, clock.now());
            if let (true, Some(n)) = (rec.success, rec.output_tokens) {
                on_tokens(n);
            }
        }
        Err(_) => {
            rec.end = clock.now();
            rec.error = Some("stream_broken".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gen",
        "choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"length"}],
        "usage":{"prompt_tokens":33,"total_tokens":545,"completion_tokens":512}}"#;

    #[test]
    fn a_whole_response_spreads_its_usage_over_its_lifetime() {
        let mut rec = RequestRecord {
            sent: 100.0,
            ..Default::default()
        };
        record_response(&mut rec, 200, OK.as_bytes(), 130.0);
        assert!(rec.success && rec.whole);
        assert_eq!(rec.output_tokens, Some(512));
        assert_eq!(rec.prompt_tokens, Some(33));
        assert_eq!(rec.ttft(), None, "no first token without a stream");
        assert_eq!(rec.tpot(), None);
        assert_eq!(rec.e2el(), Some(30.0));
        // Its 512 tokens over its 30 s: a window holding the last 10 s gets a third, one
        // holding the first 29 s 29/30, one holding all of it all of them.
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(rec.output_tokens_in(120.0, 131.0), 512.0 / 3.0));
        assert!(near(
            rec.output_tokens_in(100.0, 129.0),
            512.0 * 29.0 / 30.0
        ));
        assert!(near(rec.output_tokens_in(99.0, 131.0), 512.0));
        assert_eq!(rec.output_tokens_in(130.5, 140.0), 0.0);
        // Latency still by its end.
        assert!(rec.in_latency_set(120.0, 131.0));
        assert!(!rec.in_latency_set(100.0, 129.0));
        // The prompt counts at the send.
        assert_eq!(rec.prompt_counted_at(), Some(100.0));
    }

    /// A window's statistics over whole responses: output tokens by the share of each
    /// lifetime inside the window, prompt tokens at each send, E2EL and request counts by
    /// each end, TTFT / TPOT / ITL without a sample.
    #[test]
    fn window_statistics_of_whole_responses() {
        let rec = |sent: f64, end: f64| {
            let mut r = RequestRecord {
                sent,
                scheduled: sent,
                ..Default::default()
            };
            record_response(&mut r, 200, OK.as_bytes(), end);
            r
        };
        // Window [10, 20): one ends before it, two inside, one after.
        let recs = [
            rec(1.0, 9.0),
            rec(5.0, 12.0),
            rec(8.0, 19.5),
            rec(15.0, 21.0),
        ];
        let g = crate::metrics::gen_stats(&recs, 10.0, 20.0, &[50.0, 99.0], None);
        assert_eq!(g.completed, 2);
        let out = 512.0 * (2.0 / 7.0 + 9.5 / 11.5 + 5.0 / 6.0);
        assert!((g.output_tokens - out).abs() < 1e-9, "{}", g.output_tokens);
        assert_eq!(g.input_tokens, 33.0, "the prompt of the one sent inside");
        assert!((g.total_token_throughput - (out + 33.0) / 10.0).abs() < 1e-9);
        assert_eq!(g.ttft_ms.count, 0);
        assert_eq!(g.tpot_ms.count, 0);
        assert_eq!(g.itl_ms.count, 0);
        assert_eq!(g.decode_tok_s_per_req.count, 0);
        assert_eq!(g.e2el_ms.count, 2);
        assert!((g.e2el_ms.mean - 9_250.0).abs() < 1e-6, "{:?}", g.e2el_ms);
        assert_eq!(g.mean_output_tokens, 512.0);
    }

    /// vLLM's error body (reconstructed until recorded: testdata/vllm) is a failure with
    /// its status, never a success.
    #[test]
    fn a_vllm_error_body_is_its_status() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/vllm/error-400-0.26.0.json");
        let body = std::fs::read(&p).unwrap();
        let mut rec = RequestRecord::default();
        record_response(&mut rec, 400, &body, 1.0);
        assert_eq!(rec.error.as_deref(), Some("http_400"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], 400);
    }

    #[test]
    fn failures_say_what_failed() {
        let cases: [(u16, &str, &str); 4] = [
            (503, "{}", "http_503"),
            (200, "not json", "malformed_response"),
            (
                200,
                r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0}}"#,
                "empty_response",
            ),
            (200, r#"{"choices":[{"index":0}]}"#, "no_usage"),
        ];
        for (status, body, want) in cases {
            let mut rec = RequestRecord::default();
            record_response(&mut rec, status, body.as_bytes(), 1.0);
            assert!(!rec.success);
            assert_eq!(rec.error.as_deref(), Some(want), "{body}");
        }
    }

    /// Through HTTP: a tiny server answering one JSON body.
    #[tokio::test]
    async fn sends_and_records_a_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(req.contains("\"stream\":false") || !req.contains("\"stream\":true"));
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{OK}",
                OK.len()
            );
            sock.write_all(reply.as_bytes()).await.unwrap();
        });
        let client = crate::client::make_client().unwrap();
        let clock = Clock::new();
        let mut rec = RequestRecord::default();
        let seen = std::sync::atomic::AtomicU64::new(0);
        let body = crate::client::gen_body(
            crate::spec::WorkloadKind::Chat,
            "gen",
            "hello".into(),
            Some(512),
            false,
        );
        run_gen_unstreamed(
            &client,
            &format!("http://{addr}/v1/chat/completions"),
            body,
            &clock,
            &mut rec,
            &|n| {
                seen.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            },
        )
        .await;
        assert!(rec.success, "{:?}", rec.error);
        assert!(rec.whole);
        assert_eq!(rec.output_tokens, Some(512));
        assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 512);
        assert!(rec.end >= rec.sent);
    }
}
