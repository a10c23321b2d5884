//! What both ends of a probe share: the TCP greeting, the tokens that tell a lost
//! request from a lost reply, and what a probe can observe. Probes (`probe.rs`), servers
//! (`serve.rs`) and crafted SCTP (`sctp.rs`) import this; it imports none of them.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The byte a TCP server sends right after accepting.
pub(crate) const GREETING: u8 = b'!';

/// UDP tokens (and SCTP initiate tags) seen by any server of one lab.
pub(crate) type SeenTokens = Arc<Mutex<HashSet<u64>>>;

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A token no other probe of this process uses (UDP sends it, SCTP its low 32 bits).
pub(crate) fn next_token() -> u64 {
    NEXT_TOKEN.fetch_add(1, Ordering::Relaxed)
}

/// What a probe observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The exchange completed in both directions.
    Allowed,
    /// No answer before the timeout: what a policy drop looks like.
    Blocked,
    /// The request got through but the answer did not (TCP: handshake completed but the
    /// greeting never arrived; UDP: the server saw the datagram, its echo was lost).
    /// Never expected: it means replies of an allowed flow are dropped.
    OneWay,
    /// An active error rather than silence: RST, ICMP unreachable, a local error.
    /// Never expected either: the lab itself is broken.
    Rejected(String),
}

impl Outcome {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Outcome::Allowed)
    }

    pub fn is_blocked(&self) -> bool {
        matches!(self, Outcome::Blocked)
    }

    /// Whether this outcome is the one a probe expecting `allowed` (or blocked) wants.
    pub fn matches(&self, allowed: bool) -> bool {
        if allowed {
            self.is_allowed()
        } else {
            self.is_blocked()
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allowed => f.write_str("allowed"),
            Outcome::Blocked => f.write_str("blocked"),
            Outcome::OneWay => f.write_str("one-way (reply lost)"),
            Outcome::Rejected(e) => write!(f, "rejected ({e})"),
        }
    }
}
