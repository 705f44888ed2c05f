//! The supervisor and the gateway with real processes: `tests/fake_engine.py` is a small
//! HTTP server (a real process on 127.0.0.1) that answers `/health` and completions and can
//! be told to crash. Engines built into `colocate` are exercised by the end-to-end tests in
//! `crates/colocate/tests/deploy_*.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy::process::{alive, ProcSpec};
use deploy::supervisor::{EventKind, InstanceSpec, InstanceState, SuperviseOptions, Supervisor};
use deploy::{
    Deployment, DeploymentSpec, EngineKind, EngineSpec, GatewaySpec, SuperviseSpec, UpOptions,
    ValidDeployment,
};
use tokio_util::sync::CancellationToken;

const FAKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_engine.py");

/// A port nobody listens on (and the next `n - 1` too).
fn free_ports(n: u16) -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        if p < 60000 && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no free ports");
}

fn fake(name: &str, model: &str, replicas: u32, env: &[(&str, &str)]) -> EngineSpec {
    EngineSpec {
        name: name.into(),
        kind: EngineKind::Command,
        model: model.into(),
        port: free_ports(replicas as u16),
        replicas,
        command: Some(vec![
            "python3".into(),
            FAKE.into(),
            "{port}".into(),
            "{name}".into(),
        ]),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        start_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn spec(engines: Vec<EngineSpec>) -> DeploymentSpec {
    DeploymentSpec {
        name: "test".into(),
        engines,
        gateway: Some(GatewaySpec {
            address: format!("127.0.0.1:{}", free_ports(1)),
            drain_timeout: Duration::from_secs(5),
            ..Default::default()
        }),
        supervise: SuperviseSpec {
            max_failures: 3,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(3),
        },
        ..Default::default()
    }
}

/// A test spec, validated as `up` takes it.
fn valid(s: &DeploymentSpec) -> ValidDeployment {
    deploy::validate(s.clone()).unwrap()
}

fn opts(dir: &tempfile::TempDir) -> UpOptions {
    UpOptions {
        run_dir: dir.path().join("run"),
        engine_bin: None,
        quiet: true,
        ..Default::default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn complete(url: &str, model: &str, stream: bool) -> (u16, String) {
    let r = client()
        .post(format!("{url}/v1/completions"))
        .json(&serde_json::json!({ "model": model, "prompt": "hi", "stream": stream }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_streams_lists_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(vec![
        fake("a", "model-a", 1, &[]),
        fake("b", "model-b", 1, &[]),
    ]);
    let (pa, pb) = (s.engines[0].port, s.engines[1].port);
    let d = Deployment::up(&valid(&s), opts(&dir)).await.unwrap();
    let gw = d.gateway_url().unwrap();

    let (st, body) = complete(&gw, "model-a", false).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(&format!("port {pa} says")), "{body}");
    let (st, body) = complete(&gw, "model-b", false).await;
    assert_eq!(st, 200);
    assert!(body.contains(&format!("port {pb} says")), "{body}");

    // Unknown model: 404 with an OpenAI error body.
    let (st, body) = complete(&gw, "nope", false).await;
    assert_eq!(st, 404);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "not_found_error", "{body}");
    // No model at all: 400.
    let r = client()
        .post(format!("{gw}/v1/completions"))
        .json(&serde_json::json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // /v1/models lists both.
    let models: serde_json::Value = client()
        .get(format!("{gw}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["model-a", "model-b"]);

    // Streams pass through unchanged and unbuffered: the first chunk arrives well before
    // the last (the engine spaces its 5 chunks 50 ms apart).
    let direct = complete(&format!("http://127.0.0.1:{pa}"), "model-a", true)
        .await
        .1;
    let t0 = Instant::now();
    let mut r = client()
        .post(format!("{gw}/v1/completions"))
        .json(&serde_json::json!({ "model": "model-a", "prompt": "hi", "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut via = Vec::new();
    let mut first = None;
    while let Some(chunk) = r.chunk().await.unwrap() {
        first.get_or_insert_with(|| t0.elapsed());
        via.extend_from_slice(&chunk);
    }
    let total = t0.elapsed();
    assert_eq!(String::from_utf8(via).unwrap(), direct);
    let first = first.unwrap();
    assert!(
        total - first >= Duration::from_millis(150),
        "first chunk at {first:?}, end at {total:?}: buffered?"
    );

    let metrics = client()
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains(r#"colocate_gateway_requests_total{engine="a",route="/v1/completions"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"colocate_gateway_requests_total{engine="-",route="/v1/completions"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"colocate_gateway_in_flight{engine="b"} 0"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        "colocate_gateway_request_duration_seconds_count{engine=\"b\",route=\"/v1/completions\"} 1"
    ));

    let pids: Vec<u32> = d.status().iter().filter_map(|s| s.pid).collect();
    assert_eq!(pids.len(), 2);
    let run_dir = d.run_dir().to_path_buf();
    d.shutdown().await.unwrap();
    for p in pids {
        assert!(!alive(p), "engine {p} still running after shutdown");
    }
    let state = deploy::state::read(&run_dir).unwrap();
    assert_eq!(state.phase, "stopped");
    assert!(state
        .instances
        .iter()
        .all(|i| i.state == InstanceState::Stopped));
    assert!(run_dir.join("logs/a.log").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_engine_comes_back_and_the_gateway_routes_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(vec![fake("gen", "m", 2, &[]), fake("solo", "s", 1, &[])]);
    let d = Deployment::up(&valid(&s), opts(&dir)).await.unwrap();
    let gw = d.gateway_url().unwrap();
    let status = d.status();
    assert_eq!(
        status.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        vec!["gen-0", "gen-1", "solo"]
    );
    let gen1_port = s.engines[0].port + 1;

    // One replica of `m` dies: every request still succeeds, on the other replica.
    kill9(status[0].pid.unwrap());
    for _ in 0..10 {
        let (st, body) = complete(&gw, "m", false).await;
        assert_eq!(st, 200, "{body}");
    }
    let (_, body) = complete(&gw, "m", false).await;
    assert!(
        body.contains(&format!("port {gen1_port}"))
            || d.status()[0].state == InstanceState::Healthy,
        "{body}"
    );

    // The only replica of `s` dies: 503 (OpenAI error) or, once back, 200; never a hang.
    let old = status[2].pid.unwrap();
    kill9(old);
    let (st, body) = complete(&gw, "s", false).await;
    assert!(st == 503 || st == 200, "{st} {body}");
    if st == 503 {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "service_unavailable_error");
    }
    wait_for("both restarts", Duration::from_secs(30), || {
        let st = d.status();
        st[0].restarts == 1
            && st[2].restarts == 1
            && st.iter().all(|s| s.state == InstanceState::Healthy)
    })
    .await;
    let now = d.status();
    assert_ne!(now[2].pid, Some(old));
    assert_eq!(now[2].failures, 1);
    assert!(
        now[2].last_exit.as_deref().unwrap().contains("SIGKILL"),
        "{:?}",
        now[2].last_exit
    );
    // The restarted one is back in rotation (the supervisor says so at once).
    let (st, _) = complete(&gw, "s", false).await;
    assert_eq!(st, 200);
    let kinds: Vec<(String, EventKind)> = d
        .events()
        .into_iter()
        .map(|e| (e.instance, e.kind))
        .collect();
    assert!(
        kinds.contains(&("solo".into(), EventKind::Crashed)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("solo".into(), EventKind::Restarted)),
        "{kinds:?}"
    );
    // Time-slicing: the other engines were left alone.
    assert_eq!(now[1].restarts, 0);
    d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_failures_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(vec![fake("flaky", "f", 1, &[("EXIT_AFTER", "0.3")])]);
    s.supervise.max_failures = 2;
    s.gateway = None;
    let d = Deployment::up(&valid(&s), opts(&dir)).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(30), d.failed())
        .await
        .expect("never gave up");
    assert!(
        why.contains("gave up after 3 failures (max_failures = 2)"),
        "{why}"
    );
    assert!(why.contains("exit status 1"), "{why}");
    let st = d.status();
    assert_eq!(st[0].state, InstanceState::Failed);
    assert_eq!(st[0].restarts, 2);
    d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_name_the_engine_and_show_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(vec![
        fake("ok", "a", 1, &[]),
        fake("broken", "b", 1, &[("EXIT_AT_START", "1")]),
    ]);
    let e = Deployment::up(&valid(&s), opts(&dir))
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("engine `broken` did not start"), "{e}");
    assert!(e.contains("exit status 2"), "{e}");
    assert!(e.contains("cannot load model"), "{e}");
    let state = deploy::state::read(&dir.path().join("run")).unwrap();
    assert_eq!(state.phase, "failed");
    for i in &state.instances {
        assert!(i.pid.is_none_or(|p| !alive(p)), "{} left running", i.name);
    }

    // Never healthy: the start timeout is named.
    let dir = tempfile::tempdir().unwrap();
    s.engines = vec![fake("slow", "a", 1, &[("READY_AFTER", "100")])];
    s.engines[0].start_timeout = Duration::from_secs(1);
    let e = Deployment::up(&valid(&s), opts(&dir))
        .await
        .err()
        .expect("must time out")
        .to_string();
    assert!(e.contains("within 1s (start_timeout)"), "{e}");

    // The gateway's port is taken: fails at once, before any engine starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.engines = vec![fake("a", "a", 1, &[])];
    s.gateway.as_mut().unwrap().address = taken.local_addr().unwrap().to_string();
    let t0 = Instant::now();
    let e = format!(
        "{:#}",
        Deployment::up(&valid(&s), opts(&dir))
            .await
            .err()
            .expect("port in use")
    );
    assert!(e.contains("gateway: cannot listen on"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

/// Under MPS a crash of one client takes all of them down: the supervisor stops the others
/// and restarts every one, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_fault_restarts_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str| {
        let port = free_ports(1);
        InstanceSpec {
            name: name.into(),
            engine: name.into(),
            model: name.into(),
            url: format!("http://127.0.0.1:{port}"),
            proc: ProcSpec {
                name: name.into(),
                argv: vec!["python3".into(), FAKE.into(), port.to_string(), name.into()],
                env: vec![],
                log_path: dir.path().join(format!("{name}.log")),
                console: false,
            },
            start_timeout: Duration::from_secs(20),
            // vLLM's readiness rule on one test: /health, then the model in /v1/models.
            ready_model: Some(name.into()),
        }
    };
    let opts = SuperviseOptions {
        max_failures: 3,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        stop_timeout: Duration::from_secs(3),
        shared_fault: true,
    };
    let sup = Supervisor::start(
        vec![mk("gen"), mk("embed")],
        opts,
        Arc::new(|_: &deploy::supervisor::Snapshot| {}),
        Arc::new(|_: &str, _: bool| {}),
        CancellationToken::new(),
        None,
    )
    .await
    .unwrap();
    let before: Vec<u32> = sup.instances().iter().map(|s| s.pid.unwrap()).collect();
    kill9(before[1]);
    wait_for("both restarted", Duration::from_secs(30), || {
        let st = sup.instances();
        st.iter()
            .all(|s| s.restarts == 1 && s.state == InstanceState::Healthy)
    })
    .await;
    let after: Vec<u32> = sup.instances().iter().map(|s| s.pid.unwrap()).collect();
    assert_ne!(before[0], after[0], "the innocent client was not restarted");
    assert!(!alive(before[0]));
    let ev = sup.events();
    assert!(
        ev.iter()
            .any(|e| e.instance == "gen" && e.kind == EventKind::StoppedForFault),
        "{ev:?}"
    );
    // Restarted in start order: gen before embed.
    let order: Vec<&str> = ev
        .iter()
        .filter(|e| e.kind == EventKind::Restarted)
        .map(|e| e.instance.as_str())
        .collect();
    assert_eq!(order, vec!["gen", "embed"]);
    sup.shutdown().await;
    for p in after {
        assert!(!alive(p));
    }
}

/// vLLM's readiness: `/health` answers 200 before the API serves the model, so an instance
/// that asks for the listing is not started until `/v1/models` names its model; one whose
/// model never shows fails its start with a message naming the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_model_listing() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str, list_after: &str, timeout: u64| {
        let port = free_ports(1);
        InstanceSpec {
            name: name.into(),
            engine: name.into(),
            model: name.into(),
            url: format!("http://127.0.0.1:{port}"),
            proc: ProcSpec {
                name: name.into(),
                argv: vec!["python3".into(), FAKE.into(), port.to_string(), name.into()],
                env: vec![("LIST_AFTER".into(), list_after.into())],
                log_path: dir.path().join(format!("{name}.log")),
                console: false,
            },
            start_timeout: Duration::from_secs(timeout),
            ready_model: Some(name.into()),
        }
    };
    let opts = SuperviseOptions {
        max_failures: 1,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        stop_timeout: Duration::from_secs(3),
        shared_fault: false,
    };
    let t0 = Instant::now();
    let sup = Supervisor::start(
        vec![mk("listed", "1.5", 20)],
        opts.clone(),
        Arc::new(|_: &deploy::supervisor::Snapshot| {}),
        Arc::new(|_: &str, _: bool| {}),
        CancellationToken::new(),
        None,
    )
    .await
    .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "ready before the model was listed ({:?})",
        t0.elapsed()
    );
    assert_eq!(sup.instances()[0].state, InstanceState::Healthy);
    sup.shutdown().await;

    let err = Supervisor::start(
        vec![mk("never", "1000", 2)],
        opts,
        Arc::new(|_: &deploy::supervisor::Snapshot| {}),
        Arc::new(|_: &str, _: bool| {}),
        CancellationToken::new(),
        None,
    )
    .await
    .err()
    .expect("a model never listed must fail the start");
    let msg = format!("{err:#}");
    assert!(msg.contains("/v1/models"), "{msg}");
}

/// The real MPS logs of a client fault on the H100 (`testdata/mps/`): one client wrote
/// through a wild pointer (pid 563), the other (562) died with it.
const CAPTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../testdata/mps/mps-client-fault-h100.log"
));
/// The same on the H200 under `colocate up`: gen (474) wrote through a wild pointer,
/// embed (510) was hit; this server names the culprit.
const CAPTURE_H200: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../testdata/mps/mps-client-fault-h200.log"
));

/// The lines of one "== name" section of the H100 capture.
fn capture_section(name: &str) -> Vec<&'static str> {
    section_of(CAPTURE, name)
}

