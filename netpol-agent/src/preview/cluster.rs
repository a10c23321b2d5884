//! The cluster for the preview commands from a live API server (`kubectl netpol`): one
//! list of each kind Kubernetes mode watches, and nothing but list requests (no watch, no
//! write), the objects trimmed as Kubernetes mode trims them
//! ([`source::kube::trim`](crate::source::kube::trim)), into the same [`ClusterState`]
//! the manifest loader builds ([`super::load`]). Every pod is treated as local (a
//! preview of the whole cluster).
//!
//! Each list's resourceVersion and count are kept ([`ClusterRead`]), so an answer says
//! which objects it was computed from.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use ::kube::api::{Api, DynamicObject, ListParams};
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::{Client, Config, Resource};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::PreviewError;
use super::load::Loaded;
use crate::source::kube::pod::WatchedPod;
use crate::source::kube::{cluster_policy_resource, trim};
use netpol_compile::state::{ClusterState, NodeContext, NodePeer, ObjectRef};

/// Objects asked for per list request (the rest follows with `continue`).
const PAGE: u32 = 500;

/// A client for the cluster of the user's kubeconfig, and what names it.
#[derive(Clone)]
pub struct Connection {
    pub client: Client,
    /// The kubeconfig context used; `None` with the in-cluster configuration of a pod.
    pub context: Option<String>,
    /// The API server's URL.
    pub server: String,
    /// The context's namespace (`default` when it names none): where bare pod names
    /// are looked for unless `-n` says otherwise.
    pub namespace: String,
}

/// Connects as kubectl would: the kubeconfig file given, or else `KUBECONFIG` (files
/// merged) or `~/.kube/config`, with `context` or the file's current context; without a
/// kubeconfig (and no `context` asked for), the in-cluster configuration of a pod.
pub async fn connect(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<Connection, PreviewError> {
    let file = match kubeconfig {
        Some(path) => Kubeconfig::read_from(path).map_err(|source| PreviewError::Kubeconfig {
            path: Some(path.to_path_buf()),
            source,
        })?,
        None => match Kubeconfig::read() {
            Ok(file) => file,
            Err(source) if context.is_some() => {
                return Err(PreviewError::Kubeconfig { path: None, source });
            }
            Err(kubeconfig) => {
                let config = Config::incluster().map_err(|in_cluster| PreviewError::NoConfig {
                    kubeconfig,
                    in_cluster,
                })?;
                return connection(config, None);
            }
        },
    };
    let name = context
        .map(str::to_owned)
        .or_else(|| file.current_context.clone());
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(file, &options)
        .await
        .map_err(|source| PreviewError::Kubeconfig {
            path: kubeconfig.map(Path::to_path_buf),
            source,
        })?;
    connection(config, name)
}

fn connection(config: Config, context: Option<String>) -> Result<Connection, PreviewError> {
    let server = config.cluster_url.to_string();
    let namespace = config.default_namespace.clone();
    let client = Client::try_from(config).map_err(PreviewError::Client)?;
    Ok(Connection {
        client,
        context,
        server: server.trim_end_matches('/').to_owned(),
        namespace,
    })
}

/// One list the preview read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listed {
    /// The API resource: `pods`, `clusternetworkpolicies`...
    pub resource: &'static str,
    /// The list's `metadata.resourceVersion` (of its first page); `None` when the
    /// resource is not served.
    pub resource_version: Option<String>,
    /// Objects listed.
    pub count: usize,
    /// `false`: the API server does not serve the resource (the ClusterNetworkPolicy CRD
    /// is not installed, or a cluster older than ServiceCIDRs), so the cluster has none.
    pub served: bool,
}

/// `pods@12345 (42)`, `servicecidrs (not served)`.
impl std::fmt::Display for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.resource_version, self.served) {
            (_, false) => write!(f, "{} (not served)", self.resource),
            (Some(version), true) => write!(f, "{}@{version} ({})", self.resource, self.count),
            (None, true) => write!(f, "{} ({})", self.resource, self.count),
        }
    }
}

/// Which cluster a preview read, and the lists it read, so the answer can be reproduced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterRead {
    /// The kubeconfig context; `None` with the in-cluster configuration.
    pub context: Option<String>,
    pub server: String,
    /// In the order read: namespaces, pods, networkpolicies, clusternetworkpolicies,
    /// nodes, services, endpointslices, servicecidrs.
    pub lists: Vec<Listed>,
}

