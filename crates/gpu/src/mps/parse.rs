//! Pure parsers for what the MPS control daemon says: replies on the control pipe and
//! lines of `control.log` / `server.log`. Kept free of I/O so they are unit-tested on
//! real captured text (testdata/mps/).
use anyhow::{bail, Result};
use serde::Serialize;

/// Something the supervisor may act on, parsed from the daemon's logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MpsEvent {
    /// A client's context has a sticky error (a fault): under MPS every client of that
    /// server is listed, the innocent ones too, and all of them die. `culprit`: the server
    /// says this client's own work raised the error (the H200 capture's driver logs that
    /// line before the sticky list; the H100 capture has only the list).
    ClientFault {
        pid: Option<u32>,
        culprit: bool,
        message: String,
    },
    /// The server stopped or refused work in a way clients notice (non-zero exit,
    /// not-ready / too-many-clients errors, a failed start).
    ServerFailed { message: String },
    /// The control daemon accepted a new client process.
    ClientConnected { pid: u32 },
    /// A client process left its server (normally or after a fault).
    ClientDisconnected { pid: u32 },
    /// A new MPS server is ready.
    ServerStarted { pid: u32 },
    /// An MPS server exited with this status (0 = asked to quit).
    ServerExited { pid: u32, status: i32 },
}

/// One log line: `[2026-11-23 20:10:31.616 Server   597] text`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine<'a> {
    pub timestamp: &'a str,
    /// "Control" or "Server".
    pub source: &'a str,
    pub pid: u32,
    pub text: &'a str,
}

/// Splits a log line into its parts; `None` for anything not in that shape.
pub fn parse_log_line(line: &str) -> Option<LogLine<'_>> {
    let rest = line.strip_prefix('[')?;
    let (head, text) = rest.split_once(']')?;
    // head = "2026-11-23 20:10:31.616 Server   597"
    let mut parts = head.split_whitespace();
    let date = parts.next()?;
    let time = parts.next()?;
    let source = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let ts_len = date.len() + 1 + time.len();
    Some(LogLine {
        timestamp: head.get(..ts_len)?,
        source,
        pid,
        text: text.trim(),
    })
}

/// An [`MpsEvent`] with the line it came from: when and by which process it was logged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedEvent {
    /// The daemon's own timestamp as written (`2026-11-23 20:10:31.616`: local time, no
    /// zone), kept verbatim so a report can be matched against the log.
    pub log_time: String,
    /// The process that wrote the line (the MPS server or control daemon).
    pub logged_by: u32,
    pub event: MpsEvent,
}

/// Turns log lines into [`MpsEvent`]s. It keeps the little state the logs need (the
/// sticky-error list spans several lines), so feed it lines in order across polls.
#[derive(Debug, Default)]
pub struct LogParser {
    in_sticky_list: bool,
}

