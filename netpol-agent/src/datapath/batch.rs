//! Many entries of a hash map or LPM trie in one system call (`BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`; aya has no call for them). A change that writes thousands of
//! POLICY entries (a ClusterNetworkPolicy replaced: a row per endpoint and identity)
//! pays the system call once instead of per entry.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya::Pod;
use aya::maps::MapError;
use aya::sys::SyscallError;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs `cmd` on `keys` (and `values`, of the same length, for updates); `Err` carries
/// how many entries the kernel processed before the error.
fn batch<K: Pod, V: Pod>(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<(), (usize, std::io::Error)> {
    let count = u32::try_from(keys.len()).map_err(|_| (0, std::io::Error::other("too many")))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a live, initialised `batch` member of `union bpf_attr`, its size
    // is passed; `keys` (and `values`) hold `count` entries of the map's key (value)
    // size, laid out back to back (`Pod`: `#[repr(C)]`, no padding), and outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        Err((attr.count as usize, std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn error(call: &'static str, io_error: std::io::Error) -> MapError {
    MapError::SyscallError(SyscallError { call, io_error })
}

/// Inserts or replaces every `(key, value)` in the map open at `fd`.
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), MapError> {
    assert_eq!(keys.len(), values.len(), "a value per key");
    if keys.is_empty() {
        return Ok(());
    }
    batch(BPF_MAP_UPDATE_BATCH, fd, keys, Some(values))
        .map_err(|(_, io_error)| error("bpf_map_update_batch", io_error))
}

/// Removes every key of `keys` from the map open at `fd`; keys it lacks are no error
/// (the kernel stops at the first, then goes on after it).
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, mut keys: &[K]) -> Result<(), MapError> {
    // Each round gets past one missing key at least: bounded by the keys.
    while !keys.is_empty() {
        match batch::<K, u8>(BPF_MAP_DELETE_BATCH, fd, keys, None) {
            Ok(()) => return Ok(()),
            Err((done, io_error)) if io_error.raw_os_error() == Some(libc::ENOENT) => {
                keys = &keys[(done + 1).min(keys.len())..];
            }
            Err((_, io_error)) => return Err(error("bpf_map_delete_batch", io_error)),
        }
    }
    Ok(())
}