impl ClusterRead {
    /// The list of `resource`, if it was read.
    pub fn list(&self, resource: &str) -> Option<&Listed> {
        self.lists.iter().find(|l| l.resource == resource)
    }
}

/// Lines of at most this many columns, where the lists allow it.
const WIDTH: usize = 100;

/// `read from cluster kind-netpol: namespaces@12340 (7), pods@12345 (42), ...`, wrapped
/// (continuation lines indented), ending with a newline.
impl std::fmt::Display for ClusterRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = match &self.context {
            Some(context) => format!("read from cluster {context}:"),
            None => format!("read in-cluster from {}:", self.server),
        };
        let mut line_start = 0;
        for (i, list) in self.lists.iter().enumerate() {
            let item = format!("{list}{}", if i + 1 < self.lists.len() { "," } else { "" });
            if out.len() - line_start + 1 + item.len() > WIDTH && out.len() > line_start + 2 {
                out.push_str("\n ");
                line_start = out.len() - 1;
            }
            let _ = write!(out, " {item}");
        }
        writeln!(f, "{out}")
    }
}

/// The cluster's objects, listed once each, as a state whose every pod is local, with
/// `node_ips` as the node's addresses (traffic from them to pods always passes), and
/// what was read. A resource the API server does not serve (HTTP 404:
/// ClusterNetworkPolicies without their CRD, ServiceCIDRs before Kubernetes 1.33) has no
/// objects; any other failure names the resource whose list failed.
pub async fn from_cluster(
    client: &Client,
    node_ips: &[IpAddr],
) -> Result<(Loaded, Vec<Listed>), PreviewError> {
    let c = client;
    let (namespaces, pods, policies, cluster_policies, nodes, services, slices, cidrs) = futures::try_join!(
        list(
            Api::<Namespace>::all(c.clone()),
            "namespaces",
            trim::namespace,
            false
        ),
        // Read trimmed as Kubernetes mode reads them: nothing more to drop.
        list(Api::<WatchedPod>::all(c.clone()), "pods", |_| {}, false),
        list(
            Api::<NetworkPolicy>::all(c.clone()),
            "networkpolicies",
            trim::network_policy,
            false
        ),
        list(
            Api::<DynamicObject>::all_with(c.clone(), &cluster_policy_resource()),
            "clusternetworkpolicies",
            trim::cluster_policy,
            true
        ),
        list(Api::<Node>::all(c.clone()), "nodes", trim::node, false),
        list(
            Api::<Service>::all(c.clone()),
            "services",
            trim::service,
            false
        ),
        list(
            Api::<EndpointSlice>::all(c.clone()),
            "endpointslices",
            trim::endpoint_slice,
            false
        ),
        list(
            Api::<ServiceCIDR>::all(c.clone()),
            "servicecidrs",
            trim::service_cidr,
            true
        ),
    )?;
    let lists = vec![
        namespaces.listed.clone(),
        pods.listed.clone(),
        policies.listed.clone(),
        cluster_policies.listed.clone(),
        nodes.listed.clone(),
        services.listed.clone(),
        slices.listed.clone(),
        cidrs.listed.clone(),
    ];
    let state = ClusterState {
        namespaces: named::<_, Vec<_>>(namespaces.items, |n| &n.metadata)
            .into_iter()
            .map(|(name, namespace)| (name, namespace.into()))
            .collect(),
        pods: namespaced::<_, Vec<_>>(pods.items, |p| p.meta())
            .into_iter()
            .map(|(key, pod)| (key, pod.info))
            .collect(),
        policies: namespaced::<_, Vec<_>>(policies.items, |p| &p.metadata)
            .into_iter()
            .map(|(key, policy)| (key, policy.into()))
            .collect(),
        cluster_policies: cluster_policies
            .items
            .into_iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, serde_json::to_value(&p).ok()?)))
            .collect(),
        nodes: nodes
            .items
            .iter()
            .filter_map(|node| Some((node.metadata.name.clone()?, NodePeer::of(node))))
            .collect(),
        services: namespaced(services.items, |s| &s.metadata),
        endpoint_slices: namespaced(slices.items, |s| &s.metadata),
        service_cidrs: named(cidrs.items, |c| &c.metadata),
        node: NodeContext {
            name: None,
            ips: node_ips.to_vec(),
        },
        ..ClusterState::default()
    };
    let loaded = Loaded {
        state,
        diagnostics: Vec::new(),
    };
    Ok((loaded, lists))
}

