//! What `kubectl netpol` answers: `explain` and `matrix` over the cluster of a
//! [`Connection`], read once with list requests ([`cluster::from_cluster`]) and answered
//! by the same explain and matrix code as the manifest commands; only the loading
//! differs. The `kubectl-netpol` binary parses arguments and prints, nothing more.
//!
//! Every answer carries the [`ClusterRead`] it was computed from (text: a footer; JSON:
//! the `cluster` field).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Value, json};

use super::cluster::{self, ClusterRead, Connection};
use super::explain::{
    Explanation, ServiceExplanation, explain_between, explain_service, in_namespace,
};
use super::load::{Loaded, Overlay};
use super::matrix::{self, Matrix, MatrixDiff, MatrixOptions, Style};
use super::selector::LabelSelector;
use super::{PortProtocol, PreviewError};
use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Allocations, Compiled, compile};

/// Reads the cluster of `connection` (every list the preview needs).
pub async fn read(
    connection: &Connection,
    node_ips: &[IpAddr],
) -> Result<(Loaded, ClusterRead), PreviewError> {
    let (loaded, lists) = cluster::from_cluster(&connection.client, node_ips).await?;
    let read = ClusterRead {
        context: connection.context.clone(),
        server: connection.server.clone(),
        lists,
    };
    Ok((loaded, read))
}

/// Compiles the state as the agent would, every pod local; the warnings are the
/// loader's and the compiler's diagnostics.
fn compiled(loaded: &Loaded) -> (Compiled, Vec<String>) {
    let compiled = compile(&loaded.state, &Allocations::default());
    let warnings = loaded
        .diagnostics
        .iter()
        .chain(&compiled.diagnostics)
        .map(ToString::to_string)
        .collect();
    (compiled, warnings)
}

/// `kubectl netpol explain SRC DST PORT/PROTO`.
#[derive(Clone, Debug)]
pub struct ExplainRequest {
    /// `ns/pod`, a bare pod name (in `namespace`), `node`, or an address.
    pub src: String,
    /// As `src`, or a Service: `svc/ns/name`, `svc/name` (in `namespace`) or its address.
    pub dst: String,
    pub port: PortProtocol,
    /// `-n`: where bare names are; `None`: the context's namespace.
    pub namespace: Option<String>,
    /// `--node-ip`: the node's addresses. Without them, `node` is the node of the pod at
    /// the other end (its Node object's addresses).
    pub node_ips: Vec<IpAddr>,
}

/// What an explanation is of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Explained {
    /// A Service, for each of its backends.
    Service(ServiceExplanation),
    /// One flow per address family the two ends share.
    Flows(Vec<Explanation>),
}

/// An answer of `kubectl netpol explain`.
#[derive(Clone, Debug)]
pub struct ExplainAnswer {
    pub explained: Explained,
    pub read: ClusterRead,
    /// The node (`spec.nodeName`) of each pod the explanation names, from the same
    /// lists: where that pod's hook runs (`explain --kernel` asks its agent).
    pub nodes: BTreeMap<ObjectRef, String>,
    /// Objects that could not be read in full (as the agent reports them).
    pub warnings: Vec<String>,
}

impl ExplainAnswer {
    /// The explanation for people, then what was read.
    pub fn text(&self) -> String {
        let body = match &self.explained {
            Explained::Service(service) => service.to_string(),
            Explained::Flows(flows) => flows
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        };
        format!("{body}\n{}", self.read)
    }

    /// The manifest command's `--json` output with the field `cluster` (what was read)
    /// added; the explanations of a dual-stack pair (one per family), a list there, are
    /// the field `explanations` of an object here.
    pub fn json(&self) -> Value {
        let explained = match &self.explained {
            Explained::Service(service) => serde_json::to_value(service),
            Explained::Flows(flows) if flows.len() == 1 => serde_json::to_value(&flows[0]),
            Explained::Flows(flows) => {
                serde_json::to_value(flows).map(|flows| json!({ "explanations": flows }))
            }
        };
        let mut value = explained.unwrap_or(Value::Null);
        if let Some(object) = value.as_object_mut() {
            object.insert("cluster".into(), json!(self.read));
        }
        value
    }
}

/// Reads the cluster and explains the request.
pub async fn explain(
    connection: &Connection,
    request: &ExplainRequest,
) -> Result<ExplainAnswer, PreviewError> {
    let (loaded, read) = self::read(connection, &request.node_ips).await?;
    explain_in(loaded, read, request, &connection.namespace)
}

