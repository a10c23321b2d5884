//! Tier 3: real TCP/UDP traffic between network namespaces with the real agent.
//!
//! Run through `cargo xtask test`, which builds the agent and sets `NETPOL_AGENT_BIN`.
//! Without it the agent scenarios print a skip notice; the lab's own checks (which use
//! a no-op stand-in agent) always run as root. Every expectation comes from the
//! scenario's definition, never from observed output.

mod support;

use std::net::{IpAddr, Ipv4Addr};

use netpol_lab::{NODE, Outcome, Port, Probe};
use support::*;

// ---------------------------------------------------------------------------------
// The lab itself (no enforcement): everything reachable, in both families.

#[test]
fn lab_without_enforcement_reaches_everything() {
    if !can_run("lab_without_enforcement_reaches_everything") {
        return;
    }
    let mut lab = standard_lab(&["x/a", "x/b", "y/a"]);
    lab.add_host(
        "ext",
        IpAddr::V4(Ipv4Addr::new(192, 168, 99, 10)),
        &[Port::tcp(22), Port::udp(53)],
    )
    .expect("adding a host");

    // Pods, node -> pods (v4 + v6, TCP + UDP).
    let mut probes = all_probes(&lab, &["x/a", "x/b", "y/a", NODE]);
    // Pods <-> host.
    probes.push(Probe::tcp("x/a", "host/ext", 22));
    probes.push(Probe::udp("y/a", "host/ext", 53));
    probes.push(Probe::tcp("host/ext", "x/b", 80));
    probes.push(Probe::udp("host/ext", "y/a", 80));
    check(&lab, &expect(probes, |_| true), None);

    // A port nobody serves is an active refusal, not a policy drop.
    let r = lab
        .probe(&Probe::tcp("x/a", "y/a", 9), PROBE_TIMEOUT)
        .expect("probing");
    assert!(matches!(r.outcome, Outcome::Rejected(_)), "{r:?}");
}

#[test]
fn lab_drives_an_agent_through_the_status_file() {
    if !can_run("lab_drives_an_agent_through_the_status_file") {
        return;
    }
    let lab = standard_lab(&["x/a", "y/a"]);
    let node_netns = lab.node_netns().to_owned();
    let pod_netns = lab.pod("x/a").unwrap().netns.clone();
    let pin_dir = lab.pin_dir();
    let workdir = lab.workdir().to_path_buf();
    {
        let mut cluster = Cluster::start(lab, env!("CARGO_BIN_EXE_noop-agent").as_ref());
        // The manifests describe the lab per README.md ("Using the agent").
        let yaml = std::fs::read_to_string(cluster.manifests.path().join("cluster.yaml")).unwrap();
        // No pod names its interface: the agent finds it from the kernel.
        assert!(!yaml.contains("netpol.dev/host-interface"), "{yaml}");
        for needle in [
            "kind: Namespace",
            "kubernetes.io/metadata.name: x",
            "kind: Pod",
            "podIP: 10.0.0.1",
            "ip: fd10::1",
            "name: serve-80-udp",
            "nodeName: lab-node",
        ] {
            assert!(yaml.contains(needle), "{needle} missing from\n{yaml}");
        }
        cluster.apply("# no policies yet\n");
        assert_eq!(cluster.agent.status().unwrap().generation, 2);
        // The (no-op) agent runs inside the node namespace.
        let pid = cluster.agent.pid().unwrap();
        let agent_ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let node_ns =
            nix::sys::stat::stat(netpol_lab::netns::netns_path(&node_netns).as_path()).unwrap();
        assert_eq!(
            agent_ns.to_string_lossy(),
            format!("net:[{}]", node_ns.st_ino)
        );
        cluster.check(&expect(all_probes(&cluster.lab, &["x/a", "y/a"]), |_| true));
    }
    // Everything is gone after drop.
    for ns in [&node_netns, &pod_netns] {
        assert!(
            !netpol_lab::netns::netns_path(ns).exists(),
            "{ns} still exists"
        );
    }
    assert!(!pin_dir.exists());
    assert!(!workdir.exists());
}

#[test]
fn blocked_probes_time_out_together() {
    if !can_run("blocked_probes_time_out_together") {
        return;
    }
    let lab = standard_lab(&["x/a", "y/a"]);
    // Silently drop everything routed to y/a, as a policy drop would.
    netpol_lab::netns::ip_batch(
        Some(lab.node_netns()),
        &["route replace blackhole 10.0.0.2/32".to_string()],
    )
    .expect("blackholing y/a");
    let probes: Vec<Probe> = (0..40)
        .map(|i| {
            if i % 2 == 0 {
                Probe::tcp("x/a", "y/a", 80)
            } else {
                Probe::udp("x/a", "y/a", 80)
            }
        })
        .collect();
    let start = std::time::Instant::now();
    let results = lab.probe_all(&probes, PROBE_TIMEOUT).expect("probing");
    let elapsed = start.elapsed();
    for r in &results {
        assert_eq!(r.outcome, Outcome::Blocked, "{}", r.probe);
    }
    assert!(
        elapsed < PROBE_TIMEOUT * 3,
        "40 blocked probes took {elapsed:?}: they must run concurrently"
    );
    // The other direction is unaffected (x/a's route still exists).
    let r = lab
        .probe(&Probe::tcp("node", "x/a", 80), PROBE_TIMEOUT)
        .unwrap();
    assert!(r.outcome.is_allowed(), "{r:?}");
}

