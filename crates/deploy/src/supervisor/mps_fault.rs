//! MPS faults as the supervisor records them: what the daemon logged, which engines it
//! hit, and what the supervisor did about it. `colocate status` and the lab show these.

use serde::{Deserialize, Serialize};

use crate::gpu_glue::MpsNotice;

/// What kind of trouble the MPS logs reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MpsFaultKind {
    /// Client contexts got a sticky error (a GPU fault): every client named must go.
    ClientFault,
    /// The server failed or refused work; its clients notice by failing or exiting.
    ServerFailed,
}

/// A client process named in a fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultedClient {
    pub pid: u32,
    /// The engine replica it belongs to (its process or a descendant); `None` when no
    /// engine of this deployment had that process.
    pub engine: Option<String>,
    /// The server says this client's own work raised the error (not every driver says
    /// which one did: then no client is marked).
    #[serde(default)]
    pub culprit: bool,
}

/// One MPS fault: one event in the daemon's logs, however many clients it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MpsFault {
    /// 1, 2, ... in the order seen.
    pub id: u64,
    /// RFC 3339 time the supervisor read it (the clock of every other event).
    pub at: String,
    /// The daemon's own timestamp, verbatim (local time, no zone), to find it in the log.
    pub log_time: String,
    pub kind: MpsFaultKind,
    /// The clients named, in log order (empty for a server failure).
    #[serde(default)]
    pub clients: Vec<FaultedClient>,
    /// What the log said.
    pub message: String,
    /// What the supervisor did about it; `None` until it decided.
    #[serde(default)]
    pub action: Option<String>,
}

impl MpsFault {
    /// The engines named, in log order, each once.
    pub fn engines(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for e in self.clients.iter().filter_map(|c| c.engine.as_deref()) {
            if !out.contains(&e) {
                out.push(e);
            }
        }
        out
    }

