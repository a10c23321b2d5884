//! Fuzz target: arbitrary text as the manifest directory of local mode.
//!
//! The input (UTF-8) is the directory's one file, `manifests.yaml`: a YAML stream of
//! Namespaces, Pods, NetworkPolicies, Services, EndpointSlices and ServiceCIDRs. A line
//! `#@ then` splits it into successive versions of that file (at most three), read by
//! [`ManifestDir`] and compiled by one [`Compiler`] (so a wholly unreadable update keeps
//! the version before, and ids are kept, as in the agent's loop). The checks below run
//! over the admitted state: the state read,
//! with the version of each policy the compiler has in force. After every version:
//!
//! - nothing panics (parsing, validation, compiling, the kernel model, the reference
//!   evaluator, explain, matrix, their text and JSON forms);
//! - every diagnostic names an object, and the compiler's name objects of the state
//!   (policies, pods, Services, EndpointSlices, ServiceCIDRs);
//! - local mode keys objects by their own namespace and name; what the compiler admits
//!   names a policy (it is enforced as far as it can be read);
//! - the maps only reference what exists: POLICY keys name endpoints of ENDPOINTS,
//!   identities that IPCACHE carries, and rules of the rule table, of a policy that
//!   isolates that endpoint in that direction; the rule table names rules of policies
//!   of the state that can be read; node addresses carry `PEER_HOST`;
//! - the kernel model over the maps agrees with the reference evaluator for flows
//!   between pod, node, ipBlock and outside addresses (as the differential test);
//! - explain agrees with the model and with its own per-rule analysis;
//! - recompiling the same state changes nothing, and ids of what still exists are kept.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netpol_agent::preview::explain;
use netpol_agent::preview::matrix::{self, Matrix, MatrixOptions, Style};
use netpol_agent::preview::{PortProtocol, pod_addresses, served_ports};
use netpol_agent::source::local::{ManifestDir, Snapshot};
use netpol_common::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY,
    IDENTITY_WORLD, PEER_HOST, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, Reason,
};
use netpol_compile::state::{ClusterState, NodeContext, pod_ips};
use netpol_compile::{
    Allocations, Compiled, Compiler, Diagnostic, Direction, Kind, ObjectName, Subject, key_net,
    model, reference, validate_policy,
};

const SPLIT: &str = "\n#@ then\n";
const MAX_VERSIONS: usize = 3;
const NODE_IPS: [&str; 2] = ["10.0.2.254", "fd00::fe"];
/// Addresses that no input is likely to give a pod.
const OUTSIDE: [&str; 2] = ["203.0.113.7", "2001:db8::7"];
/// Flows checked per version: addresses × addresses, one probe each.
const MAX_ADDRESSES: usize = 14;
const MAX_PROBES: usize = 4;
/// Explained pod pairs per version.
const MAX_EXPLAINED: usize = 4;
/// Matrix cells (pods² × ports) above which no matrix is drawn.
const MAX_MATRIX_CELLS: usize = 2_000;

/// This process's manifest directory: under `$NETPOL_FUZZ_DIR` (set by `cargo xtask
/// fuzz`, which removes it afterwards) or the temporary directory.
fn work_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("NETPOL_FUZZ_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("netpol-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the manifest directory");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = work_dir();
    let source = ManifestDir::new(dir);
    let mut compiler = Compiler::new();
    let mut previous: Option<Compiled> = None;
    for version in text.split(SPLIT).take(MAX_VERSIONS) {
        std::fs::write(dir.join("manifests.yaml"), version).expect("writing the manifest");
        let snapshot = source.read().expect("reading the manifest directory");
        check_snapshot(&snapshot);
        let read = state_of(snapshot);
        let compiled = compiler.compile(&read);
        check_diagnostics(&read, &compiled);
        let state = admitted_state(read, &compiler, &compiled);
        check_maps(&state, &compiled);
        check_against_reference(&state, &compiled);
        check_explain(&state, &compiled);
        check_matrix(&state, &compiled);
        check_recompile(&state, &compiled);
        if let Some(before) = &previous {
            check_ids_kept(before, &compiled);
        }
        previous = Some(compiled);
    }
});

