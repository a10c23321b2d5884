//! The kernel side of the agent: loads the TC programs, attaches them to pod veths,
//! and writes the maps `compile` produced, applying only the difference.
//!
//! Everything lives under one bpffs directory (`--bpffs-dir`):
//!
//! ```text
//! <dir>/maps/{ENDPOINTS,IPCACHE,POLICY,POLICY_RANGES,CT4,CT6,...}   pinned by the loader, adopted on restart
//! <dir>/links/{from_pod,to_pod}:<ifname>              TCX links, pinned: they outlive the agent
//! ```
//!
//! A link stays attached while its pin exists, so enforcement continues unchanged when
//! the agent dies (fail-static). A clean shutdown removes the directory, which detaches
//! everything.
//!
//! By concern: [`load`] (loading, adopting pins, unpinning old layouts), [`attach`]
//! (TCX links on pod interfaces), [`interfaces`] (which interface is whose, from the
//! kernel), [`maps`] (shadows and differences), [`fit`] (what fits
//! in the capacities), [`counters`] (per-CPU counters, map fill).

mod attach;
mod batch;
pub mod clock;
mod counters;
pub mod fit;
pub mod inspect;
pub mod interfaces;
pub mod links;
mod load;
pub mod maps;
pub mod packet;
pub mod peers;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use aya::maps::{Array, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfError};
use netpol_common::{Counter, DatapathState, EventBudget, STATE_DENY_UNPROGRAMMED, names};
use tracing::{info, warn};

use attach::Attachment;
pub use fit::Refusal;
pub use load::map_layouts;
pub use maps::SyncStats;
use maps::{EndpointsMap, IpcacheMap, PolicyMap};
use netpol_compile::Compiled;

/// Errors of the datapath. Each variant is one metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("this agent was built with AYA_BUILD_SKIP: it has no eBPF programs")]
    NoPrograms,
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("attaching to {interface}: {source}")]
    Attach {
        interface: String,
        source: ProgramError,
    },
    #[error("pinning link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(transparent)]
    Full(#[from] fit::PrefixOverflow),
    #[error("bpffs directory {path}: {source}")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("measuring the kernel's tick rate: {0}")]
    Clock(#[from] clock::ClockError),
    #[error(
        "{0} is not on a bpf filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`); note that \
         `ip netns exec` remounts /sys, so start the agent with `nsenter --net=...` instead"
    )]
    NotBpffs(PathBuf),
}

impl Error {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Load(_) | Error::NoPrograms => "load",
            Error::Program { .. } | Error::MissingProgram(_) => "program",
            Error::Map { .. } | Error::MissingMap(_) => "map",
            Error::Full(_) => "full",
            Error::Attach { .. } => "attach",
            Error::Pin { .. } => "pin",
            Error::Bpffs { .. } | Error::NotBpffs(_) => "bpffs",
            Error::Clock(_) => "clock",
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Optional map capacities (the defaults are in `netpol_common::capacity`).
#[derive(Clone, Debug, Default)]
pub struct Capacities {
    pub endpoints: Option<u32>,
    pub ipcache: Option<u32>,
    pub policy: Option<u32>,
    pub policy_ranges: Option<u32>,
    pub conntrack: Option<u32>,
}

/// The two programs, named by what they see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// Packets leaving the pod (TC ingress of the host veth): its egress policy.
    FromPod,
    /// Packets entering the pod (TC egress of the host veth): its ingress policy, and
    /// for marked packets the source pod's egress after translation.
    ToPod,
    /// Packets leaving the node (TC egress of an exit device): marked packets' source
    /// pod egress after translation.
    LeaveNode,
}

impl HookKind {
    pub fn program(self) -> &'static str {
        match self {
            HookKind::FromPod => names::PROG_FROM_POD,
            HookKind::ToPod => names::PROG_TO_POD,
            HookKind::LeaveNode => names::PROG_LEAVE_NODE,
        }
    }
}