    /// "gen (pid 12, raised it), pid 13": the clients for a one-line summary.
    pub fn clients_text(&self) -> String {
        self.clients
            .iter()
            .map(|c| {
                let raised = if c.culprit { ", raised it" } else { "" };
                match &c.engine {
                    Some(e) => format!("{e} (pid {}{raised})", c.pid),
                    None => format!("pid {}{raised}", c.pid),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How far apart (by the daemon's clock) a server's lines about one fault may be: both
/// captures log the whole fault within one millisecond; a loaded machine may take longer.
const SAME_FAULT_MS: i64 = 1000;

/// A fault read from the log, before it gets an id, a time and engine names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedFault {
    /// The daemon's time of its first line.
    pub log_time: String,
    pub kind: MpsFaultKind,
    /// The server that logged a client fault (merging key with `log_time`).
    pub server: Option<u32>,
    /// Every client named, in log order, each once.
    pub pids: Vec<u32>,
    /// The client the server says raised the error, when it says so.
    pub culprit: Option<u32>,
    pub message: String,
}

impl LoggedFault {
    /// Whether `other` continues this fault: the server names the culprit and lists every
    /// faulted client at once, line after line, and a poll may end between those lines.
    pub fn continued_by(&self, other: &LoggedFault) -> bool {
        self.kind == MpsFaultKind::ClientFault
            && other.kind == MpsFaultKind::ClientFault
            && self.server == other.server
            && (self.log_time == other.log_time
                || match (log_ms(&self.log_time), log_ms(&other.log_time)) {
                    (Some(a), Some(b)) => (0..=SAME_FAULT_MS).contains(&(b - a)),
                    _ => false,
                })
    }

    /// Takes `other`'s clients into this fault.
    pub fn absorb(&mut self, other: LoggedFault) {
        for p in other.pids {
            if !self.pids.contains(&p) {
                self.pids.push(p);
            }
        }
        self.culprit = self.culprit.or(other.culprit);
        self.message = client_fault_message(&self.pids, self.culprit, self.server);
    }
}

/// Milliseconds of a daemon timestamp (`2026-11-23 20:10:31.616`, local time: only
/// differences are used).
fn log_ms(t: &str) -> Option<i64> {
    chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|d| d.and_utc().timestamp_millis())
}

/// Groups one poll's notices into faults (see [`LoggedFault::continued_by`]).
pub fn group(notices: Vec<MpsNotice>) -> Vec<LoggedFault> {
    let mut out: Vec<LoggedFault> = Vec::new();
    for n in notices {
        let f = match n {
            MpsNotice::ClientFault {
                log_time,
                server,
                pid,
                culprit,
                message,
            } => {
                let pids: Vec<u32> = pid.into_iter().collect();
                let culprit = pid.filter(|_| culprit);
                LoggedFault {
                    message: if pids.is_empty() {
                        message
                    } else {
                        client_fault_message(&pids, culprit, Some(server))
                    },
                    log_time,
                    kind: MpsFaultKind::ClientFault,
                    server: Some(server),
                    pids,
                    culprit,
                }
            }
            MpsNotice::ServerFailed { log_time, message } => LoggedFault {
                log_time,
                kind: MpsFaultKind::ServerFailed,
                server: None,
                pids: Vec::new(),
                culprit: None,
                message,
            },
        };
        match out.last_mut() {
            Some(last) if last.continued_by(&f) => last.absorb(f),
            _ => out.push(f),
        }
    }
    out
}

fn client_fault_message(pids: &[u32], culprit: Option<u32>, server: Option<u32>) -> String {
    let list = pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let server = server
        .map(|s| format!(" (MPS server {s})"))
        .unwrap_or_default();
    match culprit {
        Some(c) => format!(
            "client {c} raised a fatal GPU error; sticky error set on client process {list}{server}"
        ),
        None => format!(
            "sticky error set on client process {list}{server}: the GPU faulted under these clients"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(t: &str, server: u32, pid: u32) -> MpsNotice {
        MpsNotice::ClientFault {
            log_time: t.into(),
            server,
            pid: Some(pid),
            culprit: false,
            message: String::new(),
        }
    }

    /// Both real captures, through the log follower, give one fault each: the H200's
    /// with its culprit.
    #[test]
    fn each_captured_fault_is_one_fault() {
        for (file, pids, culprit) in [
            ("mps-client-fault-h100.log", vec![563, 562], None),
            ("mps-client-fault-h200.log", vec![474, 510], Some(474)),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../testdata/mps")
                .join(file);
            let capture = std::fs::read_to_string(path).unwrap();
            let server_log: String = capture
                .lines()
                .skip_while(|l| *l != "== server.log")
                .skip(1)
                .take_while(|l| !l.starts_with("== "))
                .map(|l| format!("{l}\n"))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("server.log"), server_log).unwrap();
            let notices = crate::gpu_glue::MpsFaultLog::for_log_dir(dir.path())
                .poll()
                .unwrap();
            let g = group(notices);
            assert_eq!(g.len(), 1, "{file}: {g:#?}");
            assert_eq!(g[0].pids, pids, "{file}");
            assert_eq!(g[0].culprit, culprit, "{file}");
        }
    }

    #[test]
    fn lines_of_one_fault_a_moment_apart_merge_and_a_later_fault_does_not() {
        let a = group(vec![fault("2026-11-23 20:10:31.616", 597, 1)]).remove(0);
        let b = group(vec![fault("2026-11-23 20:10:32.100", 597, 2)]).remove(0);
        let c = group(vec![fault("2026-11-23 20:10:40.000", 597, 3)]).remove(0);
        assert!(a.continued_by(&b));
        assert!(!a.continued_by(&c));
        assert!(!b.continued_by(&a), "a fault does not continue backwards");
    }

    #[test]
    fn one_sticky_list_is_one_fault() {
        let t = "2026-11-23 20:10:31.616";
        let g = group(vec![
            fault(t, 597, 563),
            fault(t, 597, 562),
            MpsNotice::ServerFailed {
                log_time: t.into(),
                message: "Server 597 exited with status 1".into(),
            },
            fault("2026-11-23 20:11:00.000", 597, 700),
        ]);
        assert_eq!(g.len(), 3, "{g:?}");
        assert_eq!(g[0].pids, vec![563, 562]);
        assert!(
            g[0].message.contains("563, 562 (MPS server 597)"),
            "{}",
            g[0].message
        );
        assert_eq!(g[1].kind, MpsFaultKind::ServerFailed);
        assert_eq!(g[2].pids, vec![700]);
    }

    #[test]
    fn a_list_split_across_polls_merges() {
        let t = "2026-11-23 20:10:31.616";
        let mut first = group(vec![fault(t, 597, 563)]).remove(0);
        let second = group(vec![fault(t, 597, 562)]).remove(0);
        assert!(first.continued_by(&second));
        first.absorb(second);
        assert_eq!(first.pids, vec![563, 562]);
        let other_server = group(vec![fault(t, 600, 1)]).remove(0);
        assert!(!first.continued_by(&other_server));
    }

    #[test]
    fn engines_and_clients_read_well() {
        let f = MpsFault {
            id: 1,
            at: "2026-01-01T00:00:00Z".into(),
            log_time: "x".into(),
            kind: MpsFaultKind::ClientFault,
            clients: vec![
                FaultedClient {
                    pid: 12,
                    engine: Some("gen".into()),
                    culprit: true,
                },
                FaultedClient {
                    pid: 13,
                    engine: None,
                    culprit: false,
                },
                FaultedClient {
                    pid: 14,
                    engine: Some("gen".into()),
                    culprit: false,
                },
            ],
            message: String::new(),
            action: None,
        };
        assert_eq!(f.engines(), vec!["gen"]);
        assert_eq!(
            f.clients_text(),
            "gen (pid 12, raised it), pid 13, gen (pid 14)"
        );
    }
}
