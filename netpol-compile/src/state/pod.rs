//! What the agent keeps of a Pod: what decides verdicts and nothing else.
//!
//! A Pod object is kilobytes (a k8s-openapi `Pod` with one container is ~4.8 KiB before
//! any string); a [`PodInfo`] is ~150 bytes, one shared value, its labels, node name, phase and ports
//! shared with every pod that has equal ones ([`super::intern`]). Kubernetes mode reads
//! pods straight into it ([`PodDocument`]: the fields it does not name are skipped by the
//! parser, never built); local mode and tests convert a `Pod` ([`PodInfo::of`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use arcstr::ArcStr;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use super::Labels;
use super::intern;

/// A port a container declares (`spec.containers[].ports[]`, and those of native
/// sidecars).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeclaredPort {
    pub name: Option<Box<str>>,
    pub protocol: Option<Box<str>>,
    pub container_port: i32,
}

/// What the compiler, the flow log and the previews read of a pod. It reads from a Pod
/// document as [`PodDocument`] does.
///
/// One shared value: a copy is a reference count, so the Kubernetes source's pod store
/// and the state hold a pointer each, not the fields twice (at 150,000 pods the two maps'
/// entries were ~78 MiB with the fields inline). The setters copy the fields only when
/// they are shared.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(from = "PodDocument")]
pub struct PodInfo(Arc<Fields>);

#[derive(Clone, Debug, PartialEq)]
struct Fields {
    /// `metadata.labels` (absent and empty are the same).
    labels: Labels,
    /// `metadata.creationTimestamp`.
    created: Option<Created>,
    /// `spec.nodeName`.
    node_name: Option<ArcStr>,
    /// `spec.hostNetwork`.
    host_network: bool,
    /// The ports of `spec.containers`, then of the native sidecars among
    /// `spec.initContainers` (`restartPolicy: Always`), in the order Kubernetes looks a
    /// port name up (`FindPort`).
    ports: Arc<[DeclaredPort]>,
    /// `status.phase`.
    phase: Option<ArcStr>,
    /// `status.podIPs[].ip`, as written, then `status.podIP` when it is not the first of
    /// them (see [`PodIpAt`]).
    addresses: Box<[Box<str>]>,
    /// Where `status.podIP` is.
    pod_ip: PodIpAt,
    /// `metadata.uid`: for Events about the pod.
    uid: Option<Uid>,
}

impl std::fmt::Debug for PodInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Fields {
            labels,
            created,
            node_name,
            host_network,
            ports,
            phase,
            addresses,
            pod_ip,
            uid,
        } = &*self.0;
        f.debug_struct("PodInfo")
            .field("labels", labels)
            .field("created", created)
            .field("node_name", node_name)
            .field("host_network", host_network)
            .field("ports", ports)
            .field("phase", phase)
            .field("addresses", addresses)
            .field("pod_ip", pod_ip)
            .field("uid", uid)
            .finish()
    }
}

impl Default for PodInfo {
    fn default() -> Self {
        PodInfo::from_parts(PodDocument::default()).1
    }
}

impl PodInfo {
    /// What the agent keeps of `pod`: read as a [`PodDocument`] of it is.
    pub fn of(pod: &Pod) -> PodInfo {
        PodInfo::from_parts(PodDocument::of(pod)).1
    }

    /// The pod's identity (namespace, name, uid, resourceVersion) and what is kept of
    /// it, from a Pod document read by [`PodDocument`].
    pub fn from_parts(document: PodDocument) -> (PodIdentity, PodInfo) {
        let PodDocument {
            metadata,
            spec,
            status,
        } = document;
        let spec = spec.unwrap_or_default();
        let status = status.unwrap_or_default();
        let sidecars = spec
            .init_containers
            .into_iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"));
        let ports = spec
            .containers
            .into_iter()
            .flatten()
            .chain(sidecars)
            .flat_map(|c| c.ports.into_iter().flatten())
            .map(|p| DeclaredPort {
                name: p.name,
                protocol: p.protocol,
                container_port: p.container_port,
            })
            .collect();
        let listed = status.pod_ips.into_iter().flatten().map(|p| p.ip).collect();
        let (addresses, pod_ip) = PodIpAt::of(listed, status.pod_ip);
        let info = PodInfo(Arc::new(Fields {
            labels: metadata
                .labels
                .as_ref()
                .map(Labels::from)
                .unwrap_or_default(),
            created: metadata.creation_timestamp.as_ref().map(Created::of),
            node_name: spec.node_name.as_deref().map(intern::name),
            host_network: spec.host_network.unwrap_or(false),
            ports: intern::ports(ports),
            phase: status.phase.as_deref().map(intern::name),
            addresses,
            pod_ip,
            uid: metadata.uid.as_deref().map(Uid::new),
        }));
        let identity = PodIdentity {
            namespace: metadata.namespace,
            name: metadata.name,
            uid: metadata.uid,
            resource_version: metadata.resource_version,
        };
        (identity, info)
    }

