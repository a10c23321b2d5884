//! The flow log: verdict events from the kernel, with names resolved, for people
//! (`netpol-agent flows`) and machines (`--json`).
//!
//! The kernel emits an event for every drop and every newly allowed connection
//! (rate-limited per CPU). [`Resolver`] turns addresses, endpoint ids and rule indices
//! into pod names and policy rules using the compiled state in force; [`Server`] streams
//! the records as JSON lines to clients of a Unix socket that only root can open.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use aya::maps::{MapData, RingBuf};
use netpol_common::{Addr, DIR_INGRESS, FAMILY_IPV4, FAMILY_IPV6, RULE_NONE, Reason, VerdictEvent};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::addresses::AddressBook;
use super::metrics::StagedLabels;

use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Compiled, Direction, RuleRef, model, protocol_name};

/// Errors of the flow log. Each variant is one metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("flow socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading verdict events: {0}")]
    Events(std::io::Error),
}

/// One line of the flow log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Seconds since boot (CLOCK_MONOTONIC) when the kernel saw the packet.
    pub time: f64,
    /// The same instant as Unix time (seconds), for merging the records of several
    /// nodes and for `--since` (0 when unknown).
    #[serde(default)]
    pub wall: f64,
    /// `dropped`, `allowed` or `audit` (would have been dropped).
    pub verdict: String,
    /// Why: a [`Reason`] name, e.g. `policy-denied`.
    pub reason: String,
    /// `ingress` (into the pod) or `egress` (out of it).
    pub direction: String,
    /// The local pod the decision was made for, `ns/name`.
    pub pod: Option<String>,
    pub src: Peer,
    pub dst: Peer,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, ... .
    pub protocol: String,
    pub dport: u16,
    pub sport: u16,
    /// The rule that allowed it, e.g. `NetworkPolicy x/web spec.ingress[0]`.
    pub rule: Option<String>,
    /// For drops: the policies that isolate the pod in this direction.
    pub isolated_by: Vec<String>,
    pub bytes: u32,
    /// For a connection the pod opened to a Service: the Service address it dialled
    /// (kube-proxy translated it to `dst`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceHop>,
    /// What the staged policies (`netpol.dev/staged`) would do with this connection,
    /// when it differs from what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedVerdict>,
}

/// A connection the staged policies would decide otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVerdict {
    /// `staged-drop` (allowed now, dropped once they are enforced) or `staged-allow`.
    pub verdict: String,
    /// The staged policies that would decide it: for a drop, those that would isolate
    /// the pod in this direction; for an allow, the policy of the allowing rule.
    pub policies: Vec<String>,
    /// For `staged-allow`: the rule, e.g. `NetworkPolicy x/web spec.ingress[0]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

impl fmt::Display for StagedVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = self.verdict.to_uppercase();
        match &self.rule {
            Some(rule) => write!(f, "{verdict} by {rule}"),
            None => write!(f, "{verdict} by {}", self.policies.join(", ")),
        }
    }
}

/// The Service a connection went through: what the pod dialled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHop {
    /// `ns/name` of the Service, when the address and port are a known Service's.
    pub name: Option<String>,
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for ServiceHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = std::net::SocketAddr::new(self.ip, self.port);
        match &self.name {
            Some(name) => write!(f, "svc {name} {address}"),
            None => write!(f, "svc {address}"),
        }
    }
}

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub ip: Option<IpAddr>,
    /// `ns/name` for pods, `node` for this node's addresses.
    pub name: Option<String>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.name, &self.ip) {
            (Some(name), Some(ip)) => write!(f, "{name} ({ip})"),
            (None, Some(ip)) => write!(f, "{ip}"),
            (Some(name), None) => f.write_str(name),
            (None, None) => f.write_str("?"),
        }
    }
}

impl fmt::Display for FlowRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>12.3} {}", self.time, self.summary())
    }
}

impl FlowRecord {
    /// The line without its time: `DROPPED x/a (10.0.0.1) -> ...`.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

/// [`FlowRecord::summary`].
pub struct Summary<'a>(&'a FlowRecord);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let record = self.0;
        let verdict = match record.verdict.as_str() {
            "dropped" => "DROPPED",
            "audit" => "AUDIT  ",
            _ => "ALLOWED",
        };
        write!(f, "{verdict} {} -> ", record.src)?;
        if let Some(service) = &record.service {
            write!(f, "{service} -> ")?;
        }
        write!(
            f,
            "{} {}/{} {}",
            record.dst, record.protocol, record.dport, record.direction
        )?;
        match (&record.rule, record.isolated_by.is_empty()) {
            (Some(rule), _) => write!(f, " by {rule}"),
            (None, false) => write!(
                f,
                " [{}: isolated by {}, no rule allows it]",
                record.reason,
                record.isolated_by.join(", ")
            ),
            (None, true) => write!(f, " [{}]", record.reason),
        }?;
        match &record.staged {
            Some(staged) => write!(f, "; {staged} (staged)"),
            None => Ok(()),
        }
    }
}

