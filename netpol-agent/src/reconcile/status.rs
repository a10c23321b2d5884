//! The status file (`--status-file`): what the agent has put into the kernel, so tests and
//! tools wait for "in the kernel" rather than sleep.

use serde::Serialize;

/// What the agent has put into the kernel, written to `--status-file` after each apply.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Status {
    /// `.generation` of the manifest set now in the kernel (0 when there is none); in
    /// Kubernetes mode the highest resourceVersion of the objects in the kernel.
    pub generation: u64,
    pub endpoints: usize,
    pub policies: usize,
    pub invalid: usize,
    pub attached: usize,
    pub pending: Vec<String>,
    /// What did not fit in the kernel's maps, one line each (`Pod x/c: not programmed:
    /// ENDPOINTS is full (capacity 4); ...`), at most [`REFUSED_LISTED`] of them.
    pub refused: Vec<String>,
}

/// At most this many refusals are listed in the status file (the log names them all).
pub const REFUSED_LISTED: usize = 100;

/// Writes the status atomically (temporary file, then rename).
pub(super) fn write(path: &std::path::Path, status: &Status) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}
