//! How much of the verifier's budget each program uses. The kernel refuses a program
//! whose verification walks more than 1,000,000 instructions (E2BIG), and the walk grows
//! with every branch a change adds to a path: `to_pod` was at 933k before the policy
//! lookups became one global function, which the verifier checks once. This test fails
//! while there is still room to restructure, not when the agent no longer loads.

use aya::programs::SchedClassifier;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// The kernel's limit on instructions walked per program (`BPF_COMPLEXITY_LIMIT_INSNS`).
const KERNEL_LIMIT: u32 = 1_000_000;
/// The share of it a program may use here.
const BUDGET: u32 = KERNEL_LIMIT / 2;

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
    let mut ebpf = aya::EbpfLoader::new()
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