pub(crate) fn ip_of(addr: &Addr) -> Option<IpAddr> {
    match addr.family {
        FAMILY_IPV4 => {
            let b = addr.bytes;
            Some(IpAddr::from([b[0], b[1], b[2], b[3]]))
        }
        FAMILY_IPV6 => Some(IpAddr::from(addr.bytes)),
        _ => None,
    }
}

/// Names for addresses, endpoints and rules, from one compiled state.
#[derive(Debug, Default)]
pub struct Resolver {
    /// Shared with the control loop, which keeps it up to date (O(changes) per apply).
    pods_by_ip: SharedAddressBook,
    node_ips: Vec<IpAddr>,
    endpoints: BTreeMap<u32, (ObjectRef, Vec<ObjectRef>, Vec<ObjectRef>)>,
    /// Rule ids (`Compiled::rules`, shared); named only when an event names one.
    rules: netpol_compile::RuleTable,
    /// Service frontends: (address, port, protocol) -> `ns/name`.
    services: BTreeMap<(IpAddr, u16, u8), String>,
    /// The state compiled with its staged policies enforced, when it has any.
    staged: Option<StagedView>,
}

/// The staged policies' view of the cluster: the compile with them enforced, against
/// which the kernel's verdicts are compared.
#[derive(Debug)]
struct StagedView {
    compiled: Compiled,
    /// The staged policies.
    staged: BTreeSet<ObjectRef>,
    /// Per pod: the staged policies that select it for (ingress, egress).
    isolating: BTreeMap<ObjectRef, (Vec<ObjectRef>, Vec<ObjectRef>)>,
}

impl StagedView {
    fn new(state: &ClusterState, compiled: Compiled) -> Self {
        let staged: BTreeSet<ObjectRef> = state.staged_policies().cloned().collect();
        let only_staged = |policies: &[ObjectRef]| -> Vec<ObjectRef> {
            policies
                .iter()
                .filter(|p| staged.contains(p))
                .cloned()
                .collect()
        };
        let isolating = compiled
            .local_pods
            .iter()
            .map(|p| {
                (
                    p.pod.clone(),
                    (
                        only_staged(&p.ingress_policies),
                        only_staged(&p.egress_policies),
                    ),
                )
            })
            .filter(|(_, (ingress, egress))| !ingress.is_empty() || !egress.is_empty())
            .collect();
        StagedView {
            compiled,
            staged,
            isolating,
        }
    }

    /// What the staged view decides for the connection of `event`, when it differs
    /// from the kernel's `reason`. `pod` is the local pod the kernel decided for.
    fn differs(
        &self,
        event: &VerdictEvent,
        reason: Reason,
        pod: Option<&ObjectRef>,
    ) -> Option<StagedVerdict> {
        // Only decisions policy made: the others (a pod reaching itself, the node's
        // traffic, spoofing, ...) are the same whatever the policies.
        if !matches!(
            reason,
            Reason::PolicyAllowed
                | Reason::PolicyDenied
                | Reason::AuditAllowed
                | Reason::NotIsolated
                | Reason::ClusterAccepted
                | Reason::ClusterDenied
        ) {
            return None;
        }
        let (src, dst) = (ip_of(&event.src)?, ip_of(&event.dst)?);
        let direction = if event.direction == DIR_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        // A connection to a Service that the pod's enforced egress does not judge is
        // seen here before kube-proxy's translation, without its backend: the staged
        // view could only judge the Service address, which the kernel never does.
        if direction == Direction::Egress
            && model::defers_to_service(&self.compiled, src, dst, event.protocol, event.dport)
        {
            return None;
        }
        let decision = model::decide(
            &self.compiled,
            src,
            dst,
            event.protocol,
            event.dport,
            direction,
        );
        if decision.reason == Reason::NotEndpoint || decision.allowed() != reason.is_drop() {
            return None;
        }
        if decision.allowed() {
            // Enforcing more policies opens only through their own rules: the allowing
            // rule is a staged policy's.
            let rule = self.compiled.rules.get(&decision.rule);
            return Some(StagedVerdict {
                verdict: "staged-allow".to_owned(),
                policies: rule
                    .filter(|r| r.cluster.is_none() && self.staged.contains(&r.policy))
                    .map(RuleRef::policy_name)
                    .into_iter()
                    .collect(),
                rule: rule.map(ToString::to_string),
            });
        }
        let policies = pod
            .and_then(|pod| self.isolating.get(pod))
            .map(|(ingress, egress)| match direction {
                Direction::Ingress => ingress,
                Direction::Egress => egress,
            })
            .into_iter()
            .flatten()
            .map(|p| format!("NetworkPolicy {p}"))
            .collect();
        Some(StagedVerdict {
            verdict: "staged-drop".to_owned(),
            policies,
            rule: None,
        })
    }
}

impl Resolver {
    /// Names from `state` and `compiled` (the pods' addresses read whole: O(pods)).
    pub fn new(state: &ClusterState, compiled: &Compiled) -> Self {
        let book = Arc::new(RwLock::new(AddressBook::of(state)));
        Resolver::with_addresses(book, state, compiled)
    }

