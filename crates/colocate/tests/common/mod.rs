//! Shared helpers for end-to-end tests: start a real `colocate serve` process on a free
//! port and wait for `/health`, and a tiny HTTP/1.1 client over `std::net::TcpStream`
//! (one request per connection, chunked bodies decoded) so tests see exact bytes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_colocate");

/// The workspace root (where `scripts/` and `models/` are).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port nobody listens on right now.
/// Fetches all-MiniLM-L6-v2 into `models/` (the test command does it first; a test run on
/// its own does it here).
pub fn fetch_minilm() {
    let root = workspace_root();
    let st = Command::new("bash")
        .arg(root.join("scripts/fetch-minilm.sh"))
        .current_dir(&root)
        .status()
        .expect("cannot run scripts/fetch-minilm.sh");
    assert!(st.success(), "scripts/fetch-minilm.sh failed");
}

/// A dummy-weight generator served as `tiny` and the real MiniLM embedder served as
/// `minilm`: the pair the client and sweep tests drive.
pub fn start_tiny_and_minilm() -> (Server, Server) {
    fetch_minilm();
    let gen = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--load-format",
        "dummy",
        "--served-model-name",
        "tiny",
    ]);
    let emb = Server::start(&[
        "--model",
        "models/all-minilm-l6-v2",
        "--task",
        "embed",
        "--served-model-name",
        "minilm",
    ]);
    (gen, emb)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

/// A `colocate serve` process, killed on drop. Its stderr goes to a file shown on failure.
pub struct Server {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Server {
    /// Starts `colocate serve <args> --port P` and waits (up to 120 s) for `/health` 200.
    pub fn start(args: &[&str]) -> Server {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("temp file");
        let child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .args(["--port", &port.to_string()])
            .current_dir(workspace_root())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("reopen log"))
            .spawn()
            .expect("cannot start colocate serve");
        let mut s = Server { child, port, log };
        let t0 = Instant::now();
        loop {
            if let Ok(r) = request(port, "GET", "/health", None) {
                if r.status == 200 {
                    return s;
                }
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!(
                    "colocate serve exited with {st} before it was healthy:\n{}",
                    s.log()
                );
            }
            if t0.elapsed() > Duration::from_secs(120) {
                panic!("colocate serve not healthy after 120 s:\n{}", s.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        request(self.port, "POST", path, Some(body))
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log()))
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    /// The value of an unlabelled-by-reason metric line `colocate:NAME{...} V`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text();
        metric_value(&text, name).unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
    }

    /// Polls `cond` every 20 ms for up to `secs`; true when it held.
    pub fn wait_for(&self, secs: u64, mut cond: impl FnMut(&Server) -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if cond(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// First sample of metric `name` (any labels) in a Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs `colocate <args>` to completion (for CLI error tests).
pub fn run_colocate(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start colocate");
    let t0 = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t0.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// An HTTP response with its body de-chunked.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Opens a connection and sends one request (`Connection: close`).
pub fn send(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(s)
}

/// Reads the status line and headers of a response.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = vec![];
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Reads one chunk of a chunked body; `None` at the last (empty) chunk.
pub fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    let mut buf = vec![0; size + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(size);
    Ok((size > 0).then_some(buf))
}

/// One full request and response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Response> {
    let s = send(port, method, path, body)?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = vec![];
    if chunked {
        while let Some(c) = read_chunk(&mut r)? {
            body.extend_from_slice(&c);
        }
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Splits an SSE body into its `data:` payloads, checking the framing byte for byte: every
/// event is exactly `data: <payload>\n\n`.
pub fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body must end with a blank line: {body:?}"
    );
    body[..body.len() - 2]
        .split("\n\n")
        .map(|e| {
            let p = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: `: {e:?}"));
            assert!(!p.contains('\n'), "multi-line event {e:?}");
            p.to_string()
        })
        .collect()
}
pub mod up;

/// Runs `colocate ARGS` to its end from the workspace root, with this build as the engine
/// binary and quiet logs: whether it succeeded, its stdout and its stderr.
pub fn colocate(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN)
        .args(args)
        .current_dir(workspace_root())
        .env("COLOCATE_BIN", BIN)
        .env("RUST_LOG", "warn")
        .output()
        .expect("cannot run colocate");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
