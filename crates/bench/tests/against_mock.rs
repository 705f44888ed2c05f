//! The client against a real HTTP server (the in-process hyper mock): window accounting
//! against the server's own token counter, calibration, faults, early ends.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench::{parse_workload, run, BenchSpec, Phase, Progress};
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
    // Each batch of 8 spread over its lifetime: the window's share, and the time series
    // adds up to it.
    assert!(e.sequences > 0.0, "{e:?}");
    let ts: f64 = r.workloads[1].timeseries.iter().map(|p| p.throughput).sum();
    assert!(
        (ts - e.sequences).abs() < 1e-6 * e.sequences,
        "{ts} vs {e:?}"
    );
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
    // Streamed requests are cut at the window's end; the embed batches in flight there
    // are waited for (their sequences count over their lifetimes), briefly.
    let d = r
        .drain
        .as_ref()
        .expect("embed responses come whole: drained");
    assert!(!d.timed_out && d.timeout_s < 10.0, "{d:?}");
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
    // 50 batches of 2 ended in the window; spread over their lifetimes, the window's
    // sequences differ from 100 by at most what was in flight at each edge (4 x 2).
    let seqs = r.workloads[0].embed.as_ref().unwrap().sequences;
    assert!((seqs - 100.0).abs() <= 16.0, "{seqs}");
}