fn section_of(capture: &'static str, name: &str) -> Vec<&'static str> {
    capture
        .lines()
        .skip_while(|l| *l != format!("== {name}"))
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect()
}

/// `text` with every number equal to a key of `pids` (as a whole run of digits) replaced:
/// the captured clients become the processes under test.
fn swap_pids(text: &str, pids: &[(u32, u32)]) -> String {
    let mut out = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        let n: Option<u32> = digits.parse().ok();
        match pids.iter().find(|(from, _)| Some(*from) == n) {
            Some((_, to)) => out.push_str(&to.to_string()),
            None => out.push_str(digits),
        }
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

/// Appends lines to an MPS log in `dir`, as the daemon does.
fn append_log(dir: &std::path::Path, file: &str, lines: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))
        .unwrap();
    f.write_all(lines.as_bytes()).unwrap();
}

/// Writes the captured control and server logs with the captured clients 563 (faulty) and
/// 562 (innocent) replaced by `faulty` and `innocent`.
fn write_captured_fault(dir: &std::path::Path, faulty: u32, innocent: u32) {
    write_capture(dir, CAPTURE, &[(563, faulty), (562, innocent)]);
}

/// Writes `capture`'s control and server logs into `dir` with its pids swapped.
fn write_capture(dir: &std::path::Path, capture: &'static str, pids: &[(u32, u32)]) {
    for file in ["control.log", "server.log"] {
        let text: String = section_of(capture, file)
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        append_log(dir, file, &swap_pids(&text, pids));
    }
}