    /// `metadata.labels`.
    pub fn labels(&self) -> &Labels {
        &self.0.labels
    }

    /// `metadata.creationTimestamp`.
    pub fn created(&self) -> Option<Time> {
        self.0.created.map(Created::time)
    }

    /// `spec.nodeName`.
    pub fn node_name(&self) -> Option<&str> {
        self.0.node_name.as_deref()
    }

    /// `spec.hostNetwork`.
    pub fn host_network(&self) -> bool {
        self.0.host_network
    }

    /// The ports its containers declare, then those of its native sidecars (init
    /// containers with `restartPolicy: Always`, which run beside the others): the order
    /// Kubernetes looks a port name up in (`FindPort`). Ports of other init containers
    /// are not served while the pod runs.
    pub fn ports(&self) -> &[DeclaredPort] {
        &self.0.ports
    }

    /// [`PodInfo::ports`], shared: equal lists are one value (interned).
    pub fn shared_ports(&self) -> &Arc<[DeclaredPort]> {
        &self.0.ports
    }

    /// `status.phase`.
    pub fn phase(&self) -> Option<&str> {
        self.0.phase.as_deref()
    }

    /// `status.podIPs[].ip`, as written.
    pub fn listed_ips(&self) -> impl ExactSizeIterator<Item = &str> {
        let Fields {
            addresses, pod_ip, ..
        } = &*self.0;
        let listed = addresses.len() - usize::from(*pod_ip == PodIpAt::Last);
        addresses[..listed].iter().map(|ip| &**ip)
    }

    /// `status.podIP`, as written.
    pub fn pod_ip(&self) -> Option<&str> {
        let addresses = &self.0.addresses;
        match self.0.pod_ip {
            PodIpAt::None => None,
            PodIpAt::First => addresses.first().map(|ip| &**ip),
            PodIpAt::Last => addresses.last().map(|ip| &**ip),
        }
    }

    /// `metadata.uid`, as written.
    pub fn uid(&self) -> Option<String> {
        self.0.uid.as_ref().map(Uid::text)
    }

    /// Sets label `key` to `value` (`None`: removes it). For generators and tests: a
    /// source replaces the whole pod.
    pub fn set_label(&mut self, key: &str, value: Option<&str>) {
        let fields = Arc::make_mut(&mut self.0);
        fields.labels = fields.labels.with(key, value);
    }

    /// Moves the pod to `node`.
    pub fn set_node_name(&mut self, node: Option<&str>) {
        Arc::make_mut(&mut self.0).node_name = node.map(intern::name);
    }

    /// Sets `status.phase`.
    pub fn set_phase(&mut self, phase: Option<&str>) {
        Arc::make_mut(&mut self.0).phase = phase.map(intern::name);
    }

    /// Sets `status.podIPs` and `status.podIP`.
    pub fn set_addresses(&mut self, listed: &[&str], pod_ip: Option<&str>) {
        let fields = Arc::make_mut(&mut self.0);
        let listed = listed.iter().map(|ip| Box::from(*ip)).collect();
        (fields.addresses, fields.pod_ip) = PodIpAt::of(listed, pod_ip.map(Box::from));
    }

    /// Replaces the declared ports (in lookup order).
    pub fn set_ports(&mut self, ports: Vec<DeclaredPort>) {
        Arc::make_mut(&mut self.0).ports = intern::ports(ports);
    }
}

