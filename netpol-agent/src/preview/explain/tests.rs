use super::*;
use crate::preview::fixtures::{self, STARS};
use netpol_common::PROTO_TCP;
use netpol_compile::cnp::reference::TieredReference;
use netpol_compile::{Allocations, compile};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Explains by name, and checks the verdict against the kernel model and the
/// reference evaluator, and the per-rule reasoning against the maps.
fn explain_checked(state: &ClusterState, src: &str, dst: &str, port: &str) -> Explanation {
    let compiled = compile(state, &Allocations::default());
    let port: PortProtocol = port.parse().unwrap();
    let mut all = explain_between(state, &compiled, src, dst, port).unwrap();
    assert_eq!(all.len(), 1);
    let e = all.remove(0);
    let (s, d) = (e.src.ip(), e.dst.ip());
    assert_eq!(
        e.allowed,
        model::flow_allowed(&compiled, s, d, port.protocol, port.port),
        "{e}"
    );
    assert_eq!(
        e.allowed,
        TieredReference::new(state).flow_allowed(s, d, port.protocol, port.port),
        "{e}"
    );
    assert!(e.hooks.iter().all(|h| h.analysis_agrees), "{e}");
    e
}

#[test]
fn blocked_by_isolation_names_the_rule_and_the_peer_it_needs() {
    let e = explain_checked(
        &fixtures::stars_with_policies(),
        "client/client",
        "stars/backend",
        "6379/TCP",
    );
    assert_eq!(
        e.to_string(),
        "\
client/client (10.0.1.1) -> stars/backend (10.0.0.2) TCP/6379: BLOCKED
  egress of client/client: not isolated (no NetworkPolicy with policyTypes Egress selects it) → allowed
  ingress of stars/backend: isolated by NetworkPolicy stars/backend-policy
    peer client/client has identity 17 = matches [pods {} in namespaces {role=client}]
    NetworkPolicy stars/backend-policy spec.ingress[0]: peer does not match (needs pods {role=frontend} in namespace stars)
  → dropped: isolated, and no rule allows TCP/6379 from client/client
"
    );
    assert_eq!(e.hooks[1].verdict, HookVerdict::Denied);
}

#[test]
fn allowed_names_the_allowing_rule() {
    let e = explain_checked(
        &fixtures::stars_with_policies(),
        "client/client",
        "stars/frontend",
        "TCP/80",
    );
    assert!(e.allowed);
    let rule = RuleRef::network_policy(
        ObjectRef::new("stars", "frontend-policy"),
        Direction::Ingress,
        0,
    );
    assert_eq!(e.hooks[1].verdict, HookVerdict::Allowed { rule });
    let text = e.to_string();
    assert!(text.contains("NetworkPolicy stars/frontend-policy spec.ingress[0]: matches"));
    assert!(text.ends_with("  → allowed by NetworkPolicy stars/frontend-policy spec.ingress[0]\n"));
}

#[test]
fn blocked_by_port_and_by_protocol() {
    let state = fixtures::stars_with_policies();
    let e = explain_checked(&state, "stars/frontend", "stars/backend", "80");
    assert!(!e.allowed);
    assert_eq!(
        e.hooks[1].rules[0].result,
        RuleResult::NoMatch {
            mismatches: vec![Mismatch::Port {
                needs: vec!["TCP/6379".into()]
            }]
        }
    );
    let e = explain_checked(&state, "stars/frontend", "stars/backend", "6379/UDP");
    assert!(!e.allowed);
    assert!(
        e.to_string()
            .contains("spec.ingress[0]: protocol does not match (needs TCP/6379)"),
        "{e}"
    );
    // Wrong peer and wrong port: both are named.
    let e = explain_checked(&state, "client/client", "stars/backend", "80");
    assert!(e.to_string().contains(
        "peer does not match (needs pods {role=frontend} in namespace stars); \
             port does not match (needs TCP/6379)"
    ));
}

#[test]
fn a_pod_reaching_its_own_address_is_never_blocked_even_when_isolated() {
    // By name, explain says a pod reaching itself never crosses its veth; by address
    // (a hairpin through its own Service arrives so) both hooks let it through.
    let state = fixtures::stars_with_policies();
    let compiled = compile(&state, &Allocations::default());
    let backend = ip("10.0.0.2");
    let e = explain(&state, &compiled, backend, backend, PortProtocol::tcp(80));
    assert!(e.allowed, "{e}");
    assert_eq!(e.hooks.len(), 2);
    assert!(
        e.hooks.iter().all(|h| h.verdict == HookVerdict::Itself),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("ingress of stars/backend: the pod reaching itself: never blocked → allowed"),
        "{e}"
    );
    assert!(reference::flow_allowed(
        &state, backend, backend, PROTO_TCP, 80
    ));
}

