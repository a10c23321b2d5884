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
//! any other thread exists (the agent does it before its async runtime starts).

use std::io;

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
    Get(io::Error),
    #[error("setting the capabilities: {0}")]
    Set(io::Error),
    #[error("clearing the ambient capabilities: {0}")]
    Ambient(io::Error),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(io::Error),
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`; version 3 uses two of them (capabilities 0-31, 32-63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const VERSION_3: u32 = 0x2008_0522;

/// The calling thread's sets as 64-bit masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

fn get() -> Result<Sets, Error> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and two data structs, as capget(2) expects for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::Get(io::Error::last_os_error()));
    }
    let join = |f: fn(&Data) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(Sets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

fn set(sets: Sets) -> Result<(), Error> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let split = |mask: u64| [mask as u32, (mask >> 32) as u32];
    let (e, p, i) = (
        split(sets.effective),
        split(sets.permitted),
        split(sets.inheritable),
    );
    let data = [
        Data {
            effective: e[0],
            permitted: p[0],
            inheritable: i[0],
        },
        Data {
            effective: e[1],
            permitted: p[1],
            inheritable: i[1],
        },
    ];
    // SAFETY: header and two data structs, as capset(2) expects for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(Error::Set(io::Error::last_os_error()));
    }
    Ok(())
}

fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
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
    for cap in 0..=last_cap() {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            bounding = false;
            break;
        }
    }
    // SAFETY: prctl with integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(Error::Ambient(io::Error::last_os_error()));
    }
    set(Sets {
        effective: keep,
        permitted: keep,
        inheritable: 0,
    })?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::NoNewPrivs(io::Error::last_os_error()));
    }
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
