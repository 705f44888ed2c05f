//! The accept loop out of file descriptors (EMFILE): it backs off instead of spinning,
//! stays up, and serves the waiting connection once descriptors are free again. A test
//! binary of its own: it lowers the whole process's descriptor limit.

use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use http_guard::{Limits, Server};

fn set_soft_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on structs we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = n as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

#[test]
fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", get(|| async { "ok" }));
    let limits = Limits {
        max_connections: 1000,
        header_read_timeout: Duration::from_secs(5),
        body_read_timeout: Duration::from_secs(5),
    };
    let server = Server::new(listener, app, limits);
    let stats = server.stats();
    rt.spawn(server.serve(std::future::pending()));

    // Fill the descriptor table, leaving one slot for the client's socket.
    set_soft_nofile(256);
    let mut fillers = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        fillers.push(f);
    }
    fillers.pop();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    // The server cannot accept it: EMFILE, again and again, with a back-off.
    std::thread::sleep(Duration::from_millis(1500));
    let errors = stats.accept_errors();
    assert!(
        errors >= 1,
        "accept never failed: the test did not exhaust descriptors"
    );
    assert!(
        errors <= 12,
        "{errors} accept errors in 1.5 s: the loop spins"
    );
    assert_eq!(stats.accepted(), 0);

    // Descriptors come back: the waiting client is served.
    drop(fillers);
    set_soft_nofile(4096);
    let t0 = Instant::now();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = String::new();
    client.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("ok"),
        "{out}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(stats.accepted(), 1);
}