#[test]
fn node_traffic_always_passes_and_outside_addresses_are_the_world() {
    let state = fixtures::stars_with_policies();
    let e = explain_checked(&state, "node", "stars/backend", "80/TCP");
    assert!(e.allowed);
    assert_eq!(e.src, Party::Node { ip: ip("10.0.9.9") });
    assert_eq!(e.hooks.len(), 1);
    assert_eq!(e.hooks[0].verdict, HookVerdict::FromNode);
    assert_eq!(
        e.to_string(),
        "\
node (10.0.9.9) -> stars/backend (10.0.0.2) TCP/80: ALLOWED
  egress: node 10.0.9.9 is not a pod: no egress policy applies
  ingress of stars/backend: isolated by NetworkPolicy stars/backend-policy
  → allowed: traffic from the pod's own node always passes (kubelet probes)
"
    );

    let e = explain_checked(&state, "203.0.113.7", "stars/frontend", "80/TCP");
    assert!(!e.allowed);
    let hook = &e.hooks[0];
    assert_eq!(
        hook.peer_identity.as_ref().unwrap().id,
        netpol_common::IDENTITY_WORLD
    );
    assert!(
        e.to_string()
            .contains("    peer 203.0.113.7 has identity 1 = the world: matches no peer\n")
    );

    // Towards the outside only the source's egress hook counts.
    let e = explain_checked(&state, "stars/backend", "203.0.113.7", "443");
    assert!(e.allowed);
    assert_eq!(
        e.dst,
        Party::Outside {
            ip: ip("203.0.113.7")
        }
    );
    assert!(e.to_string().contains("ingress: 203.0.113.7 is not a pod"));
}

#[test]
fn deny_policies_egress_ip_blocks_and_named_ports() {
    let mut state = fixtures::state(STARS, &[]);
    fixtures::add(
        &mut state,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: stars}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-out, namespace: stars}
spec:
  podSelector: {matchLabels: {role: frontend}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}]
      ports: [{port: redis}, {port: 9000}]
"#,
    );
    // Named port `redis` resolves on the destination (backend declares 6379).
    let e = explain_checked(&state, "stars/frontend", "stars/backend", "6379");
    assert!(!e.allowed, "backend's ingress is denied by deny-all");
    assert!(e.hooks[0].allowed(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("→ allowed by NetworkPolicy stars/frontend-out spec.egress[0]"),
        "{text}"
    );
    assert!(
        text.contains("    NetworkPolicy stars/deny-all: no egress rules\n"),
        "{text}"
    );
    assert!(
        text.contains("    NetworkPolicy stars/deny-all: no ingress rules\n"),
        "{text}"
    );

    // 9000 to client: allowed by port number and ipBlock.
    let e = explain_checked(&state, "stars/frontend", "client/client", "9000");
    assert!(e.allowed, "{e}");
    // To management-ui: inside the except.
    let e = explain_checked(
        &state,
        "stars/frontend",
        "management-ui/management-ui",
        "9000",
    );
    assert!(!e.allowed);
    assert!(
        e.to_string()
            .contains("peer does not match (needs ipBlock 10.0.0.0/16 except 10.0.2.0/24)")
    );
    // The named port does not resolve on client (it declares no `redis`).
    let e = explain_checked(&state, "stars/frontend", "client/client", "6379");
    assert!(!e.allowed);
    assert!(
        e.to_string()
            .contains("port does not match (needs one of: TCP/redis, which client/client does not declare; TCP/9000)"),
        "{e}"
    );
}

