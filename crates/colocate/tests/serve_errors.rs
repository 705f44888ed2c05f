//! `colocate serve` bad input end to end: every bad request gets an OpenAI error body with
//! the right status and the server keeps serving; bad command lines exit non-zero naming
//! the flag or file; a full waiting queue answers 503.

mod common;

use std::time::Duration;

use common::{run_colocate, Server};
use serde_json::{json, Value};

/// Posts `body` and checks the status and the OpenAI error shape; returns the message.
fn expect_error(s: &Server, path: &str, body: &str, status: u16) -> String {
    let r = s.post(path, body);
    assert_eq!(r.status, status, "{path} {body}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    assert_eq!(e["code"], status);
    e["message"].as_str().unwrap().to_string()
}

fn still_serves(s: &Server) {
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "ok", "max_tokens": 2}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--load-format",
        "dummy",
        "--kv-cache-memory",
        "16Mi",
        "--max-model-len",
        "64",
        "--served-model-name",
        "tiny",
    ]);
    let c = "/v1/completions";
    let m = expect_error(&s, c, r#"{"prompt": "hi", "max_tokens": 4"#, 400);
    assert!(m.contains("malformed JSON"), "{m}");
    expect_error(&s, c, "not json at all", 400);
    let m = expect_error(&s, c, r#"{"prompt": "hi", "max_tokens": "four"}"#, 400);
    assert!(m.contains("invalid"), "{m}");
    expect_error(&s, c, r#"{"prompt": 5}"#, 400);
    expect_error(&s, c, r#"{"prompt": "hi", "stream": "yes"}"#, 400);
    expect_error(&s, c, r#"{"max_tokens": 3}"#, 400);
    let m = expect_error(&s, c, r#"{"prompt": "hi", "max_tokens": 0}"#, 400);
    assert!(m.contains("max_tokens"), "{m}");
    expect_error(&s, c, r#"{"prompt": "hi", "max_tokens": -3}"#, 400);
    let long = "x".repeat(100);
    let m = expect_error(
        &s,
        c,
        &json!({"prompt": long, "max_tokens": 1}).to_string(),
        400,
    );
    assert!(
        m.contains("100") && m.contains("64"),
        "both lengths named: {m}"
    );
    let m = expect_error(&s, c, r#"{"model": "gpt-4", "prompt": "hi"}"#, 404);
    assert!(m.contains("gpt-4") && m.contains("tiny"), "{m}");
    let m = expect_error(&s, c, r#"{"prompt": "hi", "n": 2}"#, 400);
    assert!(m.contains("n must be 1"), "{m}");
    expect_error(&s, c, r#"{"prompt": "hi", "temperature": -1}"#, 400);
    expect_error(&s, c, r#"{"prompt": "hi", "top_p": 0}"#, 400);
    expect_error(&s, c, r#"{"prompt": [1, 2, 99999]}"#, 400);
    expect_error(&s, c, r#"{"prompt": ["a", "b"]}"#, 400);
    expect_error(&s, c, r#"{"prompt": ""}"#, 400);
    expect_error(
        &s,
        c,
        r#"{"prompt": "hi", "max_tokens": 2, "min_tokens": 5}"#,
        400,
    );
    let chat = "/v1/chat/completions";
    expect_error(&s, chat, r#"{"messages": "hi"}"#, 400);
    expect_error(&s, chat, r#"{"messages": []}"#, 400);
    expect_error(
        &s,
        chat,
        r#"{"model": "nope", "messages": [{"role": "user", "content": "x"}]}"#,
        404,
    );
    let m = expect_error(&s, "/v1/embeddings", r#"{"input": "hi"}"#, 400);
    assert!(m.contains("/v1/embeddings") && m.contains("generat"), "{m}");
    let r = s.get("/v1/nothing-here");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
    let r = s.get("/v1/chat/completions");
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].is_string());
    still_serves(&s);

    // /v1/models lists the served name and its context length.
    let v: Value = s.get("/v1/models").json();
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["max_model_len"], 64);
}

#[test]
fn generation_requests_to_an_embedder_are_refused() {
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--task",
        "embed",
        "--load-format",
        "dummy",
    ]);
    let m = expect_error(&s, "/v1/completions", r#"{"prompt": "hi"}"#, 400);
    assert!(m.contains("embedding model"), "{m}");
    expect_error(
        &s,
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "x"}]}"#,
        400,
    );
    expect_error(&s, "/v1/embeddings", r#"{"input": []}"#, 400);
    expect_error(&s, "/v1/embeddings", r#"{"input": {"a": 1}}"#, 400);
    expect_error(
        &s,
        "/v1/embeddings",
        r#"{"input": "x", "encoding_format": "bytes"}"#,
        400,
    );
    let m = expect_error(
        &s,
        "/v1/embeddings",
        &json!({"input": vec!["a"; 2049]}).to_string(),
        400,
    );
    assert!(m.contains("2048"), "{m}");
    expect_error(&s, "/v1/embeddings", r#"{"input": [[1, 2], [512]]}"#, 400);
    expect_error(&s, "/v1/embeddings", r#"{"input": ["a", ""]}"#, 400);
    let r = s.post("/v1/embeddings", r#"{"input": "fine"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn full_waiting_queue_answers_503() {
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--load-format",
        "dummy",
        "--kv-cache-memory",
        "16Mi",
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "1",
    ]);
    let body =
        json!({"prompt": "a", "max_tokens": 4000, "ignore_eos": true, "stream": true}).to_string();
    // One running (held open by its stream), one waiting, the third refused.
    let _running = common::send(s.port, "POST", "/v1/completions", Some(&body)).unwrap();
    assert!(s.wait_for(30, |s| s.metric("colocate:num_requests_running") == 1.0));
    let _waiting = common::send(s.port, "POST", "/v1/completions", Some(&body)).unwrap();
    assert!(s.wait_for(30, |s| s.metric("colocate:num_requests_waiting") == 1.0));
    let m = expect_error(&s, "/v1/completions", &body, 503);
    assert!(m.contains("--max-waiting"), "{m}");
    assert_eq!(s.metric("colocate:request_rejected_total"), 1.0);
}

#[test]
fn bad_command_lines_exit_non_zero_naming_the_flag_or_file() {
    let t = Duration::from_secs(60);
    let out = run_colocate(
        &[
            "serve",
            "--model",
            "preset:qwen3-tiny",
            "--max-num-seqs",
            "0",
        ],
        t,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-num-seqs"), "{err}");

    let out = run_colocate(
        &[
            "serve",
            "--model",
            "preset:qwen3-tiny",
            "--kv-cache-memory",
            "lots",
        ],
        t,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kv-cache-memory"));

    // An SM partition is a GPU setting: refused on the CPU, and 0 SMs refused by clap.
    let port = common::free_port().to_string();
    for (n, why) in [("16", "--device cuda"), ("0", "--sm-partition")] {
        let out = run_colocate(
            &[
                "serve",
                "--model",
                "preset:qwen3-tiny",
                "--port",
                &port,
                "--sm-partition",
                n,
            ],
            t,
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--sm-partition") && err.contains(why),
            "{n}: {err}"
        );
    }
    // The movable partitions likewise: refused on the CPU, 0 refused, and not beside a
    // fixed partition.
    for (args, why) in [
        (&["--sm-partitions", "16,32"][..], "--device cuda"),
        (&["--sm-partitions", "16,0"][..], "--sm-partitions"),
        (
            &["--sm-partitions", "16", "--sm-partition", "16"][..],
            "cannot be used with",
        ),
    ] {
        let mut all = vec![
            "serve",
            "--model",
            "preset:qwen3-tiny",
            "--task",
            "embed",
            "--port",
            &port,
        ];
        all.extend_from_slice(args);
        let out = run_colocate(&all, t);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--sm-partition") && err.contains(why),
            "{args:?}: {err}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let port = common::free_port().to_string();
    let out = run_colocate(
        &[
            "serve",
            "--model",
            missing.to_str().unwrap(),
            "--port",
            &port,
        ],
        t,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-model"), "{err}");

    // A folder whose config.json is not JSON.
    std::fs::write(dir.path().join("config.json"), "{oops").unwrap();
    let out = run_colocate(
        &[
            "serve",
            "--model",
            dir.path().to_str().unwrap(),
            "--port",
            &port,
        ],
        t,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_colocate(
        &[
            "serve",
            "--model",
            "preset:qwen3-tiny",
            "--load-format",
            "dummy",
            "--port",
            &port,
        ],
        t,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already in use") && err.contains(&port),
        "{err}"
    );
}