/// Result of [`Datapath::test_run`].
#[derive(Clone, Copy, Debug)]
pub struct TestVerdict {
    /// The program's return code: `TC_ACT_UNSPEC` (-1) lets the packet go on,
    /// `TC_ACT_SHOT` (2) drops it.
    pub action: i32,
    /// Mean time per run as the kernel measured it.
    pub duration: std::time::Duration,
    /// The skb mark after the program (the Service mark is set or cleared by it).
    pub mark: u32,
}

/// Room for `struct __sk_buff` as BPF_PROG_TEST_RUN takes and returns it (192 bytes in
/// 6.x kernels; the kernel accepts a longer buffer whose tail is zero, and refuses to
/// return the context into a shorter one). Only the mark is set: offset 8, after `len`
/// and `pkt_type`.
const SKB_CTX_LEN: usize = 256;
const SKB_MARK: usize = 8;

impl TestVerdict {
    pub const TC_ACT_UNSPEC: i32 = -1;
    pub const TC_ACT_SHOT: i32 = 2;

    pub fn allowed(&self) -> bool {
        self.action == Self::TC_ACT_UNSPEC
    }
}

/// What one reconciliation did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    pub maps: SyncStats,
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    /// Local pods whose interface could not be found or attached (retried next time).
    pub pending: Vec<String>,
    /// What did not fit in the maps (see [`fit`]); retried at every resync.
    pub refused: Vec<Refusal>,
    /// Interfaces the operator named for pods (local mode) that are not used, with why.
    pub refused_names: Vec<interfaces::RefusedName>,
}

/// The loaded programs, their maps and attachments.
pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    endpoints: EndpointsMap,
    ifaces: maps::IfacesMap,
    node_ports: maps::NodePortsMap,
    ipcache: IpcacheMap,
    policy: PolicyMap,
    /// The version of the compiled POLICY map the kernel holds exactly (the last sync
    /// wrote it whole): as for IPCACHE below.
    policy_written: Option<u64>,
    /// The version of the compiled IPCACHE the kernel holds exactly (the last sync wrote
    /// it whole): the next sync writes the keys changed since, or nothing.
    ipcache_written: Option<u64>,
    counters: PerCpuArray<MapData, Counter>,
    state: Array<MapData, DatapathState>,
    /// max_entries of ENDPOINTS, IPCACHE, POLICY, POLICY_RANGES, and of each of CT4 and
    /// CT6, as loaded.
    capacities: [u32; 5],
    rule_counters: PerCpuArray<MapData, Counter>,
    /// The rule each id of RULE_COUNTERS counts for; an id given to another rule starts
    /// again from zero.
    counted_rules: netpol_compile::RuleTable,
    event_budget: PerCpuArray<MapData, EventBudget>,
    /// Taken by [`Datapath::take_events`].
    events: Option<RingBuf<MapData>>,
    /// Policy generation in STATE: bumped after every change of the three policy maps
    /// so that conntrack re-checks established connections.
    generation: u32,
    /// `STATE_*` flags written with the generation.
    state_flags: u32,
    attachments: BTreeMap<String, Attachment>,
    /// The node's exit devices with `leave_node` attached (see [`Datapath::set_exits`]).
    exits: BTreeMap<String, Attachment>,
    /// `Some`: exactly these interfaces are exit devices (`--exit-interface`); `None`:
    /// discovered from the routes.
    exit_interfaces: Option<Vec<String>>,
    /// The last apply read no route (reported once, not at every apply).
    no_routes: bool,
    /// Interfaces whose names start with one of these get the programs as soon as they
    /// appear, before their pod is known (see [`Datapath::set_pod_interfaces`]).
    pod_interface_prefixes: Vec<String>,
    /// Endpoints that did not fit in ENDPOINTS: their veths are bound to IFACE_REFUSED.
    refused_endpoints: std::collections::BTreeSet<u32>,
    /// The far ends of veth bridge ports: port index -> (peer namespace id, peer index),
    /// the peer's addresses (see `attach.rs`, `read_kernel`).
    port_peers: BTreeMap<u32, ((i32, u32), Vec<std::net::IpAddr>)>,
    /// Interfaces named like pods' that may not carry the programs, logged once.
    unfit_reported: std::collections::BTreeSet<String>,
    /// The kernel's tick rate, written to STATE for conntrack's clock.
    jiffies_hz: u32,
    /// The skb mark bit(s) of Service connections, written to STATE (0: off).
    service_mark: u32,
}