impl LogParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Events in one line (none for most lines).
    pub fn feed(&mut self, line: &str) -> Vec<MpsEvent> {
        match parse_log_line(line) {
            Some(l) => self.events(&l),
            None => Vec::new(),
        }
    }

    /// Events in one line with its timestamp and writer.
    pub fn feed_logged(&mut self, line: &str) -> Vec<LoggedEvent> {
        let Some(l) = parse_log_line(line) else {
            return Vec::new();
        };
        self.events(&l)
            .into_iter()
            .map(|event| LoggedEvent {
                log_time: l.timestamp.to_string(),
                logged_by: l.pid,
                event,
            })
            .collect()
    }

    fn events(&mut self, l: &LogLine<'_>) -> Vec<MpsEvent> {
        let text = l.text;
        if self.in_sticky_list {
            if let Ok(pid) = text.parse::<u32>() {
                return vec![MpsEvent::ClientFault {
                    pid: Some(pid),
                    culprit: false,
                    message: format!("client {pid} has a sticky error set (server {})", l.pid),
                }];
            }
            self.in_sticky_list = false;
        }
        if text.contains("have a sticky error set") || text.contains("has a sticky error set") {
            self.in_sticky_list = true;
            return Vec::new();
        }
        // "Client {PID: 474, Context: 1} encountered a fatal GPU error."
        if text.starts_with("Client {") && text.contains("encountered a fatal GPU error") {
            let pid = text.split_once("PID:").and_then(|(_, r)| first_number(r));
            return vec![MpsEvent::ClientFault {
                pid,
                culprit: true,
                message: format!(
                    "client {} encountered a fatal GPU error (server {})",
                    pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                    l.pid
                ),
            }];
        }
        // The rest of the server's fault handling ("Server is handling a fatal GPU
        // error", "... to be torn down", "error trigging process ...") names the same
        // clients as the sticky list that follows: not failures of their own.
        if text.starts_with("Server is handling a fatal GPU error")
            || text.ends_with("to be torn down")
            || text.ends_with("will be torn down")
        {
            return Vec::new();
        }
        if let Some(rest) = text.strip_prefix("NEW CLIENT ") {
            return first_number(rest)
                .map(|pid| MpsEvent::ClientConnected { pid })
                .into_iter()
                .collect();
        }
        if let Some(rest) = text.strip_prefix("NEW SERVER ") {
            if text.ends_with("Ready") {
                return first_number(rest)
                    .map(|pid| MpsEvent::ServerStarted { pid })
                    .into_iter()
                    .collect();
            }
        }
        if let Some(rest) = text.strip_prefix("Client process ") {
            if text.ends_with("disconnected") {
                return first_number(rest)
                    .map(|pid| MpsEvent::ClientDisconnected { pid })
                    .into_iter()
                    .collect();
            }
        }
        // "Server 597 exited with status 0"
        if let (Some(rest), Some((_, status))) = (
            text.strip_prefix("Server "),
            text.split_once("exited with status "),
        ) {
            if let (Some(pid), Ok(status)) = (first_number(rest), status.trim().parse::<i32>()) {
                let mut ev = vec![MpsEvent::ServerExited { pid, status }];
                if status != 0 {
                    ev.push(MpsEvent::ServerFailed {
                        message: text.to_string(),
                    });
                }
                return ev;
            }
        }
        if let Some(code) = status_code(text) {
            // 806 (RPC failure) is how the server notices any client exit, faulty or
            // not: the capture shows it for clean exits too, so it is no fault by itself.
            if code != 806 && (805..=810).contains(&code) {
                return vec![MpsEvent::ServerFailed {
                    message: format!("{} ({})", text, cuda_mps_error_name(code)),
                }];
            }
        }
        let lower = text.to_ascii_lowercase();
        if l.source == "Server"
            && (lower.contains("fatal")
                || lower.contains("failed to start")
                || lower.contains("error"))
        {
            return vec![MpsEvent::ServerFailed {
                message: text.to_string(),
            }];
        }
        Vec::new()
    }

    /// Events in a block of text (a whole log or what was appended since the last poll).
    pub fn feed_text(&mut self, text: &str) -> Vec<MpsEvent> {
        text.lines().flat_map(|l| self.feed(l)).collect()
    }

    /// [`LogParser::feed_text`] with each event's timestamp and writer.
    pub fn feed_text_logged(&mut self, text: &str) -> Vec<LoggedEvent> {
        text.lines().flat_map(|l| self.feed_logged(l)).collect()
    }
}

fn first_number(s: &str) -> Option<u32> {
    let digits: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The CUDA error number in "... with status 807 ..." or "... status=807".
fn status_code(text: &str) -> Option<u32> {
    let idx = text.find("status")?;
    first_number(text[idx + "status".len()..].trim_start_matches([' ', '=', ':']))
}

/// CUDA's names for the MPS error codes (driver API `CUresult`).
pub fn cuda_mps_error_name(code: u32) -> &'static str {
    match code {
        805 => "CUDA_ERROR_MPS_CONNECTION_FAILED",
        806 => "CUDA_ERROR_MPS_RPC_FAILURE",
        807 => "CUDA_ERROR_MPS_SERVER_NOT_READY",
        808 => "CUDA_ERROR_MPS_MAX_CLIENTS_REACHED",
        809 => "CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED",
        810 => "CUDA_ERROR_MPS_CLIENT_TERMINATED",
        _ => "unknown MPS error",
    }
}

/// A reply that lists pids one per line (`get_server_list`, `get_client_list <pid>`).
/// An empty reply is an empty list; any other text is the daemon's error message.
pub fn parse_pid_list(reply: &str) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for line in reply.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.parse::<u32>() {
            Ok(p) => pids.push(p),
            Err(_) => bail!(
                "unexpected reply from the MPS control daemon: {}",
                reply.trim()
            ),
        }
    }
    Ok(pids)
}

