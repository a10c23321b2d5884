//! The kernel side of the agent: loads the TC programs, attaches them to pod veths,
//! and writes the maps `compile` produced, applying only the difference.
//!
//! Everything lives under one bpffs directory (`--bpffs-dir`):
//!
//! ```text
//! <dir>/maps/{ENDPOINTS,IPCACHE,POLICY,CT4,CT6,...}   pinned by the loader, adopted on restart
//! <dir>/links/{from_pod,to_pod}:<ifname>              TCX links, pinned: they outlive the agent
//! ```
//!
//! A link stays attached while its pin exists, so enforcement continues unchanged when
//! the agent dies (fail-static). A clean shutdown removes the directory, which detaches
//! everything.

pub mod clock;
pub mod fit;
pub mod interfaces;
pub mod links;
pub mod maps;
pub mod packet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachType};
use aya::programs::{ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfError, EbpfLoader};
use netpol_common::{
    Counter, DIR_EGRESS, DIR_INGRESS, DatapathState, EventBudget, IFACE_REFUSED, IFACE_SHARED,
    REASON_COUNT, Reason, STATE_DENY_UNPROGRAMMED, counter_index, names,
};
use tracing::{debug, info, warn};

pub use fit::Refusal;
pub use maps::SyncStats;
use maps::{EndpointsMap, IpcacheMap, PolicyMap, Synced};
use netpol_compile::{Compiled, LocalPod};

/// The programs, built by `build.rs` from `netpol-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

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
    pub conntrack: Option<u32>,
}

/// A hook of a pod's host veth.
#[derive(Clone, Copy, Debug)]
struct Hook {
    program: &'static str,
    attach_type: TcAttachType,
}

const HOOKS: [Hook; 2] = [
    Hook {
        program: names::PROG_FROM_POD,
        attach_type: TcAttachType::Ingress,
    },
    Hook {
        program: names::PROG_TO_POD,
        attach_type: TcAttachType::Egress,
    },
];

/// The two programs, named by what they see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// Packets leaving the pod (TC ingress of the host veth): its egress policy.
    FromPod,
    /// Packets entering the pod (TC egress of the host veth): its ingress policy.
    ToPod,
}

impl HookKind {
    pub fn program(self) -> &'static str {
        match self {
            HookKind::FromPod => names::PROG_FROM_POD,
            HookKind::ToPod => names::PROG_TO_POD,
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
}

impl TestVerdict {
    pub const TC_ACT_UNSPEC: i32 = -1;
    pub const TC_ACT_SHOT: i32 = 2;

    pub fn allowed(&self) -> bool {
        self.action == Self::TC_ACT_UNSPEC
    }
}

/// An interface the programs are attached to.
struct Attachment {
    ifindex: u32,
    /// Links of kernels without TCX (netlink/clsact); they cannot be pinned and detach
    /// when dropped. Empty with TCX, where the pins hold the links.
    legacy: Vec<SchedClassifierLink>,
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
}

/// The loaded programs, their maps and attachments.
pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    endpoints: EndpointsMap,
    ifaces: maps::IfacesMap,
    ipcache: IpcacheMap,
    policy: PolicyMap,
    counters: PerCpuArray<MapData, Counter>,
    state: Array<MapData, DatapathState>,
    /// max_entries of ENDPOINTS, IPCACHE, POLICY, and of each of CT4 and CT6, as loaded.
    capacities: [u32; 4],
    rule_counters: PerCpuArray<MapData, Counter>,
    /// The rule each id of RULE_COUNTERS counts for; an id given to another rule starts
    /// again from zero.
    counted_rules: BTreeMap<u32, netpol_compile::RuleRef>,
    event_budget: PerCpuArray<MapData, EventBudget>,
    /// Taken by [`Datapath::take_events`].
    events: Option<RingBuf<MapData>>,
    /// Policy generation in STATE: bumped after every change of the three policy maps
    /// so that conntrack re-checks established connections.
    generation: u32,
    /// `STATE_*` flags written with the generation.
    state_flags: u32,
    attachments: BTreeMap<String, Attachment>,
    /// Interfaces whose names start with one of these get the programs as soon as they
    /// appear, before their pod is known (see [`Datapath::set_pod_interfaces`]).
    pod_interface_prefixes: Vec<String>,
    /// Endpoints that did not fit in ENDPOINTS: their veths are bound to IFACE_REFUSED.
    refused_endpoints: std::collections::BTreeSet<u32>,
    /// The kernel's tick rate, written to STATE for conntrack's clock.
    jiffies_hz: u32,
}