/// A `metadata.uid` as written: the 16 bytes of a UUID in its canonical text (lowercase,
/// hyphenated: what the API server hands out), else the text. 150,000 pods' uids as
/// text were ~7 MiB of 48-byte allocations. Kept with the rest of the pod, so that the
/// pod store's slots hold a name and a pointer (24 bytes, not 48).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Uid {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl Uid {
    /// The hyphens of a canonical UUID's text, by position.
    const HYPHENS: [usize; 4] = [8, 13, 18, 23];

    pub(crate) fn new(text: &str) -> Uid {
        Uid::uuid(text).map_or_else(|| Uid::Text(text.into()), Uid::Uuid)
    }

    /// The bytes of `text` when it is a UUID written as [`Uid::text`] writes one.
    fn uuid(text: &str) -> Option<[u8; 16]> {
        let text = text.as_bytes();
        if text.len() != 36 || Uid::HYPHENS.iter().any(|&at| text[at] != b'-') {
            return None;
        }
        let mut digits = text.iter().filter(|&&c| c != b'-');
        let mut nibble = || match *digits.next()? {
            c @ b'0'..=b'9' => Some(c - b'0'),
            c @ b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut bytes = [0u8; 16];
        for byte in &mut bytes {
            *byte = (nibble()? << 4) | nibble()?;
        }
        Some(bytes)
    }

    pub(crate) fn text(&self) -> String {
        match self {
            Uid::Text(text) => text.to_string(),
            Uid::Uuid(bytes) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut text = String::with_capacity(36);
                for byte in bytes {
                    if Uid::HYPHENS.contains(&text.len()) {
                        text.push('-');
                    }
                    text.push(char::from(HEX[usize::from(byte >> 4)]));
                    text.push(char::from(HEX[usize::from(byte & 15)]));
                }
                text
            }
        }
    }
}

/// `metadata.creationTimestamp` in 12 bytes (a [`Time`] is 16, 24 as an `Option`; with
/// the addresses below, a pod's fields fit a 128-byte allocation, not a 160-byte one:
/// 4.6 MiB less at 150,000 pods).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, packed(4))]
struct Created {
    second: i64,
    nanosecond: i32,
}

impl Created {
    fn of(time: &Time) -> Created {
        Created {
            second: time.0.as_second(),
            nanosecond: time.0.subsec_nanosecond(),
        }
    }

    fn time(self) -> Time {
        let Created { second, nanosecond } = self;
        Time(Timestamp::new(second, nanosecond).expect("the parts of a timestamp"))
    }
}

/// Where `status.podIP` is kept: most often it is the first of `status.podIPs` (which
/// the API server makes it), then not written twice (at 150,000 pods, ~2 MiB less);
/// else its text follows the listed ones. One representation for each value, so fields
/// compare as the values do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodIpAt {
    None,
    /// The same text as `status.podIPs[0].ip`.
    First,
    /// The text after the listed addresses.
    Last,
}

impl PodIpAt {
    /// The addresses kept for `status.podIPs` (`listed`) and `status.podIP` (`pod_ip`),
    /// and where the latter is.
    fn of(listed: Vec<Box<str>>, pod_ip: Option<Box<str>>) -> (Box<[Box<str>]>, PodIpAt) {
        match pod_ip {
            None => (listed.into(), PodIpAt::None),
            Some(text) if listed.first() == Some(&text) => (listed.into(), PodIpAt::First),
            Some(text) => {
                let mut addresses = listed;
                addresses.push(text);
                (addresses.into(), PodIpAt::Last)
            }
        }
    }
}

impl DeclaredPort {
    /// A port named `name` (if any) of `protocol` (`None`: TCP).
    pub fn new(name: Option<&str>, container_port: i32, protocol: Option<&str>) -> Self {
        DeclaredPort {
            name: name.map(Box::from),
            protocol: protocol.map(Box::from),
            container_port,
        }
    }
}

impl From<PodDocument> for PodInfo {
    fn from(document: PodDocument) -> Self {
        PodInfo::from_parts(document).1
    }
}

impl From<&Pod> for PodInfo {
    fn from(pod: &Pod) -> Self {
        PodInfo::of(pod)
    }
}

impl From<Pod> for PodInfo {
    fn from(pod: Pod) -> Self {
        PodInfo::of(&pod)
    }
}

/// Who a pod is: what names it to the API server (Events, the watch's bookkeeping).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// A Pod document (JSON or YAML) as the agent reads it: only the fields [`PodInfo`] and
/// [`PodIdentity`] keep. Every other field (managed fields, annotations, container
/// images, environment, volumes, conditions) is skipped by the parser without being
/// built.
#[derive(Debug, Default, Deserialize)]
pub struct PodDocument {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Option<Spec>,
    #[serde(default)]
    status: Option<Status>,
}

