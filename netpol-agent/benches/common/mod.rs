//! Shared by the bench binaries (`harness = false`): smoke mode, statistics, output
//! (Markdown on stdout, JSON under `target/bench/`), the machine description, and the
//! bpffs directory guard that removes `/sys/fs/bpf/netpol-bench-<pid>` on exit, on
//! panic and on SIGINT/SIGTERM/SIGHUP.
#![allow(dead_code)] // each bench uses a different subset

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

/// `--smoke` on the command line or `NETPOL_BENCH_SMOKE=1`: tiny sizes, a few seconds.
pub fn smoke() -> bool {
    std::env::args().any(|a| a == "--smoke")
        || std::env::var("NETPOL_BENCH_SMOKE").is_ok_and(|v| v == "1" || v == "true")
}

/// The title suffix of a run: ` — SMOKE sizes` for a smoke run, and `unoptimized build`
/// when this binary was built without optimisations (`cargo xtask test` builds the smoke runs
/// with the test profile, whose build it shares): such figures only prove the bench runs.
pub fn smoke_label(smoke: bool) -> &'static str {
    match (smoke, cfg!(debug_assertions)) {
        (false, false) => "",
        (true, false) => " — SMOKE sizes",
        (false, true) => " — unoptimized build",
        (true, true) => " — SMOKE sizes, unoptimized build",
    }
}

/// `cargo bench` passes `--bench`; anything else unknown is a mistake worth saying.
pub fn check_args() {
    for arg in std::env::args().skip(1) {
        if arg != "--smoke" && arg != "--bench" {
            eprintln!("ignoring unknown argument {arg:?} (known: --smoke)");
        }
    }
}

/// Median, quartiles, p99, min and max of a sample.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        assert!(!values.is_empty(), "empty sample");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Summary {
            n: v.len(),
            median: quantile(&v, 0.5),
            p25: quantile(&v, 0.25),
            p75: quantile(&v, 0.75),
            p99: quantile(&v, 0.99),
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.n, "median": self.median, "p25": self.p25, "p75": self.p75,
            "p99": self.p99, "min": self.min, "max": self.max,
        })
    }
}

/// Linear interpolation between closest ranks (the "R-7" definition) on sorted data.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The cargo target directory: `CARGO_TARGET_DIR`, else two levels above the `deps`
/// directory this binary runs from (`target/release/deps/<bench>-<hash>`).
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "deps"))
        .and_then(|deps| deps.parent()?.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Writes `target/bench/<name>.json` and says where.
pub fn write_json(name: &str, value: &Value) {
    let dir = target_dir().join("bench");
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).expect("JSON");
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text + "\n")) {
        Ok(()) => println!("\nJSON: {}", path.display()),
        Err(error) => eprintln!("cannot write {}: {error}", path.display()),
    }
}

/// nproc, CPU model, kernel, for the report.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({"nproc": nproc, "cpu": model, "kernel": kernel})
}

pub fn print_machine(machine: &Value) {
    println!(
        "machine: {} CPUs, {}, Linux {}",
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?")
    );
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
pub fn memory_mib() -> (f64, f64) {
    memory_of("self")
}

/// `VmRSS` and `VmHWM` of the process `/proc/<process>` (a pid, or `self`), in MiB.
pub fn memory_of(process: &str) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A Markdown table.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", header.join(" | "));
    let align: Vec<&str> = (0..header.len())
        .map(|i| if i == 0 { ":---" } else { "---:" })
        .collect();
    println!("|{}|", align.join("|"));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}

/// `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------
// bpffs directory and process hygiene

/// Directories to remove however the process ends.
static CLEANUP: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

const BPFFS: &str = "/sys/fs/bpf";
const PREFIX: &str = "netpol-bench-";

fn cleanup_all() {
    let dirs = match CLEANUP.lock() {
        Ok(mut dirs) => std::mem::take(&mut *dirs),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    for dir in dirs {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Root, bpffs, a private network namespace, and cleanup hooks; returns the bench's
/// bpffs directory (`/sys/fs/bpf/netpol-bench-<pid>`), or `None` (with the reason
/// printed) when the kernel side cannot be exercised here.
///
/// The private network namespace has no interfaces and no routes, so `Datapath::apply`
/// never finds an interface for a pod address and never attaches anything: without it,
/// the host's default route would resolve every local pod address to the uplink.
pub fn prepare_kernel_side() -> Option<BpffsDir> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: the kernel side needs root (CAP_BPF, CAP_NET_ADMIN)");
        return None;
    }
    remove_stale_dirs();
    if let Err(error) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!("skipped: cannot enter a private network namespace: {error}");
        return None;
    }
    install_cleanup_hooks();
    let dir = PathBuf::from(format!("{BPFFS}/{PREFIX}{}", std::process::id()));
    Some(BpffsDir::new(dir))
}

/// Removes directories of earlier bench processes that no longer exist (killed hard).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale {}", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Panic hook and a thread that turns SIGINT/SIGTERM/SIGHUP into cleanup + exit.
/// Must run before any other thread starts (the signal mask is inherited).
fn install_cleanup_hooks() {
    use nix::sys::signal::{SigSet, Signal};
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        cleanup_all();
        previous(info);
    }));
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    if set.thread_block().is_ok() {
        std::thread::spawn(move || {
            if let Ok(signal) = set.wait() {
                cleanup_all();
                eprintln!("interrupted by {signal:?}; bpffs directory removed");
                std::process::exit(128 + signal as i32);
            }
        });
    }
}

/// The bench's bpffs directory; removed on drop (and by the hooks above).
pub struct BpffsDir {
    pub path: PathBuf,
}

impl BpffsDir {
    fn new(path: PathBuf) -> BpffsDir {
        CLEANUP.lock().expect("cleanup list").push(path.clone());
        BpffsDir { path }
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        if let Ok(mut dirs) = CLEANUP.lock() {
            dirs.retain(|d| d != &self.path);
        }
    }
}
