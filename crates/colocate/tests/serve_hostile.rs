//! `colocate serve` against hostile input over real sockets: numbers that would size an
//! allocation, bodies past the size limit, wrong methods, routes and content types,
//! invalid UTF-8 and deep nesting, and clients that walk away mid-request. Each gets an
//! OpenAI error body (or a cancelled request), and afterwards the server still serves
//! and its accounting (KV blocks, running, waiting, admission places) is back at zero.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{read_chunk, read_head, Response, Server};
use serde_json::json;

const TINY: &[&str] = &[
    "--model",
    "preset:qwen3-tiny",
    "--load-format",
    "dummy",
    "--kv-cache-memory",
    "16Mi",
    "--max-model-len",
    "256",
    "--served-model-name",
    "tiny",
];

/// Sends `head` (request line and headers, without the blank line) and `body` on a new
/// connection, then reads the whole response.
fn raw(port: u16, head: &str, body: &[u8]) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    s.write_all(body).unwrap();
    read_response(s)
}

fn read_response(s: TcpStream) -> Response {
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).unwrap();
    let mut body = vec![];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        while let Some(c) = read_chunk(&mut r).unwrap() {
            body.extend_from_slice(&c);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Response {
        status,
        headers,
        body,
    }
}

/// A POST of `body` with the given content type.
fn post_as(port: u16, path: &str, content_type: &str, body: &[u8]) -> Response {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}",
        body.len()
    );
    raw(port, &head, body)
}

/// Checks an OpenAI error body with `status`; returns the message.
fn error_of(r: &Response, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["error"]["code"], status, "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

fn still_serves(s: &Server) {
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "ok", "max_tokens": 2}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Waits until nothing is held: no KV block, nothing running or waiting, no admission
/// place. (A bounded wait, not a timing assertion: it passes as soon as it holds.)
fn assert_accounting_whole(s: &Server) {
    let whole = s.wait_for(30, |s| {
        let t = s.get("/metrics").text();
        [
            "colocate:kv_cache_blocks_used",
            "colocate:num_requests_running",
            "colocate:num_requests_waiting",
            "colocate:admission_places_used",
        ]
        .iter()
        .all(|m| common::metric_value(&t, m) == Some(0.0))
    });
    assert!(whole, "something leaked:\n{}", s.get("/metrics").text());
}

#[test]
fn huge_numbers_are_400s_and_the_server_stays_up() {
    let s = Server::start(TINY);
    let c = "/v1/completions";
    let r = s.post(c, r#"{"prompt": "hi", "max_tokens": 1000000000000}"#);
    let m = error_of(&r, 400);
    assert!(
        m.contains("1000000000000") && m.contains("256") && m.contains("--max-model-len"),
        "{m}"
    );
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    for body in [
        r#"{"prompt": "hi", "max_tokens": 1e12}"#,
        r#"{"prompt": "hi", "max_tokens": 255}"#,
        r#"{"prompt": "hi", "max_tokens": 99999999999999999999999999}"#,
        r#"{"prompt": "hi", "max_tokens": 4, "min_tokens": 4294967295}"#,
        r#"{"prompt": "hi", "n": 1000000}"#,
        r#"{"prompt": "hi", "n": -1}"#,
        r#"{"prompt": "hi", "top_k": -7}"#,
        r#"{"prompt": "hi", "top_p": 1e999}"#,
        r#"{"prompt": "hi", "temperature": 1e300}"#,
        r#"{"prompt": "hi", "temperature": -1e300}"#,
        r#"{"prompt": "hi", "seed": -5}"#,
        r#"{"prompt": "hi", "seed": 1.5}"#,
        r#"{"prompt": [1, 2, 4294967295]}"#,
        r#"{"prompt": [1, 2, -1]}"#,
    ] {
        error_of(&s.post(c, body), 400);
    }
    let chat = "/v1/chat/completions";
    let r = s.post(
        chat,
        r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000000000}"#,
    );
    assert!(error_of(&r, 400).contains("--max-model-len"));
    // Meaningful but large values are bounded rather than refused.
    let r = s.post(
        c,
        r#"{"prompt": "hi", "max_tokens": 3, "top_k": 9223372036854775807, "seed": 18446744073709551615, "logprobs": 1000000000}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    still_serves(&s);
    assert_accounting_whole(&s);
}

#[test]
fn an_8_mb_body_gets_a_413_json_answer() {
    let s = Server::start(TINY);
    let prompt = "x".repeat(8 * 1024 * 1024);
    let body = json!({"prompt": prompt}).to_string();
    // The whole body is sent (a writer thread: the server reads as it answers).
    let port = s.port;
    let sent = body.clone();
    let writer = std::thread::spawn(move || {
        post_as(port, "/v1/completions", "application/json", sent.as_bytes())
    });
    let r = writer.join().unwrap();
    let m = error_of(&r, 413);
    assert!(m.contains("larger than the limit of 4194304 bytes"), "{m}");
    // Declared too large with `Expect: 100-continue`: answered before any body is sent.
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}",
        body.len()
    );
    error_of(&raw(s.port, &head, b""), 413);
    // Chunked, with no length: cut at the limit all the same.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked";
    let mut chunked = Vec::new();
    for piece in body.as_bytes().chunks(1 << 20) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let port = s.port;
    let r = std::thread::spawn(move || raw(port, head, &chunked))
        .join()
        .unwrap();
    error_of(&r, 413);
    still_serves(&s);
}