#[test]
fn every_pair_agrees_with_the_model_and_the_reference() {
    let mut states = vec![
        fixtures::state(STARS, &["10.0.9.9"]),
        fixtures::stars_with_policies(),
    ];
    let mut extra = fixtures::stars_with_policies();
    fixtures::add(
        &mut extra,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: client}
spec:
  podSelector: {}
  egress:
    - to: [{namespaceSelector: {matchExpressions: [{key: role, operator: NotIn, values: [management-ui]}]}}]
      ports: [{port: 80}, {port: 6000, endPort: 6400}]
"#,
    );
    states.push(extra);
    let ports = ["80", "6379", "9000", "9001", "53/UDP", "ICMP"];
    let ends = [
        "client/client",
        "management-ui/management-ui",
        "stars/backend",
        "stars/frontend",
        "10.0.9.9",
        "198.51.100.1",
    ];
    for state in &states {
        for src in ends {
            for dst in ends {
                if src == dst {
                    continue;
                }
                for port in ports {
                    explain_checked(state, src, dst, port);
                }
            }
        }
    }
}

#[test]
fn names_that_do_not_resolve_are_errors() {
    let state = fixtures::stars_with_policies();
    let compiled = compile(&state, &Allocations::default());
    let port = PortProtocol::tcp(80);
    let err = |src: &str, dst: &str| {
        explain_between(&state, &compiled, src, dst, port)
            .unwrap_err()
            .to_string()
    };
    assert!(
        err("stars/nope", "stars/backend")
            .contains("no such pod; pods of the namespace: stars/backend, stars/frontend"),
        "the namespace's pods"
    );
    assert!(
        err("nowhere/nope", "stars/backend").contains("no such pod; known pods: client/client")
    );
    assert!(err("stars", "stars/backend").contains("expected namespace/pod"));
    assert!(err("stars/backend", "stars/backend").contains("loopback"));
    assert!(err("stars/backend", "fd00::1").contains("no address family in common"));
}

#[test]
fn json_is_structured() {
    let e = explain_checked(
        &fixtures::stars_with_policies(),
        "stars/frontend",
        "stars/backend",
        "80",
    );
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["src"]["kind"], "pod");
    assert_eq!(v["src"]["pod"], "stars/frontend");
    assert_eq!(v["port"], "TCP/80");
    let ingress = &v["hooks"][1];
    assert_eq!(ingress["direction"], "Ingress");
    assert_eq!(ingress["verdict"]["verdict"], "denied");
    assert_eq!(ingress["isolated_by"][0], "stars/backend-policy");
    assert_eq!(ingress["rules"][0]["result"]["result"], "no-match");
    assert_eq!(
        ingress["rules"][0]["result"]["mismatches"][0],
        serde_json::json!({"part": "port", "needs": ["TCP/6379"]})
    );
}

/// A Service in front of both stars pods (selectorless: its EndpointSlice lists them),
/// Service port 8080 to target port 80.
const STARS_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: stars}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: web, port: 8080, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: stars, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: web, port: 80, protocol: TCP}]
endpoints:
  - {addresses: [10.0.0.1], targetRef: {kind: Pod, namespace: stars, name: frontend}}
  - {addresses: [10.0.0.2], targetRef: {kind: Pod, namespace: stars, name: backend}}
"#;

#[test]
fn a_service_is_explained_for_each_backend_on_its_target_port() {
    let mut state = fixtures::stars_with_policies();
    fixtures::add(&mut state, STARS_SERVICE);
    let compiled = compile(&state, &Allocations::default());
    for dst in ["svc/stars/web", "10.96.0.10"] {
        let service = explain_service(
            &state,
            &compiled,
            "client/client",
            dst,
            "8080/TCP".parse().unwrap(),
        )
        .unwrap()
        .expect("a Service");
        assert_eq!(service.backends.len(), 2);
        // frontend admits role=client namespaces on 80; backend only frontend on 6379.
        let verdicts: Vec<(IpAddr, u16, bool)> = service
            .backends
            .iter()
            .map(|b| (b.ip, b.port, b.explanation.allowed))
            .collect();
        assert_eq!(
            verdicts,
            [(ip("10.0.0.1"), 80, true), (ip("10.0.0.2"), 80, false)]
        );
        // Each backend's verdict is the model's and the reference's for the translated flow.
        for b in &service.backends {
            let (s, d) = (b.explanation.src.ip(), b.ip);
            assert_eq!(
                b.explanation.allowed,
                model::flow_allowed(&compiled, s, d, PROTO_TCP, b.port)
            );
            assert_eq!(
                b.explanation.allowed,
                reference::flow_allowed(&state, s, d, PROTO_TCP, b.port)
            );
        }
        let text = service.to_string();
        assert!(text.starts_with("svc stars/web"), "{text}");
        assert!(text.contains("1 of 2 backends allowed"), "{text}");
    }
    // An address that is no Service's is explained as before.
    assert!(
        explain_service(
            &state,
            &compiled,
            "client/client",
            "10.0.0.1",
            "80/TCP".parse().unwrap()
        )
        .unwrap()
        .is_none()
    );
    // A Service port that does not exist is a clear error.
    let error = explain_service(
        &state,
        &compiled,
        "client/client",
        "svc/stars/web",
        "9/TCP".parse().unwrap(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("has no port TCP/9"), "{error}");
}

#[test]
fn a_policy_read_in_part_is_explained_as_far_as_it_can_be_read() {
    // Rule 0 cannot be read (its only peer has an except outside cidr): it is not
    // listed, and rule 1 keeps its index; rule 1's second peer cannot be read either.
    let mut state = fixtures::state(STARS, &[]);
    fixtures::add(
        &mut state,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-policy, namespace: stars}
spec:
  podSelector: {matchLabels: {role: backend}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]
  - from:
    - podSelector: {matchLabels: {role: frontend}}
    - {NamespaceSelector: {}}
"#,
    );
    let e = explain_checked(&state, "client/client", "stars/backend", "6379/TCP");
    assert!(!e.allowed);
    let checks: Vec<Option<usize>> = e.hooks[1].rules.iter().map(|r| r.index).collect();
    assert_eq!(checks, [Some(1)]);
    let e = explain_checked(&state, "stars/frontend", "stars/backend", "6379/TCP");
    assert!(e.allowed);
}

