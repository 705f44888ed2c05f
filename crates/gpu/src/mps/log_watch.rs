//! Following the MPS daemon's logs (`control.log`, `server.log`) as they grow.
//!
//! Why a type of its own: the supervisor of a deployment watches for client faults while
//! the daemon runs, and tests (and a daemon someone else started) have only a log folder;
//! so watching needs nothing but the folder, never the control pipe.
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::parse::{LogParser, LoggedEvent};

/// The daemon's two log files under its log folder.
const LOG_FILES: [&str; 2] = ["control.log", "server.log"];

/// Reads what the daemon logged since the last poll, from the start of the logs on the
/// first poll. Files that do not exist yet are empty.
#[derive(Debug)]
pub struct MpsLogWatch {
    dir: PathBuf,
    tails: Vec<LogTail>,
}

impl MpsLogWatch {
    /// Watches `<log_dir>/control.log` and `<log_dir>/server.log` (the daemon's
    /// `CUDA_MPS_LOG_DIRECTORY`); no daemon needs to run.
    pub fn new(log_dir: &Path) -> Self {
        Self {
            dir: log_dir.to_path_buf(),
            tails: LOG_FILES
                .iter()
                .map(|f| LogTail::new(log_dir.join(f)))
                .collect(),
        }
    }

    /// The folder watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Events logged since the last poll: the control log's first, then the server's.
    pub fn poll(&mut self) -> Result<Vec<LoggedEvent>> {
        let mut out = Vec::new();
        for t in &mut self.tails {
            out.extend(t.poll()?);
        }
        Ok(out)
    }
}

/// Follows one log file from where the last poll stopped, whole lines only.
#[derive(Debug)]
struct LogTail {
    path: PathBuf,
    offset: u64,
    parser: LogParser,
}

impl LogTail {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            parser: LogParser::new(),
        }
    }

    fn poll(&mut self) -> Result<Vec<LoggedEvent>> {
        let mut f = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        let len = f.metadata()?.len();
        if len < self.offset {
            self.offset = 0; // truncated or replaced
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        self.offset += end as u64 + 1;
        Ok(self
            .parser
            .feed_text_logged(&String::from_utf8_lossy(&buf[..=end])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mps::MpsEvent;

    fn events(w: &mut MpsLogWatch) -> Vec<MpsEvent> {
        w.poll().unwrap().into_iter().map(|e| e.event).collect()
    }

    #[test]
    fn reads_whole_lines_once() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("server.log");
        let mut w = MpsLogWatch::new(tmp.path());
        assert!(w.poll().unwrap().is_empty());
        fs::write(&path, "[2026-11-23 20:10:31.752 Server   597] Client process 563 disconnected\n[2026-11-23 20:10:31").unwrap();
        assert_eq!(
            events(&mut w),
            vec![MpsEvent::ClientDisconnected { pid: 563 }]
        );
        assert!(w.poll().unwrap().is_empty());
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(
            &mut f,
            b".800 Server   597] Client process 562 disconnected\n",
        )
        .unwrap();
        let logged = w.poll().unwrap();
        assert_eq!(logged[0].event, MpsEvent::ClientDisconnected { pid: 562 });
        assert_eq!(logged[0].log_time, "2026-11-23 20:10:31.800");
    }

    #[test]
    fn both_logs_are_followed_and_a_replaced_log_is_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = MpsLogWatch::new(tmp.path());
        fs::write(
            tmp.path().join("control.log"),
            "[2026-11-23 20:10:31.248 Control   558] NEW CLIENT 562 from user 0: Server already exists\n",
        )
        .unwrap();
        fs::write(
            tmp.path().join("server.log"),
            "[2026-11-23 20:10:31.616 Server   597] The following client process have a sticky error set:\n[2026-11-23 20:10:31.616 Server   597] 562\n",
        )
        .unwrap();
        let ev = events(&mut w);
        assert_eq!(ev[0], MpsEvent::ClientConnected { pid: 562 });
        assert!(
            matches!(ev[1], MpsEvent::ClientFault { pid: Some(562), .. }),
            "{ev:?}"
        );
        // A shorter file is a new log: read from its start.
        fs::write(
            tmp.path().join("control.log"),
            "[2026-11-23 20:11:00.000 Control   558] NEW CLIENT 7 from user 0\n",
        )
        .unwrap();
        assert_eq!(events(&mut w), vec![MpsEvent::ClientConnected { pid: 7 }]);
    }
}
