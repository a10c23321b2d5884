//! How much of the verifier's budget each program uses. The kernel refuses a program
//! whose verification walks more than 1,000,000 instructions (E2BIG), and the walk grows
//! with every branch a change adds to a path: `to_pod` was at 933k before the policy
//! lookups became one global function, which the verifier checks once. This test fails
//! while there is still room to restructure, not when the agent no longer loads.

use std::path::PathBuf;

use aya::programs::SchedClassifier;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// The kernel's limit on instructions walked per program (`BPF_COMPLEXITY_LIMIT_INSNS`).
const KERNEL_LIMIT: u32 = 1_000_000;
/// The share of it a program may use here.
const BUDGET: u32 = KERNEL_LIMIT / 2;

/// A bpffs directory of this test's own for the maps the object pins, removed on drop
/// (so nothing is left in the bpffs root, and no map of another run is adopted).
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> PinDir {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/netpol-verifier-budget-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a bpffs directory");
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_program_verifies_within_half_the_kernels_instruction_limit() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: loading programs needs root (run via `cargo xtask test`)");
        return;
    }
    if OBJECT.is_empty() {
        eprintln!("skipped: built without the eBPF object (AYA_BUILD_SKIP)");
        return;
    }
    let pins = PinDir::new();
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&pins.0)
        .load(OBJECT)
        .expect("the object loads");
    let mut report = Vec::new();
    for name in [
        netpol_common::names::PROG_FROM_POD,
        netpol_common::names::PROG_TO_POD,
        netpol_common::names::PROG_LEAVE_NODE,
    ] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("the program exists")
            .try_into()
            .expect("a TC program");
        program
            .load()
            .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
        let walked = program
            .info()
            .expect("program info")
            .verified_instruction_count()
            .expect("the kernel reports verified instructions (5.16+)");
        report.push((name, walked));
    }
    drop(ebpf);
    drop(pins);
    eprintln!("verified instructions: {report:?} (budget {BUDGET} each)");
    for (name, walked) in report {
        assert!(
            walked <= BUDGET,
            "{name}: the verifier walked {walked} instructions, over half its limit of \
             {KERNEL_LIMIT}: restructure before it stops loading (see \
             `netpol_policy_lookups` in netpol-ebpf/src/policy.rs)"
        );
    }
}