/// Objects of one list, trimmed, and what the list was.
struct Listing<K> {
    items: Vec<K>,
    listed: Listed,
}

/// Lists every object of `api` (pages of [`PAGE`]), trimming each. `absent_is_empty`: a
/// 404 means the resource is not served, hence none.
async fn list<K>(
    api: Api<K>,
    resource: &'static str,
    trim: fn(&mut K),
    absent_is_empty: bool,
) -> Result<Listing<K>, PreviewError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut items = Vec::new();
    let mut resource_version = None;
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().limit(PAGE);
        if let Some(token) = &token {
            params = params.continue_token(token);
        }
        let page = match api.list(&params).await {
            Ok(page) => page,
            Err(::kube::Error::Api(status))
                if absent_is_empty && status.code == 404 && token.is_none() =>
            {
                return Ok(Listing {
                    items: Vec::new(),
                    listed: Listed {
                        resource,
                        resource_version: None,
                        count: 0,
                        served: false,
                    },
                });
            }
            Err(error) => return Err(PreviewError::List { resource, error }),
        };
        if token.is_none() {
            resource_version = page.metadata.resource_version.clone();
        }
        items.extend(page.items.into_iter().map(|mut object| {
            trim(&mut object);
            object
        }));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    Ok(Listing {
        listed: Listed {
            resource,
            resource_version,
            count: items.len(),
            served: true,
        },
        items,
    })
}

/// Cluster-scoped objects by name.
fn named<K, V: FromIterator<(String, K)>>(items: Vec<K>, meta: fn(&K) -> &ObjectMeta) -> V {
    items
        .into_iter()
        .filter_map(|o| Some((meta(&o).name.clone()?, o)))
        .collect()
}