impl PodDocument {
    /// The fields of `pod` a document would give (copied, nothing derived: that is
    /// [`PodInfo::from_parts`]'s).
    fn of(pod: &Pod) -> PodDocument {
        let container = |c: &k8s_openapi::api::core::v1::Container| Container {
            restart_policy: c.restart_policy.clone(),
            ports: c.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|p| Port {
                        name: p.name.as_deref().map(Box::from),
                        protocol: p.protocol.as_deref().map(Box::from),
                        container_port: p.container_port,
                    })
                    .collect()
            }),
        };
        let meta = &pod.metadata;
        PodDocument {
            metadata: Meta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                labels: meta.labels.clone(),
                creation_timestamp: meta.creation_timestamp.clone(),
            },
            spec: pod.spec.as_ref().map(|spec| Spec {
                node_name: spec.node_name.clone(),
                host_network: spec.host_network,
                containers: Some(spec.containers.iter().map(container).collect()),
                init_containers: spec
                    .init_containers
                    .as_ref()
                    .map(|init| init.iter().map(container).collect()),
            }),
            status: pod.status.as_ref().map(|status| Status {
                phase: status.phase.clone(),
                pod_ip: status.pod_ip.as_deref().map(Box::from),
                pod_ips: status.pod_ips.as_ref().map(|ips| {
                    ips.iter()
                        .map(|ip| PodIp {
                            ip: Box::from(ip.ip.as_str()),
                        })
                        .collect()
                }),
            }),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    node_name: Option<String>,
    host_network: Option<bool>,
    containers: Option<Vec<Container>>,
    init_containers: Option<Vec<Container>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    restart_policy: Option<String>,
    ports: Option<Vec<Port>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Port {
    name: Option<Box<str>>,
    protocol: Option<Box<str>>,
    container_port: i32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<Box<str>>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Default, Deserialize)]
struct PodIp {
    ip: Box<str>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_uid_is_kept_as_written_in_16_bytes_when_it_is_a_canonical_uuid() {
        for text in [
            "6b1f0c2e-0000-4000-8000-00000000002a",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "00000000-0000-0000-0000-000000000000",
        ] {
            let uid = Uid::new(text);
            assert!(matches!(uid, Uid::Uuid(_)), "{text}");
            assert_eq!(uid.text(), text);
        }
        // Anything else is kept as text, so it reads back as it was written.
        for text in [
            "6B1F0C2E-0000-4000-8000-00000000002A",
            "6b1f0c2e00004000800000000000002a",
            "6b1f0c2e-0000-4000-8000-00000000002",
            "6b1f0c2e-0000-4000-8000-00000000002g",
            "6b1f0c2e-0000-4000-8000+00000000002a",
            "uid-a",
            "",
        ] {
            let uid = Uid::new(text);
            assert_eq!(uid, Uid::Text(text.into()), "{text}");
            assert_eq!(uid.text(), text);
        }
        assert_eq!(std::mem::size_of::<Uid>(), 24);
    }