#[test]
fn methods_routes_types_encodings_and_nesting_get_json_errors() {
    let s = Server::start(TINY);
    let p = s.port;
    let m = error_of(&s.get("/v1/completions"), 405);
    assert!(m.contains("GET") && m.contains("/v1/completions"), "{m}");
    error_of(
        &raw(p, "DELETE /v1/embeddings HTTP/1.1\r\nHost: x", b""),
        405,
    );
    error_of(
        &raw(
            p,
            "POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 2",
            b"{}",
        ),
        405,
    );
    error_of(&s.post("/v1/nowhere", r#"{"prompt": "x"}"#), 404);
    error_of(&s.get("/"), 404);
    let ok = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let m = error_of(
        &post_as(p, "/v1/completions", "text/plain", ok.as_bytes()),
        415,
    );
    assert!(m.contains("application/json"), "{m}");
    error_of(
        &post_as(
            p,
            "/v1/completions",
            "application/x-www-form-urlencoded",
            ok.as_bytes(),
        ),
        415,
    );
    let r = post_as(
        p,
        "/v1/completions",
        "application/json; charset=utf-8",
        ok.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let no_type = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}",
        ok.len()
    );
    assert_eq!(raw(p, &no_type, ok.as_bytes()).status, 200);

    let json = "application/json";
    let c = "/v1/completions";
    for body in [
        b"{\"prompt\": \"\xff\xfe\xfd\"}".to_vec(),
        b"\xef\xbb\xbf{\"prompt\": \"bom\"}".to_vec(),
        br#"{"prompt": "\ud800"}"#.to_vec(),
        b"".to_vec(),
        b"{\"prompt\": \"a\"} trailing".to_vec(),
        "[".repeat(200_000).into_bytes(),
        format!("{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000)).into_bytes(),
        format!(
            r#"{{"prompt": {}"x"{}}}"#,
            "[".repeat(1000),
            "]".repeat(1000)
        )
        .into_bytes(),
    ] {
        error_of(&post_as(p, c, json, &body), 400);
    }
    let nested_content = format!(
        r#"{{"messages": [{{"role": "user", "content": {}"x"{}}}]}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    error_of(
        &post_as(p, "/v1/chat/completions", json, nested_content.as_bytes()),
        400,
    );
    let image = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#;
    assert!(error_of(&s.post("/v1/chat/completions", image), 400).contains("image_url"));
    // Unknown fields are ignored, as OpenAI and vLLM do.
    let r = s.post(
        c,
        r#"{"prompt": "hi", "max_tokens": 2, "frobnicate": {"deep": [1, 2]}, "user": "u"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    still_serves(&s);
    assert_accounting_whole(&s);
}

/// Opens a request and returns its connection once the engine is running it.
fn start_long_generation(s: &Server, stream: bool) -> TcpStream {
    let body = json!({"prompt": "abc", "max_tokens": 4000, "ignore_eos": true, "stream": stream})
        .to_string();
    let conn = common::send(s.port, "POST", "/v1/completions", Some(&body)).unwrap();
    assert!(
        s.wait_for(60, |s| s.metric("colocate:num_requests_running") == 1.0
            && s.metric("colocate:kv_cache_blocks_used") > 0.0),
        "the request never ran:\n{}",
        s.get("/metrics").text()
    );
    conn
}

#[test]
fn clients_that_leave_free_their_kv_blocks_and_places() {
    // One sequence at a time: a second request waits behind the first.
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--load-format",
        "dummy",
        "--kv-cache-memory",
        "16Mi",
        "--max-num-seqs",
        "1",
    ]);
    // A stream, dropped after its first chunk.
    let conn = start_long_generation(&s, true);
    let mut r = BufReader::new(conn);
    assert_eq!(read_head(&mut r).unwrap().0, 200);
    assert!(read_chunk(&mut r).unwrap().is_some());
    drop(r);
    assert_accounting_whole(&s);

    // A non-streamed request, dropped while the engine generates for it.
    let conn = start_long_generation(&s, false);
    // And one waiting behind it, dropped too.
    let body = json!({"prompt": "q", "max_tokens": 4000, "ignore_eos": true}).to_string();
    let waiting = common::send(s.port, "POST", "/v1/completions", Some(&body)).unwrap();
    assert!(s.wait_for(60, |s| s.metric("colocate:num_requests_waiting") == 1.0));
    drop(waiting);
    drop(conn);
    assert_accounting_whole(&s);
    let t = s.get("/metrics").text();
    assert!(t.contains("finished_reason=\"abort\"} 3"), "{t}");
    still_serves(&s);
    assert_accounting_whole(&s);
}
