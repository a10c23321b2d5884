//! `matrix --html` opened in a real browser: Debian's chromium, headless, from `file://`.
//!
//! The page must load without a console message or an uncaught exception, and the cells
//! the browser drew (counted in the DOM it dumps after the page's script ran, and by that
//! script into `data-dom-*` attributes) must be those of `matrix --json` on the same
//! manifests, with and without `--apply`. Each page and a screenshot of it are written to
//! `target/test-output/matrix_html/`.
//!
//! Without chromium (`/usr/bin/chromium`, or `NETPOL_TEST_CHROMIUM`) the tests print
//! `SKIPPED` on stderr and check nothing, unless `NETPOL_TEST_REQUIRE_CHROMIUM` is set:
//! `cargo xtask test` installs chromium and sets it, so there a missing browser fails.

use std::io::{Read, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Debian's chromium (`apt-get install chromium`), unless `NETPOL_TEST_CHROMIUM` names
/// another.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Set by `cargo xtask test` once chromium is installed (same name in xtask/src/cargo.rs).
const REQUIRE_CHROMIUM: &str = "NETPOL_TEST_REQUIRE_CHROMIUM";
/// A page this small loads in a second or two; chromium is killed after this.
const TIMEOUT: Duration = Duration::from_secs(120);
const WINDOW: (u32, u32) = (1400, 1000);

/// Three namespaces; web and data dual-stack. db admits TCP/5432 from namespaces
/// team=web, under a name that would run a script if it were not escaped; the frontends
/// admit TCP/80 from an IPv6 block only, so dual-stack sources read `~`.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {team: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-a, namespace: web, labels: {role: frontend}}
spec: {containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.1}, {ip: "fd00::101"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-b, namespace: web, labels: {role: frontend}}
spec: {containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}, {ip: "fd00::102"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: data, labels: {role: db}}
spec: {containers: [{name: main, ports: [{containerPort: 5432}]}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.1}, {ip: "fd00::201"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cache, namespace: data, labels: {role: cache}}
spec: {containers: [{name: main, ports: [{containerPort: 6379}]}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}, {ip: "fd00::202"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: monitor, namespace: ops, labels: {role: monitor}}
spec: {containers: [{name: main, ports: [{containerPort: 9090}]}]}
status: {phase: Running, podIP: 10.3.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: ops, labels: {role: dns}}
spec: {containers: [{name: main, ports: [{containerPort: 53, protocol: UDP}]}]}
status: {phase: Running, podIPs: [{ip: 10.3.0.2}, {ip: "fd00::302"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: "<img src=x onerror=console.error('xss')>", namespace: data}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: web}}}], ports: [{port: 5432}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-v6, namespace: web}
spec:
  podSelector: {matchLabels: {role: frontend}}
  ingress: [{from: [{ipBlock: {cidr: "fd00::/64"}}], ports: [{port: 80}]}]
"#;

/// monitor may no longer open anything (newly blocked); db's policy is replaced by one
/// that admits every namespace (newly allowed).
const APPLY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: monitor-quiet, namespace: ops}
spec: {podSelector: {matchLabels: {role: monitor}}, policyTypes: [Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: "<img src=x onerror=console.error('xss')>", namespace: data}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 5432}]}]
"#;