/// The reply to `get_default_active_thread_percentage` ("100.0").
pub fn parse_percentage(reply: &str) -> Result<f64> {
    let t = reply.trim();
    match t.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => bail!("unexpected reply to get_default_active_thread_percentage: '{t}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURE: &str = include_str!("../../../../testdata/mps/mps-client-fault-h100.log");
    const CAPTURE_H200: &str = include_str!("../../../../testdata/mps/mps-client-fault-h200.log");

    /// The part of `capture` after a "== name" header, up to the next header.
    fn section_of(capture: &str, name: &str) -> String {
        let start = capture.find(&format!("== {name}\n")).expect(name) + name.len() + 4;
        let rest = &capture[start..];
        rest[..rest.find("\n== ").map(|i| i + 1).unwrap_or(rest.len())].to_string()
    }

    fn section(name: &str) -> String {
        section_of(CAPTURE, name)
    }

    #[test]
    fn the_h200_fault_names_the_culprit_then_both_clients_and_nothing_else() {
        let events = LogParser::new().feed_text(&section_of(CAPTURE_H200, "server.log"));
        let faults: Vec<(Option<u32>, bool)> = events
            .iter()
            .filter_map(|e| match e {
                MpsEvent::ClientFault { pid, culprit, .. } => Some((*pid, *culprit)),
                _ => None,
            })
            .collect();
        assert_eq!(
            faults,
            vec![(Some(474), true), (Some(474), false), (Some(510), false)],
            "{events:#?}"
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, MpsEvent::ServerFailed { .. })),
            "{events:#?}"
        );
        let control = LogParser::new().feed_text(&section_of(CAPTURE_H200, "control.log"));
        assert!(control.contains(&MpsEvent::ServerStarted { pid: 499 }));
        assert!(!control.iter().any(|e| matches!(
            e,
            MpsEvent::ServerFailed { .. } | MpsEvent::ClientFault { .. }
        )));
    }

    #[test]
    fn log_lines_split_into_parts() {
        let l = parse_log_line("[2026-11-23 20:10:31.616 Server   597] The following client process have a sticky error set:").unwrap();
        assert_eq!(l.timestamp, "2026-11-23 20:10:31.616");
        assert_eq!(l.source, "Server");
        assert_eq!(l.pid, 597);
        assert!(l.text.starts_with("The following"));
        assert!(parse_log_line("victim started").is_none());
        assert!(parse_log_line("[garbage]").is_none());
    }

    #[test]
    fn the_captured_fault_names_both_clients() {
        let events = LogParser::new().feed_text(&section("server.log"));
        let faults: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                MpsEvent::ClientFault { pid, .. } => *pid,
                _ => None,
            })
            .collect();
        assert_eq!(faults, vec![563, 562], "{events:#?}");
        let disconnected: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                MpsEvent::ClientDisconnected { pid } => Some(*pid),
                _ => None,
            })
            .collect();
        assert_eq!(disconnected, vec![563, 562, 617, 640]);
        // The 806 lines of clean exits are not failures.
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, MpsEvent::ServerFailed { .. })),
            "{events:#?}"
        );
    }

    #[test]
    fn logged_events_keep_the_daemons_time_and_writer() {
        let events = LogParser::new().feed_text_logged(&section("server.log"));
        let first = &events[0];
        assert_eq!(first.log_time, "2026-11-23 20:10:31.616");
        assert_eq!(first.logged_by, 597);
        assert!(matches!(
            first.event,
            MpsEvent::ClientFault { pid: Some(563), .. }
        ));
        assert_eq!(
            events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
            LogParser::new().feed_text(&section("server.log"))
        );
    }

    #[test]
    fn the_control_log_gives_clients_and_the_server_lifecycle() {
        let events = LogParser::new().feed_text(&section("control.log"));
        assert!(events.contains(&MpsEvent::ServerStarted { pid: 597 }));
        assert!(events.contains(&MpsEvent::ServerExited {
            pid: 597,
            status: 0
        }));
        let clients: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                MpsEvent::ClientConnected { pid } => Some(*pid),
                _ => None,
            })
            .collect();
        assert_eq!(clients, vec![563, 562, 563, 562, 617, 617, 640, 640]);
        assert!(!events
            .iter()
            .any(|e| matches!(e, MpsEvent::ServerFailed { .. })));
    }

    #[test]
    fn refusals_and_bad_exits_are_failures() {
        let mut p = LogParser::new();
        let ev = p.feed("[2026-11-23 20:10:45.354 Control   558] Server 597 exited with status 1");
        assert!(matches!(ev[1], MpsEvent::ServerFailed { .. }));
        let ev =
            p.feed("[2026-11-23 20:10:45.354 Server   597] Client request failed with status 807");
        match &ev[0] {
            MpsEvent::ServerFailed { message } => {
                assert!(message.contains("SERVER_NOT_READY"), "{message}")
            }
            e => panic!("{e:?}"),
        }
        // A sticky list ends at the first non-pid line.
        p.feed("[2026-11-23 20:10:31.616 Server   597] The following client process have a sticky error set:");
        assert_eq!(p.feed("[2026-11-23 20:10:31.616 Server   597] 12").len(), 1);
        assert!(
            p.feed("[2026-11-23 20:10:31.616 Server   597] Client process 12 disconnected")
                .len()
                == 1
        );
        assert!(p
            .feed("[2026-11-23 20:10:31.616 Server   597] 13")
            .is_empty());
    }

    #[test]
    fn the_captured_server_list_reply_parses() {
        assert_eq!(
            parse_pid_list(&section("server list during")).unwrap(),
            vec![597]
        );
        assert_eq!(parse_pid_list("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_pid_list("597\n612\n").unwrap(), vec![597, 612]);
        let err = parse_pid_list("Cannot find MPS control daemon process\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Cannot find MPS control daemon"), "{err}");
    }

    #[test]
    fn percentages_parse_and_are_bounded() {
        assert_eq!(parse_percentage("100.0\n").unwrap(), 100.0);
        assert_eq!(parse_percentage("30").unwrap(), 30.0);
        assert!(parse_percentage("140").is_err());
        assert!(parse_percentage("oops").is_err());
    }
}