impl Datapath {
    /// Loads (or adopts, when pinned state exists under `dir`) the maps and programs.
    pub fn open(dir: &Path, capacities: &Capacities) -> Result<Self> {
        let bpffs = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Bpffs { path, source }
        };
        if OBJECT.is_empty() {
            return Err(Error::NoPrograms);
        }
        ensure_bpffs(dir)?;
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
        std::fs::create_dir_all(&maps_dir).map_err(bpffs(&maps_dir))?;
        std::fs::create_dir_all(&links_dir).map_err(bpffs(&links_dir))?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        for (name, capacity) in [
            (names::ENDPOINTS, capacities.endpoints),
            (names::IPCACHE, capacities.ipcache),
            (names::POLICY, capacities.policy),
            (names::CT4, capacities.conntrack),
            (names::CT6, capacities.conntrack),
        ] {
            if let Some(capacity) = capacity {
                loader.map_max_entries(name, capacity);
            }
        }
        // One IFACES entry per pod veth: never fewer than ENDPOINTS can hold.
        if let Some(endpoints) = capacities.endpoints {
            loader.map_max_entries(
                names::IFACES,
                endpoints.max(netpol_common::capacity::IFACES),
            );
        }
        unpin_incompatible_maps(&maps_dir);
        let mut ebpf = loader.load(OBJECT)?;
        for name in [
            names::PROG_FROM_POD,
            names::PROG_TO_POD,
            names::PROG_JIFFIES,
        ] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        let jiffies_hz = clock::kernel_hz(program(&mut ebpf, names::PROG_JIFFIES)?)?;

