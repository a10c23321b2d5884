//! The generated NetworkPolicies, as values (for the iptables rules) and as the YAML the
//! agent reads: 1,000 of which 10 select x/server, and 10,000 that all select it.

use anyhow::{Context, Result};
use serde_json::json;

use super::{OTHER_NAMESPACES, POLICIES, PROBE_PORT, RR_PORT, SERVER_POLICIES, STREAM_PORT};

pub(super) type Labels = Vec<(String, String)>;

/// A peer of an ingress rule.
#[derive(Clone, Debug)]
pub(super) enum Peer {
    /// Pods matching `pod` labels in namespaces matching `ns` labels (`None`: the
    /// policy's namespace).
    Pods {
        ns: Option<Labels>,
        pod: Labels,
    },
    Cidr(String),
}

#[derive(Clone, Debug)]
pub(super) struct Rule {
    pub from: Vec<Peer>,
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug)]
pub(super) struct Policy {
    pub namespace: String,
    pub name: String,
    pub selector: Labels,
    pub ingress: Vec<Rule>,
}

fn l(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Policy `i` of those selecting x/server: x/client among other peers and ports, and an
/// ipBlock.
fn server_policy(i: usize) -> Policy {
    let cidr = if i < 256 {
        format!("192.168.{i}.0/24")
    } else {
        format!("172.{}.{}.0/24", 16 + (i / 256) % 16, i % 256)
    };
    Policy {
        namespace: "x".into(),
        name: format!("server-{i}"),
        selector: l(&[("app", "server".into())]),
        ingress: vec![
            Rule {
                from: vec![
                    Peer::Pods {
                        ns: None,
                        pod: l(&[("app", "client".into())]),
                    },
                    Peer::Pods {
                        ns: None,
                        pod: l(&[("app", format!("web-{i}"))]),
                    },
                    Peer::Pods {
                        ns: Some(l(&[("team", format!("t{}", i % 5))])),
                        pod: l(&[("tier", "frontend".into())]),
                    },
                ],
                ports: vec![PROBE_PORT, STREAM_PORT, RR_PORT, 8000 + (i % 20_000) as u16],
            },
            Rule {
                from: vec![Peer::Cidr(cidr)],
                ports: vec![9000 + (i % 20_000) as u16],
            },
        ],
    }
}

/// `count` policies that all select x/server: what an enforcer pays for the policies of
/// the measured pod itself.
pub(super) fn server_policies(count: usize) -> Vec<Policy> {
    (0..count).map(server_policy).collect()
}

/// 1,000 ingress policies: 10 select x/server (each allows x/client among other peers
/// and ports), the others select absent pods in x and 20 other namespaces with the same
/// shapes (pod and namespace selectors, ipBlocks, 1-3 rules, 1-4 ports).
pub(super) fn generate_policies() -> Vec<Policy> {
    let mut out = Vec::with_capacity(POLICIES);
    out.extend((0..SERVER_POLICIES).map(server_policy));
    for i in SERVER_POLICIES..POLICIES {
        let namespace = if i % 4 == 0 {
            "x".to_owned()
        } else {
            format!("ns-{}", i % OTHER_NAMESPACES)
        };
        let mut ingress = vec![Rule {
            from: vec![Peer::Pods {
                ns: None,
                pod: l(&[("app", format!("svc-{}", i + 1))]),
            }],
            ports: (0..1 + i % 4).map(|k| 8080 + k as u16).collect(),
        }];
        if i % 2 == 0 {
            ingress.push(Rule {
                from: vec![Peer::Pods {
                    ns: Some(l(&[("team", format!("t{}", i % 5))])),
                    pod: l(&[("tier", "frontend".into())]),
                }],
                ports: vec![443],
            });
        }
        if i % 3 == 0 {
            ingress.push(Rule {
                from: vec![Peer::Cidr(format!("10.{}.{}.0/24", 100 + i / 256, i % 256))],
                ports: vec![9100 + (i % 50) as u16],
            });
        }
        out.push(Policy {
            namespace,
            name: format!("svc-{i}"),
            selector: l(&[("app", format!("svc-{i}"))]),
            ingress,
        });
    }
    out
}

fn match_labels(labels: &Labels) -> serde_json::Value {
    json!({"matchLabels": labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()})
}

pub(super) fn policies_yaml(policies: &[Policy]) -> Result<String> {
    let mut out = String::new();
    for p in policies {
        let ingress: Vec<_> = p
            .ingress
            .iter()
            .map(|r| {
                let from: Vec<_> = r
                    .from
                    .iter()
                    .map(|peer| match peer {
                        Peer::Pods { ns: None, pod } => json!({"podSelector": match_labels(pod)}),
                        Peer::Pods { ns: Some(ns), pod } => json!({
                            "namespaceSelector": match_labels(ns),
                            "podSelector": match_labels(pod),
                        }),
                        Peer::Cidr(c) => json!({"ipBlock": {"cidr": c}}),
                    })
                    .collect();
                let ports: Vec<_> = r
                    .ports
                    .iter()
                    .map(|port| json!({"protocol": "TCP", "port": port}))
                    .collect();
                json!({"from": from, "ports": ports})
            })
            .collect();
        let doc = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": p.name, "namespace": p.namespace},
            "spec": {
                "podSelector": match_labels(&p.selector),
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        });
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&doc).context("rendering YAML")?);
    }
    Ok(out)
}

/// x/client egress-isolated, allowed to x/server's benchmark and probe ports: with it,
/// each connection through the Service is judged after translation, on x/server.
pub(super) const CLIENT_EGRESS: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: server}}}]
      ports: [{protocol: TCP, port: 5201}, {protocol: TCP, port: 5202}, {protocol: TCP, port: 80}]
"#;
