//! `cargo xtask fuzz`: the cargo-fuzz target in `fuzz/` (libFuzzer, nightly), for a
//! fixed time, summed up in one line: inputs run, corpus size, coverage.
//!
//! The target (`fuzz/fuzz_targets/manifests.rs`) reads arbitrary text as local mode's
//! manifest directory, compiles it and checks invariants (see the file). It starts from
//! the committed seeds (`fuzz/seeds/manifests`, made from the conformance cases plus
//! hostile manifests) and grows `fuzz/corpus/manifests` (not committed). A crash leaves
//! the input in `fuzz/artifacts/manifests/`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, prereqs, ui};

/// `cargo xtask fuzz` without `--secs`.
pub const DEFAULT_SECS: u64 = 60;
/// The smoke run of `cargo xtask test`.
pub const SMOKE_SECS: u64 = 30;
const TARGET: &str = "manifests";
/// libFuzzer options: a slow input (10 s) or a memory blow-up is a failure too.
const LIBFUZZER_OPTIONS: [&str; 3] = ["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"];

/// What libFuzzer reported at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `stat::number_of_executed_units`.
    pub executed: Option<u64>,
    /// `stat::average_exec_per_sec`.
    pub per_second: Option<u64>,
    /// `stat::new_units_added`.
    pub new_units: Option<u64>,
    /// `stat::peak_rss_mb`.
    pub peak_rss_mb: Option<u64>,
    /// `corp: N/SIZE` of the last status line: inputs in the corpus.
    pub corpus: Option<u64>,
    /// `cov: N` of the last status line: coverage points.
    pub coverage: Option<u64>,
}

impl Stats {
    /// Takes what it knows from one line of libFuzzer's output.
    pub fn read_line(&mut self, line: &str) {
        let number = |text: &str| text.trim().parse::<u64>().ok();
        if let Some((name, value)) = line
            .strip_prefix("stat::")
            .and_then(|rest| rest.split_once(':'))
        {
            let slot = match name {
                "number_of_executed_units" => &mut self.executed,
                "average_exec_per_sec" => &mut self.per_second,
                "new_units_added" => &mut self.new_units,
                "peak_rss_mb" => &mut self.peak_rss_mb,
                _ => return,
            };
            *slot = number(value);
        } else if line.starts_with('#') {
            // `#1234\tNEW    cov: 2345 ft: 6789 corp: 56/7890b lim: ...`
            let mut words = line.split_whitespace();
            while let Some(word) = words.next() {
                match word {
                    "cov:" => self.coverage = words.next().and_then(number),
                    "corp:" => {
                        self.corpus = words
                            .next()
                            .and_then(|w| w.split('/').next())
                            .and_then(number);
                    }
                    _ => {}
                }
            }
        }
    }

    /// `123,456 inputs in 30 s (4,115/s), corpus 312 (57 new), coverage 4,321, peak 210 MB`.
    pub fn summary(&self, secs: u64) -> String {
        let n = |v: Option<u64>| {
            v.map_or_else(|| "?".to_string(), |n| crate::ui::thousands(n as usize))
        };
        let mut text = format!(
            "{} inputs in {secs} s ({}/s), corpus {} ({} new)",
            n(self.executed),
            n(self.per_second),
            n(self.corpus),
            n(self.new_units),
        );
        if let Some(coverage) = self.coverage {
            text.push_str(&format!(
                ", coverage {}",
                crate::ui::thousands(coverage as usize)
            ));
        }
        if let Some(rss) = self.peak_rss_mb {
            text.push_str(&format!(", peak {rss} MB"));
        }
        text
    }
}

