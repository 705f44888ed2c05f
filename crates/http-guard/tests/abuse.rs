//! Connection abuse against a real [`http_guard::Server`] on loopback: thousands of idle
//! connections, a slowloris head, a trickled body, and a graceful shutdown with a request
//! in flight. Short limits keep every test within a few seconds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::{get, post};
use axum::Router;
use http_guard::{ConnectionStats, Limits, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "done"
            }),
        )
}

struct Running {
    addr: SocketAddr,
    stats: ConnectionStats,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn start(limits: Limits) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(listener, app(), limits);
    let stats = server.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        stats,
        stop: Some(tx),
        task,
    }
}

fn limits(max_connections: usize, header: Duration, body: Duration) -> Limits {
    Limits {
        max_connections,
        header_read_timeout: header,
        body_read_timeout: body,
    }
}

/// Sends `request` on a fresh connection and reads until the server closes it.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn wait_for(what: &str, secs: f64, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed().as_secs_f64() < secs,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const GET_CLOSE: &str = "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_stay_under_the_cap_and_the_server_still_answers() {
    // Each idle connection costs two descriptors here (client and server side).
    let _ = http_guard::raise_fd_limit();
    let budget = http_guard::limits::fd_soft_limit().saturating_sub(300) / 2;
    let n = budget.min(2000) as usize;
    let cap = n * 3 / 4;
    // Long enough that the cap fills before the first idle ones are cut, even when a
    // loaded machine takes a second or two to open them all.
    let header = Duration::from_secs(3);
    let srv = start(limits(cap, header, Duration::from_secs(5))).await;

    let t0 = Instant::now();
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    wait_for("the cap to fill", 10.0, || {
        srv.stats.peak_connections() == cap
    })
    .await;
    println!(
        "{n} idle connections opened in {:?}, cap {cap}",
        t0.elapsed()
    );

    // A real client behind them is answered once the idle ones run out their time.
    let t1 = Instant::now();
    // The idle ones fill the cap at most twice over (n <= 2 x cap): two head timeouts.
    let resp = tokio::time::timeout(header * 4, exchange(srv.addr, GET_CLOSE))
        .await
        .expect("no answer within four head timeouts behind the idle connections");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok"), "{resp}");
    println!("answered after {:?}", t1.elapsed());

    // Every idle connection is cut at the head timeout; none outlives twice its time plus
    // its wait in the backlog.
    wait_for(
        "the idle connections to be closed",
        header.as_secs_f64() * 4.0,
        || srv.stats.open_connections() == 0,
    )
    .await;
    println!("all closed {:?} after opening", t0.elapsed());
    assert!(
        srv.stats.peak_connections() <= cap,
        "{}",
        srv.stats.peak_connections()
    );
    assert!(srv.stats.header_timeouts() >= n as u64);
    let mut buf = [0u8; 16];
    let first = idle.first_mut().unwrap();
    let got = first.read(&mut buf).await.unwrap_or(0);
    assert_eq!(got, 0, "an idle connection got bytes instead of EOF");
}

#[tokio::test]
async fn a_slowloris_head_is_cut_at_the_header_timeout() {
    let srv = start(limits(
        64,
        Duration::from_millis(800),
        Duration::from_secs(5),
    ))
    .await;
    let s = TcpStream::connect(srv.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let t0 = Instant::now();
    // One byte every 100 ms, for ever: the head never ends.
    let writer = tokio::spawn(async move {
        let head = b"GET / HTTP/1.1\r\nHost: t\r\n".iter().copied();
        let forever = head.chain(b"X-Slow: 1\r\n".iter().copied().cycle());
        for b in forever {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out))
        .await
        .expect("the slow client was never cut");
    let took = t0.elapsed();
    writer.abort();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(2500),
        "cut after {took:?}"
    );
    assert!(!String::from_utf8_lossy(&out).contains("200"));
    assert_eq!(srv.stats.header_timeouts(), 1);
    // The server goes on answering.
    assert!(exchange(srv.addr, GET_CLOSE)
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_trickled_body_gets_408_at_the_body_timeout() {
    let srv = start(limits(
        64,
        Duration::from_secs(5),
        Duration::from_millis(800),
    ))
    .await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        for _ in 0..100 {
            if wr.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out))
        .await
        .expect("the slow body was never cut");
    let took = t0.elapsed();
    writer.abort();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 800ms"), "{text}");
    assert!(text.contains("\"type\":\"timeout_error\""), "{text}");
    assert!(took < Duration::from_millis(2500), "cut after {took:?}");
    assert_eq!(srv.stats.body_timeouts(), 1);
    // A body sent at once passes.
    let body = "y".repeat(100);
    let resp = exchange(
        srv.addr,
        &format!("POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{body}"),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("100"),
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests_and_closes_idle_ones() {
    let mut srv = start(limits(64, Duration::from_secs(30), Duration::from_secs(30))).await;
    let addr = srv.addr;
    let in_flight = tokio::spawn(exchange(
        addr,
        "GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ));
    // A kept-alive connection, idle after its first answer, and one that never spoke:
    // neither may hold the shutdown for the 30 s head timeout.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut silent = TcpStream::connect(addr).await.unwrap();
    wait_for("three connections", 2.0, || {
        srv.stats.open_connections() == 3
    })
    .await;

    let t0 = Instant::now();
    srv.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), &mut srv.task)
        .await
        .expect("shutdown did not finish")
        .unwrap();
    let took = t0.elapsed();
    let resp = in_flight.await.unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("done"),
        "{resp}"
    );
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert_eq!(kept.read(&mut buf).await.unwrap_or(0), 0);
    assert_eq!(silent.read(&mut buf).await.unwrap_or(0), 0);
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}
