//! The HTTP side: one connection pool per endpoint, request bodies, one request's
//! execution into a [`RequestRecord`], and the pre-flight calibration that also proves the
//! endpoint is reachable before any warm-up.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::metrics::RequestRecord;
use crate::prompt::{random_text, request_rng, Calibration};
use crate::spec::{WorkloadKind, WorkloadSpec};
use crate::sse::{classify, ChunkKind, EmbedProbe, SseSplitter};

/// Monotonic time expressed as Unix epoch seconds (the convention shared with the gpu
/// crate, so that the lab can align load and GPU samples).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix: f64,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        let base_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Clock {
            base: Instant::now(),
            base_unix,
        }
    }

    /// Now, in Unix seconds (monotonic within a run).
    pub fn now(&self) -> f64 {
        self.base_unix + self.base.elapsed().as_secs_f64()
    }

    /// The `Instant` of a Unix time of this clock (for sleeping until it).
    pub fn instant_at(&self, unix: f64) -> Instant {
        let off = unix - self.base_unix;
        if off <= 0.0 {
            self.base
        } else {
            self.base + Duration::from_secs_f64(off)
        }
    }
}

/// A client (connection pool) for one endpoint origin, sized for thousands of streams.
pub fn make_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("cannot build the HTTP client")
}

/// The JSON body of a gen request (the `openai` crate's request types). A fixed output
/// length sets `max_tokens`, `min_tokens` and `ignore_eos` (vLLM's extras), so the server
/// generates exactly that; streamed requests ask for the final usage chunk.
pub fn gen_body(
    kind: WorkloadKind,
    model: &str,
    prompt: String,
    output: Option<u32>,
    stream: bool,
) -> Vec<u8> {
    let stream_options = stream.then_some(openai::StreamOptions {
        include_usage: true,
    });
    let max_tokens = output.map(i64::from);
    let r = if kind == WorkloadKind::Chat {
        serde_json::to_vec(&openai::ChatCompletionRequest {
            model: model.to_string(),
            messages: vec![openai::ChatMessage::new("user", prompt)],
            max_tokens,
            temperature: Some(0.0),
            stream,
            stream_options,
            ignore_eos: output.is_some(),
            min_tokens: output,
            ..Default::default()
        })
    } else {
        serde_json::to_vec(&openai::CompletionRequest {
            model: model.to_string(),
            prompt: openai::Input::Text(prompt),
            max_tokens,
            temperature: Some(0.0),
            stream,
            stream_options,
            ignore_eos: output.is_some(),
            min_tokens: output,
            ..Default::default()
        })
    };
    r.unwrap_or_default()
}

/// The JSON body of an embeddings request.
pub fn embed_body(model: &str, inputs: Vec<String>) -> Vec<u8> {
    serde_json::to_vec(&openai::EmbeddingRequest::new(
        model,
        openai::Input::Texts(inputs),
    ))
    .unwrap_or_default()
}

/// The error kind of a failed send.
pub(crate) fn send_error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "connect"
    } else if e.is_timeout() {
        "timeout"
    } else {
        "request"
    }
}

/// Sends one streamed gen request and fills `rec` as chunks arrive. On return `rec` holds
/// either a complete success or an error kind; if the future is dropped (end of the run),
/// `rec` keeps the chunks received so far. `on_content` runs for every content chunk (live
/// progress counters).
pub async fn run_gen(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    clock: &Clock,
    rec: &mut RequestRecord,
    on_content: &(dyn Fn() + Sync),
) {
    rec.sent = clock.now();
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => {
            rec.end = clock.now();
            rec.error = Some(send_error_kind(&e).into());
            return;
        }
    };
    if !resp.status().is_success() {
        rec.error = Some(format!("http_{}", resp.status().as_u16()));
        let _ = resp.bytes().await;
        rec.end = clock.now();
        return;
    }
    let mut sse = SseSplitter::default();
    let mut done = false;
    let mut bad: Option<&'static str> = None;
    let mut handle = |d: &[u8], rec: &mut RequestRecord, now: f64| {
        let (kind, usage) = classify(d);
        match kind {
            ChunkKind::Content => {
                if rec.first_token.is_none() {
                    rec.first_token = Some(now);
                }
                rec.last_token = Some(now);
                rec.chunk_times.push(now);
                rec.chunks += 1;
                on_content();
            }
            ChunkKind::Done => done = true,
            ChunkKind::Error => bad = Some("stream_error"),
            ChunkKind::Malformed => bad = bad.or(Some("malformed_chunk")),
            ChunkKind::Usage(_) => {}
        }
        if let Some(u) = usage {
            rec.prompt_tokens = Some(u.prompt_tokens);
            rec.prompt_tokens_estimated = false;
            rec.output_tokens = Some(u.completion_tokens);
        }
    };
    loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                let now = clock.now();
                sse.feed(&bytes, |d| handle(d, rec, now));
            }
            Ok(None) => break,
            Err(_) => {
                rec.end = clock.now();
                rec.error = Some("stream_broken".into());
                return;
            }
        }
    }
    let now = clock.now();
    sse.finish(|d| handle(d, rec, now));
    rec.end = now;
    if let Some(b) = bad {
        rec.error = Some(b.into());
    } else if rec.chunks == 0 {
        rec.error = Some("empty_response".into());
    } else if !done && rec.output_tokens.is_none() {
        rec.error = Some("stream_incomplete".into());
    } else {
        if rec.output_tokens.is_none() {
            // No usage from the server: fall back to one token per content chunk.
            rec.output_tokens = Some(rec.chunks);
        }
        rec.success = true;
    }
}