/// Namespaced objects by namespace and name.
fn namespaced<K, V: FromIterator<(ObjectRef, K)>>(items: Vec<K>, meta: fn(&K) -> &ObjectMeta) -> V {
    items
        .into_iter()
        .filter_map(|o| {
            let m = meta(&o);
            let key = ObjectRef::new(m.namespace.clone()?, m.name.clone()?);
            Some((key, o))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_lab::apiserver::ApiServer;
    use serde_json::json;

    fn client(server: &ApiServer) -> Client {
        Client::try_from(Config::new(server.url().parse().unwrap())).unwrap()
    }

    async fn small_cluster() -> ApiServer {
        let server = ApiServer::start().await.unwrap();
        server.apply(
            json!({"kind": "Namespace", "metadata": {"name": "x", "labels": {"team": "a"}}}),
        );
        server.apply(json!({
            "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "labels": {"app": "a"},
                         "annotations": {"netpol.dev/host-interface": "eth0"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx",
                     "ports": [{"containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "hostIP": "192.168.0.1"},
        }));
        server.apply(json!({
            "kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        }));
        server.apply(json!({
            "kind": "Node", "metadata": {"name": "n1", "labels": {"zone": "z1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
        }));
        server
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_cluster_is_listed_into_the_state_trimmed_with_each_lists_version() {
        let server = small_cluster().await;
        server.apply(json!({
            "kind": "ClusterNetworkPolicy", "metadata": {"name": "admin"},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                     "ingress": [{"name": "r", "action": "Deny", "from": [{"namespaces": {}}]}]},
            "status": {"conditions": []},
        }));
        let version = server.resource_version();
        let (loaded, lists) = from_cluster(&client(&server), &[]).await.unwrap();
        let state = &loaded.state;
        assert_eq!(state.namespaces.keys().collect::<Vec<_>>(), ["x"]);
        let pod = &state.pods[&ObjectRef::new("x", "a")];
        assert_eq!(
            (pod.phase(), pod.pod_ip(), pod.node_name()),
            (Some("Running"), Some("10.0.0.1"), Some("n1")),
            "read as Kubernetes mode reads"
        );
        assert_eq!(pod.labels().get("app"), Some("a"));
        assert!(
            state.pod_interfaces.is_empty(),
            "no pod names the interface the agent attaches to"
        );
        assert!(state.policies.contains_key(&ObjectRef::new("x", "deny")));
        let cnp = &state.cluster_policies["admin"];
        assert_eq!(cnp["apiVersion"], "policy.networking.k8s.io/v1alpha2");
        assert_eq!(cnp["kind"], "ClusterNetworkPolicy");
        assert_eq!(cnp.get("status"), None);
        assert_eq!(
            state.nodes["n1"].ips,
            ["192.168.0.1".parse::<IpAddr>().unwrap()]
        );
        assert!(state.node.name.is_none(), "every pod is local");

        let shown: Vec<String> = lists.iter().map(ToString::to_string).collect();
        let v = version;
        assert_eq!(
            shown,
            [
                format!("namespaces@{v} (1)"),
                format!("pods@{v} (1)"),
                format!("networkpolicies@{v} (1)"),
                format!("clusternetworkpolicies@{v} (1)"),
                format!("nodes@{v} (1)"),
                format!("services@{v} (0)"),
                format!("endpointslices@{v} (0)"),
                format!("servicecidrs@{v} (0)"),
            ]
        );
        let requests = server.requests();
        assert!(!requests.is_empty());
        assert!(requests.iter().all(|r| r.verb == "list"), "{requests:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_404_on_clusternetworkpolicies_means_the_cluster_has_none() {
        let server = small_cluster().await;
        server.fail("clusternetworkpolicies", "list", Some(404));
        server.fail("servicecidrs", "list", Some(404));
        let (loaded, lists) = from_cluster(&client(&server), &[]).await.unwrap();
        assert!(loaded.state.cluster_policies.is_empty());
        assert_eq!(loaded.state.pods.len(), 1);
        let read = ClusterRead {
            context: Some("kind-netpol".into()),
            server: server.url(),
            lists,
        };
        let cnp = read.list("clusternetworkpolicies").unwrap();
        assert!(!cnp.served);
        assert_eq!(cnp.resource_version, None);
        assert!(
            read.to_string()
                .contains("clusternetworkpolicies (not served)"),
            "{read}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn any_other_failure_names_the_resource_whose_list_failed() {
        let server = small_cluster().await;
        server.fail("networkpolicies", "list", Some(403));
        let error = from_cluster(&client(&server), &[]).await.unwrap_err();
        assert!(
            matches!(
                error,
                PreviewError::List {
                    resource: "networkpolicies",
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "listing networkpolicies: Forbidden (HTTP 403): injected failure"
        );

        // A 404 on a built-in resource is a failure, not "none".
        server.fail("networkpolicies", "list", None);
        server.fail("pods", "list", Some(404));
        let error = from_cluster(&client(&server), &[]).await.unwrap_err();
        assert!(error.to_string().starts_with("listing pods: "), "{error}");

        // An API server that is not there: the cause is written out.
        drop(server);
        let nowhere = Client::try_from(Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let error = from_cluster(&nowhere, &[]).await.unwrap_err().to_string();
        assert!(error.starts_with("listing "), "{error}");
        assert!(error.contains("Connection refused"), "{error}");
    }

    #[test]
    fn the_lists_read_are_wrapped_into_lines_of_a_hundred_columns() {
        let listed = |resource, version: &str, count| Listed {
            resource,
            resource_version: Some(version.to_owned()),
            count,
            served: true,
        };
        let read = ClusterRead {
            context: Some("kind-netpol".into()),
            server: "https://127.0.0.1:6443".into(),
            lists: vec![
                listed("namespaces", "12340", 7),
                listed("pods", "12345", 42),
                listed("networkpolicies", "12345", 3),
                listed("clusternetworkpolicies", "12345", 1),
                listed("nodes", "12345", 3),
                listed("services", "12345", 12),
                listed("endpointslices", "12345", 14),
                Listed {
                    resource: "servicecidrs",
                    resource_version: None,
                    count: 0,
                    served: false,
                },
            ],
        };
        let text = read.to_string();
        assert_eq!(
            text,
            "read from cluster kind-netpol: namespaces@12340 (7), pods@12345 (42), \
             networkpolicies@12345 (3),\n  clusternetworkpolicies@12345 (1), nodes@12345 (3), \
             services@12345 (12), endpointslices@12345 (14),\n  servicecidrs (not served)\n"
        );
        assert!(text.lines().all(|l| l.len() <= WIDTH), "{text}");
        let in_cluster = ClusterRead {
            context: None,
            ..read
        };
        assert!(
            in_cluster
                .to_string()
                .starts_with("read in-cluster from https://127.0.0.1:6443: namespaces@12340")
        );
    }
}