/// The state local mode builds: every pod local, unless some pod names a node, in which
/// case that node is this one (and pods elsewhere are peers only, as with `--node-name`).
fn state_of(snapshot: Snapshot) -> ClusterState {
    let node_name = snapshot
        .pods
        .values()
        .find_map(|pod| pod.spec.as_ref()?.node_name.clone());
    let mut state = ClusterState {
        node: NodeContext {
            name: node_name,
            ips: NODE_IPS.iter().map(|ip| ip.parse().unwrap()).collect(),
        },
        ..ClusterState::default()
    };
    let (_diagnostics, _generation) = snapshot.into_state(&mut state);
    state
}

/// `read` with the version of each policy that `compiler` has in force.
fn admitted_state(read: ClusterState, compiler: &Compiler, compiled: &Compiled) -> ClusterState {
    let state = compiler.admitted(&read);
    assert!(state.policies.keys().eq(compiled.policies.iter()));
    for (obj, policy) in &state.policies {
        // Admitted as far as it can be read: a name and a namespace at least.
        if let Err(errors) = validate_policy(&policy.object()) {
            assert!(
                !errors.iter().any(|e| e.field.starts_with("metadata.")),
                "the compiler admitted {obj}, which names no policy: {errors:?}"
            );
        }
    }
    state
}

fn check_diagnostic(d: &Diagnostic) {
    let named = match &d.subject {
        Subject::Object { name, .. } => match name {
            ObjectName::Namespaced(_) | ObjectName::Endpoint(_) => true,
            ObjectName::Cluster(name) | ObjectName::In(name) => !name.is_empty(),
        },
        Subject::File { origin, .. } => !origin.is_empty(),
        Subject::Address(address) => !address.is_empty(),
    };
    assert!(named, "diagnostic names no object: {d:?}");
    assert!(!d.message.is_empty(), "diagnostic without a message: {d:?}");
    // (No check of the field's shape: keys may contain dots, e.g. `.name: x` gives
    // `spec.containers[0]..name`, which is faithful.)
    let _ = d.to_string();
}

fn check_snapshot(snapshot: &Snapshot) {
    snapshot.diagnostics.iter().for_each(check_diagnostic);
    // A namespace is kept by its name (the key), which is never empty.
    for name in snapshot.namespaces.keys() {
        assert!(!name.is_empty());
    }
    for (key, pod) in &snapshot.pods {
        assert!(!key.name.is_empty());
        assert_eq!(
            pod.metadata.namespace.as_deref(),
            Some(key.namespace.as_str())
        );
        assert_eq!(pod.metadata.name.as_deref(), Some(key.name.as_str()));
    }
    for (key, policy) in &snapshot.policies {
        assert!(!key.name.is_empty());
        let policy = policy.object();
        assert_eq!(
            policy.metadata.namespace.as_deref(),
            Some(key.namespace.as_str())
        );
        assert_eq!(policy.metadata.name.as_deref(), Some(key.name.as_str()));
    }
}

/// The compiler's diagnostics name objects of the state it read.
fn check_diagnostics(state: &ClusterState, compiled: &Compiled) {
    for d in &compiled.diagnostics {
        check_diagnostic(d);
        let exists = match &d.subject {
            Subject::Object {
                kind,
                name: ObjectName::Namespaced(key),
            } => match kind {
                Kind::NetworkPolicy => {
                    state.policies.contains_key(key) || state.unreadable_policies.contains(key)
                }
                Kind::Pod => state.pods.contains_key(key),
                Kind::Service => state.services.contains_key(key),
                Kind::EndpointSlice => state.endpoint_slices.contains_key(key),
                _ => false,
            },
            Subject::Object {
                kind: Kind::ServiceCIDR,
                name: ObjectName::Cluster(name),
            } => state.service_cidrs.contains_key(name),
            _ => false,
        };
        assert!(
            exists,
            "compiler diagnostic about no object of the state: {d}"
        );
    }
}