impl Datapath {
    /// What traffic on an attached but unprogrammed interface gets: dropped (`deny`) or
    /// passed unjudged. Written to the kernel at once.
    /// The skb mark bit(s) `from_pod` puts on a pod's connection to a Service for the
    /// hook after kube-proxy's translation (0: Service connections are judged on the
    /// Service address, as on a cluster without kube-proxy). Written to the kernel at once.
    pub fn set_service_mark(&mut self, mark: u32) -> Result<()> {
        self.service_mark = mark;
        self.write_state()
    }

    pub fn set_unprogrammed_default(&mut self, deny: bool) -> Result<()> {
        let flags = if deny {
            self.state_flags | STATE_DENY_UNPROGRAMMED
        } else {
            self.state_flags & !STATE_DENY_UNPROGRAMMED
        };
        self.state_flags = flags;
        self.write_state()
    }

    fn write_state(&mut self) -> Result<()> {
        let state = DatapathState {
            generation: self.generation,
            flags: self.state_flags,
            jiffies_hz: self.jiffies_hz,
            service_mark: self.service_mark,
        };
        self.state.set(0, state, 0).map_err(|source| Error::Map {
            name: names::STATE,
            source,
        })
    }

    /// Brings the kernel to `compiled`: map contents first (in an order that never opens
    /// more than the old or the new state allows), then attachments.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<ApplyReport> {
        let mut report = self.sync_maps(compiled)?;
        self.reconcile_attachments(Some(&compiled.local_pods), &mut report)?;
        Ok(report)
    }

    /// Only the map half of [`Datapath::apply`]: no interface is touched (verdict tests,
    /// benchmarks).
    pub fn sync_maps(&mut self, compiled: &Compiled) -> Result<ApplyReport> {
        self.reset_reassigned_rule_counters(compiled)?;
        let mut report = ApplyReport::default();
        let [endpoints_cap, ipcache_cap, policy_cap, ranges_cap, _] = self.capacities;
        // What did not fit may fit once the stale entries are gone: a second round.
        for _round in 0..2 {
            let kernel = fit::Kernel {
                endpoints: self.endpoints.contents(),
                ipcache: self.ipcache.contents(),
                policy: self.policy.contents(),
                policy_version: self.policy_written.take(),
                ipcache_version: self.ipcache_written.take(),
            };
            let caps = [endpoints_cap, ipcache_cap, policy_cap, ranges_cap];
            let fitted = fit::fit(compiled, &kernel, caps)?;
            let removed_before = report.maps.removed;
            self.write_maps(&fitted, &compiled.node_ports, &mut report)?;
            // Written whole: the kernel holds the compiled map itself.
            if matches!(fitted.policy, Cow::Borrowed(_)) {
                self.policy_written = Some(compiled.policy.version());
            }
            if matches!(fitted.ipcache, Cow::Borrowed(_)) {
                self.ipcache_written = Some(compiled.ipcache.version());
            }
            report.refused = fitted.refused;
            if report.refused.is_empty() || report.maps.removed == removed_before {
                break;
            }
        }
        self.refused_endpoints = report
            .refused
            .iter()
            .filter(|r| matches!(r, Refusal::Endpoint { .. }))
            .filter_map(Refusal::endpoint)
            .collect();
        if report.maps.writes() > 0 {
            self.generation = self.generation.wrapping_add(1);
            self.write_state()?;
        }
        Ok(report)
    }

    fn write_maps(
        &mut self,
        fitted: &fit::Fitted<'_>,
        node_ports: &std::collections::BTreeSet<netpol_common::ServicePort>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let map_err = |name| move |source| Error::Map { name, source };
        // Additions: allowing entries before the identities that use them, and both
        // before endpoints become isolated.
        report.maps += self
            .policy
            .upsert_work(&fitted.policy, fitted.policy_work)
            .map_err(map_err(names::POLICY))?;
        report.maps += self
            .ipcache
            .upsert_work(&fitted.ipcache, fitted.ipcache_work)
            .map_err(map_err(names::IPCACHE))?;
        report.maps += self
            .endpoints
            .upsert(&fitted.endpoints)
            .map_err(map_err(names::ENDPOINTS))?;
        // Node ports only widen what `from_pod` defers to the hook after translation;
        // that hook judges the same policy, so their order with the rest is free.
        let node_ports: BTreeMap<netpol_common::ServicePort, u32> =
            node_ports.iter().map(|&port| (port, 1)).collect();
        report.maps += self
            .node_ports
            .upsert(&node_ports)
            .map_err(map_err(names::NODE_PORTS))?;
        report.maps += self
            .node_ports
            .remove_stale(&node_ports)
            .map_err(map_err(names::NODE_PORTS))?;
        // Removals in reverse order.
        report.maps += self
            .endpoints
            .remove_stale(&fitted.endpoints)
            .map_err(map_err(names::ENDPOINTS))?;
        report.maps += self
            .ipcache
            .remove_work(&fitted.ipcache, fitted.ipcache_work)
            .map_err(map_err(names::IPCACHE))?;
        report.maps += self
            .policy
            .remove_work(&fitted.policy, fitted.policy_work)
            .map_err(map_err(names::POLICY))?;
        Ok(())
    }

    /// The policy generation now in the kernel.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The ring buffer of verdict events (once; the reader owns it from then on).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Runs one hook's program on a crafted frame (BPF_PROG_TEST_RUN) without any
    /// interface: the verdict the kernel would give, from the real maps.
    pub fn test_run(&self, hook: HookKind, frame: &[u8], repeat: u32) -> Result<TestVerdict> {
        self.test_run_marked(hook, frame, repeat, 0)
    }

    /// [`Datapath::test_run`] of a packet carrying skb mark `mark`; the verdict has the
    /// mark the program left.
    pub fn test_run_marked(
        &self,
        hook: HookKind,
        frame: &[u8],
        repeat: u32,
        mark: u32,
    ) -> Result<TestVerdict> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let name = hook.program();
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat: repeat.max(1),
                ..TestRunOptions::new()
            })
            .map_err(|source| Error::Program { name, source })?;
        let mark = u32::from_ne_bytes(
            ctx_out[SKB_MARK..SKB_MARK + 4]
                .try_into()
                .expect("four bytes"),
        );
        Ok(TestVerdict {
            action: result.return_value as i32,
            duration: result.duration,
            mark,
        })
    }

    /// Leaves everything pinned and attached: enforcement goes on unchanged without the
    /// agent (fail-static), and the next agent adopts maps, conntrack and links.
    pub fn release(self) {
        info!(dir = %self.dir.display(), generation = self.generation, "datapath left in place (fail-static)");
    }

    /// Detaches from every interface and removes every pinned object.
    pub fn shutdown(mut self) {
        let interfaces: Vec<String> = self.attachments.keys().cloned().collect();
        for interface in interfaces {
            self.detach(&interface);
        }
        let exits: Vec<String> = self.exits.keys().cloned().collect();
        for interface in exits {
            self.detach_exit(&interface);
        }
        let dir = self.dir.clone();
        drop(self);
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %dir.display(), %error, "cannot remove the bpffs directory");
        }
        info!(dir = %dir.display(), "datapath removed");
    }
}

/// An error with its sources, `outer: inner: innermost`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}