    /// Names from `state` and `compiled`, the pods' addresses from `book` (kept up to
    /// date by its owner).
    pub fn with_addresses(
        book: SharedAddressBook,
        state: &ClusterState,
        compiled: &Compiled,
    ) -> Self {
        let pods_by_ip = book;
        let endpoints = compiled
            .local_pods
            .iter()
            .map(|p| {
                (
                    p.endpoint_id,
                    (
                        p.pod.clone(),
                        p.ingress_policies.clone(),
                        p.egress_policies.clone(),
                    ),
                )
            })
            .collect();
        Resolver {
            pods_by_ip,
            node_ips: state.node.ips.clone(),
            endpoints,
            rules: compiled.rules.clone(),
            services: netpol_compile::services::ServiceIndex::new(state)
                .frontends()
                .map(|(key, frontend)| (key, frontend.service.to_string()))
                .collect(),
            staged: None,
        }
    }

    /// The same names, with the staged policies' view: `staged` is the state compiled
    /// with [`ClusterState::enforce_staged`] (`None` when the state has no staged
    /// policy). Records then say what the staged policies would change.
    pub fn with_staged(mut self, state: &ClusterState, staged: Option<Compiled>) -> Self {
        self.staged = staged.map(|compiled| StagedView::new(state, compiled));
        self
    }

    /// The Service at a frontend address and port, `ns/name`.
    pub fn service_at(&self, ip: IpAddr, port: u16, protocol: u8) -> Option<&str> {
        self.services.get(&(ip, port, protocol)).map(String::as_str)
    }

    fn peer(&self, addr: &Addr) -> Peer {
        let ip = ip_of(addr);
        let name = ip.and_then(|ip| {
            self.pods_by_ip
                .read()
                .ok()?
                .holder(&ip)
                .map(ToString::to_string)
                .or_else(|| self.node_ips.contains(&ip).then(|| "node".to_owned()))
        });
        Peer { ip, name }
    }

    /// The record of one kernel event.
    pub fn record(&self, event: &VerdictEvent) -> FlowRecord {
        let reason = Reason::ALL
            .into_iter()
            .find(|r| *r as u8 == event.reason)
            .unwrap_or(Reason::Malformed);
        let ingress = event.direction == DIR_INGRESS;
        let endpoint = self.endpoints.get(&event.endpoint);
        let isolated_by = match (reason, endpoint) {
            (
                Reason::PolicyDenied | Reason::AuditAllowed,
                Some((_, ingress_policies, egress_policies)),
            ) => {
                let policies = if ingress {
                    ingress_policies
                } else {
                    egress_policies
                };
                policies
                    .iter()
                    .map(|p| format!("NetworkPolicy {p}"))
                    .collect()
            }
            _ => Vec::new(),
        };
        FlowRecord {
            time: event.timestamp_ns as f64 / 1e9,
            wall: 0.0,
            verdict: match reason {
                Reason::AuditAllowed => "audit",
                r if r.is_drop() => "dropped",
                _ => "allowed",
            }
            .to_owned(),
            reason: reason.name().to_owned(),
            direction: if ingress { "ingress" } else { "egress" }.to_owned(),
            pod: endpoint.map(|(pod, _, _)| pod.to_string()),
            src: self.peer(&event.src),
            dst: self.peer(&event.dst),
            protocol: protocol_name(event.protocol),
            dport: event.dport,
            sport: event.sport,
            rule: (event.rule != RULE_NONE)
                .then(|| self.rules.get(&event.rule).map(ToString::to_string))
                .flatten(),
            isolated_by,
            bytes: event.len,
            service: None,
            staged: self
                .staged
                .as_ref()
                .and_then(|view| view.differs(event, reason, endpoint.map(|(pod, _, _)| pod))),
        }
    }
}

/// Joins the two halves of a pod's connection to a Service: `from_pod` reports the
/// Service address the pod dialled ([`Reason::ToService`], not published on its own),
/// the hook after kube-proxy's translation reports the decision on the backend. They
/// share the pod's address, source port and protocol (kube-proxy's DNAT keeps them).
/// Bounded: the oldest dialled addresses are forgotten first.
#[derive(Debug, Default)]
pub struct ServiceHops {
    by_source: BTreeMap<(IpAddr, u16, u8), (IpAddr, u16)>,
    order: std::collections::VecDeque<(IpAddr, u16, u8)>,
}

impl ServiceHops {
    /// Connections remembered between the two halves.
    const CAPACITY: usize = 16_384;

    /// The record of `event`, or `None` for the first half of a Service connection
    /// (remembered for the second).
    pub fn record(&mut self, resolver: &Resolver, event: &VerdictEvent) -> Option<FlowRecord> {
        let Some(src) = ip_of(&event.src) else {
            return Some(resolver.record(event));
        };
        let key = (src, event.sport, event.protocol);
        if event.reason == Reason::ToService as u8
            && let Some(dst) = ip_of(&event.dst)
        {
            if self.by_source.insert(key, (dst, event.dport)).is_none() {
                self.order.push_back(key);
                if self.order.len() > Self::CAPACITY
                    && let Some(oldest) = self.order.pop_front()
                {
                    self.by_source.remove(&oldest);
                }
            }
            return None;
        }
        let mut record = resolver.record(event);
        record.service = self.by_source.get(&key).map(|&(ip, port)| ServiceHop {
            name: resolver
                .service_at(ip, port, event.protocol)
                .map(str::to_owned),
            ip,
            port,
        });
        Some(record)
    }
}

