//! The client against a real HTTP server (the in-process hyper mock): window accounting
//! against the server's own token counter, calibration, faults, early ends.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench::{parse_workload, run, BenchSpec};
use tokio_util::sync::CancellationToken;

#[path = "support/mock_server.rs"]
mod mock_server;
use mock_server::MockOptions;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Samples a counter every 20 ms as (unix time, value) until stopped.
fn sample(
    counter: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) -> Arc<Mutex<Vec<(f64, f64)>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            o.lock()
                .unwrap()
                .push((unix_now(), counter.load(Relaxed) as f64));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    out
}

/// The counter at time `t`, interpolated linearly between samples.
fn at(samples: &[(f64, f64)], t: f64) -> f64 {
    let i = samples.partition_point(|s| s.0 <= t);
    assert!(i > 0 && i < samples.len(), "time {t} outside the samples");
    let (a, b) = (samples[i - 1], samples[i]);
    a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0)
}

fn spec(ws: &[String], warmup_ms: u64, dur_ms: u64) -> BenchSpec {
    let mut s = BenchSpec::new(ws.iter().map(|w| parse_workload(w).unwrap()).collect());
    s.warmup = Duration::from_millis(warmup_ms);
    s.duration = Some(Duration::from_millis(dur_ms));
    s.seed = 1;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_and_embed_window_agrees_with_the_server_counter() {
    let gen = mock_server::start(
        0,
        MockOptions {
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let emb = mock_server::start(
        0,
        MockOptions {
            embed_delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = spec(
        &[
            format!(
                "gen:url={},model=mock,concurrency=16,input=128,output=40",
                gen.url()
            ),
            format!(
                "embed:url={},model=mock,concurrency=2,batch=8,input=64",
                emb.url()
            ),
        ],
        500,
        2000,
    );
    let stop = CancellationToken::new();
    let samples = sample(gen.generated.clone(), stop.clone());
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    let samples = samples.lock().unwrap().clone();
    let (w0, w1) = r.window;
    assert!((w1 - w0 - 2.0).abs() < 1e-6);
    let g = r.workloads[0].gen.as_ref().unwrap();
    let served = at(&samples, w1) - at(&samples, w0);
    // 16 streams at ~200 tok/s: ~6,000 tokens in the window.
    assert!(served > 1000.0, "served {served}");
    let rel = (g.output_tokens - served).abs() / served;
    assert!(rel < 0.03, "client {} vs server {served}", g.output_tokens);
    // Calibration made the prompts exactly 128 tokens (byte-level + chat template).
    assert_eq!(g.mean_prompt_tokens, 128.0);
    assert_eq!(g.mean_output_tokens, 40.0);
    assert!(
        g.ttft_ms.count > 0 && g.tpot_ms.mean > 4.0 && g.tpot_ms.mean < 50.0,
        "{:?}",
        g.tpot_ms
    );
    assert_eq!(g.itl_ms.count as f64, g.completed as f64 * 39.0);
    let ts: f64 = r.workloads[0].timeseries.iter().map(|p| p.throughput).sum();
    assert!((ts - g.output_tokens).abs() < 1e-6 * g.output_tokens.max(1.0) + 1e-6);
    let e = r.workloads[1].embed.as_ref().unwrap();
    assert!(e.sequences > 0 && e.sequences % 8 == 0);
    // 64-token inputs under a words+2 tokenizer: close to 64 per sequence.
    assert!(
        (e.mean_tokens_per_seq - 64.0).abs() < 4.0,
        "{}",
        e.mean_tokens_per_seq
    );
    assert!(e.latency_ms.median >= 20.0);
    assert!(
        r.workloads.iter().all(|w| w.errors.is_empty()),
        "{:?}",
        r.workloads[0].errors
    );
    assert!(!r.interrupted);
    // The JSON round-trips with its schema version.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["schema_version"], 1);
    assert_eq!(json["spec"]["workload"][0]["load"]["concurrency"], 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_and_broken_streams_are_counted_not_fatal() {
    let m = mock_server::start(
        0,
        MockOptions {
            fail_every: 5,
            break_every: 7,
            token_delay: Duration::from_millis(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = spec(
        &[format!(
            "completions:url={},model=mock,concurrency=4,input=16,output=10",
            m.url()
        )],
        0,
        1500,
    );
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    let w = &r.workloads[0];
    assert!(
        w.errors.get("http_503").copied().unwrap_or(0) > 0,
        "{:?}",
        w.errors
    );
    assert!(
        w.errors.get("stream_broken").copied().unwrap_or(0) > 0,
        "{:?}",
        w.errors
    );
    assert!(w.requests_completed > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_fails_before_the_warmup() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let s = spec(
        &[format!("gen:url={url},model=m,concurrency=1")],
        30_000,
        1000,
    );
    let t = Instant::now();
    let e = format!(
        "{:#}",
        run(&s, None, CancellationToken::new()).await.unwrap_err()
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.contains(&url) && e.contains("unreachable"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_model_is_reported_before_the_warmup() {
    // A server answering 404 at the probe (e.g. unknown model) stops the run with its reply.
    let m = mock_server::start(0, MockOptions::default()).await.unwrap();
    let s = spec(
        &[format!(
            "gen:url={}/v1/nope/,model=m,concurrency=1",
            m.url()
        )],
        30_000,
        1000,
    );
    let e = format!(
        "{:#}",
        run(&s, None, CancellationToken::new()).await.unwrap_err()
    );
    assert!(e.contains("404") && e.contains("/v1/nope"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_the_run_with_results_marked_interrupted() {
    let m = mock_server::start(
        0,
        MockOptions {
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = spec(
        &[format!(
            "gen:url={},model=mock,concurrency=4,input=16,output=1000",
            m.url()
        )],
        200,
        60_000,
    );
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.cancel();
    });
    let t = Instant::now();
    let r = run(&s, None, cancel).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(r.interrupted);
    let len = r.window.1 - r.window.0;
    assert!(len > 0.5 && len < 3.0, "{len}");
    // Requests of 1000 tokens never finished, yet their streamed tokens count.
    let g = r.workloads[0].gen.as_ref().unwrap();
    assert_eq!(g.completed, 0);
    assert!(g.output_tokens > 100.0, "{}", g.output_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_by_request_count() {
    let m = mock_server::start(0, MockOptions::default()).await.unwrap();
    let mut s = spec(
        &[format!(
            "embed:url={},model=mock,concurrency=4,batch=2,input=8",
            m.url()
        )],
        100,
        1,
    );
    s.duration = None;
    s.max_requests = Some(50);
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    assert_eq!(r.workloads[0].requests_completed, 50);
    assert_eq!(r.workloads[0].embed.as_ref().unwrap().sequences, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_rate_and_client_queueing() {
    // 40 req/s offered to a server that takes 100 ms per request, capped at 2 in flight:
    // capacity is 20 req/s, so requests queue on the client and the queue time shows it.
    let m = mock_server::start(
        0,
        MockOptions {
            embed_delay: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = spec(
        &[format!(
            "embed:url={},model=mock,rate=40,max_concurrency=2,batch=1,input=8",
            m.url()
        )],
        0,
        2000,
    );
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    let e = r.workloads[0].embed.as_ref().unwrap();
    assert!(
        e.request_throughput < 22.0 && e.request_throughput > 12.0,
        "{}",
        e.request_throughput
    );
    assert!(e.queue_ms.max > 200.0, "{:?}", e.queue_ms);
    // Uncapped at a rate the server sustains: throughput follows the offered rate.
    let s = spec(
        &[format!(
            "embed:url={},model=mock,rate=30,batch=1,input=8",
            m.url()
        )],
        0,
        3000,
    );
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    let e = r.workloads[0].embed.as_ref().unwrap();
    assert!(
        (e.request_throughput - 30.0).abs() < 9.0,
        "{}",
        e.request_throughput
    );
    assert!(e.queue_ms.max < 50.0, "{:?}", e.queue_ms);
}

/// The seed studies' clients: seed-gen sends its one fixed prompt with `stream: false` and
/// counts each whole response's `usage` when it arrives (TTFT, TPOT and ITL undefined, and
/// the results say so); seed-embed numbers its inputs within each batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_presets_send_the_seed_texts_whole() {
    use bench::spec::{parse_workload_entry, Preset, SEED_EMBED_INPUT, SEED_GEN_PROMPT};
    // 64 tokens at 0.5 ms each: a whole response every ~32 ms per request in flight.
    let gen = mock_server::start(
        0,
        MockOptions {
            token_delay: Duration::from_micros(500),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let emb = mock_server::start(
        0,
        MockOptions {
            embed_delay: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut s = BenchSpec::new(Vec::new());
    for w in [
        format!(
            "seed-gen:url={},model=mock,concurrency=8,output=64",
            gen.url()
        ),
        format!(
            "seed-embed:url={},model=mock,concurrency=2,batch=4",
            emb.url()
        ),
    ] {
        let (w, preset) = parse_workload_entry(&w).unwrap();
        s.push_workload(w, preset);
    }
    s.warmup = Duration::from_millis(300);
    s.duration = Some(Duration::from_millis(1500));
    s.seed = 1;
    let stop = CancellationToken::new();
    let samples = sample(gen.generated.clone(), stop.clone());
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    let samples = samples.lock().unwrap().clone();

    let w = &r.workloads[0];
    assert_eq!(w.preset, Some(Preset::SeedGen));
    assert!(!w.streamed && w.whole_requests_only());
    let g = w.gen.as_ref().unwrap();
    assert!(g.completed > 50, "{g:?}");
    for (name, st) in [
        ("ttft", &g.ttft_ms),
        ("tpot", &g.tpot_ms),
        ("itl", &g.itl_ms),
        ("decode", &g.decode_tok_s_per_req),
    ] {
        assert_eq!(st.count, 0, "{name} has samples without a stream");
    }
    assert_eq!(g.e2el_ms.count, g.completed);
    assert!(g.e2el_ms.median >= 30.0, "{:?}", g.e2el_ms);
    assert_eq!(g.mean_output_tokens, 64.0);
    // The fixed prompt every time: the mock counts its bytes plus a chat template.
    assert_eq!(
        g.mean_prompt_tokens,
        (SEED_GEN_PROMPT.len() as u64 + mock_server::CHAT_OVERHEAD) as f64
    );
    assert!(g.input_tokens > 0.0);
    // Tokens in the window agree with the server's counter, which counts a whole answer
    // as it sends it.
    let (w0, w1) = r.window;
    let served = at(&samples, w1) - at(&samples, w0);
    let rel = (g.output_tokens - served).abs() / served;
    assert!(rel < 0.05, "client {} vs server {served}", g.output_tokens);
    // Every gen request went out whole (the two pre-flight probes too).
    assert!(gen.unstreamed.load(Relaxed) >= w.requests_sent + 2);
    let bodies = gen.bodies.lock().unwrap().clone();
    let sent: Vec<&serde_json::Value> = bodies.iter().filter(|b| b["max_tokens"] == 64).collect();
    assert!(sent.len() > 10, "{bodies:?}");
    for b in sent {
        assert_eq!(b["messages"][0]["content"], SEED_GEN_PROMPT, "{b}");
        assert_ne!(b["stream"], true, "{b}");
        assert_eq!(b["ignore_eos"], true, "{b}");
        assert_eq!(b["temperature"], 0.0, "{b}");
    }
    // seed-embed: batches of 4 numbered sentences.
    let e = r.workloads[1].embed.as_ref().unwrap();
    assert_eq!(r.workloads[1].preset, Some(Preset::SeedEmbed));
    assert!(e.sequences > 0 && e.sequences % 4 == 0, "{e:?}");
    let bodies = emb.bodies.lock().unwrap().clone();
    let batch = bodies
        .iter()
        .find(|b| b["input"].as_array().is_some_and(|a| a.len() == 4))
        .expect("a batch of 4");
    for i in 0..4 {
        assert_eq!(
            batch["input"][i],
            SEED_EMBED_INPUT.replace("{i}", &i.to_string())
        );
    }
    assert!(r.workloads.iter().all(|w| w.errors.is_empty()));
    // What a reader sees: no zeros for what was not measured.
    let table = r.table();
    assert!(table.contains("gen0 (Chat, preset seed-gen)"), "{table}");
    assert!(table.contains("TTFT, TPOT and ITL undefined"), "{table}");
    assert!(!table.contains("TTFT (ms)"), "{table}");
    assert!(table.contains("E2EL (ms)"), "{table}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["workloads"][0]["streamed"], false);
    assert_eq!(json["workloads"][0]["preset"], "seed-gen");
    assert_eq!(json["workloads"][1]["streamed"], true);
    assert_eq!(json["spec"]["presets"]["gen0"], "seed-gen");
}