/// A load step in the window (issue 18): an open loop of 8 req/s for the first second,
/// then a closed loop of 2 slots. The open loop's requests keep their arrival time
/// (`scheduled`, before the step); the closed loop's are sent when a slot is free, all at or
/// after the step. Facts of the records, not rates, so a loaded machine cannot fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_step_switches_the_load_at_its_time() {
    let m = mock_server::start(
        0,
        MockOptions {
            embed_delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut s = spec(
        &[format!(
            "embed:url={},model=mock,rate=8,step_at=1s,step_concurrency=2,batch=1,input=8",
            m.url()
        )],
        0,
        2000,
    );
    s.record_requests = true;
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    let step = r.window.0 + 1.0;
    let before: Vec<_> = r.requests.iter().filter(|q| q.scheduled < step).collect();
    let after: Vec<_> = r.requests.iter().filter(|q| q.scheduled >= step).collect();
    // Poisson(8) arrivals in the first second, fixed by the seed
    assert!((1..=20).contains(&before.len()), "{}", before.len());
    // the closed loop: sent as scheduled, never before the step, never more than 2 at once
    assert!(after
        .iter()
        .all(|q| q.sent == q.scheduled && q.sent >= step));
    assert!(
        after.len() > before.len(),
        "{} after, {} before",
        after.len(),
        before.len()
    );
    for q in &after {
        let overlapping = after
            .iter()
            .filter(|o| o.sent <= q.sent && o.end > q.sent)
            .count();
        assert!(overlapping <= 2, "{overlapping} in flight at {}", q.sent);
    }
    // the spec in the results carries the step
    assert_eq!(
        r.spec.workloads[0].step.as_ref().unwrap().at,
        Duration::from_secs(1)
    );
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
/// spreads each whole response's `usage` over its lifetime (TTFT, TPOT and ITL undefined,
/// and the results say so); seed-embed numbers its inputs within each batch.
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
    // Tokens in the window agree with the server's counter, which counts each token of a
    // whole answer when its time comes.
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
    assert!(e.sequences > 0.0, "{e:?}");
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

/// Collects every progress update of a run.
fn progress_log() -> (
    tokio::sync::watch::Sender<Progress>,
    tokio::task::JoinHandle<Vec<Progress>>,
) {
    let (tx, mut rx) = tokio::sync::watch::channel(Progress::default());
    let log = tokio::spawn(async move {
        let mut v = Vec::new();
        while rx.changed().await.is_ok() {
            v.push(rx.borrow_and_update().clone());
        }
        v
    });
    (tx, log)
}

/// A seed-gen workload of `output` tokens, every request recorded.
fn seed_gen_spec(
    url: &str,
    concurrency: usize,
    output: u32,
    warmup_ms: u64,
    dur_ms: u64,
) -> BenchSpec {
    let (w, preset) = bench::spec::parse_workload_entry(&format!(
        "seed-gen:url={url},model=mock,concurrency={concurrency},output={output}"
    ))
    .unwrap();
    let mut s = BenchSpec::new(Vec::new());
    s.push_workload(w, preset);
    s.warmup = Duration::from_millis(warmup_ms);
    s.duration = Some(Duration::from_millis(dur_ms));
    s.seed = 1;
    s.record_requests = true;
    s
}

/// Whole responses count the share of their lifetime inside the window. Identical requests
/// started together finish in waves (here 8 of 64 tokens at 10 ms: one every 640 ms, a
/// steady 800 tok/s); the window [0.7 s, 1.6 s) holds one wave's end (512 tokens: 569 tok/s
/// counted at the ends), while the server generated ~720 tokens in it. The wave in flight
/// at the window's end is waited for (the run says it is draining) and counted by its
/// share; requests sent after the window's end count for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_responses_in_flight_at_the_window_end_are_waited_for_and_shared() {
    let gen = mock_server::start(
        0,
        MockOptions {
            token_delay: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = seed_gen_spec(&gen.url(), 8, 64, 700, 900);
    let stop = CancellationToken::new();
    let samples = sample(gen.generated.clone(), stop.clone());
    let (tx, log) = progress_log();
    let r = run(&s, Some(tx), CancellationToken::new()).await.unwrap();
    let log = log.await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    let samples = samples.lock().unwrap().clone();

    let (w0, w1) = r.window;
    assert!((w1 - w0 - 0.9).abs() < 1e-6);
    let w = &r.workloads[0];
    let g = w.gen.as_ref().unwrap();
    assert!(w.errors.is_empty() && !r.interrupted, "{:?}", w.errors);
    // The server's own counter over the window.
    let served = at(&samples, w1) - at(&samples, w0);
    assert!(served > 500.0, "served {served}");
    let rel = (g.output_tokens - served).abs() / served;
    assert!(rel < 0.05, "client {} vs server {served}", g.output_tokens);
    // Not whole waves: what ended inside, counted at its end, is far from it.
    let ended = r
        .requests
        .iter()
        .filter(|x| x.success && x.end >= w0 && x.end < w1)
        .count() as f64
        * 64.0;
    assert!((ended - served).abs() / served > 0.1, "{ended} vs {served}");
    // Latency and request counts keep their rule: the requests that ended inside.
    assert_eq!(g.completed as f64 * 64.0, ended);
    assert_eq!(w.requests_completed, g.completed as u64);
    assert_eq!(g.e2el_ms.count, g.completed);

    // Every request sent before the window's end was waited for and ended whole; none sent
    // after it is kept.
    assert!(
        r.requests.iter().all(|x| x.sent < w1),
        "a request sent after w1"
    );
    assert!(r.requests.iter().all(|x| x.success), "a request was cut");
    assert_eq!(w.requests_sent, r.requests.len() as u64);
    assert_eq!(w.unfinished, 0);
    let straddling: Vec<_> = r.requests.iter().filter(|x| x.end >= w1).collect();
    assert_eq!(
        straddling.len(),
        8,
        "the wave in flight at the window's end"
    );
    let share: f64 = straddling.iter().map(|x| x.output_tokens_in(w0, w1)).sum();
    assert!(share > 100.0, "{share}");
    let total: f64 = r.requests.iter().map(|x| x.output_tokens_in(w0, w1)).sum();
    assert!((total - g.output_tokens).abs() < 1e-9);
    // The time series spreads them the same way (rates: a partial last bin is scaled).
    let ts: f64 = w
        .timeseries
        .iter()
        .map(|p| p.throughput * (w1 - p.t).min(1.0))
        .sum();
    assert!((ts - g.output_tokens).abs() < 1e-6 * g.output_tokens);

    // The drain: until the last of them ended, well inside its time-out.
    let d = r.drain.as_ref().expect("a drain");
    assert!(!d.timed_out);
    let last_end = straddling.iter().map(|x| x.end).fold(0.0, f64::max);
    assert!(d.ended >= last_end && d.ended < last_end + 0.2, "{d:?}");
    assert!(d.timeout_s > 1.2 && d.timeout_s < 2.0, "{d:?}");
    let draining: Vec<&Progress> = log.iter().filter(|p| p.phase == Phase::Draining).collect();
    assert!(
        draining
            .iter()
            .any(|p| p.drain.as_ref().is_some_and(|d| d.left == 8)),
        "{log:?}"
    );
    assert!(r.table().contains("drained"), "{}", r.table());
}

/// A request that never ends does not hold the run: the drain stops at its time-out (twice
/// the longest E2EL seen before the window's end), cuts it and says so; meanwhile the load
/// kept running (requests sent during the drain, then dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_at_its_time_out() {
    // Requests 1 and 2 are the pre-flight probes; the 3rd, the first of the load, hangs.
    let gen = mock_server::start(
        0,
        MockOptions {
            token_delay: Duration::from_millis(5),
            stall_nth: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = seed_gen_spec(&gen.url(), 4, 40, 400, 600);
    let t = Instant::now();
    let r = run(&s, None, CancellationToken::new()).await.unwrap();
    let took = t.elapsed();
    let (_, w1) = r.window;
    let d = r.drain.as_ref().expect("a drain");
    assert!(d.timed_out, "{d:?}");
    // 40 tokens at 5 ms: E2EL about 200 ms, so a time-out about 400 ms.
    assert!(d.timeout_s > 0.38 && d.timeout_s < 0.8, "{d:?}");
    let drained = d.ended - w1;
    assert!(
        drained >= d.timeout_s - 0.01 && drained < d.timeout_s + 0.3,
        "drained {drained} s, {d:?}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(!r.interrupted);
    let w = &r.workloads[0];
    assert_eq!(w.unfinished, 1, "the hung request");
    let cut: Vec<_> = r.requests.iter().filter(|x| !x.success).collect();
    assert_eq!(cut.len(), 1);
    assert!(cut[0].error.is_none() && cut[0].sent < w1);
    assert_eq!(cut[0].output_tokens_in(r.window.0, w1), 0.0);
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    // The load ran on while draining: the server got requests after the window's end that
    // count nowhere.
    assert!(r.requests.iter().all(|x| x.sent < w1));
    assert!(
        gen.unstreamed.load(Relaxed) >= w.requests_sent + 2 + 3,
        "{} answered, {} sent before the window's end",
        gen.unstreamed.load(Relaxed),
        w.requests_sent
    );
    assert!(r.table().contains("unfinished"), "{}", r.table());
}

/// `prompt_seed` changes the prompts' texts and nothing else: two runs with the same seed
/// send the same texts (a server's prefix cache would reuse the first run's), a third with
/// a prompt seed sends none of them, at the same lengths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_seed_sends_new_texts_at_the_same_lengths() {
    let m = mock_server::start(0, MockOptions::default()).await.unwrap();
    let texts = |prompt_seed: Option<u64>| {
        let url = m.url();
        let bodies = m.bodies.clone();
        async move {
            bodies.lock().unwrap().clear();
            let mut s = spec(
                &[format!(
                    "completions:url={url},model=mock,concurrency=1,input=40,output=2"
                )],
                0,
                60_000,
            );
            s.max_requests = Some(12);
            s.prompt_seed = prompt_seed;
            run(&s, None, CancellationToken::new()).await.unwrap();
            // The measured requests (max_tokens 2), in the order sent (one at a time).
            let sent: Vec<String> = bodies
                .lock()
                .unwrap()
                .iter()
                .filter(|b| b["max_tokens"] == 2)
                .map(|b| b["prompt"].as_str().unwrap().to_string())
                .collect();
            sent
        }
    };
    let a = texts(None).await;
    let b = texts(None).await;
    let c = texts(Some(7)).await;
    // (requests already sent when the twelfth completed are sent too: compare twelve)
    assert!(a.len() >= 12 && b.len() >= 12 && c.len() >= 12, "{a:?}");
    assert_eq!(a[..12], b[..12], "the same seed sends the same texts");
    assert!(c.iter().all(|t| !a.contains(t)), "{c:?}");
    let lens = |v: &[String]| v.iter().map(|t| t.len()).collect::<Vec<_>>();
    assert_eq!(lens(&a[..12]), lens(&c[..12]));
}
