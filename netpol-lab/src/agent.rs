//! Running the real agent (or any program honouring the same CLI) in the lab's node
//! namespace, per README.md ("Using the agent").

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::lab::Lab;
use crate::manifest::ManifestDir;
use crate::netns;

/// How long [`Drop`] waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);

/// Name prefix of the pods' host-side veths in the lab (`v<i>`; hosts' are `x<i>`), passed
/// to the agent as `--pod-interface-prefix`.
pub const POD_INTERFACE_PREFIX: &str = "v";

/// The agent's status file (`--status-file`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AgentStatus {
    pub generation: u64,
    pub endpoints: u64,
    pub policies: u64,
    pub invalid: u64,
    pub attached: u64,
}

/// A running agent. Dropping it stops it (SIGTERM, then SIGKILL after 5 s) and removes
/// its pin directory. Declare it after the [`Lab`] so that it is dropped first.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    status: PathBuf,
    flow_socket: PathBuf,
    pin_dir: PathBuf,
    /// Leave the pinned programs and maps when dropped (a crash test's restart adopts
    /// them); the lab removes them in the end.
    keep_pins: bool,
}

impl AgentProcess {
    /// Starts `agent_bin run --manifests DIR --bpffs-dir /sys/fs/bpf/netpol-<lab id>
    /// --status-file <workdir>/agent-status.json --node-name lab-node` inside the node
    /// namespace, with stdout and stderr appended to `<workdir>/agent.log`.
    ///
    /// The process enters the node's network namespace itself (setns before exec)
    /// instead of going through `ip netns exec`: the latter remounts /sys in a private
    /// mount namespace, which hides the bpffs mounted at /sys/fs/bpf.
    pub fn start(lab: &Lab, agent_bin: &Path, manifests: &ManifestDir) -> Result<Self> {
        Self::start_on(lab, 0, agent_bin, manifests)
    }

    /// [`AgentProcess::start`] for node `node` of a [`Lab::with_nodes`] lab: in that
    /// node's namespace, with `--node-name` its name and its own pin directory
    /// ([`Lab::node_pin_dir`]); node `n` > 0 logs to `agent-node<n>.log` and has
    /// `agent-node<n>-status.json` and `flows-node<n>.sock`.
    pub fn start_on(
        lab: &Lab,
        node: usize,
        agent_bin: &Path,
        manifests: &ManifestDir,
    ) -> Result<Self> {
        let source = [
            std::ffi::OsString::from("--manifests"),
            manifests.path().as_os_str().to_owned(),
        ];
        Self::start_with_source_on(lab, node, agent_bin, &source)
    }

    /// [`AgentProcess::start`] with other source arguments instead of `--manifests DIR`,
    /// e.g. `--kubeconfig FILE` (Kubernetes mode).
    pub fn start_with_source(
        lab: &Lab,
        agent_bin: &Path,
        source: &[std::ffi::OsString],
    ) -> Result<Self> {
        Self::start_with_source_on(lab, 0, agent_bin, source)
    }