#[test]
fn swap_pids_replaces_whole_numbers_only() {
    assert_eq!(
        swap_pids(
            "[2026-11-23 20:10:31.563 Server 597] {PID: 563, x 5630}",
            &[(563, 42)]
        ),
        "[2026-11-23 20:10:31.42 Server 597] {PID: 42, x 5630}"
    );
    assert!(capture_section("server.log")[1].ends_with("] 563"));
}

/// Under MPS the daemon's log names both clients of a fault while their processes live on
/// (wedged: a client with a sticky error can do no GPU work): the supervisor records the
/// fault, stops both and restarts both; the state file and `status` show it. A later fault
/// naming only processes that are gone is recorded, and restarts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mps_fault_in_the_log_restarts_every_engine_and_status_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("mps-log");
    std::fs::create_dir_all(&logs).unwrap();
    let mut s = spec(vec![
        fake("gen", "model-gen", 1, &[]),
        fake("embed", "model-embed", 1, &[]),
    ]);
    s.gateway = None;
    let d = Deployment::up_with_mps_logs(&valid(&s), opts(&dir), &logs)
        .await
        .unwrap();
    assert!(d.mps_faults().is_empty());
    let before: Vec<u32> = d.status().iter().map(|s| s.pid.unwrap()).collect();

    write_captured_fault(&logs, before[0], before[1]);
    wait_for("both engines restarted", Duration::from_secs(30), || {
        d.status()
            .iter()
            .all(|s| s.restarts == 1 && s.state == InstanceState::Healthy)
            && d.mps_faults().first().and_then(|f| f.action.as_deref())
                == Some("every engine of the GPU (gen, embed) restarted")
    })
    .await;

    let faults = d.mps_faults();
    assert_eq!(faults.len(), 1, "{faults:#?}");
    let f = &faults[0];
    assert_eq!(f.id, 1);
    assert_eq!(f.log_time, "2026-11-23 20:10:31.616");
    assert_eq!(f.engines(), vec!["gen", "embed"]);
    assert_eq!(f.clients.iter().map(|c| c.pid).collect::<Vec<_>>(), before);
    assert!(f.message.contains("sticky error"), "{}", f.message);

    let now = d.status();
    for (i, st) in now.iter().enumerate() {
        assert_ne!(st.pid, Some(before[i]), "{} was not restarted", st.name);
        assert!(!alive(before[i]), "{} was left running", st.name);
        assert_eq!(st.failures, 1, "{}: one fault, one failure", st.name);
    }
    let ev = d.events();
    for name in ["gen", "embed"] {
        assert!(
            ev.iter()
                .any(|e| e.instance == name && e.kind == EventKind::MpsFault),
            "{ev:#?}"
        );
        assert!(
            ev.iter().any(|e| e.instance == name
                && e.kind == EventKind::StoppedForFault
                && e.message.contains("cannot go on after MPS fault #1")),
            "{ev:#?}"
        );
    }
    let order: Vec<&str> = ev
        .iter()
        .filter(|e| e.kind == EventKind::Restarted)
        .map(|e| e.instance.as_str())
        .collect();
    assert_eq!(order, vec!["gen", "embed"]);

    // The state file carries it and `status` shows it.
    let state = deploy::state::read(d.run_dir()).unwrap();
    assert_eq!(state.schema, deploy::state::SCHEMA);
    assert_eq!(state.mps_faults_total, 1);
    assert_eq!(state.mps_faults, faults);
    let lines = deploy::cli::mps_fault_lines(&state).join("\n");
    for needle in [
        "MPS faults: 1, last at ",
        "(daemon log 2026-11-23 20:10:31.616)",
        "#1 ",
        " gen, embed: sticky error set on client process",
        &format!(
            "clients: gen (pid {}), embed (pid {})",
            before[0], before[1]
        ),
        "action: every engine of the GPU (gen, embed) restarted",
    ] {
        assert!(lines.contains(needle), "missing {needle} in\n{lines}");
    }

    // A fault naming only the old processes: recorded, nothing restarted.
    append_log(
        &logs,
        "server.log",
        &format!(
            "[2026-11-23 20:12:00.000 Server   597] The following client process have a sticky error set:\n[2026-11-23 20:12:00.000 Server   597] {}\n",
            before[0]
        ),
    );
    wait_for("the late fault decided", Duration::from_secs(30), || {
        d.mps_faults().get(1).is_some_and(|f| f.action.is_some())
    })
    .await;
    let late = &d.mps_faults()[1];
    assert_eq!(late.engines(), vec!["gen"]);
    assert!(
        late.action.as_deref().unwrap().starts_with("recorded"),
        "{late:?}"
    );
    assert!(d.status().iter().all(|s| s.restarts == 1));
    assert_eq!(
        d.status().iter().map(|s| s.pid).collect::<Vec<_>>(),
        now.iter().map(|s| s.pid).collect::<Vec<_>>()
    );
    let run_dir = d.run_dir().to_path_buf();
    d.shutdown().await.unwrap();
    let state = deploy::state::read(&run_dir).unwrap();
    assert_eq!(state.mps_faults_total, 2);
}