    fn full_pod() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "a", "namespace": "x", "uid": "u-1", "resourceVersion": "42",
                "labels": {"app": "web", "pod-template-hash": "5d9c"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "creationTimestamp": "2025-01-02T03:04:05Z",
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            },
            "spec": {
                "nodeName": "node-1",
                "hostNetwork": false,
                "initContainers": [
                    {"name": "init", "image": "busybox", "ports": [{"name": "once", "containerPort": 1}]},
                    {"name": "proxy", "image": "envoy", "restartPolicy": "Always",
                     "ports": [{"name": "admin", "containerPort": 15000}]},
                ],
                "containers": [{
                    "name": "main", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"containerPort": 9090, "protocol": "UDP"},
                    ],
                }],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.1",
                "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        })
    }

    #[test]
    fn the_pod_ip_reads_back_as_written_whether_or_not_it_is_the_first_listed() {
        let with = |pod_ip: Option<&str>, listed: &[&str]| {
            let listed: Vec<serde_json::Value> =
                listed.iter().map(|ip| json!({"ip": ip})).collect();
            let document = json!({"status": {"podIP": pod_ip, "podIPs": listed}});
            let info: PodInfo = serde_json::from_value(document).unwrap();
            let mut set = PodInfo::default();
            set.set_addresses(&info.listed_ips().collect::<Vec<_>>(), pod_ip);
            assert_eq!(set, info, "set as read");
            info
        };
        let first = with(Some("10.0.0.1"), &["10.0.0.1", "fd00::1"]);
        assert_eq!(first.pod_ip(), Some("10.0.0.1"));
        assert!(
            first.0.pod_ip == PodIpAt::First && first.0.addresses.len() == 2,
            "not written twice"
        );
        let other = with(Some("10.0.0.9"), &["10.0.0.1"]);
        assert_eq!(other.pod_ip(), Some("10.0.0.9"));
        assert_ne!(other, first);
        assert_eq!(with(Some("10.0.0.1"), &[]).pod_ip(), Some("10.0.0.1"));
        assert_eq!(with(None, &["10.0.0.1"]).pod_ip(), None);
        assert_ne!(
            with(None, &["10.0.0.1"]),
            with(Some("10.0.0.1"), &["10.0.0.1"])
        );
    }

    #[test]
    fn a_pod_document_keeps_what_the_same_pod_object_keeps() {
        let object: Pod = serde_json::from_value(full_pod()).unwrap();
        let document: PodDocument = serde_json::from_value(full_pod()).unwrap();
        let (identity, info) = PodInfo::from_parts(document);
        assert_eq!(info, PodInfo::of(&object));
        assert_eq!(
            identity,
            PodIdentity {
                namespace: Some("x".into()),
                name: Some("a".into()),
                uid: Some("u-1".into()),
                resource_version: Some("42".into()),
            }
        );
    }

    #[test]
    fn a_pod_keeps_labels_node_phase_addresses_and_its_served_ports_in_lookup_order() {
        let info = PodInfo::of(&serde_json::from_value(full_pod()).unwrap());
        assert_eq!(info.labels().get("app"), Some("web"));
        assert_eq!(info.node_name(), Some("node-1"));
        assert!(!info.host_network());
        assert_eq!(info.phase(), Some("Running"));
        assert_eq!(
            info.listed_ips().collect::<Vec<_>>(),
            ["10.0.0.1", "fd00::1"]
        );
        assert_eq!(info.pod_ip(), Some("10.0.0.1"));
        assert!(info.created().is_some());
        let ports: Vec<(Option<&str>, i32)> = info
            .ports()
            .iter()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        // The containers' first, then the native sidecar's; the plain init container's
        // port is never served.
        assert_eq!(
            ports,
            [(Some("http"), 8080), (None, 9090), (Some("admin"), 15000)]
        );
    }

    #[test]
    fn pods_with_equal_labels_and_ports_share_one_copy_of_them() {
        let a = PodInfo::of(&serde_json::from_value(full_pod()).unwrap());
        let mut other = full_pod();
        other["metadata"]["name"] = json!("b");
        other["status"]["podIP"] = json!("10.0.0.2");
        let b = PodInfo::of(&serde_json::from_value(other).unwrap());
        assert_eq!(a.labels(), b.labels());
        assert!(Arc::ptr_eq(a.shared_ports(), b.shared_ports()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_pods_fields_fit_a_128_byte_allocation_with_their_reference_counts() {
        // Two counts of 8 bytes, then the fields: jemalloc's classes are 112, 128, 160.
        assert!(16 + std::mem::size_of::<Fields>() <= 128);
    }

    #[test]
    fn a_creation_time_reads_back_to_the_nanosecond_before_and_after_1970() {
        for written in [
            "2025-01-02T03:04:05Z",
            "2025-01-02T03:04:05.123456789Z",
            "1969-12-31T23:59:58.25Z",
            "0001-01-01T00:00:00Z",
        ] {
            let document = json!({"metadata": {"creationTimestamp": written}});
            let info: PodInfo = serde_json::from_value(document).unwrap();
            let time: Time = serde_json::from_value(json!(written)).unwrap();
            assert_eq!(info.created(), Some(time), "{written}");
        }
        assert_eq!(PodInfo::default().created(), None);
    }

    #[test]
    fn a_copied_pod_shares_its_fields_until_a_setter_changes_the_copy() {
        let a = PodInfo::of(&serde_json::from_value(full_pod()).unwrap());
        let mut b = a.clone();
        assert!(Arc::ptr_eq(&a.0, &b.0), "a copy is a reference count");
        assert_eq!(std::mem::size_of::<PodInfo>(), std::mem::size_of::<usize>());
        b.set_label("app", Some("other"));
        assert!(!Arc::ptr_eq(&a.0, &b.0));
        assert_ne!(
            a.labels().get("app"),
            Some("other"),
            "the original is untouched"
        );
        assert_eq!(b.labels().get("app"), Some("other"));
    }

    #[test]
    fn an_empty_document_is_a_pod_with_nothing() {
        let (identity, info) = PodInfo::from_parts(serde_json::from_value(json!({})).unwrap());
        assert_eq!(identity, PodIdentity::default());
        assert_eq!(info, PodInfo::default());
        assert!(info.labels().is_empty() && info.ports().is_empty());
        assert_eq!(info.phase(), None);
    }
}