/// `stars_with_policies` and one ClusterNetworkPolicy for the pods of namespace stars.
fn stars_with_cluster_policy(tier: &str, action: &str) -> ClusterState {
    let mut state = fixtures::stars_with_policies();
    let object = serde_json::json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "clients"},
        "spec": {
            "tier": tier,
            "priority": 10,
            "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "stars"}}},
            "ingress": [{
                "name": "from-clients",
                "action": action,
                "from": [{"namespaces": {"matchLabels": {"role": "client"}}}],
            }],
        },
    });
    state.cluster_policies.insert("clients".into(), object);
    state
}

#[test]
fn an_admin_deny_decides_before_any_network_policy_and_is_named_with_its_tier() {
    // Without it, frontend-policy allows this flow (see allowed_names_the_allowing_rule).
    let state = stars_with_cluster_policy("Admin", "Deny");
    let e = explain_checked(&state, "client/client", "stars/frontend", "TCP/80");
    assert!(!e.allowed);
    let HookVerdict::ClusterDenied { rule } = &e.hooks[1].verdict else {
        panic!("{e}");
    };
    let text = e.to_string();
    let named = "ClusterNetworkPolicy/clients (Admin, priority 10) ingress rule \"from-clients\"";
    assert_eq!(rule.to_string(), named);
    assert!(
        text.contains(&format!(
            "    Admin tier: Deny by {named}\n    → dropped by {named}\n"
        )),
        "{text}"
    );
    // The NetworkPolicy that would allow it is not consulted.
    assert!(!text.contains("frontend-policy"), "{text}");
}