/// `cargo fuzz` with nightly, from the workspace root, without the eBPF object.
fn cargo_fuzz(subcommand: &str, target_dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", subcommand])
        .arg("--fuzz-dir")
        .arg(cargo::workspace_root().join("fuzz"))
        .args(["--sanitizer", "none", "--debug-assertions"])
        .arg("--target-dir")
        .arg(target_dir)
        .arg(TARGET)
        .current_dir(cargo::workspace_root())
        // The fuzz target never loads BPF: netpol-agent's build.rs then skips the
        // eBPF build and embeds an empty object.
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Calls `each` with every line `reader` gives (lossy UTF-8, trailing whitespace cut),
/// as it comes.
fn each_line(reader: impl Read, mut each: impl FnMut(String) -> Result<()>) -> Result<()> {
    let mut reader = BufReader::new(reader);
    let mut bytes = Vec::new();
    while reader.read_until(b'\n', &mut bytes)? > 0 {
        each(String::from_utf8_lossy(&bytes).trim_end().to_owned())?;
        bytes.clear();
    }
    Ok(())
}

/// Builds the target, cargo's output shown as it comes; a failure names cargo's error
/// lines, so a summary that keeps only the last lines still says why.
fn build(target_dir: &Path) -> Result<()> {
    let mut child = cargo_fuzz("build", target_dir)
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo fuzz build")?;
    let mut lines = Vec::new();
    each_line(child.stderr.take().expect("stderr is piped"), |line| {
        eprintln!("{line}");
        lines.push(line);
        Ok(())
    })?;
    let status = child.wait()?;
    if status.success() {
        return Ok(());
    }
    let errors = error_lines(&lines);
    if errors.is_empty() {
        bail!("building the fuzz target failed ({status})");
    }
    bail!(
        "building the fuzz target failed ({status}): {}",
        errors.join(" | ")
    )
}

/// The lines of cargo's output that say what failed (`error: ...`, `error[E0308]: ...`),
/// at most five, each cut to 200 characters.
fn error_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|line| line.trim())
        .filter(|line| line.starts_with("error"))
        .take(5)
        .map(|line| line.chars().take(200).collect())
        .collect()
}

/// Where the fuzz target is built: `fuzz/` under the workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| cargo::workspace_root().join("target"), PathBuf::from)
        .join("fuzz")
}

/// Installs what is missing, builds the target, fuzzes for `secs` seconds and prints
/// the summary; fails on a crash, a timeout or a memory blow-up.
pub fn run(secs: u64) -> Result<()> {
    prereqs::ensure_fuzz()?;
    build_target()?;
    fuzz(secs)
}

/// Builds the target (cargo-fuzz installed already), once more if the first build fails.
pub fn build_target() -> Result<()> {
    ui::step(&format!("fuzz: building the {TARGET} target (nightly)"));
    let target_dir = target_dir();
    if let Err(first) = build(&target_dir) {
        // The build fetches crates and writes a separate target directory: a registry
        // hiccup or a full disk fails it for reasons outside the code. Once more, said
        // aloud; a second failure is the stage's.
        ui::warn(&format!("{first:#}; building once more"));
        build(&target_dir)?;
    }
    Ok(())
}

/// The target's build (cargo-fuzz installed first where missing) in a child process at
/// the lowest CPU priority (`nice -n 19`), its output in `target/fuzz/build.log`.
/// `cargo xtask test` starts it before the test tiers: it runs in the CPU time they and
/// the conformance worlds leave idle (mostly waiting for packets), instead of adding its
/// ten minutes to the run. It stays in the terminal's process group, so Ctrl-C stops it
/// too; dropped before [`BackgroundBuild::wait`], it kills the child xtask.
pub struct BackgroundBuild {
    child: Option<Child>,
    log: PathBuf,
    started: Instant,
}

impl BackgroundBuild {
    /// Starts `nice -n 19 xtask fuzz --build-only`.
    pub fn start() -> Result<BackgroundBuild> {
        let dir = target_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("build.log");
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let xtask = std::env::current_exe().context("finding the xtask binary")?;
        let child = Command::new("nice")
            .args(["-n", "19"])
            .arg(xtask)
            .args(["fuzz", "--build-only"])
            .current_dir(cargo::workspace_root())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the fuzz target's background build (nice)")?;
        ui::step(&format!(
            "fuzz: building the {TARGET} target in the background (nice 19; log {})",
            log.display()
        ));
        Ok(BackgroundBuild {
            child: Some(child),
            log,
            started: Instant::now(),
        })
    }