/// Counts a record's staged verdict against each staged policy it names.
fn count_staged(counters: &Family<StagedLabels, Counter>, record: &FlowRecord) {
    let Some(staged) = &record.staged else {
        return;
    };
    for policy in &staged.policies {
        let policy = policy.strip_prefix("NetworkPolicy ").unwrap_or(policy);
        counters
            .get_or_create(&StagedLabels {
                policy: policy.to_owned(),
                verdict: staged.verdict.clone(),
            })
            .inc();
    }
}

/// Converts the kernel's CLOCK_MONOTONIC nanoseconds to Unix time, with the offset of
/// the two clocks read once per batch of events.
struct WallClock {
    monotonic_ns: u64,
    unix: f64,
}

impl WallClock {
    fn now() -> Self {
        let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            .unwrap_or(0);
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        WallClock {
            monotonic_ns: monotonic,
            unix,
        }
    }

    /// Unix seconds of the monotonic instant `ns` (0 when a clock could not be read).
    fn wall(&self, ns: u64) -> f64 {
        if self.monotonic_ns == 0 || self.unix == 0.0 {
            return 0.0;
        }
        self.unix - (self.monotonic_ns.saturating_sub(ns)) as f64 / 1e9
    }
}

/// Records as they are read, to every client of the flow socket, and the most recent
/// of them for clients that ask for what came before (`flows --since`).
#[derive(Debug)]
pub struct FlowFeed {
    sender: broadcast::Sender<Arc<FlowRecord>>,
    history: std::sync::Mutex<std::collections::VecDeque<Arc<FlowRecord>>>,
    capacity: usize,
}

impl FlowFeed {
    /// Records kept for `--since`: about 4 MiB of records.
    pub const HISTORY: usize = 10_000;

    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(FlowFeed {
            sender: broadcast::channel(4096).0,
            history: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
            capacity,
        })
    }

    /// Keeps `record` (forgetting the oldest beyond the capacity) and sends it to the
    /// clients following now.
    pub fn publish(&self, record: FlowRecord) {
        let record = Arc::new(record);
        let Ok(mut history) = self.history.lock() else {
            return;
        };
        if history.len() == self.capacity {
            history.pop_front();
        }
        history.push_back(record.clone());
        // Sent under the lock, so a subscriber taken with a replay (below) misses none
        // and sees none twice. No subscriber is fine.
        let _ = self.sender.send(record);
    }

    /// The kept records from Unix time `since` on (none when `since` is `None`), and
    /// the records published after them.
    pub fn subscribe(
        &self,
        since: Option<f64>,
    ) -> (Vec<Arc<FlowRecord>>, broadcast::Receiver<Arc<FlowRecord>>) {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let replay = since.map_or_else(Vec::new, |since| {
            history
                .iter()
                .filter(|r| r.wall >= since)
                .cloned()
                .collect()
        });
        (replay, self.sender.subscribe())
    }
}

/// A duration as `--since` takes it: `90s`, `5m`, `2h`, or seconds alone.
pub fn parse_since(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: the unit is s, m or h (e.g. 90s, 5m, 2h)"
            ));
        }
    };
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(std::time::Duration::from_secs_f64(n * scale)),
        _ => Err(format!("{text:?} is not a duration (e.g. 90s, 5m, 2h)")),
    }
}

impl FlowRequest {
    /// Records from `duration` ago on.
    pub fn since(duration: std::time::Duration) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        FlowRequest {
            since: Some(now.saturating_sub(duration).as_secs_f64()),
        }
    }
}

/// What a client of the flow socket asks for, in its first line (JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowRequest {
    /// Replay the kept records from this Unix time on before the live ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<f64>,
}

/// The resolver in force, swapped by the control loop after every apply.
pub type SharedResolver = Arc<RwLock<Arc<Resolver>>>;

/// The pods' addresses, shared between the control loop (which updates them) and the
/// flow log's resolvers.
pub type SharedAddressBook = Arc<RwLock<AddressBook>>;

/// Reads the kernel's ring buffer and publishes records until the process ends.
pub fn spawn_reader(
    events: RingBuf<MapData>,
    resolver: SharedResolver,
    feed: Arc<FlowFeed>,
    staged: Family<StagedLabels, Counter>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    // SAFETY: the ring buffer owns its descriptor and moves into the AsyncFd, which
    // deregisters it before dropping it; nothing else closes or reuses it meanwhile.
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|error| Error::Events(std::io::Error::from(error)))?;
    Ok(tokio::spawn(async move {
        let mut hops = ServiceHops::default();
        loop {
            let mut guard = match events.readable_mut().await {
                Ok(guard) => guard,
                Err(error) => {
                    warn!(%error, "verdict event reader stopped");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            let current = resolver.read().map(|r| Arc::clone(&r)).unwrap_or_default();
            let clock = WallClock::now();
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<VerdictEvent>() {
                    continue;
                }
                // SAFETY: the kernel wrote a VerdictEvent; read_unaligned copes with
                // the ring buffer's 8-byte alignment either way.
                let event =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) };
                // No subscriber is fine: the record is simply not delivered.
                if let Some(mut record) = hops.record(&current, &event) {
                    record.wall = clock.wall(event.timestamp_ns);
                    count_staged(&staged, &record);
                    feed.publish(record);
                }
            }
            guard.clear_ready();
        }
    }))
}