fn check_maps(state: &ClusterState, compiled: &Compiled) {
    // Local endpoints and ENDPOINTS.
    let mut endpoint_ids = BTreeMap::new();
    for local in &compiled.local_pods {
        let pod = state.pods.get(&local.pod).expect("local pod of the state");
        assert!(
            state.node.is_local(pod),
            "{} is not on this node",
            local.pod
        );
        assert!(
            endpoint_ids.insert(local.endpoint_id, local).is_none(),
            "endpoint id {} given twice",
            local.endpoint_id
        );
        assert!(!local.ips.is_empty());
        for ip in &local.ips {
            let info = compiled
                .endpoints
                .get(&netpol_compile::addr(*ip))
                .unwrap_or_else(|| panic!("{} address {ip} not in ENDPOINTS", local.pod));
            assert_eq!(info.id, local.endpoint_id);
            assert_eq!(
                info.flags & ENDPOINT_INGRESS_ISOLATED != 0,
                !local.ingress_policies.is_empty()
            );
            assert_eq!(
                info.flags & ENDPOINT_EGRESS_ISOLATED != 0,
                !local.egress_policies.is_empty()
            );
        }
        for policy in local.ingress_policies.iter().chain(&local.egress_policies) {
            assert!(state.policies.contains_key(policy));
            assert_eq!(policy.namespace, local.pod.namespace);
        }
    }
    for info in compiled.endpoints.values() {
        assert!(
            endpoint_ids.contains_key(&info.id),
            "ENDPOINTS id {} has no pod",
            info.id
        );
    }

    // The rule table: rules of policies of the state that can be read (what cannot be
    // read allows nothing, so has no rule id).
    for (id, rule) in compiled.rules.iter() {
        assert_ne!(*id, netpol_common::RULE_NONE);
        let policy = state
            .policies
            .get(&rule.policy)
            .unwrap_or_else(|| panic!("rule {id} of a policy not in the state: {rule}"));
        let readable = reference::readable_rules(&rule.policy, &policy.object(), rule.direction);
        assert!(
            readable.iter().any(|r| r.index == rule.index),
            "rule {id} is {rule}, which cannot be read"
        );
    }

    // IPCACHE and identities.
    let carried: BTreeSet<u32> = compiled.ipcache.values().map(|p| p.identity).collect();
    for (key, info) in &compiled.ipcache {
        let net = key_net(key).unwrap_or_else(|| panic!("IPCACHE key is no prefix: {key:?}"));
        assert_eq!(
            netpol_compile::net_key(&net),
            *key,
            "IPCACHE key not masked"
        );
        assert_ne!(
            info.identity, IDENTITY_ANY,
            "IPCACHE entry with identity ANY"
        );
        assert!(
            compiled.identities.contains_key(&info.identity),
            "IPCACHE identity {} is not described",
            info.identity
        );
    }
    for id in compiled.identities.keys() {
        assert!(
            *id == IDENTITY_ANY || *id == IDENTITY_WORLD || carried.contains(id),
            "identity {id} has no address"
        );
        let _ = compiled.members(state, *id);
    }
    for ip in &state.node.ips {
        let info = compiled.ipcache.get(&netpol_compile::host_key(*ip));
        assert!(
            info.is_some_and(|i| i.flags & PEER_HOST != 0),
            "node address {ip} without PEER_HOST: {info:?}"
        );
    }

    // POLICY: endpoint, identity, rule, direction all exist and fit together.
    for (key, value) in compiled.policy.iter() {
        let k = &key.data;
        assert!(
            (POLICY_PREFIX_ANY_PROTO..=POLICY_PREFIX_FULL).contains(&key.prefix_len),
            "POLICY prefix length {}",
            key.prefix_len
        );
        assert_eq!(
            netpol_compile::Lpm::new(key.prefix_len, *k),
            *key,
            "POLICY key not masked"
        );
        let local = endpoint_ids
            .get(&k.endpoint)
            .unwrap_or_else(|| panic!("POLICY key for no endpoint: {k:?}"));
        assert!(
            k.identity == IDENTITY_ANY || carried.contains(&k.identity),
            "POLICY key for identity {} that IPCACHE does not carry",
            k.identity
        );
        let rule = compiled
            .rules
            .get(&value.rule)
            .unwrap_or_else(|| panic!("POLICY value names no rule: {value:?}"));
        let isolating = match rule.direction {
            Direction::Ingress => {
                assert_eq!(k.direction, DIR_INGRESS);
                &local.ingress_policies
            }
            Direction::Egress => {
                assert_eq!(k.direction, DIR_EGRESS);
                &local.egress_policies
            }
        };
        assert!(
            isolating.contains(&rule.policy),
            "POLICY entry of {} allows by {rule}, a policy that does not isolate it",
            local.pod
        );
    }
}

