//! The agent binary's allocator settings, as jemalloc reads them when it starts.

use std::process::Command;

/// jemalloc prints its options at exit when asked to (`stats_print`): the agent's own
/// `malloc_conf` must be the one it read (a symbol of the wrong name or type would
/// leave jemalloc's ten-second defaults, and ~15 MiB more resident at 150,000 pods).
#[test]
fn the_agent_gives_freed_pages_back_to_the_kernel_at_once() {
    let output = Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect("the agent runs");
    assert!(output.status.success(), "{output:?}");
    let stats = String::from_utf8_lossy(&output.stderr);
    for option in ["opt.dirty_decay_ms: 0 ", "opt.muzzy_decay_ms: 0 "] {
        assert!(
            stats.contains(option),
            "{option:?} not in jemalloc's stats:\n{stats}"
        );
    }
}
