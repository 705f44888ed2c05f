//! `colocate serve` generation end to end: the real binary serving qwen3-tiny (dummy
//! weights, CPU), spoken to over raw HTTP/1.1.

mod common;

use std::io::BufReader;
use std::time::Instant;

use common::{read_chunk, read_head, send, sse_events, Server};
use serde_json::{json, Value};

const TINY: &[&str] = &[
    "--model",
    "preset:qwen3-tiny",
    "--load-format",
    "dummy",
    "--kv-cache-memory",
    "64Mi",
    "--served-model-name",
    "tiny",
];

fn completion(s: &Server, body: Value) -> Value {
    let r = s.post("/v1/completions", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn sse_framing_usage_chunk_and_done() {
    let s = Server::start(TINY);
    let body = json!({"model": "tiny", "prompt": "Hello there", "max_tokens": 7, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let r = s.post("/v1/completions", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 7);
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"], 11,
        "byte-level: one token per byte"
    );
    assert_eq!(usage_chunk["usage"]["total_tokens"], 18);
    let text_chunks = &chunks[..chunks.len() - 1];
    for c in text_chunks {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["model"], "tiny");
        assert!(
            c.get("usage").is_none(),
            "usage only on the last chunk: {c}"
        );
    }
    assert_eq!(
        text_chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    for c in &text_chunks[..text_chunks.len() - 1] {
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
    }
    let streamed: String = text_chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();

    // Greedy: the same request without streaming gives the same text.
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let v = completion(&s, plain);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), streamed);
    assert_eq!(v["usage"]["completion_tokens"], 7);

    // Without include_usage there is no usage chunk.
    let mut no_usage = body.clone();
    no_usage["stream_options"] = json!({"include_usage": false});
    let events = sse_events(&s.post("/v1/completions", &no_usage.to_string()).text());
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| !e.contains("\"usage\"")));
}

#[test]
fn chat_stream_starts_with_role_and_ignore_eos_gives_exact_lengths() {
    let s = Server::start(TINY);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let events = sse_events(&s.post("/v1/chat/completions", &body.to_string()).text());
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    for n in [1, 13, 40] {
        let v = completion(
            &s,
            json!({"prompt": "abc", "max_tokens": n, "ignore_eos": true, "temperature": 0.8, "seed": n}),
        );
        assert_eq!(v["usage"]["completion_tokens"], n);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let v: Value = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9, "ignore_eos": true})
                .to_string(),
        )
        .json();
    assert_eq!(v["usage"]["completion_tokens"], 9);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
}

#[test]
fn seeds_repeat_and_stop_strings_truncate() {
    let s = Server::start(TINY);
    let req = json!({"prompt": "The sky", "max_tokens": 30, "ignore_eos": true, "temperature": 1.0, "seed": 42});
    let a = completion(&s, req.clone());
    let b = completion(&s, req);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    // Greedy output, then the same request with a stop string taken from its middle.
    let greedy =
        json!({"prompt": "Once upon", "max_tokens": 40, "ignore_eos": true, "temperature": 0});
    let full = completion(&s, greedy.clone())["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "{full:?}");
    let stop: String = chars[5..7].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut with_stop = greedy;
    with_stop["stop"] = json!([stop]);
    let v = completion(&s, with_stop.clone());
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), expected);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streamed, the stop string is never sent either.
    with_stop["stream"] = json!(true);
    let events = sse_events(&s.post("/v1/completions", &with_stop.to_string()).text());
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, expected);
}