#[test]
fn an_admin_pass_goes_on_to_the_network_policy_and_says_so() {
    let state = stars_with_cluster_policy("Admin", "Pass");
    let e = explain_checked(&state, "client/client", "stars/frontend", "TCP/80");
    assert!(e.allowed);
    let text = e.to_string();
    assert!(
        text.contains(
            "    Admin tier: Pass by ClusterNetworkPolicy/clients (Admin, priority 10) ingress \
             rule \"from-clients\" → on to NetworkPolicy\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with("  → allowed by NetworkPolicy stars/frontend-policy spec.ingress[0]\n"),
        "{text}"
    );
}

#[test]
fn a_baseline_deny_yields_to_a_network_policy_and_decides_where_none_isolates() {
    let state = stars_with_cluster_policy("Baseline", "Deny");
    // frontend-policy isolates frontend and allows this flow: the Baseline tier is not
    // reached.
    let e = explain_checked(&state, "client/client", "stars/frontend", "TCP/80");
    assert!(e.allowed, "{e}");
    assert_eq!(e.hooks[1].tiers.len(), 1, "{e}");
    // The client's own egress: not isolated, and no ClusterNetworkPolicy has rules for
    // it, so no tier steps are shown.
    let egress = &e.hooks[0];
    assert_eq!(egress.verdict, HookVerdict::NotIsolated, "{e}");
    assert!(egress.tiers.is_empty(), "{e}");
    // stars/backend is isolated for ingress and no rule lets the client in: with the
    // Baseline tier's Deny beside NetworkPolicy, NetworkPolicy still decides.
    let e = explain_checked(&state, "client/client", "stars/backend", "TCP/6379");
    assert_eq!(e.hooks[1].verdict, HookVerdict::Denied, "{e}");
    // A pod no NetworkPolicy isolates for ingress: the Baseline tier decides.
    let mut open = state.clone();
    open.policies.clear();
    let e = explain_checked(&open, "client/client", "stars/backend", "TCP/6379");
    let HookVerdict::ClusterDenied { rule } = &e.hooks[1].verdict else {
        panic!("{e}");
    };
    assert_eq!(rule.cluster.as_ref().unwrap().tier, Tier::Baseline);
    assert!(
        e.to_string().contains("    Admin tier: no ClusterNetworkPolicy rule matches → on to NetworkPolicy\n    Baseline tier: Deny by"),
        "{e}"
    );
}

#[test]
fn a_bare_pod_or_service_name_is_put_in_the_namespace_given() {
    assert_eq!(in_namespace("a", "x"), "x/a");
    assert_eq!(in_namespace("y/a", "x"), "y/a");
    assert_eq!(in_namespace("svc/web", "x"), "svc/x/web");
    assert_eq!(in_namespace("svc/y/web", "x"), "svc/y/web");
    assert_eq!(in_namespace("node", "x"), "node");
    assert_eq!(in_namespace("10.0.0.1", "x"), "10.0.0.1");
    assert_eq!(in_namespace("fd00::1", "x"), "fd00::1");
}

#[test]
fn an_unknown_pod_lists_a_few_pods_and_says_how_many_more() {
    let mut yaml = String::new();
    for i in 0..12 {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i:02}, namespace: x}}\n\
             spec: {{containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.0.0.{}}}\n---\n",
            i + 1
        ));
    }
    let state = fixtures::state(&yaml, &[]);
    let compiled = compile(&state, &Allocations::default());
    let error = explain_between(&state, &compiled, "x/nope", "x/p00", PortProtocol::tcp(80))
        .unwrap_err()
        .to_string();
    assert!(error.ends_with("x/p08, x/p09, and 2 more"), "{error}");
}

#[test]
fn a_staged_policy_is_explained_beside_the_verdict_in_force() {
    let mut state = fixtures::stars_with_policies();
    let staged = ObjectRef::new("stars", "backend-policy");
    let mut object = state.policies[&staged].object();
    object.metadata.annotations = Some(
        [(
            netpol_compile::state::STAGED_ANNOTATION.to_owned(),
            "true".to_owned(),
        )]
        .into(),
    );
    state.policies.insert(staged.clone(), object.into());
    // In force: nothing isolates the backend, so the client reaches it.
    let e = explain_checked(&state, "client/client", "stars/backend", "6379/TCP");
    assert!(e.allowed, "{e}");
    assert_eq!(e.hooks[1].verdict, HookVerdict::NotIsolated);
    let view = e.staged.as_deref().expect("the staged view");
    assert_eq!(view.policies, std::slice::from_ref(&staged));
    assert!(!view.allowed, "{e}");
    assert_eq!(view.hooks[1].verdict, HookVerdict::Denied);
    assert_eq!(view.hooks[1].isolated_by, [staged]);
    let text = e.to_string();
    assert!(
        text.contains(
            "Staged (netpol.dev/staged: NetworkPolicy stars/backend-policy): would be \
             BLOCKED (staged-drop)\n  ingress of stars/backend: isolated by NetworkPolicy \
             stars/backend-policy\n"
        ),
        "{text}"
    );
    // The frontend is allowed by the staged policy as by none: the same verdict.
    let e = explain_checked(&state, "stars/frontend", "stars/backend", "6379/TCP");
    let view = e.staged.as_deref().unwrap();
    assert!(e.allowed && view.allowed, "{e}");
    assert!(e.to_string().contains("would be ALLOWED, as now"), "{e}");

    // Without staged policies there is no staged view.
    let e = explain_checked(
        &fixtures::stars_with_policies(),
        "client/client",
        "stars/backend",
        "6379/TCP",
    );
    assert!(e.staged.is_none());
}