/// The faulty client exits at once and the log names both: whichever the supervisor sees
/// first, the two make one recovery: one fault, one failure and one restart each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mps_fault_and_the_culprits_exit_make_one_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("mps-log");
    std::fs::create_dir_all(&logs).unwrap();
    let mk = |name: &str| {
        let port = free_ports(1);
        InstanceSpec {
            name: name.into(),
            engine: name.into(),
            model: name.into(),
            url: format!("http://127.0.0.1:{port}"),
            proc: ProcSpec {
                name: name.into(),
                argv: vec!["python3".into(), FAKE.into(), port.to_string(), name.into()],
                env: vec![],
                log_path: dir.path().join(format!("{name}.log")),
                console: false,
            },
            start_timeout: Duration::from_secs(20),
            ready_model: None,
        }
    };
    let opts = SuperviseOptions {
        max_failures: 3,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        stop_timeout: Duration::from_secs(3),
        shared_fault: true,
    };
    let sup = Supervisor::start(
        vec![mk("gen"), mk("embed")],
        opts,
        Arc::new(|_: &deploy::supervisor::Snapshot| {}),
        Arc::new(|_: &str, _: bool| {}),
        CancellationToken::new(),
        Some(deploy::gpu_glue::MpsFaultLog::for_log_dir(&logs)),
    )
    .await
    .unwrap();
    let before: Vec<u32> = sup.instances().iter().map(|s| s.pid.unwrap()).collect();
    kill9(before[1]);
    write_captured_fault(&logs, before[1], before[0]);
    wait_for("both restarted", Duration::from_secs(30), || {
        sup.instances()
            .iter()
            .all(|s| s.restarts == 1 && s.state == InstanceState::Healthy)
            && sup.mps_faults().first().and_then(|f| f.action.as_deref())
                == Some("every engine of the GPU (gen, embed) restarted")
    })
    .await;
    let faults = sup.mps_faults();
    assert_eq!(faults.len(), 1, "{faults:#?}");
    assert_eq!(faults[0].engines(), vec!["embed", "gen"]);
    for st in sup.instances() {
        assert_eq!(st.failures, 1, "{st:?}");
        assert_eq!(st.restarts, 1, "{st:?}");
    }
    assert!(!alive(before[0]));
    sup.shutdown().await;
}