    /// [`AgentProcess::start_with_source`] for node `node` (see [`AgentProcess::start_on`]).
    pub fn start_with_source_on(
        lab: &Lab,
        node: usize,
        agent_bin: &Path,
        source: &[std::ffi::OsString],
    ) -> Result<Self> {
        let Some(node_ns) = lab.nodes().get(node) else {
            bail!("no node {node} (the lab has {})", lab.nodes().len());
        };
        let suffix = match node {
            0 => String::new(),
            n => format!("-node{n}"),
        };
        let log = lab.workdir().join(format!("agent{suffix}.log"));
        let status = lab.workdir().join(format!("agent{suffix}-status.json"));
        let flow_socket = lab.workdir().join(format!("flows{suffix}.sock"));
        let pin_dir = lab.node_pin_dir(node);
        // A status left by a previous agent of this lab must not satisfy a wait.
        match std::fs::remove_file(&status) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", status.display())),
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let netns_file = File::open(netns::netns_path(&node_ns.netns))
            .with_context(|| format!("opening network namespace {}", node_ns.netns))?;
        let netns_fd = netns_file.as_raw_fd();

        let mut cmd = Command::new(agent_bin);
        cmd.arg("run")
            .args(source)
            .arg("--bpffs-dir")
            .arg(&pin_dir)
            .arg("--status-file")
            .arg(&status)
            .arg("--node-name")
            .arg(&node_ns.name)
            // Pods' host veths are v<i>: covered the moment they appear.
            .args(["--pod-interface-prefix", POD_INTERFACE_PREFIX])
            .arg("--flow-socket")
            .arg(&flow_socket)
            // The log is a file: no colour codes in it.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: a Ctrl-C at the terminal reaches us, and we stop
            // the agent in order.
            .process_group(0);
        // SAFETY: setns(2) and prctl(2) are async-signal-safe; the closure only makes
        // those syscalls, on a descriptor that stays open in the parent until spawn
        // returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If we die without running Drop (SIGKILL), the agent is told to stop
                // too instead of running on in an orphaned namespace. (Tied to the
                // spawning thread: create and drop an AgentProcess on one thread.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting agent {}", agent_bin.display()))?;
        drop(netns_file);
        Ok(Self {
            child: Some(child),
            log,
            status,
            flow_socket,
            pin_dir,
            keep_pins: false,
        })
    }

    /// Kills the agent with SIGKILL, as a crash would, and leaves everything it pinned in
    /// place: its programs keep enforcing until the next agent adopts them.
    pub fn crash(mut self) -> Result<()> {
        self.keep_pins = true;
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            child.wait().context("waiting for the killed agent")?;
        }
        Ok(())
    }

    /// The agent's flow-log socket (`netpol-agent flows --socket`).
    pub fn flow_socket(&self) -> PathBuf {
        self.flow_socket.clone()
    }

    /// Its bpffs directory (`--bpffs-dir`), where its maps are pinned.
    pub fn bpffs_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Its status file (`--status-file`).
    pub fn status_path(&self) -> &Path {
        &self.status
    }

    /// The agent's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The current status file, if the agent has written one.
    pub fn status(&self) -> Option<AgentStatus> {
        let text = std::fs::read_to_string(&self.status).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits (bounded) until the agent reports `generation` or later. Fails early, with
    /// the log tail, if the agent exits.
    pub fn wait_generation(&mut self, generation: u64, timeout: Duration) -> Result<AgentStatus> {
        self.wait_generation_unless(generation, timeout, || false)
    }

    /// [`AgentProcess::wait_generation`] that also gives up as soon as `cancelled()`
    /// returns true (e.g. on Ctrl-C).
    pub fn wait_generation_unless(
        &mut self,
        generation: u64,
        timeout: Duration,
        cancelled: impl Fn() -> bool,
    ) -> Result<AgentStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if cancelled() {
                bail!("cancelled while waiting for generation {generation}");
            }
            if let Some(s) = self.status().filter(|s| s.generation >= generation) {
                return Ok(s);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(exit) = child.try_wait()?
            {
                bail!(
                    "the agent exited ({exit}) before reporting generation {generation}\n{}",
                    self.log_tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent did not report generation {generation} within {timeout:?} \
                     (status: {:?})\n{}",
                    self.status(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The last `lines` lines of the agent's log, indented, with a header.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            // The tail of a large log is in its last 64 KiB.
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
            let _ = f.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        format!(
            "--- last {} lines of {} ---\n  {}",
            tail.len(),
            self.log.display(),
            tail.join("\n  ")
        )
    }

    /// `Some(status)` if the agent has exited on its own.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// Stops the agent now (see [`Drop`]); returns how it exited.
    pub fn stop(&mut self) -> Result<Option<std::process::ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(POLL);
        }
        let _ = kill(pid, Signal::SIGKILL);
        Ok(Some(child.wait()?))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping the agent: {e:#}");
        }
        if !self.keep_pins && self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}