/// Pod, node, ipBlock and outside addresses (a bounded, deterministic selection).
fn addresses(state: &ClusterState, compiled: &Compiled) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut push = |ip: IpAddr| {
        if out.len() < MAX_ADDRESSES && !out.contains(&ip) {
            out.push(ip);
        }
    };
    NODE_IPS.iter().for_each(|ip| push(ip.parse().unwrap()));
    OUTSIDE.iter().for_each(|ip| push(ip.parse().unwrap()));
    for pod in state.pods.values() {
        pod_ips(pod).take(2).for_each(&mut push);
    }
    for key in compiled.ipcache.keys() {
        if let Some(net) = key_net(key) {
            push(net.network());
            push(net.broadcast());
        }
    }
    out
}

/// TCP/80, then the numeric ports the policies and containers mention (bounded).
fn probes(state: &ClusterState) -> Vec<(u8, u16)> {
    let mut out = vec![(PROTO_TCP, 80)];
    let protocol = |name: Option<&str>| match name {
        Some("UDP") => PROTO_UDP,
        Some("SCTP") => PROTO_SCTP,
        _ => PROTO_TCP,
    };
    let mut push = |probe: (u8, u16)| {
        if out.len() < MAX_PROBES && !out.contains(&probe) {
            out.push(probe);
        }
    };
    for policy in state.policies.values() {
        let Some(spec) = &policy.object().spec else {
            continue;
        };
        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .flat_map(|r| r.ports.iter().flatten());
        let egress = spec
            .egress
            .iter()
            .flatten()
            .flat_map(|r| r.ports.iter().flatten());
        for port in ingress.chain(egress) {
            let proto = protocol(port.protocol.as_deref());
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) =
                &port.port
                && let Ok(n) = u16::try_from(*n)
            {
                push((proto, n));
                if let Some(end) = port.end_port.and_then(|e| u16::try_from(e).ok()) {
                    push((proto, end));
                    push((proto, end.wrapping_add(1)));
                }
            }
        }
    }
    for pod in state.pods.values() {
        for p in served_ports(pod) {
            push((p.protocol, p.port));
        }
    }
    out
}

/// The differential property test's check, on whatever the input made: the model
/// against the reference with the cluster admin's tiers (NetworkPolicy's under it).
fn check_against_reference(state: &ClusterState, compiled: &Compiled) {
    use netpol_compile::cnp::reference::{DecidedBy, TieredReference};
    let reference = TieredReference::new(state);
    let addresses = addresses(state, compiled);
    let probes = probes(state);
    for (i, &src) in addresses.iter().enumerate() {
        for (j, &dst) in addresses.iter().enumerate() {
            let (protocol, port) = probes[(i + j) % probes.len()];
            for direction in Direction::BOTH {
                let got = model::decide(compiled, src, dst, protocol, port, direction);
                let want = reference.evaluate(src, dst, protocol, port, direction);
                let rule = compiled.rules.get(&got.rule);
                let agree = match (&want.decided_by, got.reason) {
                    (DecidedBy::NotEndpoint, Reason::NotEndpoint)
                    | (DecidedBy::Itself, Reason::Hairpin)
                    | (DecidedBy::Default, Reason::NotIsolated | Reason::FromHost)
                    | (DecidedBy::NetworkPolicy(reference::Verdict::FromHost), Reason::FromHost)
                    | (DecidedBy::NetworkPolicy(reference::Verdict::Denied), Reason::PolicyDenied)
                    // The reference knows no audit mode: an audited drop is its Denied.
                    | (
                        DecidedBy::NetworkPolicy(reference::Verdict::Denied),
                        Reason::AuditAllowed,
                    ) => true,
                    (
                        DecidedBy::NetworkPolicy(reference::Verdict::Allowed(rules)),
                        Reason::PolicyAllowed,
                    ) => rule.is_some_and(|rule| rules.contains(rule)),
                    (
                        DecidedBy::Cnp { rule: want, action },
                        Reason::ClusterAccepted | Reason::ClusterDenied,
                    ) => {
                        (*action == netpol_compile::cnp::Action::Deny)
                            == (got.reason == Reason::ClusterDenied)
                            && rule.is_some_and(|r| want.names(r))
                    }
                    _ => false,
                };
                assert!(
                    agree,
                    "{direction} {src} -> {dst} protocol {protocol} port {port}: \
                     model {got:?}, reference {want:?}"
                );
            }
        }
    }
}

