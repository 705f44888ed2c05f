//! Bounded HTTP serving of an axum [`Router`](axum::Router), for `colocate serve` and the
//! gateway: whatever clients do with their connections, the server's tasks, descriptors
//! and waits stay bounded and it keeps answering.
//!
//! `axum::serve` accepts without limit and waits for ever on a client that never finishes
//! its request. [`Server`] keeps what nginx and uvicorn keep:
//!
//! - a cap on connections served at once (from the descriptor limit; beyond it, new
//!   connections wait in the listen backlog);
//! - a time limit on a request's head, which in hyper is also the idle keep-alive limit
//!   (slowloris, and clients that connect and say nothing);
//! - a time limit on a request's body (408 to slow senders);
//! - accept errors (EMFILE) answered with a back-off, never a spin or an exit;
//! - graceful shutdown on a signal future.
//!
//! - [`limits`]: the [`Limits`] and the descriptor arithmetic behind the cap.
//! - [`accept`]: accept errors sorted, and the back-off.
//! - [`body_deadline`]: the body deadline and its 408.
//! - [`limited_body`]: a body read whole within a size limit, 413 past it.
//! - [`server`]: the accept loop and connections.

pub mod accept;
pub mod body_deadline;
pub mod limited_body;
pub mod limits;
pub mod server;

pub use limits::{raise_fd_limit, Limits};
pub use server::{ConnectionStats, Server};

use std::time::Duration;

/// `1s`, `1.5s`, `250ms`: a limit as a user reads it in an error message.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if ms >= 1000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_user_writes_them() {
        assert_eq!(human(Duration::from_secs(60)), "60s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
    }
}