/// Where pages and screenshots are kept: `target/test-output/matrix_html/`.
fn output_dir() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is target/tmp");
    let dir = target.join("test-output").join("matrix_html");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A scratch directory under target/tmp, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("matrix-html-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Says so on stderr (past the test harness's capture, so `cargo test` shows it).
fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn chromium() -> PathBuf {
    std::env::var_os("NETPOL_TEST_CHROMIUM").map_or_else(|| CHROMIUM.into(), PathBuf::from)
}

/// Whether chromium is there; without it, says the test is skipped (or fails when
/// `cargo xtask test` said it installed it).
fn chromium_present(test: &str) -> bool {
    let chromium = chromium();
    if chromium.exists() {
        return true;
    }
    assert!(
        std::env::var_os(REQUIRE_CHROMIUM).is_none(),
        "{REQUIRE_CHROMIUM} is set but {} is missing",
        chromium.display()
    );
    say(&format!(
        "SKIPPED: chromium not installed ({} missing; `cargo xtask test` installs it): {test} \
         checked nothing",
        chromium.display()
    ));
    false
}

/// Runs `netpol-agent matrix ARGS --manifests DIR`; stdout.
fn matrix(args: &[&str], manifests: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .arg("matrix")
        .args(args)
        .arg("--manifests")
        .arg(manifests)
        .output()
        .expect("run netpol-agent");
    assert!(
        output.status.success(),
        "matrix {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// What chromium made of a page.
struct Browsed {
    /// The DOM after the page's script ran (`--dump-dom`).
    dom: String,
    /// Console messages and uncaught exceptions (`--enable-logging=stderr`).
    console: Vec<String>,
}

/// Opens `page` in headless chromium: dumps its DOM and writes a screenshot. Killed
/// (with every process it started) after [`TIMEOUT`].
fn browse(page: &Path, screenshot: &Path, profile: &Path) -> Browsed {
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-breakpad",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout ends the renderer and the rest too.
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!(
                "chromium did not finish {url} within {TIMEOUT:?}: killed\n{}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = stdout.join().unwrap();
    let log = stderr.join().unwrap();
    assert!(status.success(), "chromium {url}: {status}\n{log}");
    let console = log
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .map(str::to_owned)
        .collect();
    Browsed { dom, console }
}

/// Cell counts by kind: cells, allowed, blocked, partial, changed, newly blocked, newly
/// allowed (the page's `data-*` names).
const KINDS: [&str; 7] = [
    "cells",
    "allowed",
    "blocked",
    "partial",
    "changed",
    "newly-blocked",
    "newly-allowed",
];

type Counts = std::collections::BTreeMap<&'static str, usize>;

/// The counts of `--json`: of every table, and of each (by port).
fn json_counts(report: &Value) -> (Counts, Vec<(String, Counts)>) {
    let changes = report["diff"]["changes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut tables = Vec::new();
    for table in report["matrix"]["tables"].as_array().unwrap() {
        let port = table["port"].as_str().unwrap().to_string();
        let mut counts: Counts = KINDS.iter().map(|k| (*k, 0)).collect();
        for cell in table["cells"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap())
        {
            let Some(state) = cell.as_str() else { continue };
            *counts.get_mut("cells").unwrap() += 1;
            *counts.get_mut(state).expect("allowed, blocked or partial") += 1;
        }
        for change in changes.iter().filter(|c| c["port"] == port.as_str()) {
            *counts.get_mut("changed").unwrap() += 1;
            // Reach orders blocked < partial < allowed.
            let rank = |v: &Value| {
                ["blocked", "partial", "allowed"]
                    .iter()
                    .position(|s| v == s)
            };
            let kind = if rank(&change["after"]) < rank(&change["before"]) {
                "newly-blocked"
            } else {
                "newly-allowed"
            };
            *counts.get_mut(kind).unwrap() += 1;
        }
        tables.push((port, counts));
    }
    let mut total: Counts = KINDS.iter().map(|k| (*k, 0)).collect();
    for (_, counts) in &tables {
        for (kind, n) in counts {
            *total.get_mut(kind).unwrap() += n;
        }
    }
    if let Some(diff) = report["diff"].as_object() {
        assert_eq!(total["changed"], changes.len());
        assert_eq!(
            total["newly-blocked"],
            diff["newly_blocked"].as_u64().unwrap() as usize
        );
        assert_eq!(
            total["newly-allowed"],
            diff["newly_allowed"].as_u64().unwrap() as usize
        );
    }
    (total, tables)
}

/// The value of `name="..."` in a tag.
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

/// The opening tags of `element` in `dom` that contain `marker`.
fn tags<'a>(dom: &'a str, element: &str, marker: &str) -> Vec<&'a str> {
    dom.match_indices(&format!("<{element} "))
        .map(|(at, _)| &dom[at..at + dom[at..].find('>').unwrap()])
        .filter(|tag| tag.contains(marker))
        .collect()
}

/// The cells drawn in `html` (a table section or the whole page), counted by class.
fn drawn(html: &str) -> Counts {
    let mut counts: Counts = KINDS.iter().map(|k| (*k, 0)).collect();
    for tag in tags(html, "td", "class=\"cell ") {
        let classes: Vec<&str> = attribute(tag, "class").unwrap().split(' ').collect();
        for kind in KINDS {
            if kind == "cells" || classes.contains(&kind) {
                *counts.get_mut(kind).unwrap() += 1;
            }
        }
    }
    counts
}

/// The counts the page's script wrote into `data-dom-*` of `tag`, and those written
/// with the page (`data-*`).
fn attributes(tag: &str) -> (Counts, Counts) {
    let read = |prefix: &str| -> Counts {
        KINDS
            .iter()
            .map(|kind| {
                let value = attribute(tag, &format!("{prefix}{kind}"))
                    .unwrap_or_else(|| panic!("no {prefix}{kind} in {tag}"));
                (*kind, value.parse().unwrap())
            })
            .collect()
    };
    (read("data-dom-"), read("data-"))
}

/// Runs `matrix --json` and `matrix --html` with `extra` arguments, opens the page in
/// chromium and checks it against the JSON. Returns the DOM.
fn page_matches_json(name: &str, extra: &[&str], manifests: &Path) -> String {
    let report: Value = serde_json::from_str(&matrix(&[&["--json"], extra].concat(), manifests))
        .expect("--json prints JSON");
    let out = output_dir();
    let page = out.join(format!("{name}.html"));
    let screenshot = out.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&screenshot);
    let stdout = matrix(
        &[&["--html", page.to_str().unwrap()], extra].concat(),
        manifests,
    );
    assert_eq!(stdout, "", "--html alone prints nothing on stdout");

    let profile = Scratch::new(&format!("{name}-profile"));
    let browsed = browse(&page, &screenshot, &profile.0);
    assert!(
        browsed.console.is_empty(),
        "{name}: the page logged to the console:\n{}",
        browsed.console.join("\n")
    );
    let dom = browsed.dom;
    assert!(
        tags(&dom, "body", "")
            .iter()
            .any(|t| attribute(t, "data-ready") == Some("yes")),
        "{name}: the page's script did not run to its end"
    );

    let (total, tables) = json_counts(&report);
    assert!(total["cells"] > 0);
    assert_eq!(drawn(&dom), total, "{name}: cells drawn, against --json");
    let totals = tags(&dom, "p", "id=\"totals\"");
    assert_eq!(totals.len(), 1);
    let (counted, written) = attributes(totals[0]);
    assert_eq!(counted, total, "{name}: cells the page's script counted");
    assert_eq!(written, total, "{name}: counts written with the page");

    let sections: Vec<&str> = dom.split("<section class=\"port\"").skip(1).collect();
    assert_eq!(sections.len(), tables.len(), "{name}: one table per port");
    for (section, (port, expected)) in sections.iter().zip(&tables) {
        let tag = &section[..section.find('>').unwrap()];
        let tag = format!(" {tag}");
        assert_eq!(attribute(&tag, "data-port"), Some(port.as_str()));
        let section = &section[..section.find("</section>").unwrap()];
        assert_eq!(&drawn(section), expected, "{name} {port}: cells drawn");
        let (counted, written) = attributes(&tag);
        assert_eq!(&counted, expected, "{name} {port}: counted by the script");
        assert_eq!(&written, expected, "{name} {port}: written with the page");
    }

    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{}", screenshot.display());
    let size = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((size(16), size(20)), WINDOW, "the screenshot is the window");
    say(&format!(
        "matrix_html: {} ({} cells), screenshot {}",
        page.display(),
        total["cells"],
        screenshot.display()
    ));
    dom
}

#[test]
fn chromium_draws_the_cells_and_counts_of_json_without_a_console_error() {
    if !chromium_present("chromium_draws_the_cells_and_counts_of_json_without_a_console_error") {
        return;
    }
    let dir = Scratch::new("plain");
    std::fs::write(dir.0.join("cluster.yaml"), CLUSTER).unwrap();
    let dom = page_matches_json("matrix", &[], &dir.0);
    let (total, _) = json_counts(&serde_json::from_str(&matrix(&["--json"], &dir.0)).unwrap());
    assert!(
        total["partial"] > 0,
        "dual-stack sources of the frontends read ~"
    );
    assert!(total["blocked"] > 0 && total["allowed"] > 0);
    assert_eq!(total["changed"], 0);
    assert!(!dom.contains("<img"), "a policy's name became an element");
}

#[test]
fn with_apply_chromium_draws_the_changed_cells_of_json() {
    if !chromium_present("with_apply_chromium_draws_the_changed_cells_of_json") {
        return;
    }
    let dir = Scratch::new("apply");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), CLUSTER).unwrap();
    let extra = dir.0.join("apply.yaml");
    std::fs::write(&extra, APPLY).unwrap();
    page_matches_json(
        "matrix-apply",
        &["--apply", extra.to_str().unwrap()],
        &manifests,
    );
    let report: Value = serde_json::from_str(&matrix(
        &["--json", "--apply", extra.to_str().unwrap()],
        &manifests,
    ))
    .unwrap();
    assert!(report["diff"]["newly_blocked"].as_u64().unwrap() > 0);
    assert!(report["diff"]["newly_allowed"].as_u64().unwrap() > 0);
}

/// The check above catches what it looks for: a page that logs, and one that throws.
#[test]
fn a_page_that_logs_or_throws_fails_the_browser_check() {
    if !chromium_present("a_page_that_logs_or_throws_fails_the_browser_check") {
        return;
    }
    let dir = Scratch::new("broken");
    let page = dir.0.join("broken.html");
    std::fs::write(
        &page,
        "<!DOCTYPE html><html><body><p>broken</p><script>console.error('boom'); \
         document.body.dataset.ready = 'yes'; null.x;</script></body></html>",
    )
    .unwrap();
    let browsed = browse(&page, &dir.0.join("broken.png"), &dir.0.join("profile"));
    assert!(
        browsed.dom.contains("data-ready=\"yes\""),
        "{}",
        browsed.dom
    );
    let console = browsed.console.join("\n");
    assert!(console.contains("\"boom\""), "{console}");
    assert!(console.contains("Uncaught TypeError"), "{console}");
}
