//! The agent's allocator and its options (`src/main.rs`): jemalloc with one arena and
//! unused pages returned within a second, which the agent's memory figures at 10,000
//! and 150,000 pods depend on (docs/BENCHMARKS.md).

use std::process::Command;

/// jemalloc prints its options at exit when `stats_print` is set (the environment's
/// options add to the compiled-in ones).
fn jemalloc_options() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_netpol-agent"))
        .arg("--help")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect("running the agent");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_agent_allocates_with_jemalloc_in_one_arena_returning_unused_pages_within_a_second() {
    let options = jemalloc_options();
    for option in [
        "opt.narenas: 1\n",
        "opt.dirty_decay_ms: 1000 ",
        "opt.muzzy_decay_ms: 0 ",
    ] {
        assert!(
            options.contains(option),
            "{option:?} is not among jemalloc's options:\n{}",
            options
                .lines()
                .filter(|l| l.contains("opt."))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
