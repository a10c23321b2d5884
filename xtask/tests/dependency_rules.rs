//! The dependency rules of docs/ARCHITECTURE.md, checked against the code as it is.
//!
//! Crate rules ask `cargo tree` what a crate really builds with (features resolved for
//! that crate alone); module rules read the agent's sources for `crate::<module>` paths.
//! Each checker is also run on a made-up violation, so a rule that can no longer fail
//! fails here instead.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates the compiler must never build with: it is pure (no kernel, no cluster client,
/// no runtime), which is what lets it run anywhere and be tested without root.
const COMPILE_FORBIDDEN: &[&str] = &["aya", "aya-obj", "kube", "kube-client", "tokio", "nix"];

/// What the eBPF programs may depend on directly.
const EBPF_ALLOWED: &[&str] = &["netpol-common", "aya-ebpf", "network-types"];

/// Agent modules that must not import each other: (module, what it must not import).
const MODULE_RULES: &[(&str, &[&str])] = &[
    // Sources feed the state; the datapath writes what the compiler produced.
    ("source", &["datapath"]),
    ("datapath", &["source"]),
    // The offline preview answers from the compiler alone, never from the kernel.
    ("preview", &["datapath"]),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// `cargo tree` for one package: the names of the packages it builds with.
fn tree(package: &str, extra: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "tree", "--quiet", "--locked", "--prefix", "none", "--format", "{p}",
        ])
        .args(["-p", package])
        .args(extra)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The names in `deps` that `forbidden` lists.
fn forbidden_in<'a>(deps: &'a [String], forbidden: &[&str]) -> Vec<&'a str> {
    let mut found: Vec<&str> = deps
        .iter()
        .map(String::as_str)
        .filter(|d| forbidden.contains(d))
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// The names in `deps` (other than `package` itself) that `allowed` does not list.
fn not_allowed_in<'a>(package: &str, deps: &'a [String], allowed: &[&str]) -> Vec<&'a str> {
    let mut found: Vec<&str> = deps
        .iter()
        .map(String::as_str)
        .filter(|d| *d != package && !allowed.contains(d))
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Every `crate::<name>` path in Rust source, comments left out.
fn crate_paths(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            // `netpol_crate::x` or `$crate::x` are other paths.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
        // `use crate::{a, b::c}` names several modules at once.
        if let Some(at) = code.find("crate::{") {
            let inner = &code[at + "crate::{".len()..];
            for part in inner.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        }
    }
    found
}

/// The Rust files of module `name` under `src`: `name.rs` and everything in `name/`.
fn module_files(src: &Path, name: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        files.push(file);
    }
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `file: imports crate::<x>` for every forbidden import of `module` under `src`.
fn module_violations(src: &Path, module: &str, forbidden: &[&str]) -> Vec<String> {
    let files = module_files(src, module);
    assert!(
        !files.is_empty(),
        "module {module} has no files under {}: the rule names a module that does not exist",
        src.display()
    );
    let mut violations = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("reading a source file");
        for path in crate_paths(&text) {
            if forbidden.contains(&path.as_str()) {
                violations.push(format!("{}: imports crate::{path}", file.display()));
            }
        }
    }
    violations.sort();
    violations.dedup();
    violations
}

#[test]
fn the_compiler_builds_without_kernel_cluster_client_or_runtime_crates() {
    let deps = tree("netpol-compile", &["-e", "normal,build"]);
    assert!(
        deps.iter().any(|d| d == "k8s-openapi"),
        "cargo tree output looks wrong: {deps:?}"
    );
    let found = forbidden_in(&deps, COMPILE_FORBIDDEN);
    assert!(found.is_empty(), "netpol-compile builds with {found:?}");
}

#[test]
fn the_ebpf_programs_depend_only_on_the_shared_types_and_aya_ebpf() {
    let deps = tree(
        "netpol-ebpf",
        &["-e", "normal", "--target", "all", "--depth", "1"],
    );
    let found = not_allowed_in("netpol-ebpf", &deps, EBPF_ALLOWED);
    assert!(found.is_empty(), "netpol-ebpf depends on {found:?}");
}

#[test]
fn agent_modules_import_only_what_their_room_allows() {
    let src = workspace_root().join("netpol-agent/src");
    let violations: Vec<String> = MODULE_RULES
        .iter()
        .flat_map(|(module, forbidden)| module_violations(&src, module, forbidden))
        .collect();
    assert!(
        violations.is_empty(),
        "forbidden imports:\n{}",
        violations.join("\n")
    );
}

#[test]
fn a_forbidden_crate_in_a_tree_is_reported() {
    let deps: Vec<String> = ["netpol-compile", "serde", "tokio", "tokio", "k8s-openapi"]
        .map(String::from)
        .to_vec();
    assert_eq!(forbidden_in(&deps, COMPILE_FORBIDDEN), ["tokio"]);
    assert_eq!(
        not_allowed_in(
            "netpol-ebpf",
            &["netpol-ebpf".into(), "libc".into()],
            EBPF_ALLOWED
        ),
        ["libc"]
    );
}

#[test]
fn a_forbidden_module_import_is_reported_in_any_form() {
    let dir = std::env::temp_dir().join(format!("netpol-rules-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("source/kube")).unwrap();
    std::fs::write(
        src.join("source/mod.rs"),
        "// crate::datapath in a comment\nuse crate::state;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("source/kube/watch.rs"),
        "use crate::{state::X, datapath::Datapath};\nfn f() { netpol_crate::datapath::x(); }\n",
    )
    .unwrap();
    std::fs::write(
        src.join("preview.rs"),
        "fn f() { let _ = crate::datapath::open(); }\n",
    )
    .unwrap();
    let source = module_violations(&src, "source", &["datapath"]);
    let preview = module_violations(&src, "preview", &["datapath"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(source.len(), 1, "{source:?}");
    assert!(source[0].ends_with("source/kube/watch.rs: imports crate::datapath"));
    assert_eq!(preview.len(), 1, "{preview:?}");
}