/// Explains the request over a cluster already read; `context_namespace` is where bare
/// names are when the request names no namespace.
pub fn explain_in(
    mut loaded: Loaded,
    read: ClusterRead,
    request: &ExplainRequest,
    context_namespace: &str,
) -> Result<ExplainAnswer, PreviewError> {
    let namespace = request.namespace.as_deref().unwrap_or(context_namespace);
    let src = in_namespace(&request.src, namespace);
    let dst = in_namespace(&request.dst, namespace);
    if loaded.state.node.ips.is_empty() {
        if src == "node" {
            loaded.state.node.ips = node_of(&loaded.state, &dst);
        } else if dst == "node" {
            loaded.state.node.ips = node_of(&loaded.state, &src);
        }
    }
    let (compiled, warnings) = compiled(&loaded);
    let state = &loaded.state;
    let explained = match explain_service(state, &compiled, &src, &dst, request.port)? {
        Some(service) => Explained::Service(service),
        None => Explained::Flows(explain_between(state, &compiled, &src, &dst, request.port)?),
    };
    let hooks: Vec<&ObjectRef> = match &explained {
        Explained::Service(service) => service
            .backends
            .iter()
            .flat_map(|b| &b.explanation.hooks)
            .map(|h| &h.pod)
            .collect(),
        Explained::Flows(flows) => flows
            .iter()
            .flat_map(|f| &f.hooks)
            .map(|h| &h.pod)
            .collect(),
    };
    let nodes = hooks
        .into_iter()
        .filter_map(|pod| {
            let node = state.pods.get(pod)?.node_name()?.to_owned();
            Some((pod.clone(), node))
        })
        .collect();
    Ok(ExplainAnswer {
        explained,
        read,
        nodes,
        warnings,
    })
}

/// The addresses of the node the pod `end` (`ns/name`) runs on, from its Node object;
/// empty when `end` is no such pod.
fn node_of(state: &ClusterState, end: &str) -> Vec<IpAddr> {
    let Some((namespace, name)) = end.split_once('/') else {
        return Vec::new();
    };
    state
        .pods
        .get(&ObjectRef::new(namespace, name))
        .and_then(|pod| pod.node_name())
        .and_then(|node| state.nodes.get(node))
        .map(|node| node.ips.clone())
        .unwrap_or_default()
}

/// Whose pods a matrix shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// The context's namespace (kubectl's default).
    Context,
    /// These (`-n`, repeatable).
    Only(Vec<String>),
    /// Every namespace (`-A`, `--all-namespaces`).
    All,
}

/// `kubectl netpol matrix`.
#[derive(Clone, Debug)]
pub struct MatrixRequest {
    pub namespaces: Namespaces,
    /// `-l`: only the pods it selects (in those namespaces).
    pub selector: Option<LabelSelector>,
    /// `--apply`: NetworkPolicies and ClusterNetworkPolicies to create or replace first
    /// (files or directories, in order), showing the cells they change.
    pub apply: Vec<PathBuf>,
    /// Ports, destinations, family; which pods is decided here.
    pub options: MatrixOptions,
    /// `--node-ip`: the node's addresses (traffic from them always passes).
    pub node_ips: Vec<IpAddr>,
}

/// The pods a matrix shows, and how they were chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Shown {
    /// `None`: every namespace.
    pub namespaces: Option<Vec<String>>,
    /// The label selector, as kubectl writes it.
    pub selector: Option<String>,
    /// Pods chosen (with or without addresses) and pods in the cluster.
    pub pods: usize,
    pub of: usize,
}

/// `pods of namespaces x, y matching app=web: 3 of 42`.
impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespaces {
            None => f.write_str("pods of every namespace")?,
            Some(list) if list.len() == 1 => write!(f, "pods of namespace {}", list[0])?,
            Some(list) => write!(f, "pods of namespaces {}", list.join(", "))?,
        }
        if let Some(selector) = &self.selector {
            write!(f, " matching {selector}")?;
        }
        write!(f, ": {} of {}", self.pods, self.of)
    }
}

/// An answer of `kubectl netpol matrix`.
#[derive(Clone, Debug)]
pub struct MatrixAnswer {
    /// The matrix (after `--apply`, when given).
    pub matrix: Matrix,
    /// With `--apply`: the matrix before, and the cells that change.
    pub before: Option<Matrix>,
    pub diff: Option<MatrixDiff>,
    pub shown: Shown,
    pub read: ClusterRead,
    /// Objects that could not be read in full, documents of `--apply` that could not be
    /// read, namespaces asked for that do not exist.
    pub warnings: Vec<String>,
}

impl MatrixAnswer {
    /// Which pods, the tables (and changes) for people, then what was read.
    pub fn text(&self, style: Style) -> String {
        let mut out = format!("{}\n\n", self.shown);
        out.push_str(&matrix::render(&self.matrix, self.diff.as_ref(), style));
        let _ = write!(out, "\n{}", self.read);
        out
    }