        let endpoints = adopt(&mut ebpf, names::ENDPOINTS, HashMap::try_from)?;
        let ipcache = adopt(&mut ebpf, names::IPCACHE, LpmTrie::try_from)?;
        let ifaces = adopt(&mut ebpf, names::IFACES, HashMap::try_from)?;
        let policy = adopt(&mut ebpf, names::POLICY, LpmTrie::try_from)?;
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| Error::Map {
            name: names::COUNTERS,
            source,
        })?;
        let state = take_map(&mut ebpf, names::STATE)?;
        let state: Array<MapData, DatapathState> =
            Array::try_from(state).map_err(|source| Error::Map {
                name: names::STATE,
                source,
            })?;
        let DatapathState {
            generation,
            flags: state_flags,
            ..
        } = state.get(&0, 0).map_err(|source| Error::Map {
            name: names::STATE,
            source,
        })?;
        let map_err = |name| move |source| Error::Map { name, source };
        let rule_counters = PerCpuArray::try_from(take_map(&mut ebpf, names::RULE_COUNTERS)?)
            .map_err(map_err(names::RULE_COUNTERS))?;
        let event_budget = PerCpuArray::try_from(take_map(&mut ebpf, names::EVENT_BUDGET)?)
            .map_err(map_err(names::EVENT_BUDGET))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)
            .map_err(map_err(names::EVENTS))?;
        info!(
            dir = %dir.display(),
            generation,
            endpoints = endpoints.len(),
            ipcache = ipcache.len(),
            policy = policy.len(),
            jiffies_hz,
            "datapath loaded"
        );
        let mut datapath = Datapath {
            ebpf,
            dir: dir.to_path_buf(),
            endpoints,
            ifaces,
            ipcache,
            policy,
            counters,
            state,
            capacities: [
                capacities
                    .endpoints
                    .unwrap_or(netpol_common::capacity::ENDPOINTS),
                capacities
                    .ipcache
                    .unwrap_or(netpol_common::capacity::IPCACHE),
                capacities.policy.unwrap_or(netpol_common::capacity::POLICY),
                capacities.conntrack.unwrap_or(netpol_common::capacity::CT),
            ],
            rule_counters,
            counted_rules: BTreeMap::new(),
            event_budget,
            events: Some(events),
            generation,
            state_flags,
            attachments: BTreeMap::new(),
            pod_interface_prefixes: Vec::new(),
            refused_endpoints: Default::default(),
            jiffies_hz,
        };
        // Before anything is attached: conntrack times entries with it.
        datapath.write_state()?;
        Ok(datapath)
    }

    /// What traffic on an attached but unprogrammed interface gets: dropped (`deny`) or
    /// passed unjudged. Written to the kernel at once.
    pub fn set_unprogrammed_default(&mut self, deny: bool) -> Result<()> {
        let flags = if deny {
            self.state_flags | STATE_DENY_UNPROGRAMMED
        } else {
            self.state_flags & !STATE_DENY_UNPROGRAMMED
        };
        self.state_flags = flags;
        self.write_state()
    }

    /// Name prefixes of the host-side interfaces of pods (`veth`, `cali`, `lxc`, ...):
    /// such an interface gets the programs as soon as it appears, so a pod is never
    /// without enforcement, whatever the agent knows about it yet.
    pub fn set_pod_interfaces(&mut self, prefixes: Vec<String>) {
        self.pod_interface_prefixes = prefixes;
    }

    fn write_state(&mut self) -> Result<()> {
        let state = DatapathState {
            generation: self.generation,
            flags: self.state_flags,
            jiffies_hz: self.jiffies_hz,
            _pad: 0,
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

    /// Attaches to pod interfaces (by name prefix) that appeared since the last look,
    /// touching nothing else: safe before the first complete state is known.
    pub fn attach_new_interfaces(&mut self) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        self.reconcile_attachments(None, &mut report)?;
        Ok(report)
    }

    /// Only the map half of [`Datapath::apply`]: no interface is touched (verdict tests,
    /// benchmarks).
    pub fn sync_maps(&mut self, compiled: &Compiled) -> Result<ApplyReport> {
        self.reset_reassigned_rule_counters(compiled)?;
        let mut report = ApplyReport::default();
        let [endpoints_cap, ipcache_cap, policy_cap, _] = self.capacities;
        // What did not fit may fit once the stale entries are gone: a second round.
        for _round in 0..2 {
            let kernel = fit::Kernel {
                endpoints: self.endpoints.contents(),
                ipcache: self.ipcache.contents(),
                policy: self.policy.contents(),
            };
            let fitted = fit::fit(compiled, &kernel, [endpoints_cap, ipcache_cap, policy_cap])?;
            let removed_before = report.maps.removed;
            self.write_maps(&fitted, &mut report)?;
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

    fn write_maps(&mut self, fitted: &fit::Fitted<'_>, report: &mut ApplyReport) -> Result<()> {
        let map_err = |name| move |source| Error::Map { name, source };
        // Additions: allowing entries before the identities that use them, and both
        // before endpoints become isolated.
        report.maps += self
            .policy
            .upsert(&fitted.policy)
            .map_err(map_err(names::POLICY))?;
        report.maps += self
            .ipcache
            .upsert(&fitted.ipcache)
            .map_err(map_err(names::IPCACHE))?;
        report.maps += self
            .endpoints
            .upsert(&fitted.endpoints)
            .map_err(map_err(names::ENDPOINTS))?;
        // Removals in reverse order.
        report.maps += self
            .endpoints
            .remove_stale(&fitted.endpoints)
            .map_err(map_err(names::ENDPOINTS))?;
        report.maps += self
            .ipcache
            .remove_stale(&fitted.ipcache)
            .map_err(map_err(names::IPCACHE))?;
        report.maps += self
            .policy
            .remove_stale(&fitted.policy)
            .map_err(map_err(names::POLICY))?;
        Ok(())
    }

    /// Attaches to the interfaces of `local_pods` and to every interface named like a
    /// pod's, detaches from the rest, and binds each veth to its pod. With `None` (the
    /// pods are not known yet) it only attaches to new pod-named interfaces.
    fn reconcile_attachments(
        &mut self,
        local_pods: Option<&[LocalPod]>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut wanted: BTreeMap<String, u32> = BTreeMap::new();
        if !self.pod_interface_prefixes.is_empty() {
            match nix::net::if_::if_nameindex() {
                Ok(list) => {
                    for interface in list.iter() {
                        let name = interface.name().to_string_lossy();
                        if interfaces::is_pod_interface(&name, &self.pod_interface_prefixes) {
                            wanted.insert(name.into_owned(), interface.index());
                        }
                    }
                }
                Err(error) => warn!(%error, "cannot list interfaces"),
            }
        }
        // ifindex -> the endpoints whose pods sit behind it (one, unless misconfigured).
        let mut owners: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        if let Some(local_pods) = local_pods {
            let routes = match interfaces::read_routes() {
                Ok(routes) => routes,
                Err(error) => {
                    warn!(%error, "cannot read the routing table; only annotated interfaces are used");
                    Vec::new()
                }
            };
            for pod in local_pods {
                let interface = pod.host_interface.clone().or_else(|| {
                    pod.ips
                        .iter()
                        .find_map(|ip| interfaces::interface_for(&routes, *ip).map(str::to_owned))
                });
                match interface
                    .as_deref()
                    .and_then(|name| Some((name, interfaces::ifindex(name)?)))
                {
                    Some((name, ifindex)) => {
                        wanted.insert(name.to_owned(), ifindex);
                        owners.entry(ifindex).or_default().push(pod.endpoint_id);
                    }
                    None => report.pending.push(format!(
                        "{} (interface {})",
                        pod.pod,
                        interface.as_deref().unwrap_or("unknown")
                    )),
                }
            }

            let gone: Vec<String> = self
                .attachments
                .iter()
                .filter(|(name, attachment)| wanted.get(*name) != Some(&attachment.ifindex))
                .map(|(name, _)| name.clone())
                .collect();
            for name in gone {
                self.detach(&name);
                report.detached.push(name);
            }
        }
        for (name, ifindex) in wanted {
            if self.attachments.contains_key(&name) {
                continue;
            }
            match self.attach(&name, ifindex) {
                Ok(attachment) => {
                    self.attachments.insert(name.clone(), attachment);
                    report.attached.push(name);
                }
                Err(error) => {
                    warn!(interface = %name, error = chain(&error), "attach failed; will retry");
                    report.pending.push(format!("{name}: {}", chain(&error)));
                }
            }
        }
        if local_pods.is_none() {
            return Ok(());
        }

        // Bind each attached veth to its pod's endpoint (anti-spoofing), or mark it
        // refused (its pod did not fit) or shared (claimed by several pods: their
        // policies apply, but the interface cannot vouch for a source address).
        let attached: std::collections::BTreeSet<u32> =
            self.attachments.values().map(|a| a.ifindex).collect();
        let mut bindings = BTreeMap::new();
        for (ifindex, endpoints) in owners {
            if !attached.contains(&ifindex) {
                continue;
            }
            let binding = match endpoints.as_slice() {
                [endpoint] if self.refused_endpoints.contains(endpoint) => IFACE_REFUSED,
                [endpoint] => *endpoint,
                _ => {
                    warn!(ifindex, ?endpoints, "several pods share one interface");
                    IFACE_SHARED
                }
            };
            bindings.insert(ifindex, binding);
        }
        let map_err = |source| Error::Map {
            name: names::IFACES,
            source,
        };
        report.maps += self.ifaces.upsert(&bindings).map_err(map_err)?;
        report.maps += self.ifaces.remove_stale(&bindings).map_err(map_err)?;
        Ok(())
    }

    /// bpffs refuses names containing '.', which interface names may contain (VLANs);
    /// ':' can appear in neither, so it separates and stands in for '.'.
    fn link_pin(&self, interface: &str, hook: Hook) -> PathBuf {
        self.dir
            .join("links")
            .join(format!("{}:{}", hook.program, interface.replace('.', ":")))
    }

    fn attach(&mut self, interface: &str, ifindex: u32) -> Result<Attachment> {
        let mut legacy = Vec::new();
        for hook in HOOKS {
            let pin = self.link_pin(interface, hook);
            let attach_error = |source| Error::Attach {
                interface: interface.to_owned(),
                source,
            };
            let prog = program(&mut self.ebpf, hook.program)?;
            // A pinned link from an earlier agent: swap our program in atomically, so
            // the hook is never empty. A stale pin (its interface is gone) is replaced.
            let adopted = match PinnedLink::from_pin(&pin) {
                Ok(pinned) => {
                    let replaced = match SchedClassifierLink::try_from(FdLink::from(pinned)) {
                        Ok(link) => prog.attach_to_link(link).map_err(|e| chain(&e)),
                        Err(error) => Err(chain(&error)),
                    };
                    match replaced {
                        Ok(id) => Some(id),
                        Err(error) => {
                            debug!(pin = %pin.display(), %error, "stale link pin replaced");
                            let _ = std::fs::remove_file(&pin);
                            None
                        }
                    }
                }
                Err(_) => None,
            };
            let id = match adopted {
                Some(id) => id,
                None => prog
                    .attach(interface, hook.attach_type)
                    .map_err(attach_error)?,
            };
            let link = prog.take_link(id).map_err(attach_error)?;
            match FdLink::try_from(link) {
                // Pinned, the link holds itself; our descriptor can go.
                Ok(fd_link) if !pin.exists() => {
                    fd_link.pin(&pin).map_err(|error| Error::Pin {
                        path: pin.clone(),
                        message: chain(&error),
                    })?;
                }
                Ok(_already_pinned) => {}
                Err(LinkError::InvalidLink) => {
                    // Netlink attachment (no TCX): cannot be pinned; keep it alive here.
                    let prog = program(&mut self.ebpf, hook.program)?;
                    let id = prog
                        .attach(interface, hook.attach_type)
                        .map_err(attach_error)?;
                    legacy.push(prog.take_link(id).map_err(attach_error)?);
                }
                Err(error) => {
                    return Err(Error::Pin {
                        path: pin,
                        message: chain(&error),
                    });
                }
            }
        }
        debug!(%interface, ifindex, "attached");
        Ok(Attachment { ifindex, legacy })
    }

    fn detach(&mut self, interface: &str) {
        if let Some(attachment) = self.attachments.remove(interface) {
            drop(attachment.legacy);
        }
        for hook in HOOKS {
            let pin = self.link_pin(interface, hook);
            if let Err(error) = std::fs::remove_file(&pin)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                warn!(pin = %pin.display(), %error, "cannot remove link pin");
            }
        }
        debug!(%interface, "detached");
    }

    /// Binds interface `ifindex` to `binding` (an endpoint id, `IFACE_REFUSED` or
    /// `IFACE_SHARED`) outside reconciliation: for verdict tests, whose packets arrive
    /// through BPF_PROG_TEST_RUN on loopback rather than on a pod's veth. The next
    /// [`Datapath::apply`] replaces every binding.
    pub fn bind_interface(&mut self, ifindex: u32, binding: u32) -> Result<()> {
        let mut bindings = self.ifaces.contents().clone();
        bindings.insert(ifindex, binding);
        self.ifaces
            .upsert(&bindings)
            .map(drop)
            .map_err(|source| Error::Map {
                name: names::IFACES,
                source,
            })
    }

    /// Interfaces with programs attached.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attachments.keys().map(String::as_str)
    }

    /// The policy generation now in the kernel.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Map sizes as the kernel holds them: (ENDPOINTS, IPCACHE, POLICY).
    pub fn map_sizes(&self) -> (usize, usize, usize) {
        (self.endpoints.len(), self.ipcache.len(), self.policy.len())
    }

    /// (map, entries, capacity) of ENDPOINTS, IPCACHE and POLICY (from the shadows: no
    /// syscall), and of CT4 and CT6 when `conntrack_limit` is given (counted by walking
    /// their keys, at most `limit` of each).
    pub fn map_fill(&self, conntrack_limit: Option<usize>) -> Vec<(&'static str, u64, u64)> {
        let [endpoints, ipcache, policy, ct] = self.capacities.map(u64::from);
        let mut out = vec![
            (names::ENDPOINTS, self.endpoints.len() as u64, endpoints),
            (names::IPCACHE, self.ipcache.len() as u64, ipcache),
            (names::POLICY, self.policy.len() as u64, policy),
        ];
        if let Some(limit) = conntrack_limit {
            fn count<K: aya::Pod>(ebpf: &Ebpf, name: &str, limit: usize) -> Option<u64> {
                let map = HashMap::<_, K, netpol_common::CtValue>::try_from(ebpf.map(name)?);
                Some(map.ok()?.keys().take(limit).count() as u64)
            }
            let tables = [
                (
                    names::CT4,
                    count::<netpol_common::CtKey4>(&self.ebpf, names::CT4, limit),
                ),
                (
                    names::CT6,
                    count::<netpol_common::CtKey6>(&self.ebpf, names::CT6, limit),
                ),
            ];
            for (name, entries) in tables {
                if let Some(entries) = entries {
                    out.push((name, entries, ct));
                }
            }
        }
        out
    }

    /// Packets and bytes per reason, summed over CPUs and both directions.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>> {
        let by_direction = self.counters_by_direction()?;
        Ok(Reason::ALL
            .into_iter()
            .map(|reason| {
                let total = sum(by_direction
                    .iter()
                    .filter(|(r, _, _)| *r == reason)
                    .map(|(_, _, c)| c));
                (reason, total)
            })
            .collect())
    }

    /// Packets and bytes per reason and direction (`DIR_INGRESS`/`DIR_EGRESS`, from the
    /// pod's point of view), summed over CPUs.
    pub fn counters_by_direction(&self) -> Result<Vec<(Reason, u8, Counter)>> {
        let mut out = Vec::with_capacity(2 * REASON_COUNT as usize);
        for direction in [DIR_INGRESS, DIR_EGRESS] {
            for reason in Reason::ALL {
                let per_cpu = self
                    .counters
                    .get(&counter_index(reason, direction), 0)
                    .map_err(|source| Error::Map {
                        name: names::COUNTERS,
                        source,
                    })?;
                out.push((reason, direction, sum(per_cpu.iter())));
            }
        }
        Ok(out)
    }

    /// Zeroes the counters of rule ids that now name another rule (or a rule this agent
    /// has not counted yet: a restarted agent numbers rules afresh), before any POLICY
    /// value points at them.
    fn reset_reassigned_rule_counters(&mut self, compiled: &Compiled) -> Result<()> {
        let fresh: Vec<u32> = compiled
            .rules
            .iter()
            .filter(|(id, rule)| self.counted_rules.get(id) != Some(rule))
            .map(|(id, _)| *id)
            .filter(|id| *id < netpol_common::capacity::RULE_COUNTERS)
            .collect();
        if !fresh.is_empty() {
            let cpus = aya::util::nr_cpus().map_err(|(_, source)| Error::Bpffs {
                path: PathBuf::from("/sys/devices/system/cpu/possible"),
                source,
            })?;
            for id in fresh {
                let zero = aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus])
                    .map_err(|source| Error::Map {
                        name: names::RULE_COUNTERS,
                        source: source.into(),
                    })?;
                self.rule_counters
                    .set(id, zero, 0)
                    .map_err(|source| Error::Map {
                        name: names::RULE_COUNTERS,
                        source,
                    })?;
            }
        }
        self.counted_rules = compiled.rules.clone();
        Ok(())
    }

    /// The ring buffer of verdict events (once; the reader owns it from then on).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Packets and bytes of one rule (its id in `Compiled::rules`), summed over CPUs.
    pub fn rule_counter(&self, rule: u32) -> Result<Counter> {
        let per_cpu = self
            .rule_counters
            .get(&rule, 0)
            .map_err(|source| Error::Map {
                name: names::RULE_COUNTERS,
                source,
            })?;
        Ok(sum(per_cpu.iter()))
    }

    /// Events suppressed by the in-kernel rate limit and lost to a full ring buffer,
    /// summed over CPUs.
    pub fn event_losses(&self) -> Result<(u64, u64)> {
        let per_cpu = self.event_budget.get(&0, 0).map_err(|source| Error::Map {
            name: names::EVENT_BUDGET,
            source,
        })?;
        Ok(per_cpu
            .iter()
            .fold((0, 0), |(s, l), b| (s + b.suppressed, l + b.lost)))
    }

    /// Runs one hook's program on a crafted frame (BPF_PROG_TEST_RUN) without any
    /// interface: the verdict the kernel would give, from the real maps.
    pub fn test_run(&self, hook: HookKind, frame: &[u8], repeat: u32) -> Result<TestVerdict> {
        use aya::programs::{TestRun as _, TestRunOptions};
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
                repeat: repeat.max(1),
                ..TestRunOptions::new()
            })
            .map_err(|source| Error::Program { name, source })?;
        Ok(TestVerdict {
            action: result.return_value as i32,
            duration: result.duration,
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

fn sum<'a>(counters: impl Iterator<Item = &'a Counter>) -> Counter {
    counters.fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

/// Pins only work on bpffs: check the nearest existing ancestor of `dir`.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = nix::sys::statfs::statfs(existing)
        .map(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if on_bpffs {
        Ok(())
    } else {
        Err(Error::NotBpffs(dir.to_path_buf()))
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

/// The layout of every map this build pins: (name, type, key size, value size).
pub fn map_layouts() -> [(&'static str, aya::maps::MapType, u32, u32); 11] {
    use aya::maps::MapType::{Array, Hash, LpmTrie, LruHash, PerCpuArray, RingBuf};
    use netpol_common as c;
    fn size<T>() -> u32 {
        std::mem::size_of::<T>() as u32
    }
    // LPM trie keys carry their prefix length first.
    let lpm = |data: u32| 4 + data;
    [
        (
            names::ENDPOINTS,
            Hash,
            size::<c::Addr>(),
            size::<c::EndpointInfo>(),
        ),
        (
            names::IPCACHE,
            LpmTrie,
            lpm(size::<c::Addr>()),
            size::<c::PeerInfo>(),
        ),
        (
            names::POLICY,
            LpmTrie,
            lpm(size::<c::PolicyKey>()),
            size::<c::PolicyValue>(),
        ),
        (
            names::CT4,
            LruHash,
            size::<c::CtKey4>(),
            size::<c::CtValue>(),
        ),
        (
            names::CT6,
            LruHash,
            size::<c::CtKey6>(),
            size::<c::CtValue>(),
        ),
        (names::COUNTERS, PerCpuArray, 4, size::<c::Counter>()),
        (names::STATE, Array, 4, size::<c::DatapathState>()),
        (names::EVENTS, RingBuf, 0, 0),
        (
            names::EVENT_BUDGET,
            PerCpuArray,
            4,
            size::<c::EventBudget>(),
        ),
        (names::RULE_COUNTERS, PerCpuArray, 4, size::<c::Counter>()),
        (names::IFACES, Hash, 4, 4),
    ]
}

/// Unpins what an older build left under `maps_dir` that this build cannot adopt: maps
/// it no longer defines (the single conntrack map `CT` became CT4 and CT6) and maps whose
/// type, key or value size changed (see [`map_layouts`]), so the loader creates them
/// afresh instead of handing the programs a map they cannot use. Programs still attached
/// from that build keep the old maps alive until they are replaced; a new STATE starts
/// from generation 0, which makes conntrack re-check every connection (always safe).
fn unpin_incompatible_maps(maps_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(maps_dir) else {
        return;
    };
    let layouts = map_layouts();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let expected = layouts
            .iter()
            .find(|layout| layout.0 == name)
            .map(|&(_, map_type, key, value)| (Some(map_type), key, value));
        let pinned = aya::maps::MapInfo::from_pin(entry.path())
            .ok()
            .map(|info| (info.map_type().ok(), info.key_size(), info.value_size()));
        if expected.is_some() && pinned == expected {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => info!(
                map = name,
                ?pinned,
                ?expected,
                "unpinned a map this build does not define or whose layout changed"
            ),
            Err(error) => warn!(map = name, %error, "could not unpin an incompatible map"),
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

fn adopt<M: maps::KernelMap>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> std::result::Result<M, MapError>,
) -> Result<Synced<M>> {
    let map = convert(take_map(ebpf, name)?).map_err(|source| Error::Map { name, source })?;
    Synced::adopt(name, map).map_err(|source| Error::Map { name, source })
}