/// Sends one embeddings request of `expect` inputs and fills `rec`.
pub async fn run_embed(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    expect: usize,
    clock: &Clock,
    rec: &mut RequestRecord,
) {
    // An embedding comes whole: its batch counts over its lifetime (`sequences_in`).
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
            rec.error = Some(send_error_kind(&e).into());
            return;
        }
    };
    let status = resp.status();
    let bytes = resp.bytes().await;
    let now = clock.now();
    rec.end = now;
    if !status.is_success() {
        rec.error = Some(format!("http_{}", status.as_u16()));
        return;
    }
    let Ok(bytes) = bytes else {
        rec.error = Some("stream_broken".into());
        return;
    };
    match serde_json::from_slice::<EmbedProbe>(&bytes) {
        Ok(p) if p.data.0 == expect => {
            rec.first_token = Some(now);
            rec.last_token = Some(now);
            if let Some(u) = p.usage {
                rec.prompt_tokens = Some(u.prompt_tokens);
                rec.prompt_tokens_estimated = false;
            }
            rec.success = true;
        }
        Ok(_) => rec.error = Some("wrong_count".into()),
        Err(_) => rec.error = Some("malformed_response".into()),
    }
}

/// A short description of what a server answered, for pre-flight errors.
async fn describe_failure(resp: reqwest::Response) -> String {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let text: String = text.chars().take(300).collect();
    format!("HTTP {status}: {text}")
}

/// Sends one probe request with a prompt of `bytes` bytes and returns `usage.prompt_tokens`
/// (None when the server reports no usage). Fails with the URL in the message when the
/// endpoint cannot be reached or rejects the request.
async fn probe(
    client: &reqwest::Client,
    w: &WorkloadSpec,
    seed: u64,
    bytes: usize,
) -> anyhow::Result<Option<u64>> {
    let url = w.endpoint();
    let mut rng = request_rng(seed ^ 0xCA1B, usize::MAX, bytes as u64);
    let text = random_text(&mut rng, bytes);
    let body = match w.kind {
        WorkloadKind::Embed => embed_body(&w.model, vec![text]),
        k => gen_body(k, &w.model, text, Some(1), false),
    };
    let resp = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| {
            let why = if e.is_connect() {
                "unreachable"
            } else {
                "not answering"
            };
            anyhow::anyhow!("workload {}: endpoint {url} {why}: {e}", w.name)
        })?;
    if !resp.status().is_success() {
        bail!(
            "workload {}: endpoint {url} rejected a probe request: {}",
            w.name,
            describe_failure(resp).await
        );
    }
    let v: serde_json::Value = resp.json().await.with_context(|| {
        format!(
            "workload {}: endpoint {url} answered a probe with invalid JSON",
            w.name
        )
    })?;
    Ok(v["usage"]["prompt_tokens"].as_u64())
}

/// Pre-flight for one workload: proves the endpoint answers (fails fast with the URL) and
/// fits prompt bytes to server tokens from two probes.
pub async fn calibrate(
    client: &reqwest::Client,
    w: &WorkloadSpec,
    seed: u64,
) -> anyhow::Result<Calibration> {
    let (b1, b2) = (200, 400);
    let t1 = probe(client, w, seed, b1).await?;
    let t2 = probe(client, w, seed, b2).await?;
    Ok(match (t1, t2) {
        (Some(t1), Some(t2)) => Calibration::fit(b1, t1, b2, t2).unwrap_or_default(),
        _ => {
            tracing::warn!(
                "workload {}: the server reports no usage; assuming 4 bytes per token",
                w.name
            );
            Calibration::default()
        }
    })
}

/// Races `fut` against `stop`; returns false if stopped first. The future is dropped
/// before returning, so anything it borrowed is usable again.
pub async fn until_stopped<F: std::future::Future<Output = ()>>(
    fut: F,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = fut => true,
        _ = stop.cancelled() => false,
    }
}