/// The Unix socket that `netpol-agent flows` reads.
pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Binds `path` (mode 0600: only root reaches it; pods never see the host's file
    /// system) and serves every client the live records as JSON lines.
    pub fn start(path: &Path, feed: &Arc<FlowFeed>) -> Result<Server, Error> {
        use std::os::unix::fs::PermissionsExt as _;
        let socket_error = |source| Error::Socket {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(socket_error)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(socket_error(error)),
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(socket_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_error)?;
        let feed = feed.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(client) => client,
                    Err(error) => {
                        warn!(%error, "flow socket accept failed");
                        continue;
                    }
                };
                tokio::spawn(serve_client(stream, feed.clone()));
            }
        });
        Ok(Server {
            path: path.to_path_buf(),
        })
    }
}

/// One client: its request line (a client that sends none within a second, or an
/// unreadable one, follows from now), the replay it asked for, then live records until
/// it goes away.
async fn serve_client(stream: tokio::net::UnixStream, feed: Arc<FlowFeed>) {
    use tokio::io::AsyncBufReadExt as _;
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    let mut first = String::new();
    let request = match tokio::time::timeout(
        std::time::Duration::from_secs(1),
        reader.read_line(&mut first),
    )
    .await
    {
        Ok(Ok(_)) => serde_json::from_str::<FlowRequest>(&first).unwrap_or_default(),
        _ => FlowRequest::default(),
    };
    let (replay, mut records) = feed.subscribe(request.since);
    let line = |record: &FlowRecord| {
        let mut line = serde_json::to_string(record).unwrap_or_default();
        line.push('\n');
        line
    };
    for record in &replay {
        if writer.write_all(line(record).as_bytes()).await.is_err() {
            return;
        }
    }
    loop {
        let text = match records.recv().await {
            Ok(record) => line(&record),
            Err(broadcast::error::RecvError::Lagged(n)) => format!("{{\"lagged\":{n}}}\n"),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let sent = writer.write_all(text.as_bytes()).await;
        if sent.is_err() {
            debug!("flow client went away");
            return;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Which records `netpol-agent flows` shows.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    /// `ns/name`: flows from, to or decided for this pod.
    pub pod: Option<String>,
    /// Flows with an end in this namespace.
    pub namespace: Option<String>,
    /// `dropped`, `allowed` or `audit`; or `staged-drop`, `staged-allow`: what the
    /// staged policies would change.
    pub verdict: Option<String>,
    /// Destination port.
    pub port: Option<u16>,
}

impl FlowFilter {
    pub fn matches(&self, record: &FlowRecord) -> bool {
        let names = [
            record.src.name.as_deref(),
            record.dst.name.as_deref(),
            record.pod.as_deref(),
        ];
        self.pod
            .as_ref()
            .is_none_or(|pod| names.contains(&Some(pod.as_str())))
            && self.namespace.as_ref().is_none_or(|ns| {
                names
                    .iter()
                    .flatten()
                    .any(|name| name.split_once('/').is_some_and(|(n, _)| n == ns))
            })
            && self.verdict.as_ref().is_none_or(|v| {
                *v == record.verdict || record.staged.as_ref().is_some_and(|s| s.verdict == *v)
            })
            && self.port.is_none_or(|port| port == record.dport)
    }
}

/// Connects to a running agent's flow socket and prints matching records until the
/// agent goes away: one readable line each, or the JSON line as received.
pub async fn follow(
    path: &Path,
    request: &FlowRequest,
    filter: &FlowFilter,
    json: bool,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), Error> {
    use tokio::io::AsyncBufReadExt as _;
    let socket_error = |source| Error::Socket {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(socket_error)?;
    let mut line = serde_json::to_string(request).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(socket_error)?;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    while let Some(line) = lines.next_line().await.map_err(socket_error)? {
        let record: FlowRecord = match serde_json::from_str(&line) {
            Ok(record) => record,
            Err(_) => {
                // `{"lagged": n}`: this client fell behind and n records were skipped.
                writeln!(out, "... {line}").map_err(socket_error)?;
                continue;
            }
        };
        if !filter.matches(&record) {
            continue;
        }
        if json {
            writeln!(out, "{line}")
        } else {
            writeln!(out, "{record}")
        }
        .map_err(socket_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest::parse_documents;
    use netpol_compile::{Allocations, compile};

    fn state() -> ClusterState {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: a}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.1}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: b}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.2}\n---\n\
            apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\n\
            spec: {podSelector: {matchLabels: {app: b}}, ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]}\n";
        let mut state = ClusterState::default();
        state.node.ips = vec!["10.99.0.1".parse().unwrap()];
        for object in parse_documents(text, "t") {
            object.unwrap().insert_into(&mut state);
        }
        state
    }

    fn event(
        src: [u8; 4],
        dst: [u8; 4],
        dport: u16,
        reason: Reason,
        endpoint: u32,
        rule: u32,
    ) -> VerdictEvent {
        VerdictEvent {
            timestamp_ns: 1_500_000_000,
            src: Addr::v4(src),
            dst: Addr::v4(dst),
            sport: 40000,
            dport,
            protocol: 6,
            direction: DIR_INGRESS,
            reason: reason as u8,
            endpoint,
            rule,
            len: 60,
            ..VerdictEvent::default()
        }
    }

    #[test]
    fn an_address_is_named_by_the_pod_that_holds_it_never_a_finished_or_stale_one() {
        // x/0done finished and x/0stale is a stale, pending object: both list an address
        // that a running pod holds now, and both sort before it by name.
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: 0done, namespace: x, creationTimestamp: '2025-01-03T00:00:00Z'}\n\
            spec: {containers: [{name: c}]}\nstatus: {phase: Succeeded, podIP: 10.0.0.1}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: 0stale, namespace: x, creationTimestamp: '2025-01-03T00:00:00Z'}\n\
            spec: {containers: [{name: c}]}\nstatus: {phase: Pending, podIP: 10.0.0.2}\n---\n";
        let mut state = state();
        for object in parse_documents(text, "t") {
            object.unwrap().insert_into(&mut state);
        }
        for name in ["a", "b"] {
            let pod = state.pods.get_mut(&ObjectRef::new("x", name)).unwrap();
            pod.set_phase(Some("Running"));
        }
        let compiled = compile(&state, &Allocations::default());
        let resolver = Resolver::new(&state, &compiled);
        let record = resolver.record(&event(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            81,
            Reason::PolicyDenied,
            compiled.endpoints[&Addr::v4([10, 0, 0, 2])].id,
            RULE_NONE,
        ));
        assert_eq!(record.src.name.as_deref(), Some("x/a"));
        assert_eq!(record.dst.name.as_deref(), Some("x/b"));
    }

    #[test]
    fn a_drop_by_a_cluster_network_policy_names_it_with_its_tier_priority_and_rule() {
        let text = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
            metadata: {name: deny-a}\n\
            spec: {tier: Admin, priority: 10, subject: {namespaces: {}},\n\
              ingress: [{name: no-a, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}]}]}\n";
        let mut state = state();
        for object in parse_documents(text, "t") {
            object.unwrap().insert_into(&mut state);
        }
        let compiled = compile(&state, &Allocations::default());
        assert!(
            compiled.diagnostics.is_empty(),
            "{:?}",
            compiled.diagnostics
        );
        // What the kernel does with it (the model replays its lookups): the Admin tier
        // denies before x/web, which allows port 80, is looked at.
        let decision = netpol_compile::model::decide(
            &compiled,
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            6,
            80,
            netpol_compile::Direction::Ingress,
        );
        assert_eq!(decision.reason, Reason::ClusterDenied);
        let resolver = Resolver::new(&state, &compiled);
        let record = resolver.record(&event(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            80,
            decision.reason,
            decision.endpoint.unwrap(),
            decision.rule,
        ));
        assert_eq!(record.verdict, "dropped");
        assert_eq!(record.reason, "cluster-denied");
        assert_eq!(
            record.to_string(),
            "       1.500 DROPPED x/a (10.0.0.1) -> x/b (10.0.0.2) TCP/80 ingress by \
             ClusterNetworkPolicy/deny-a (Admin, priority 10) ingress rule \"no-a\""
        );
    }

    /// The resolver of `state` plus `staged` (documents of staged policies), as the
    /// control loop builds it: the kernel's maps from the state in force, the staged
    /// view from the same state with the staged policies enforced.
    fn with_staged(staged: &str) -> (Compiled, Resolver) {
        let mut state = state();
        for object in parse_documents(staged, "t") {
            object.unwrap().insert_into(&mut state);
        }
        let compiled = compile(&state, &Allocations::default());
        state.enforce_staged = true;
        let view = compile(&state, &Allocations::default());
        state.enforce_staged = false;
        let resolver = Resolver::new(&state, &compiled).with_staged(&state, Some(view));
        (compiled, resolver)
    }

    /// The kernel's event for `src -> dst:dport` at the destination's ingress, as the
    /// model of its lookups decides it on the maps in force.
    fn kernel_event(compiled: &Compiled, src: [u8; 4], dst: [u8; 4], dport: u16) -> VerdictEvent {
        let decision = netpol_compile::model::decide(
            compiled,
            IpAddr::from(src),
            IpAddr::from(dst),
            6,
            dport,
            Direction::Ingress,
        );
        event(
            src,
            dst,
            dport,
            decision.reason,
            decision.endpoint.unwrap(),
            decision.rule,
        )
    }

    #[test]
    fn a_connection_a_staged_policy_would_drop_is_allowed_and_reported_as_staged_drop() {
        // x/a is not isolated; the staged x/lock-a would isolate it for ingress.
        let (compiled, resolver) = with_staged(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: lock-a, namespace: x, annotations: {netpol.dev/staged: 'true'}}\n\
             spec: {podSelector: {matchLabels: {app: a}}}\n",
        );
        let record = resolver.record(&kernel_event(&compiled, [10, 0, 0, 2], [10, 0, 0, 1], 80));
        assert_eq!(record.verdict, "allowed", "a staged policy is not enforced");
        assert_eq!(
            record.staged,
            Some(StagedVerdict {
                verdict: "staged-drop".into(),
                policies: vec!["NetworkPolicy x/lock-a".into()],
                rule: None,
            })
        );
        assert_eq!(
            record.to_string(),
            "       1.500 ALLOWED x/b (10.0.0.2) -> x/a (10.0.0.1) TCP/80 ingress \
             [not-isolated]; STAGED-DROP by NetworkPolicy x/lock-a (staged)"
        );
        let filter = |verdict: &str| FlowFilter {
            verdict: Some(verdict.into()),
            ..FlowFilter::default()
        };
        assert!(filter("staged-drop").matches(&record));
        assert!(filter("allowed").matches(&record));
        assert!(!filter("staged-allow").matches(&record));
        let counters = Family::<StagedLabels, Counter>::default();
        count_staged(&counters, &record);
        let labels = StagedLabels {
            policy: "x/lock-a".into(),
            verdict: "staged-drop".into(),
        };
        assert_eq!(counters.get_or_create(&labels).get(), 1);

        // Where the staged view agrees with the kernel, nothing is said.
        let same = resolver.record(&kernel_event(&compiled, [10, 0, 0, 1], [10, 0, 0, 2], 80));
        assert_eq!(same.verdict, "allowed");
        assert_eq!(same.staged, None);
    }

    #[test]
    fn a_connection_a_staged_policy_would_allow_is_dropped_and_reported_as_staged_allow() {
        // x/web allows b's port 80 from a only; the staged x/open-81 would open port 81.
        let (compiled, resolver) = with_staged(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: open-81, namespace: x, annotations: {netpol.dev/staged: 'true'}}\n\
             spec: {podSelector: {matchLabels: {app: b}}, ingress: [{ports: [{port: 81}]}]}\n",
        );
        let record = resolver.record(&kernel_event(&compiled, [10, 0, 0, 1], [10, 0, 0, 2], 81));
        assert_eq!(record.verdict, "dropped", "a staged policy is not enforced");
        let staged = record.staged.clone().expect("a staged verdict");
        assert_eq!(staged.verdict, "staged-allow");
        assert_eq!(staged.policies, ["NetworkPolicy x/open-81"]);
        assert_eq!(
            staged.rule.as_deref(),
            Some("NetworkPolicy x/open-81 spec.ingress[0]")
        );
        // The drop is still explained by the policies in force alone.
        assert_eq!(record.isolated_by, ["NetworkPolicy x/web"]);
        let json: FlowRecord =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(json, record);
    }

    #[test]
    fn since_reads_seconds_minutes_and_hours_and_names_what_it_cannot_read() {
        assert_eq!(parse_since("90s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_since("5m"), Ok(std::time::Duration::from_secs(300)));
        assert_eq!(parse_since("2h"), Ok(std::time::Duration::from_secs(7200)));
        assert_eq!(parse_since("15"), Ok(std::time::Duration::from_secs(15)));
        assert!(parse_since("5d").unwrap_err().contains("s, m or h"));
        assert!(parse_since("m").unwrap_err().contains("not a duration"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_asking_since_gets_the_kept_records_from_then_and_then_the_live_ones() {
        let feed = FlowFeed::new(3);
        let record = |wall: f64| {
            let mut r = Resolver::default().record(&event(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                80,
                Reason::PolicyDenied,
                0,
                RULE_NONE,
            ));
            r.wall = wall;
            r
        };
        for wall in [100.0, 200.0, 300.0, 400.0] {
            feed.publish(record(wall));
        }
        // Three kept: 100 was forgotten.
        let (replay, mut live) = feed.subscribe(Some(150.0));
        let walls: Vec<f64> = replay.iter().map(|r| r.wall).collect();
        assert_eq!(walls, [200.0, 300.0, 400.0]);
        let (none, _) = feed.subscribe(None);
        assert!(none.is_empty(), "without since, live only");
        feed.publish(record(500.0));
        assert_eq!(live.recv().await.unwrap().wall, 500.0);

        // Over the socket, as `netpol-agent flows --since` asks.
        let dir = std::env::temp_dir().join(format!("netpol-flowfeed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.sock");
        let _server = Server::start(&path, &feed).unwrap();
        let mut out = Vec::new();
        let request = FlowRequest { since: Some(250.0) };
        let followed = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            follow(&path, &request, &FlowFilter::default(), true, &mut out),
        )
        .await;
        assert!(followed.is_err(), "it follows until stopped");
        let walls: Vec<f64> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<FlowRecord>(l).unwrap().wall)
            .collect();
        assert_eq!(walls, [300.0, 400.0, 500.0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_drop_names_the_pods_and_the_isolating_policy() {
        let state = state();
        let compiled = compile(&state, &Allocations::default());
        let b = compiled
            .local_pods
            .iter()
            .find(|p| p.pod.name == "b")
            .unwrap()
            .endpoint_id;
        let resolver = Resolver::new(&state, &compiled);
        let record = resolver.record(&event(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            81,
            Reason::PolicyDenied,
            b,
            RULE_NONE,
        ));
        assert_eq!(record.verdict, "dropped");
        assert_eq!(record.pod.as_deref(), Some("x/b"));
        assert_eq!(record.src.name.as_deref(), Some("x/a"));
        assert_eq!(record.isolated_by, ["NetworkPolicy x/web"]);
        assert_eq!(
            record.to_string(),
            "       1.500 DROPPED x/a (10.0.0.1) -> x/b (10.0.0.2) TCP/81 ingress \
             [policy-denied: isolated by NetworkPolicy x/web, no rule allows it]"
        );
        let json: FlowRecord =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(json, record);
    }

    #[test]
    fn filters_select_by_pod_namespace_verdict_and_port() {
        let state = state();
        let compiled = compile(&state, &Allocations::default());
        let resolver = Resolver::new(&state, &compiled);
        let record = resolver.record(&event(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            81,
            Reason::PolicyDenied,
            1,
            RULE_NONE,
        ));
        let filter = |pod: Option<&str>,
                      ns: Option<&str>,
                      verdict: Option<&str>,
                      port: Option<u16>| FlowFilter {
            pod: pod.map(Into::into),
            namespace: ns.map(Into::into),
            verdict: verdict.map(Into::into),
            port,
        };
        assert!(filter(None, None, None, None).matches(&record));
        assert!(filter(Some("x/a"), Some("x"), Some("dropped"), Some(81)).matches(&record));
        assert!(!filter(Some("x/c"), None, None, None).matches(&record));
        assert!(!filter(None, Some("y"), None, None).matches(&record));
        assert!(!filter(None, None, Some("allowed"), None).matches(&record));
        assert!(!filter(None, None, None, Some(80)).matches(&record));
    }

    #[test]
    fn a_service_connection_is_one_line_naming_the_service_and_the_backend() {
        let state = state();
        let compiled = compile(&state, &Allocations::default());
        let mut resolver = Resolver::new(&state, &compiled);
        resolver
            .services
            .insert(("10.96.0.10".parse().unwrap(), 53, 6), "x/db".to_owned());
        let mut hops = ServiceHops::default();
        let mut dialled = event(
            [10, 0, 0, 1],
            [10, 96, 0, 10],
            53,
            Reason::ToService,
            1,
            RULE_NONE,
        );
        dialled.direction = netpol_common::DIR_EGRESS;
        assert_eq!(
            hops.record(&resolver, &dialled),
            None,
            "the first half is not a line"
        );
        let mut judged = event(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            5353,
            Reason::PolicyAllowed,
            1,
            RULE_NONE,
        );
        judged.direction = netpol_common::DIR_EGRESS;
        let record = hops.record(&resolver, &judged).unwrap();
        assert_eq!(
            record.to_string(),
            "       1.500 ALLOWED x/a (10.0.0.1) -> svc x/db 10.96.0.10:53 -> x/b (10.0.0.2) \
             TCP/5353 egress [policy-allowed]"
        );
        // Another connection of the same pod is not taken for the Service's.
        judged.sport = 40001;
        assert_eq!(hops.record(&resolver, &judged).unwrap().service, None);
        // An event without addresses (a malformed packet) is still a line.
        let malformed = VerdictEvent {
            reason: Reason::Malformed as u8,
            ..VerdictEvent::default()
        };
        assert!(hops.record(&resolver, &malformed).is_some());
    }

    #[test]
    fn an_allowed_connection_names_its_rule_and_the_node_is_named() {
        let state = state();
        let compiled = compile(&state, &Allocations::default());
        let b = compiled
            .local_pods
            .iter()
            .find(|p| p.pod.name == "b")
            .unwrap()
            .endpoint_id;
        let resolver = Resolver::new(&state, &compiled);
        let record = resolver.record(&event(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            80,
            Reason::PolicyAllowed,
            b,
            0,
        ));
        assert_eq!(
            record.rule.as_deref(),
            Some("NetworkPolicy x/web spec.ingress[0]")
        );
        assert!(
            record
                .to_string()
                .ends_with("by NetworkPolicy x/web spec.ingress[0]")
        );
        let from_node = resolver.record(&event(
            [10, 99, 0, 1],
            [10, 0, 0, 2],
            8080,
            Reason::FromHost,
            b,
            RULE_NONE,
        ));
        assert_eq!(from_node.src.name.as_deref(), Some("node"));
        assert_eq!(from_node.verdict, "allowed");
    }
}
