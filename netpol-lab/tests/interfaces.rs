//! Tier 3: what the agent attaches to comes from the kernel, never from a pod.
//!
//! Hostile pods name the node's uplink (the underlay `ul1`, which carries a node
//! address), loopback and another pod's veth in `netpol.dev/host-interface`. In
//! Kubernetes mode that changes nothing; in local mode (where the operator may name
//! interfaces) each is refused with a diagnostic naming the pod and the annotation, and
//! changes nothing either. A node whose pods hang on a Linux bridge (no per-pod route)
//! is enforced and anti-spoofed. An interface an earlier agent left programs on is
//! cleaned up by the next one.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use netpol_lab::{AgentProcess, HOST_INTERFACE_ANNOTATION, Lab, NetnsWorker, Probe};
use support::*;

/// Two nodes. On node 0: x/victim, x/other, and three hostile pods naming the uplink
/// (`ul1`, towards node 1), `lo` and x/victim's veth; on node 1: x/far.
fn hostile_lab() -> Lab {
    let mut lab = Lab::with_nodes(2).expect("creating the lab");
    lab.set_namespace_labels("x", [("ns", "x")]);
    for (i, name) in ["victim", "other", "h-uplink", "h-lo", "h-veth"]
        .into_iter()
        .enumerate()
    {
        lab.add_pod(standard_pod("x", name, i as u8 + 1))
            .expect("adding a pod");
    }
    lab.add_pod(standard_pod("x", "far", 9).on_node(1))
        .expect("adding a pod on node 1");
    let victim_veth = lab.pod("x/victim").unwrap().host_if.clone();
    for (pod, interface) in [
        ("x/h-uplink", "ul1"),
        ("x/h-lo", "lo"),
        ("x/h-veth", &victim_veth),
    ] {
        lab.set_pod_annotation(pod, HOST_INTERFACE_ANNOTATION, interface)
            .expect("annotating");
    }
    lab
}

/// Whether the node reaches a TCP server of its own over loopback.
fn loopback_works(lab: &Lab) -> bool {
    let node = NetnsWorker::spawn(lab.node_netns()).expect("node worker");
    node.run(|| -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let _client = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        listener.accept()?;
        Ok(())
    })
    .expect("node worker")
    .is_ok()
}

/// What the hostile annotations must not change: only node 0's pods' veths carry the
/// programs, traffic over the uplink and loopback flows, and x/victim still cannot
/// borrow another pod's address.
fn assert_nothing_changed(lab: &Lab, agent: &AgentProcess) {
    let status = agent.status().expect("a status");
    assert_eq!(
        status.attached,
        5,
        "the programs are on node 0's five pod veths and nowhere else\n{}",
        agent.log_tail(30)
    );
    assert!(loopback_works(lab), "the node's loopback is broken");
    let probes = vec![
        Probe::tcp("x/far", "x/victim", 80),
        Probe::tcp("x/victim", "x/far", 80),
        Probe::udp("x/far", "x/h-uplink", 80),
        Probe::tcp("node", "x/victim", 80),
        Probe::tcp("x/other", "x/victim", 80),
        Probe::tcp("x/victim", "x/h-veth", 80),
    ];
    check(lab, &expect(probes, |_| true), Some(agent));
    assert!(
        !borrows_address(lab, "x/victim", "x/other", "x/h-lo"),
        "x/victim got a datagram with x/other's address through: its veth is not bound to it"
    );
}

#[test]
fn in_kubernetes_mode_no_pod_chooses_what_the_agent_attaches_to() {
    let Some(agent) = agent_bin("in_kubernetes_mode_no_pod_chooses_what_the_agent_attaches_to")
    else {
        return;
    };
    let cluster = KubeCluster::start(hostile_lab(), &agent, &[], &[]);
    assert_nothing_changed(&cluster.lab, &cluster.agent);
    let status = cluster.agent.status().unwrap();
    assert_eq!(
        status.invalid, 0,
        "nothing to say: the annotations are not read"
    );
}

#[test]
fn in_local_mode_hostile_interface_names_are_refused_and_change_nothing() {
    let Some(agent) =
        agent_bin("in_local_mode_hostile_interface_names_are_refused_and_change_nothing")
    else {
        return;
    };
    // Pods' veths are `v<i>`; the prefix `ul` also covers the underlay, which still never
    // gets pod programs: it carries a node address.
    let cluster = Cluster::start_with(
        hostile_lab(),
        &agent,
        "",
        &["--pod-interface-prefix", "v,ul"],
    );
    assert_nothing_changed(&cluster.lab, &cluster.agent);
    assert_eq!(cluster.agent.status().unwrap().invalid, 3);
    let log = std::fs::read_to_string(cluster.agent.log_path()).expect("the agent's log");
    let victim_veth = &cluster.lab.pod("x/victim").unwrap().host_if;
    for (pod, why) in [
        ("x/h-uplink", "interface \"ul1\" may not carry pod programs: it carries the node address 172.31.254.1/30".to_owned()),
        ("x/h-lo", "interface \"lo\" is not named like a pod's interface".to_owned()),
        ("x/h-veth", format!("interface \"{victim_veth}\" is Pod x/victim's")),
    ] {
        let line = format!("Pod {pod}: metadata.annotations[{HOST_INTERFACE_ANNOTATION}]: {why}");
        assert!(
            log.contains(&line),
            "no diagnostic `{line}` in\n{}",
            cluster.agent.log_tail(40)
        );
    }
}

