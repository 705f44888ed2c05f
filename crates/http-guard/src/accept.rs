//! Accept errors sorted into "this one connection failed" and "the process is out of
//! something", with a back-off for the latter so that a full descriptor table (EMFILE)
//! neither spins the accept loop nor ends the server.

use std::io;
use std::time::Duration;

/// First and longest pause after a resource error.
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// True when the error concerns only the connection being accepted (the peer gave up
/// before we took it): take the next one at once.
pub fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// The pause before the next accept after consecutive resource errors (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM): 10 ms doubling to 1 s, back to the start after a success. While the
/// process is out of descriptors the pending connection stays in the backlog; retrying at
/// once would only spin.
#[derive(Debug, Default)]
pub struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// Records a resource error; returns how long to wait.
    pub fn failed(&mut self) -> Duration {
        let d = self.next.unwrap_or(BACKOFF_START);
        self.next = Some((d * 2).min(BACKOFF_MAX));
        d
    }

    /// Records a successful accept.
    pub fn succeeded(&mut self) {
        self.next = None;
    }

    /// True right after the first error of a run (log it once, not on every retry).
    pub fn first_failure(&self) -> bool {
        self.next == Some(BACKOFF_START * 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), BACKOFF_START);
        assert!(b.first_failure());
    }

    #[test]
    fn per_connection_errors_are_told_apart() {
        assert!(is_connection_error(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
    }
}
