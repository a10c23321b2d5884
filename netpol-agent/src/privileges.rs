//! Least privilege. Loading and pinning the programs needs more than running them does;
//! once that is done the agent keeps only what enforcement needs from then on:
//!
//! - `CAP_BPF`: map reads and writes, pinning links (bpf(2) on this kernel);
//! - `CAP_NET_ADMIN`: attaching the programs to pods' veths as they appear (TCX).
//!
//! Everything else goes from the effective, permitted and inheritable sets, the bounding
//! set (when allowed: it needs `CAP_SETPCAP`, which a DaemonSet that already dropped it
//! does not have; its bounding set is then the runtime's) and the ambient set, and
//! `no_new_privs` is set, so nothing can come back through exec either.
//!
//! Capabilities are per thread and inherited by new threads: call [`keep_only`] before
//! any other thread exists (the agent does it before its async runtime starts). The
//! `caps` crate does the system calls (capget/capset, prctl for the bounding and ambient
//! sets).

use caps::errors::CapsError;
use caps::{CapSet, Capability, CapsHashSet};

pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// What running enforcement needs.
pub const ENFORCEMENT: [u32; 2] = [CAP_BPF, CAP_NET_ADMIN];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the capabilities: {0}")]
    Get(CapsError),
    #[error("setting the capabilities: {0}")]
    Set(CapsError),
    #[error("clearing the ambient capabilities: {0}")]
    Ambient(CapsError),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
}

/// The calling thread's sets as 64-bit masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

fn get() -> Result<Sets, Error> {
    let read = |set| {
        caps::read(None, set)
            .map(|caps| to_mask(&caps))
            .map_err(Error::Get)
    };
    Ok(Sets {
        effective: read(CapSet::Effective)?,
        permitted: read(CapSet::Permitted)?,
        inheritable: read(CapSet::Inheritable)?,
    })
}

/// Sets the three sets; the effective set first, so it never exceeds the permitted one.
fn set(sets: Sets) -> Result<(), Error> {
    for (set, mask) in [
        (CapSet::Effective, sets.effective),
        (CapSet::Permitted, sets.permitted),
        (CapSet::Inheritable, sets.inheritable),
    ] {
        caps::set(None, set, &from_mask(mask)).map_err(Error::Set)?;
    }
    Ok(())
}

fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

fn to_mask(caps: &CapsHashSet) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bitmask())
}

fn from_mask(mask: u64) -> CapsHashSet {
    caps::all()
        .into_iter()
        .filter(|c| mask & c.bitmask() != 0)
        .collect()
}

/// The capabilities this kernel knows, lowest first.
fn known() -> Vec<Capability> {
    let mut known: Vec<Capability> = caps::runtime::thread_all_supported().into_iter().collect();
    known.sort_by_key(Capability::index);
    known
}

/// What [`keep_only`] did.
#[derive(Clone, Copy, Debug)]
pub struct Dropped {
    pub before: u64,
    pub after: u64,
    /// Whether the bounding set could be reduced too.
    pub bounding: bool,
}

/// Keeps only `kept` (those of them the thread has) in every set; see the module doc.
pub fn keep_only(kept: &[u32]) -> Result<Dropped, Error> {
    let before = get()?;
    let keep = mask(kept) & before.permitted;
    // The bounding set first: it needs CAP_SETPCAP, which is about to go.
    let mut bounding = true;
    for cap in known() {
        if keep & cap.bitmask() != 0 {
            continue;
        }
        if caps::drop(None, CapSet::Bounding, cap).is_err() {
            bounding = false;
            break;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(Error::Ambient)?;
    set(Sets {
        effective: keep,
        permitted: keep,
        inheritable: 0,
    })?;
    nix::sys::prctl::set_no_new_privs().map_err(|errno| Error::NoNewPrivs(errno.into()))?;
    Ok(Dropped {
        before: before.effective,
        after: get()?.effective,
        bounding,
    })
}

/// Names of the capabilities in `mask` this module knows, the others by number.
pub fn names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|c| mask & (1u64 << c) != 0)
        .map(|c| match c {
            CAP_SETPCAP => "SETPCAP".to_string(),
            CAP_NET_ADMIN => "NET_ADMIN".to_string(),
            CAP_SYS_ADMIN => "SYS_ADMIN".to_string(),
            CAP_PERFMON => "PERFMON".to_string(),
            CAP_BPF => "BPF".to_string(),
            other => format!("cap{other}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_names() {
        assert_eq!(mask(&ENFORCEMENT), (1 << 39) | (1 << 12));
        assert_eq!(names(mask(&ENFORCEMENT)), vec!["NET_ADMIN", "BPF"]);
        assert_eq!(names(1 << 1), vec!["cap1"]);
    }

    /// Runs in a thread of its own: capabilities are per thread, so the test harness's
    /// other threads keep theirs.
    #[test]
    fn keep_only_leaves_exactly_what_was_kept() {
        let held = get().unwrap();
        if held.effective & mask(&ENFORCEMENT) != mask(&ENFORCEMENT) {
            eprintln!("skipped: needs CAP_BPF and CAP_NET_ADMIN (run as root)");
            return;
        }
        let (after, inner) = std::thread::spawn(|| {
            let dropped = keep_only(&ENFORCEMENT).unwrap();
            (dropped, get().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(after.after, mask(&ENFORCEMENT));
        assert_eq!(inner.permitted, mask(&ENFORCEMENT));
        assert_eq!(inner.inheritable, 0);
        // This thread is untouched.
        assert_eq!(get().unwrap(), held);
    }
}
