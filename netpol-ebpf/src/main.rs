//! netpol's kernel half: two TC programs on every pod's host-side veth.
//!
//! - `from_pod` (TC ingress of the host veth) sees packets leaving the pod: the pod's
//!   **egress** policy.
//! - `to_pod` (TC egress of the host veth) sees packets entering the pod: the pod's
//!   **ingress** policy.
//! - `leave_node` (TC egress of the node's exit devices) sees marked Service connections
//!   leaving the node after kube-proxy's translation.
//!
//! A pod's connection to a Service address is judged after translation, on the real
//! backend: `from_pod` lets it through with the Service mark, and `to_pod` (a backend on
//! this node) or `leave_node` (elsewhere) makes the pod's egress decision.
//!
//! Both run the same pipeline, Cilium-style: parse → conntrack → policy → verdict, with
//! one exit (`verdict::finish`) that counts the reason. Per packet the cost is a fixed
//! number of map lookups whatever the number of policies: ENDPOINTS, CT, and for a new
//! flow IPCACHE plus one POLICY hash lookup in the common case (at most eight, by the
//! kinds of rules the endpoint has; see `policy.rs`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{macros::classifier, programs::TcContext};

    use crate::verdict::{self, Hook};

    /// Packets leaving the pod: its egress policy (for a Service, after translation).
    #[classifier]
    pub fn from_pod(ctx: TcContext) -> i32 {
        verdict::run(&ctx, Hook::FromPod)
    }

    /// Packets entering the pod: its ingress policy, and the egress policy of a local
    /// source pod whose Service connection kube-proxy translated to this pod.
    #[classifier]
    pub fn to_pod(ctx: TcContext) -> i32 {
        verdict::run(&ctx, Hook::ToPod)
    }

    /// Packets leaving the node on an exit device: the egress policy of a local pod
    /// whose Service connection kube-proxy translated to a backend elsewhere.
    #[classifier]
    pub fn leave_node(ctx: TcContext) -> i32 {
        verdict::run(&ctx, Hook::LeaveNode)
    }

    /// The low 32 bits of jiffies. Never attached: the agent runs it with
    /// BPF_PROG_TEST_RUN to measure the kernel's tick rate for conntrack's clock.
    #[classifier]
    pub fn jiffies(_ctx: TcContext) -> i32 {
        // SAFETY: a helper without preconditions.
        let jiffies = unsafe { aya_ebpf::helpers::generated::bpf_jiffies64() };
        jiffies as u32 as i32
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        // SAFETY: the verifier rejects any program with a reachable panic path.
        unsafe { core::hint::unreachable_unchecked() }
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// On the host this crate is an empty stub; see `lib.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