    /// Waits for the build; a failure names cargo's error lines and the log.
    pub fn wait(mut self) -> Result<()> {
        ui::step(&format!("fuzz: the {TARGET} target's background build"));
        let mut child = self.child.take().expect("waited once");
        let status = child.wait().context("waiting for the fuzz build")?;
        let took = self.started.elapsed().as_secs();
        if status.success() {
            ui::ok(&format!("built (started {took} s ago)"));
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let errors = error_lines(&lines);
        bail!(
            "building the fuzz target failed ({status}){}; log {}",
            match errors.is_empty() {
                true => String::new(),
                false => format!(": {}", errors.join(" | ")),
            },
            self.log.display()
        )
    }
}

impl Drop for BackgroundBuild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Fuzzes the built target for `secs` seconds and prints the summary; fails on a crash,
/// a timeout or a memory blow-up.
pub fn fuzz(secs: u64) -> Result<()> {
    let root = cargo::workspace_root();
    let target_dir = target_dir();
    ui::step(&format!("fuzz: {TARGET} for {secs} s"));
    let fuzz_dir = root.join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(TARGET);
    let seeds = fuzz_dir.join("seeds").join(TARGET);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    // Where the target writes its manifest directory (one per process).
    let work = target_dir.join("work");
    std::fs::create_dir_all(&work)?;
    let log_path = target_dir.join(format!("{TARGET}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    let mut child = cargo_fuzz("run", &target_dir)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .args(LIBFUZZER_OPTIONS)
        .env("NETPOL_FUZZ_DIR", &work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo fuzz run")?;
    // libFuzzer writes to stderr, cargo-fuzz's hints to stdout: read both into the log.
    let stdout = child.stdout.take().expect("stdout is piped");
    let stdout_reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut stats = Stats::default();
    let mut tail: VecDeque<String> = VecDeque::new();
    each_line(child.stderr.take().expect("stderr is piped"), |line| {
        writeln!(log, "{line}")?;
        stats.read_line(&line);
        if tail.len() == 40 {
            tail.pop_front();
        }
        tail.push_back(line);
        Ok(())
    })?;
    let status = child.wait()?;
    let hints = stdout_reader.join().unwrap_or_default();
    for line in &hints {
        writeln!(log, "{line}")?;
    }
    let _ = std::fs::remove_dir_all(&work);

    let summary = stats.summary(secs);
    if status.success() {
        ui::ok(&format!("fuzz {TARGET}: {summary}; no crash"));
        return Ok(());
    }
    // (cargo-fuzz also prints the input's bytes in one long line: the file is enough.)
    for line in tail.iter().chain(&hints).filter(|l| l.len() <= 300) {
        ui::note(line);
    }
    println!(
        "  {} fuzz {TARGET}: {summary}; FAILED (full log: {})",
        ui::red("✗"),
        log_path.display()
    );
    bail!("fuzz target {TARGET} failed ({status}); the input is in fuzz/artifacts/{TARGET}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_build_is_named_by_cargos_error_lines() {
        let output: Vec<String> = [
            "   Compiling netpol-compile v0.1.0",
            "error: failed to write /target/fuzz/x.rlib: No space left on device (os error 28)",
            "  --> src/lib.rs:1:1",
            "error[E0308]: mismatched types",
            "warning: build failed, waiting for other jobs to finish...",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            error_lines(&output),
            [
                "error: failed to write /target/fuzz/x.rlib: No space left on device (os error 28)",
                "error[E0308]: mismatched types",
            ]
        );
        assert!(error_lines(&output[..1]).is_empty());
    }

    #[test]
    fn reads_libfuzzer_final_stats_and_status_lines() {
        let mut stats = Stats::default();
        for line in [
            "INFO: seed corpus: files: 49 min: 120b max: 7296b total: 121240b rss: 40Mb",
            "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 40Mb",
            "#123456\tDONE   cov: 4321 ft: 9876 corp: 312/57Kb lim: 4096 exec/s: 4115 rss: 210Mb",
            "Done 123456 runs in 30 second(s)",
            "stat::number_of_executed_units: 123456",
            "stat::average_exec_per_sec:     4115",
            "stat::new_units_added:          57",
            "stat::slowest_unit_time_sec:    0",
            "stat::peak_rss_mb:              210",
        ] {
            stats.read_line(line);
        }
        assert_eq!(
            stats,
            Stats {
                executed: Some(123_456),
                per_second: Some(4115),
                new_units: Some(57),
                peak_rss_mb: Some(210),
                corpus: Some(312),
                coverage: Some(4321),
            }
        );
        assert_eq!(
            stats.summary(30),
            "123,456 inputs in 30 s (4,115/s), corpus 312 (57 new), coverage 4,321, peak 210 MB"
        );
        assert_eq!(
            Stats::default().summary(5),
            "? inputs in 5 s (?/s), corpus ? (? new)"
        );
    }
}