fn check_explain(state: &ClusterState, compiled: &Compiled) {
    let (pods, _skipped) = pod_addresses(state);
    let probes = probes(state);
    let ends: Vec<IpAddr> = pods
        .iter()
        .filter_map(|p| p.ips.first().copied())
        .chain(NODE_IPS.iter().take(1).map(|ip| ip.parse().unwrap()))
        .take(MAX_EXPLAINED)
        .collect();
    for (i, &src) in ends.iter().enumerate() {
        for (j, &dst) in ends.iter().enumerate() {
            let (protocol, port) = probes[(i + j) % probes.len()];
            let flow = PortProtocol { port, protocol };
            let e = explain::explain(state, compiled, src, dst, flow);
            assert_eq!(
                e.allowed,
                model::flow_allowed(compiled, src, dst, protocol, port),
                "explain and the model disagree on {src} -> {dst} {flow:?}"
            );
            for hook in &e.hooks {
                assert!(
                    hook.analysis_agrees,
                    "explain's per-rule analysis disagrees with the maps:\n{e}"
                );
            }
            let _ = e.to_string();
            let _ = serde_json::to_string(&e).expect("explain as JSON");
        }
    }
    // By name, as the command line does (errors are fine, panics are not).
    if let (Some(a), Some(b)) = (pods.first(), pods.last()) {
        let _ = explain::explain_between(
            state,
            compiled,
            &a.pod.to_string(),
            &b.pod.to_string(),
            PortProtocol::tcp(80),
        );
    }
}

fn check_matrix(state: &ClusterState, compiled: &Compiled) {
    // A matrix previews the whole cluster: every pod local, as `matrix` loads it.
    if state.node.name.is_some() {
        return;
    }
    let (pods, _) = pod_addresses(state);
    let ports: BTreeSet<PortProtocol> = state.pods.values().flat_map(served_ports).collect();
    if pods.len() * pods.len() * ports.len().max(1) > MAX_MATRIX_CELLS {
        return;
    }
    let m = Matrix::new(state, compiled, &MatrixOptions::default());
    for (port, src, dst, reach) in m.cells() {
        assert_eq!(m.get(port, src, dst), Some(reach));
    }
    let _ = matrix::render(&m, None, Style::default());
    let _ = serde_json::to_string(&m).expect("matrix as JSON");
    let unchanged = matrix::diff(&m, &m);
    let _ = matrix::render(&m, Some(&unchanged), Style::default());
}

/// Compiling the same state again with the allocations it produced changes nothing
/// (the agent then writes nothing to the kernel).
fn check_recompile(state: &ClusterState, compiled: &Compiled) {
    let again = netpol_compile::compile(state, &compiled.allocations);
    assert_eq!(again.endpoints, compiled.endpoints, "ENDPOINTS changed");
    assert_eq!(again.ipcache, compiled.ipcache, "IPCACHE changed");
    assert_eq!(again.policy, compiled.policy, "POLICY changed");
    assert_eq!(again.rules, compiled.rules, "rule table changed");
    assert_eq!(again.local_pods, compiled.local_pods);
    // What is said about policies depends on the versions read (the admitted state may
    // hold a version from before); the rest is about pods, and the same.
    let not_about_policies =
        |d: &&Diagnostic| !matches!(d.object(), Some((Kind::NetworkPolicy, _)));
    let about_pods: Vec<&Diagnostic> = compiled
        .diagnostics
        .iter()
        .filter(not_about_policies)
        .collect();
    assert!(
        again
            .diagnostics
            .iter()
            .filter(not_about_policies)
            .eq(about_pods.iter().copied())
    );
    let fresh = netpol_compile::compile(state, &Allocations::default());
    assert!(
        fresh
            .diagnostics
            .iter()
            .filter(not_about_policies)
            .eq(about_pods.iter().copied())
    );
    assert_eq!(fresh.endpoints.len(), compiled.endpoints.len());
    assert_eq!(fresh.rules.len(), compiled.rules.len());
}

/// Endpoint and rule ids are kept while their pod or rule exists.
fn check_ids_kept(before: &Compiled, after: &Compiled) {
    let (b, a) = (&before.allocations, &after.allocations);
    for (pod, id) in b.endpoints() {
        if let Some(now) = a.endpoint_id(pod) {
            assert_eq!(now, *id, "endpoint id of {pod} changed");
        }
    }
    for (rule, id) in b.rules() {
        if let Some(now) = a.rule_id(rule) {
            assert_eq!(now, *id, "id of {rule} changed");
        }
    }
}