#[test]
fn short_request_finishes_while_long_one_runs() {
    let s = Server::start(TINY);
    let port = s.port;
    let long = std::thread::spawn(move || {
        let r = common::request(
            port,
            "POST",
            "/v1/completions",
            Some(&json!({"prompt": "long", "max_tokens": 4000, "ignore_eos": true}).to_string()),
        )
        .unwrap();
        assert_eq!(r.status, 200);
        Instant::now()
    });
    assert!(
        s.wait_for(30, |s| s.metric("colocate:generation_tokens_total") >= 5.0),
        "long request never started"
    );
    let v = completion(
        &s,
        json!({"prompt": "short", "max_tokens": 3, "ignore_eos": true}),
    );
    let short_done = Instant::now();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let running = s.metric("colocate:num_requests_running");
    let long_done = long.join().unwrap();
    assert!(
        short_done < long_done,
        "the short request waited for the long one"
    );
    assert!(
        running >= 1.0,
        "long one still running when the short one ended"
    );
}

#[test]
fn disconnect_frees_kv_blocks_and_counters_match_usage() {
    let s = Server::start(TINY);
    // Counters against usage.
    let mut total = 0;
    for n in [3, 8] {
        total += completion(
            &s,
            json!({"prompt": "x", "max_tokens": n, "ignore_eos": true}),
        )["usage"]["completion_tokens"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(s.metric("colocate:generation_tokens_total") as u64, total);
    assert_eq!(s.metric("colocate:prompt_tokens_total") as u64, 2);
    assert_eq!(
        s.metric("colocate:time_to_first_token_seconds_count") as u64,
        2
    );

    // A stream dropped after its first chunk.
    let body = json!({"prompt": "abc", "max_tokens": 4000, "ignore_eos": true, "stream": true})
        .to_string();
    let conn = send(s.port, "POST", "/v1/completions", Some(&body)).unwrap();
    let mut r = BufReader::new(conn);
    let (status, _) = read_head(&mut r).unwrap();
    assert_eq!(status, 200);
    let first = read_chunk(&mut r).unwrap().unwrap();
    assert!(first.starts_with(b"data: {"));
    assert!(s.metric("colocate:kv_cache_blocks_used") > 0.0);
    drop(r);
    assert!(
        s.wait_for(10, |s| s.metric("colocate:kv_cache_blocks_used") == 0.0
            && s.metric("colocate:num_requests_running") == 0.0),
        "blocks not freed after disconnect:\n{}",
        s.get("/metrics").text()
    );
    let text = s.get("/metrics").text();
    assert!(text.contains("finished_reason=\"abort\"} 1"), "{text}");
    // Still serving.
    completion(&s, json!({"prompt": "x", "max_tokens": 2}));
}

#[test]
fn kv_pressure_preempts_and_recomputes_to_the_same_greedy_output() {
    // qwen3-tiny keeps 512 bytes of K/V per token: 12 blocks of 16 tokens = 192 tokens for
    // six requests that need 120 each, so requests wait and running ones are preempted.
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--load-format",
        "dummy",
        "--kv-cache-memory",
        "98304",
        "--block-size",
        "16",
    ]);
    assert_eq!(s.metric("colocate:kv_cache_blocks_total"), 12.0);
    let body = |i: usize| {
        json!({"prompt": format!("request number {i:02} says"), "max_tokens": 100,
            "ignore_eos": true, "temperature": 0})
        .to_string()
    };
    let port = s.port;
    let handles: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                let r = common::request(port, "POST", "/v1/completions", Some(&body(i))).unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()
            })
        })
        .collect();
    let together: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(s.metric("colocate:num_preemptions_total") > 0.0);
    // The gauges are updated at the end of the step that sent the last answer: a client can
    // read its answer a moment before they show every block free.
    assert!(
        s.wait_for(5, |s| s.metric("colocate:kv_cache_blocks_used") == 0.0),
        "KV blocks still used after every request ended"
    );
    for (i, v) in together.iter().enumerate() {
        assert_eq!(v["usage"]["completion_tokens"], 100);
        let alone = completion(&s, serde_json::from_str(&body(i)).unwrap());
        assert_eq!(
            v["choices"][0]["text"], alone["choices"][0]["text"],
            "request {i}"
        );
    }
}