// ---------------------------------------------------------------------------------
// The agent.

const DENY_INGRESS_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;

/// (a) No policies: everything allowed, TCP and UDP, IPv4 and IPv6.
#[test]
fn no_policies_allow_everything() {
    let Some(agent) = agent_bin("no_policies_allow_everything") else {
        return;
    };
    let cluster = Cluster::start(standard_lab(&["x/a", "x/b", "y/a", "y/b"]), &agent);
    let srcs = sources(&cluster.lab);
    let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
    cluster.check(&expect(all_probes(&cluster.lab, &srcs), |_| true));
}

/// (b) Default-deny ingress in `x`: its pods are unreachable from every pod (the node
/// still reaches them), `y` is untouched, and `x`'s own egress works, replies included.
#[test]
fn default_deny_ingress_isolates_one_namespace() {
    let Some(agent) = agent_bin("default_deny_ingress_isolates_one_namespace") else {
        return;
    };
    let mut cluster = Cluster::start(standard_lab(&["x/a", "x/b", "y/a", "y/b"]), &agent);
    cluster.apply(DENY_INGRESS_X);
    let srcs = sources(&cluster.lab);
    let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
    cluster.check(&expect(all_probes(&cluster.lab, &srcs), |p| {
        p.src == NODE || ns_of(&p.dst) != "x"
    }));
}

/// (c) Ingress to `x` allowed only on TCP 80 and only from namespaces labelled `ns=y`.
#[test]
fn allow_by_port_and_namespace_label() {
    let Some(agent) = agent_bin("allow_by_port_and_namespace_label") else {
        return;
    };
    let mut cluster = Cluster::start(standard_lab(&["x/a", "x/b", "y/a"]), &agent);
    cluster.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-y-on-80, namespace: x}
spec:
  podSelector: {}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
      ports: [{protocol: TCP, port: 80}]
"#,
    );
    let srcs = sources(&cluster.lab);
    let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
    cluster.check(&expect(all_probes(&cluster.lab, &srcs), |p| {
        let into_x = ns_of(&p.dst) == "x";
        let admitted =
            ns_of(&p.src) == "y" && p.port == 80 && p.protocol == netpol_lab::Protocol::Tcp;
        p.src == NODE || !into_x || admitted
    }));
}

/// (d) Egress of `x/a` only to 192.168.99.0/24 except 192.168.99.20/32 on TCP 80.
#[test]
fn egress_ip_block_with_except() {
    let Some(agent) = agent_bin("egress_ip_block_with_except") else {
        return;
    };
    let mut lab = standard_lab(&["x/a", "y/a"]);
    for (name, last) in [("in-block", 10), ("excepted", 20)] {
        lab.add_host(
            name,
            IpAddr::V4(Ipv4Addr::new(192, 168, 99, last)),
            &[Port::tcp(80)],
        )
        .expect("adding a host");
    }
    let mut cluster = Cluster::start(lab, &agent);
    cluster.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-to-block, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 192.168.99.0/24, except: [192.168.99.20/32]}}]
      ports: [{protocol: TCP, port: 80}]
"#,
    );
    let mut probes = vec![
        Probe::tcp("x/a", "host/in-block", 80),
        Probe::tcp("x/a", "host/excepted", 80),
        Probe::tcp("y/a", "host/in-block", 80),
        Probe::tcp("y/a", "host/excepted", 80),
        Probe::tcp("host/in-block", "x/a", 80),
    ];
    probes.extend(all_probes(&cluster.lab, &["x/a", "y/a", NODE]));
    cluster.check(&expect(probes, |p| {
        if p.src != "x/a" {
            // Only x/a's egress is restricted; its ingress stays open.
            return true;
        }
        // From x/a only the in-block host on TCP 80.
        p.dst == "host/in-block" && p.port == 80
    }));
}

/// (e) Applying, then deleting, a policy changes the matrix both ways.
#[test]
fn policy_update_changes_the_matrix() {
    let Some(agent) = agent_bin("policy_update_changes_the_matrix") else {
        return;
    };
    let mut cluster = Cluster::start(standard_lab(&["x/a", "y/a"]), &agent);
    let probes = all_probes(&cluster.lab, &["x/a", "y/a"]);
    cluster.check(&expect(probes.clone(), |_| true));
    cluster.apply(DENY_INGRESS_X);
    cluster.check(&expect(probes.clone(), |p| ns_of(&p.dst) != "x"));
    cluster.apply("");
    cluster.check(&expect(probes, |_| true));
}

/// (f) A pod created after the agent started is enforced once it is in the manifests.
#[test]
fn pods_added_later_are_enforced() {
    let Some(agent) = agent_bin("pods_added_later_are_enforced") else {
        return;
    };
    let mut cluster = Cluster::start(standard_lab(&["x/a", "y/a"]), &agent);
    cluster.apply(DENY_INGRESS_X);
    cluster
        .lab
        .add_pod(standard_pod("x", "late", 9))
        .expect("adding a pod");
    cluster
        .lab
        .add_pod(standard_pod("y", "late", 10))
        .expect("adding a pod");
    cluster.apply(DENY_INGRESS_X);
    let srcs = sources(&cluster.lab);
    let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
    cluster.check(&expect(all_probes(&cluster.lab, &srcs), |p| {
        p.src == NODE || ns_of(&p.dst) != "x"
    }));
}