#[test]
fn a_bridge_cni_node_is_enforced_and_anti_spoofed() {
    let Some(agent) = agent_bin("a_bridge_cni_node_is_enforced_and_anti_spoofed") else {
        return;
    };
    let mut lab = Lab::new().expect("creating the lab");
    lab.set_bridged(0).expect("a bridge on the node");
    lab.set_namespace_labels("x", [("ns", "x")]);
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        lab.add_pod(standard_pod("x", name, i as u8 + 1))
            .expect("adding a pod");
    }
    // Kubernetes mode: nothing names the pods' interfaces, and no route leads to them
    // but the bridge's subnet routes.
    let cluster = KubeCluster::start(lab, &agent, &[policy_object(B_ONLY_FROM_C)], &[]);
    let status = cluster.agent.status().unwrap();
    assert_eq!(
        status.attached,
        3,
        "the three bridge ports, not the bridge\n{}",
        cluster.agent.log_tail(30)
    );
    // Enforced: x/b accepts only x/c (and the node); everything else is open.
    let lab = &cluster.lab;
    let probes = all_probes(lab, &["x/a", "x/b", "x/c", "node"]);
    cluster.check(&expect(probes, |p| {
        p.dst != "x/b" || p.src == "x/c" || p.src == "node"
    }));
    // Anti-spoofed: each port is bound to its pod.
    assert!(
        !borrows_address(lab, "x/a", "x/b", "x/c"),
        "x/a got a datagram with x/b's address through its bridge port"
    );
    assert!(
        !borrows_address(lab, "x/c", "x/a", "x/b"),
        "x/c got a datagram with x/a's address through its bridge port"
    );
}

#[test]
fn an_agent_removes_the_programs_an_earlier_one_left_on_an_interface_that_is_no_pods() {
    let Some(agent) = agent_bin("an_agent_removes_the_programs_an_earlier_one_left") else {
        return;
    };
    let mut lab = standard_lab(&["x/a"]);
    let host = lab
        .add_host("ext", std::net::Ipv4Addr::new(192, 168, 99, 10).into(), &[])
        .expect("adding a host");
    let host_veth = host.node_if.clone();
    let mut manifests =
        netpol_lab::ManifestDir::create(lab.workdir().join("manifests")).expect("manifests");
    let generation = manifests.write(&lab, "").expect("writing manifests");
    let source = |extra: &[&str]| {
        let mut args = vec![
            std::ffi::OsString::from("--manifests"),
            manifests.path().as_os_str().to_owned(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        args
    };
    let probe_a = |lab: &Lab| {
        lab.probe(&Probe::tcp("host/ext", "x/a", 80), PROBE_TIMEOUT)
            .expect("probing")
            .outcome
    };
    let reaches_a = |lab: &Lab| probe_a(lab).is_allowed();
    // The precondition, with no agent yet: a host just plumbed on a busy machine may
    // lose its first handshake (one retransmission is the probe's whole second), so it
    // gets three tries; what it saw is in the message.
    let mut first_outcomes = Vec::new();
    let works = (0..3).any(|_| {
        first_outcomes.push(probe_a(&lab));
        first_outcomes[first_outcomes.len() - 1].is_allowed()
    });
    assert!(
        works,
        "the lab works without an agent: host/ext -> x/a:80 observed {first_outcomes:?}"
    );
    // An earlier agent (here: told the host's veth is a pod's) pinned the pod programs
    // there: nothing is programmed behind it, so the host's traffic is dropped, and the
    // pinned link outlives the agent.
    let mut first = AgentProcess::start_with_source(
        &lab,
        &agent,
        &source(&["--pod-interface-prefix", &format!("v,{host_veth}")]),
    )
    .expect("starting the first agent");
    first
        .wait_generation(generation, AGENT_TIMEOUT)
        .expect("the first agent applied the manifests");
    assert!(
        !reaches_a(&lab),
        "the stray programs drop the host's traffic"
    );
    first.crash().expect("kill -9");
    assert!(!reaches_a(&lab), "pinned, they outlive their agent");
    // The next agent knows the host's veth is no pod's: it removes them.
    let mut second = AgentProcess::start_with_source(&lab, &agent, &source(&[]))
        .expect("starting the second agent");
    second
        .wait_generation(generation, AGENT_TIMEOUT)
        .expect("the second agent applied the manifests");
    let pins: Vec<String> = std::fs::read_dir(lab.pin_dir().join("links"))
        .expect("the pinned links")
        .map(|entry| {
            entry
                .expect("a pin")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(
        !pins
            .iter()
            .any(|pin| pin.starts_with("from_pod:x") || pin.starts_with("to_pod:x")),
        "{pins:?}"
    );
    // The kernel releases a link whose pin is removed after an RCU grace period:
    // bounded wait.
    let deadline = std::time::Instant::now() + AGENT_TIMEOUT;
    while !reaches_a(&lab) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reaches_a(&lab), "{}", second.log_tail(30));
}
