//! Every map the programs use, in one place. Layouts live in `netpol-common`.
//!
//! All maps are pinned by name: the agent gives the loader a bpffs directory, so maps
//! outlive the agent process (enforcement continues while it restarts) and a new agent
//! adopts them.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use netpol_common::{
    Addr, COUNTER_SLOTS, Counter, CtKey4, CtKey6, CtValue, DatapathState, EndpointInfo,
    EventBudget, PeerInfo, PeerSlot, PolicyKey, PolicyValue, ServicePort, capacity,
};

/// Local pod address -> endpoint.
#[map]
pub static ENDPOINTS: HashMap<Addr, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Address prefix -> its slot in PEERS. Longest match decides ipBlock membership
/// exactly.
#[map]
pub static IPCACHE: LpmTrie<Addr, PeerSlot> = LpmTrie::pinned(capacity::IPCACHE, 0);

/// Slot -> peer identity and flags. Mappable: the agent renumbers addresses by storing
/// into its mapping, without a system call per address.
#[map]
pub static PEERS: Array<PeerInfo> = Array::pinned(capacity::IPCACHE, BPF_F_MMAPABLE);

/// {endpoint, identity, direction, protocol, port} -> allowing rule: exact ports, every
/// port of a protocol, every protocol (see [`PolicyKey`]). Allocated as entries come, so
/// its capacity costs no memory until used.
#[map]
pub static POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(capacity::POLICY, BPF_F_NO_PREALLOC);

/// {endpoint, identity, direction, protocol, port prefix} -> allowing rule, for port
/// ranges only; walked only for endpoints flagged as having them.
#[map]
pub static POLICY_RANGES: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::pinned(capacity::POLICY_RANGES, 0);

/// Own connection tracking of IPv4 connections, so replies of allowed connections pass
/// and established packets cost one lookup.
#[map]
pub static CT4: LruHashMap<CtKey4, CtValue> = LruHashMap::pinned(capacity::CT, 0);

/// The same for IPv6 (a separate map keeps the IPv4 key short).
#[map]
pub static CT6: LruHashMap<CtKey6, CtValue> = LruHashMap::pinned(capacity::CT, 0);

/// Packets and bytes per verdict reason and direction.
#[map]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// Agent-written global state (the policy generation).
#[map]
pub static STATE: Array<DatapathState> = Array::pinned(1, 0);

/// Verdict events for the agent (flow log), rate-limited per CPU by EVENT_BUDGET.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

/// Token bucket of the event rate limit, per CPU.
#[map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

/// Packets and bytes per rule (index = `PolicyValue::rule`), per CPU.
#[map]
pub static RULE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(capacity::RULE_COUNTERS, 0);

/// Host-side veth (ifindex) -> the endpoint id of the pod behind it. A packet leaving a
/// pod with another local pod's address is spoofed.
#[map]
pub static IFACES: HashMap<u32, u32> = HashMap::pinned(capacity::IFACES, 0);

/// Ports kube-proxy translates on this node's addresses (NodePorts): a pod's connection
/// to a node address on one of them is Service traffic.
#[map]
pub static NODE_PORTS: HashMap<ServicePort, u32> = HashMap::pinned(capacity::NODE_PORTS, 0);