    /// The manifest command's `--json` output (`matrix`, `before`, `diff`) with the
    /// fields `shown` and `cluster` (what was read).
    pub fn json(&self) -> Value {
        json!({
            "matrix": self.matrix,
            "before": self.before,
            "diff": self.diff,
            "shown": self.shown,
            "cluster": self.read,
        })
    }
}

/// Reads the cluster and previews the matrix of the request.
pub async fn matrix(
    connection: &Connection,
    request: &MatrixRequest,
) -> Result<MatrixAnswer, PreviewError> {
    let overlay = read_overlay(&request.apply)?;
    let (loaded, read) = self::read(connection, &request.node_ips).await?;
    Ok(matrix_in(
        &loaded,
        read,
        request,
        overlay.as_ref(),
        &connection.namespace,
    ))
}

/// The `--apply` files, read before the cluster is (a typo fails fast).
pub fn read_overlay(paths: &[PathBuf]) -> Result<Option<Overlay>, PreviewError> {
    if paths.is_empty() {
        Ok(None)
    } else {
        Overlay::read(paths).map(Some)
    }
}

/// The matrix of the request over a cluster already read, with `overlay` applied (its
/// changes shown); `context_namespace` is the namespace shown by default.
pub fn matrix_in(
    loaded: &Loaded,
    read: ClusterRead,
    request: &MatrixRequest,
    overlay: Option<&Overlay>,
    context_namespace: &str,
) -> MatrixAnswer {
    let state = &loaded.state;
    let namespaces = match &request.namespaces {
        Namespaces::All => None,
        Namespaces::Context => Some(vec![context_namespace.to_owned()]),
        Namespaces::Only(list) => Some(list.clone()),
    };
    let pods: BTreeSet<ObjectRef> = state
        .pods
        .iter()
        .filter(|(key, _)| {
            namespaces
                .as_ref()
                .is_none_or(|list| list.iter().any(|ns| *ns == key.namespace))
        })
        .filter(|(_, pod)| {
            request
                .selector
                .as_ref()
                .is_none_or(|s| s.matches_object(Some(&pod.labels().to_map())))
        })
        .map(|(key, _)| key.clone())
        .collect();
    let (compiled, mut warnings) = compiled(loaded);
    for namespace in namespaces.iter().flatten() {
        if !state.namespaces.contains_key(namespace) {
            warnings.push(format!("namespace {namespace}: not in the cluster"));
        }
    }
    let shown = Shown {
        namespaces,
        selector: request.selector.as_ref().map(ToString::to_string),
        pods: pods.len(),
        of: state.pods.len(),
    };
    let options = MatrixOptions {
        pods: Some(pods),
        ..request.options.clone()
    };
    let before = Matrix::new(state, &compiled, &options);
    let Some(overlay) = overlay else {
        return MatrixAnswer {
            matrix: before,
            before: None,
            diff: None,
            shown,
            read,
            warnings,
        };
    };
    warnings.extend(overlay.diagnostics.iter().map(ToString::to_string));
    let after_state = overlay.apply_to(state);
    let after_compiled = compile(&after_state, &compiled.allocations);
    // What the cluster's own objects cost was said with the first compile.
    warnings.extend(
        after_compiled
            .diagnostics
            .iter()
            .filter(|d| !compiled.diagnostics.contains(d))
            .map(ToString::to_string),
    );
    let after = Matrix::new(&after_state, &after_compiled, &options);
    let diff = matrix::diff(&before, &after);
    MatrixAnswer {
        matrix: after,
        before: Some(before),
        diff: Some(diff),
        shown,
        read,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview::cluster::Listed;
    use crate::preview::fixtures::{self, STARS_POLICIES};
    use crate::preview::matrix::Reach;

    fn read() -> ClusterRead {
        ClusterRead {
            context: Some("test".into()),
            server: "https://127.0.0.1:6443".into(),
            lists: vec![Listed {
                resource: "pods",
                resource_version: Some("7".into()),
                count: 4,
                served: true,
            }],
        }
    }

    fn matrix_request(namespaces: Namespaces, selector: Option<&str>) -> MatrixRequest {
        MatrixRequest {
            namespaces,
            selector: selector.map(|s| s.parse().unwrap()),
            apply: Vec::new(),
            options: MatrixOptions::default(),
            node_ips: Vec::new(),
        }
    }

    fn rows(answer: &MatrixAnswer) -> Vec<String> {
        answer
            .matrix
            .pods
            .iter()
            .map(|p| p.pod.to_string())
            .collect()
    }

    #[test]
    fn the_matrix_shows_the_namespaces_and_the_pods_the_selector_chooses() {
        let loaded = Loaded {
            state: fixtures::stars_with_policies(),
            diagnostics: Vec::new(),
        };
        let answer = matrix_in(
            &loaded,
            read(),
            &matrix_request(Namespaces::Context, None),
            None,
            "stars",
        );
        assert_eq!(rows(&answer), ["stars/backend", "stars/frontend"]);
        assert_eq!(answer.shown.to_string(), "pods of namespace stars: 2 of 4");

        let request = matrix_request(
            Namespaces::Only(vec!["stars".into(), "client".into()]),
            Some("role in (frontend,client)"),
        );
        let answer = matrix_in(&loaded, read(), &request, None, "default");
        assert_eq!(rows(&answer), ["client/client", "stars/frontend"]);
        assert_eq!(
            answer.shown.to_string(),
            "pods of namespaces stars, client matching role in (client,frontend): 2 of 4"
        );
        assert_eq!(
            answer.matrix.get(
                PortProtocol::tcp(80),
                &ObjectRef::new("client", "client"),
                &ObjectRef::new("stars", "frontend")
            ),
            Some(Reach::Allowed)
        );

        let answer = matrix_in(
            &loaded,
            read(),
            &matrix_request(Namespaces::All, Some("role!=backend")),
            None,
            "default",
        );
        assert_eq!(answer.shown.pods, 3);
        assert!(!rows(&answer).contains(&"stars/backend".to_owned()));
        let text = answer.text(Style::default());
        assert!(
            text.starts_with("pods of every namespace matching role!=backend: 3 of 4\n\nTCP/80"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "traffic from the node always passes\n\nread from cluster test: pods@7 (4)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_namespace_not_in_the_cluster_is_a_warning_and_shows_nothing() {
        let loaded = Loaded {
            state: fixtures::stars_with_policies(),
            diagnostics: Vec::new(),
        };
        let request = matrix_request(Namespaces::Only(vec!["nope".into()]), None);
        let answer = matrix_in(&loaded, read(), &request, None, "default");
        assert!(answer.matrix.pods.is_empty());
        assert_eq!(answer.warnings, ["namespace nope: not in the cluster"]);
    }

    #[test]
    fn apply_reports_the_cells_it_changes_among_the_pods_shown() {
        let loaded = Loaded {
            state: fixtures::state(fixtures::STARS, &[]),
            diagnostics: Vec::new(),
        };
        let mut overlay = Overlay::default();
        overlay.add_text(STARS_POLICIES, "stars-policies.yaml");
        let request = matrix_request(Namespaces::Only(vec!["stars".into()]), None);
        let answer = matrix_in(&loaded, read(), &request, Some(&overlay), "default");
        let diff = answer.diff.as_ref().unwrap();
        let changes: Vec<String> = diff.changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            ["stars/backend -> stars/frontend TCP/80: ✓ → ✗ (newly blocked)"]
        );
        let json = answer.json();
        assert_eq!(json["diff"]["newly_blocked"], 1);
        assert_eq!(json["cluster"]["context"], "test");
        assert_eq!(json["shown"]["namespaces"][0], "stars");
        assert!(json["before"].is_object());
    }

    #[test]
    fn explain_puts_bare_names_in_the_namespace_and_names_the_node_of_the_other_end() {
        let mut state = fixtures::stars_with_policies();
        state.node.ips.clear();
        for pod in state.pods.values_mut() {
            pod.set_node_name(Some("n1"));
        }
        state.nodes.insert(
            "n1".into(),
            netpol_compile::state::NodePeer {
                labels: Default::default(),
                ips: vec!["192.168.0.1".parse().unwrap()],
            },
        );
        let loaded = Loaded {
            state,
            diagnostics: Vec::new(),
        };
        let request = ExplainRequest {
            src: "frontend".into(),
            dst: "backend".into(),
            port: PortProtocol::tcp(6379),
            namespace: Some("stars".into()),
            node_ips: Vec::new(),
        };
        let answer = explain_in(loaded.clone(), read(), &request, "default").unwrap();
        let Explained::Flows(flows) = &answer.explained else {
            panic!("not a flow");
        };
        assert!(flows[0].allowed);
        assert_eq!(flows[0].dst.name(), "stars/backend");
        assert_eq!(
            answer.json()["cluster"]["lists"][0]["resource_version"],
            "7"
        );
        assert!(
            answer
                .text()
                .ends_with("read from cluster test: pods@7 (4)\n")
        );

        let from_node = ExplainRequest {
            src: "node".into(),
            dst: "backend".into(),
            ..request
        };
        let answer = explain_in(loaded, read(), &from_node, "stars").unwrap();
        let Explained::Flows(flows) = &answer.explained else {
            panic!("not a flow");
        };
        assert_eq!(flows[0].src.name(), "node 192.168.0.1");
        assert!(flows[0].allowed, "traffic from the pod's own node passes");
    }
}
