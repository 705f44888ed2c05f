//! The limits a server keeps, and the file-descriptor arithmetic behind the connection cap.

use std::time::Duration;

/// Descriptors kept free for everything that is not a client connection: model shards and
/// tokenizer files, logs, the runtime's own (epoll, eventfd), health checks, child pipes.
const FD_HEADROOM: u64 = 256;
/// Never more connections than this, whatever the descriptor limit: each costs memory
/// (hyper's buffers, a task), and an OpenAI server with this many clients at once is
/// overloaded anyway (nginx's default is 512 per worker).
const MAX_CONNECTIONS_CEILING: usize = 8192;
/// Never fewer than this, even under a tiny descriptor limit.
const MIN_CONNECTIONS: usize = 16;
/// [`raise_fd_limit`] raises the soft limit to the hard one but not past this: a huge soft
/// limit slows programs that close every descriptor at start (`close_range` emulation,
/// older Pythons), and the engines this process starts inherit it.
const FD_LIMIT_TARGET: u64 = 65_536;

/// How much a server takes from its clients before it cuts them off.
///
/// Every bound answers one kind of abuse that would otherwise pin a task and a descriptor
/// forever: a flood of connections (`max_connections`), a client that opens a connection
/// and trickles its request head or sends nothing at all (slowloris: `header_read_timeout`),
/// and a client that trickles its body (`body_read_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once. Beyond it the server stops accepting: new connections
    /// wait in the kernel's listen backlog until one closes, so tasks and descriptors stay
    /// bounded (nginx's `worker_connections`). Derived from the descriptor limit by
    /// [`Limits::from_fd_limit`].
    pub max_connections: usize,
    /// Time a client has to send a request's head (request line and headers), counted from
    /// the moment the connection is ready for one: right after accept, and after each
    /// response on a kept-alive connection. hyper runs this clock while a connection is
    /// idle, so it is also the keep-alive idle limit: an idle connection is closed after
    /// it (nginx: `client_header_timeout` 60 s, `keepalive_timeout` 75 s; uvicorn: 5 s).
    /// Keep it above the idle timeout of the clients' connection pools so that the client
    /// closes first (the gateway's pool to the engines idles out after 20 s).
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's whole body, counted from the arrival of its
    /// head. A slower sender gets `408` and the connection is closed (nginx:
    /// `client_body_timeout`). 60 s carries 32 MiB at half a megabyte a second.
    pub body_read_timeout: Duration,
}

impl Default for Limits {
    /// The defaults for a server whose connections cost one descriptor each.
    fn default() -> Self {
        Limits::from_fd_limit(1)
    }
}

impl Limits {
    /// Default timeouts and a connection cap that fits the process's current descriptor
    /// limit when each connection costs `fds_per_connection` descriptors (a proxy holds
    /// one to its client and one upstream: 2). Call [`raise_fd_limit`] first to get the
    /// most out of the hard limit.
    pub fn from_fd_limit(fds_per_connection: u64) -> Limits {
        Limits {
            max_connections: connection_cap(fd_soft_limit(), fds_per_connection),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
        }
    }
}

/// The connection cap for a descriptor limit: what is left after the headroom, shared out
/// per connection, within [`MIN_CONNECTIONS`, `MAX_CONNECTIONS_CEILING`].
pub fn connection_cap(fd_limit: u64, fds_per_connection: u64) -> usize {
    let per = fds_per_connection.max(1);
    let spare = fd_limit.saturating_sub(FD_HEADROOM) / per;
    usize::try_from(spare)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS_CEILING)
}

/// The process's soft `RLIMIT_NOFILE` (1024 when it cannot be read).
pub fn fd_soft_limit() -> u64 {
    read_nofile().map(|(soft, _)| soft).unwrap_or(1024)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (at most 65,536), as nginx, Go's
/// runtime and many servers do at start-up: distributions default the soft limit to 1024,
/// which a few hundred clients exhaust. Never lowers it. Returns the soft limit in force
/// afterwards.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let (soft, hard) = read_nofile()?;
    let target = hard.min(FD_LIMIT_TARGET);
    if target <= soft {
        return Ok(soft);
    }
    write_nofile(target, hard)?;
    Ok(target)
}

#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
fn read_nofile() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

#[cfg(unix)]
#[allow(clippy::unnecessary_cast)]
fn write_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(unix))]
fn read_nofile() -> std::io::Result<(u64, u64)> {
    Err(std::io::Error::other("no RLIMIT_NOFILE on this platform"))
}

#[cfg(not(unix))]
fn write_nofile(_soft: u64, _hard: u64) -> std::io::Result<()> {
    Err(std::io::Error::other("no RLIMIT_NOFILE on this platform"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_headroom_and_shares_descriptors_out() {
        assert_eq!(connection_cap(1024, 1), 768);
        assert_eq!(connection_cap(1024, 2), 384);
        assert_eq!(connection_cap(20_000, 1), MAX_CONNECTIONS_CEILING);
        assert_eq!(connection_cap(100, 1), MIN_CONNECTIONS);
        assert_eq!(connection_cap(1024, 0), 768);
        assert_eq!(connection_cap(u64::MAX, 1), MAX_CONNECTIONS_CEILING);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let before = fd_soft_limit();
        let after = raise_fd_limit().unwrap();
        assert!(after >= before);
        assert_eq!(fd_soft_limit(), after);
    }
}