/// The H200's log names the client that raised the fault: both engines are restarted, and
/// only the culprit is charged a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mps_fault_with_a_named_culprit_charges_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("mps-log");
    std::fs::create_dir_all(&logs).unwrap();
    let mut s = spec(vec![
        fake("gen", "model-gen", 1, &[]),
        fake("embed", "model-embed", 1, &[]),
    ]);
    s.gateway = None;
    let d = Deployment::up_with_mps_logs(&valid(&s), opts(&dir), &logs)
        .await
        .unwrap();
    let before: Vec<u32> = d.status().iter().map(|s| s.pid.unwrap()).collect();
    write_capture(&logs, CAPTURE_H200, &[(474, before[0]), (510, before[1])]);
    wait_for("both engines restarted", Duration::from_secs(30), || {
        d.status()
            .iter()
            .all(|s| s.restarts == 1 && s.state == InstanceState::Healthy)
            && d.mps_faults().first().and_then(|f| f.action.as_deref())
                == Some("every engine of the GPU (gen, embed) restarted")
    })
    .await;
    let faults = d.mps_faults();
    assert_eq!(faults.len(), 1, "{faults:#?}");
    assert_eq!(faults[0].log_time, "2026-12-01 01:56:55.959");
    assert_eq!(
        faults[0].clients_text(),
        format!(
            "gen (pid {}, raised it), embed (pid {})",
            before[0], before[1]
        )
    );
    assert!(
        faults[0]
            .message
            .starts_with(&format!("client {} raised a fatal GPU error", before[0])),
        "{}",
        faults[0].message
    );
    let st = d.status();
    assert_eq!((st[0].failures, st[1].failures), (1, 0), "{st:#?}");
    d.shutdown().await.unwrap();
}
