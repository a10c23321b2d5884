//! Network-namespace plumbing: named namespaces (`ip netns`), `ip -batch` scripts,
//! per-namespace worker threads, sysctls, and the sweep of leftovers from dead runs.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::{Context, Error, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Where bpffs is mounted; agents started by the lab pin below it.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip [-n NETNS] -batch -` with `lines` on stdin: one process for many commands.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("spawning `ip` (is iproute2 installed?)")?;
    {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let script = lines.join("\n") + "\n";
        stdin
            .write_all(script.as_bytes())
            .context("writing the ip batch script")?;
    }
    let out = child
        .wait_with_output()
        .context("waiting for `ip -batch`")?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch` failed: {}\nscript:\n  {}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n  ")
        );
    }
    Ok(())
}

/// Creates the named network namespace `name` (`ip netns add`).
pub fn create_netns(name: &str) -> Result<()> {
    ip_batch(None, &[format!("netns add {name}")])
        .with_context(|| format!("creating network namespace {name}"))
}

/// Deletes named network namespaces, ignoring ones that are already gone.
/// Returns the first error but always tries every namespace.
pub fn delete_netns<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<()> {
    let lines: Vec<String> = names
        .into_iter()
        .filter(|n| netns_path(n).exists())
        .map(|n| format!("netns del {n}"))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    // -force: keep going after a failure so that one stuck namespace does not leak the rest.
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning `ip`")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all((lines.join("\n") + "\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "deleting network namespaces: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes a sysctl of the calling thread's network namespace, e.g.
/// `sysctl("net/ipv4/ip_forward", "1")`. `/proc/sys/net` resolves against the netns of
/// the thread that opens the file, so call this from a [`NetnsWorker`].
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that lives inside one network namespace and runs closures there.
///
/// Sockets stay in the namespace they were created in, so creating them on the worker
/// and using them anywhere (e.g. on the tokio runtime) is how the lab talks from
/// inside a pod without the process ever switching namespaces on a shared thread.
pub struct NetnsWorker {
    netns: String,
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NetnsWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsWorker")
            .field("netns", &self.netns)
            .finish()
    }
}

impl NetnsWorker {
    /// Starts a worker inside the named namespace.
    pub fn spawn(netns: &str) -> Result<Self> {
        let file = File::open(netns_path(netns))
            .with_context(|| format!("opening network namespace {netns}"))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<nix::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("netns-worker".into())
            .spawn(move || {
                let entered = setns(file.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                drop(file);
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })
            .context("spawning a netns worker thread")?;
        ready_rx
            .recv()
            .map_err(|_| Error::Failed(format!("netns worker for {netns} died during start")))?
            .with_context(|| format!("setns into {netns}"))?;
        Ok(Self {
            netns: netns.to_owned(),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// The namespace this worker lives in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
        reply: impl FnOnce(T) + Send + 'static,
    ) -> Result<()> {
        self.tx
            .as_ref()
            .expect("sender lives until drop")
            .send(Box::new(move || reply(f())))
            .map_err(|_| Error::Failed(format!("netns worker for {} has stopped", self.netns)))
    }

    /// Runs `f` inside the namespace and waits for its result (blocking).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(f, move |v| {
            let _ = tx.send(v);
        })?;
        rx.recv()
            .map_err(|_| Error::Failed(format!("netns worker for {} dropped a job", self.netns)))
    }

    /// Runs `f` inside the namespace; the result is awaited without blocking the runtime.
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(f, move |v| {
            let _ = tx.send(v);
        })?;
        rx.await
            .map_err(|_| Error::Failed(format!("netns worker for {} dropped a job", self.netns)))
    }
}

impl Drop for NetnsWorker {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a process with this pid currently exists.
pub fn pid_alive(pid: i32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Parses the owning pid out of a lab namespace name `np<pid>-…`.
pub fn netns_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("np")?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Parses the owning pid out of a pin directory or work directory `netpol-…-<pid>`.
pub fn dir_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("netpol-")?;
    let (_, pid) = rest.rsplit_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // No process has pid 0: a name ending in `-0` is some other numbering, not an owner.
    pid.parse().ok().filter(|pid| *pid > 0)
}

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub namespaces: Vec<String>,
    pub dirs: Vec<PathBuf>,
}

/// Removes leftovers of lab runs whose process is gone: namespaces `np<pid>-*`, pin
/// directories `/sys/fs/bpf/netpol-*-<pid>` and work directories `$TMP/netpol-*-<pid>`.
/// Leftovers of live processes (including this one) are never touched.
pub fn sweep_stale() -> Swept {
    let mut swept = Swept::default();
    let me = std::process::id() as i32;
    let dead = |pid: i32| pid != me && !pid_alive(pid);

    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if netns_owner(&name).is_some_and(dead) {
                swept.namespaces.push(name);
            }
        }
    }
    if !swept.namespaces.is_empty() {
        let _ = delete_netns(swept.namespaces.iter().map(String::as_str));
    }
    for base in [PathBuf::from(BPFFS), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dir_owner(&name).is_some_and(dead)
                && e.path().is_dir()
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                swept.dirs.push(e.path());
            }
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners() {
        assert_eq!(netns_owner("np123-0-node"), Some(123));
        assert_eq!(netns_owner("np123-"), None);
        assert_eq!(netns_owner("npx-1"), None);
        assert_eq!(netns_owner("cni-1234"), None);
        assert_eq!(dir_owner("netpol-lab0-4242"), Some(4242));
        assert_eq!(dir_owner("netpol"), None);
        assert_eq!(dir_owner("netpol-agent"), None);
        assert_eq!(dir_owner("netpol-x-"), None);
        assert_eq!(dir_owner("netpol-bench-kube-77-kube-0"), None, "not a pid");
    }
}
