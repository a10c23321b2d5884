//! Tier 3: churn. Pods are created and deleted, labels flipped and policies replaced
//! continuously (a seeded random walk) while the agent runs; at checkpoints real probes
//! check the whole matrix against what the scenario predicts. Then the cluster is put
//! back into its initial state, and what the agent holds must be back at its baseline:
//! entries of the kernel maps (counted by walking the pinned maps, not taken from the
//! agent), peer identities (distinct PEERS values of the IPCACHE entries), attachments (link pins under
//! `<pin dir>/links`), the agent's open descriptors and its resident memory.
//!
//! Bounded: 90 s of churn by default; `NETPOL_CHURN_SECS=N` sets another duration and
//! `NETPOL_CHURN_SEED=N` replays a run (the seed is printed).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::Ipv6Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use netpol_lab::{AgentProcess, Lab, ManifestDir, Pod, PodSpec, Port, Probe};
use support::{AGENT_TIMEOUT, PROBE_TIMEOUT, agent_bin, can_run};

const DEFAULT_SECS: u64 = 90;
/// Churn operations between two checkpoints.
const CHECKPOINT_EVERY: u64 = 15;
/// Pod slots that come and go: `x/c0..c2` and `y/c0..c2`.
const SLOTS: [(&str, &str); 6] = [
    ("x", "c0"),
    ("x", "c1"),
    ("x", "c2"),
    ("y", "c0"),
    ("y", "c1"),
    ("y", "c2"),
];
/// The slots present at the start (and again at the end), with their role.
const INITIAL: [(&str, &str, &str); 3] = [
    ("x", "c0", "client"),
    ("x", "c1", "other"),
    ("y", "c0", "client"),
];
/// Maps whose entries must return to the baseline exactly.
const CHECKED_MAPS: [&str; 4] = ["ENDPOINTS", "IPCACHE", "POLICY", "IFACES"];
/// Resident memory may end up this much above the baseline: the allocator keeps freed
/// pages and arenas grown by the churn's peaks instead of returning them, so RSS after
/// a burst sits somewhat above a fresh agent's without any leak. A leak that matters
/// (per pod, per policy version) grows with the hundreds of operations and goes past it.
const RSS_SLACK_MIB: u64 = 20;
const RSS_SLACK_PERCENT: u64 = 25;
/// Open descriptors may vary by a few (e.g. a status file being written); one leaked
/// per attachment or per map update would be hundreds.
const FD_SLACK: usize = 16;

// ---------------------------------------------------------------------------------
// The scenario: policy sets and what each predicts, from the lab's declared labels.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policies {
    /// No policy: everything is allowed.
    None,
    /// `app=server` in x and y accepts TCP 80 only from `role=client` of any namespace.
    ClientsOnly,
    /// `app=server` in x accepts anything from x's clients, and TCP 81 from any pod of a
    /// namespace labelled `team=blue`.
    SameNsOrBlue,
    /// [`Policies::ClientsOnly`], and x's clients may only open TCP 80 to servers.
    ClientsEgress,
    /// Every pod of y accepts only TCP 81 from clients of any namespace.
    DenyY,
}

const ALL_POLICIES: [Policies; 5] = [
    Policies::None,
    Policies::ClientsOnly,
    Policies::SameNsOrBlue,
    Policies::ClientsEgress,
    Policies::DenyY,
];

fn servers_policy(ns: &str) -> String {
    format!(
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: servers, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  ingress:
    - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: client}}}}}}]
      ports: [{{port: 80, protocol: TCP}}]
"#
    )
}

const SAME_NS_OR_BLUE: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: servers, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: client}}}]
    - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
      ports: [{port: 81}]
"#;

const CLIENTS_EGRESS: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: clients-egress, namespace: x}
spec:
  podSelector: {matchLabels: {role: client}}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: server}}}]
      ports: [{port: 80, protocol: TCP}]
"#;

const DENY_Y: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-clients-81, namespace: y}
spec:
  podSelector: {}
  ingress:
    - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]
      ports: [{port: 81, protocol: TCP}]
"#;

impl Policies {
    fn yaml(self) -> String {
        match self {
            Policies::None => String::new(),
            Policies::ClientsOnly => servers_policy("x") + &servers_policy("y"),
            Policies::SameNsOrBlue => SAME_NS_OR_BLUE.into(),
            Policies::ClientsEgress => servers_policy("x") + &servers_policy("y") + CLIENTS_EGRESS,
            Policies::DenyY => DENY_Y.into(),
        }
    }

    /// Whether `src` may open TCP `port` to `dst`, by construction of the policies.
    fn allows(self, lab: &Lab, src: &Pod, dst: &Pod, port: u16) -> bool {
        let label = |p: &Pod, k: &str, v: &str| p.labels.get(k).is_some_and(|l| l == v);
        let client = label(src, "role", "client");
        let server = label(dst, "app", "server");
        let blue = lab.namespaces()[&src.namespace]
            .get("team")
            .is_some_and(|t| t == "blue");
        let clients_only = !server || (client && port == 80);
        match self {
            Policies::None => true,
            Policies::ClientsOnly => clients_only,
            Policies::SameNsOrBlue => {
                dst.namespace != "x"
                    || !server
                    || (src.namespace == "x" && client)
                    || (blue && port == 81)
            }
            Policies::ClientsEgress => {
                let egress = src.namespace != "x" || !client || (server && port == 80);
                clients_only && egress
            }
            Policies::DenyY => dst.namespace != "y" || (client && port == 81),
        }
    }
}

// ---------------------------------------------------------------------------------
// Reading the agent's footprint.

/// Entries of pinned BPF maps, counted in the kernel (BPF_MAP_GET_NEXT_KEY /
/// BPF_MAP_LOOKUP_ELEM on the pins): what is really there, not the agent's account.
mod bpf {
    use std::collections::BTreeSet;
    use std::ffi::CString;
    use std::io::{Error, Result};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    const MAP_LOOKUP_ELEM: libc::c_long = 1;
    const MAP_GET_NEXT_KEY: libc::c_long = 4;
    const OBJ_GET: libc::c_long = 7;
    const OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// No map here comes near this; a walk that does is broken (e.g. a key that keeps
    /// reappearing while the map changes).
    const MAX_ENTRIES: usize = 1 << 20;

    /// Prefixes of `union bpf_attr` for the commands used (the kernel zero-fills the rest).
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct MapInfo {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value_or_next_key: u64,
    }

    fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<libc::c_long> {
        // SAFETY: `attr` is a live, initialised prefix of `union bpf_attr` for `cmd`, its
        // size is passed, and every pointer in it refers to a live buffer of the size the
        // kernel expects (key_size / value_size from the map's own info).
        let r =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
        if r < 0 {
            Err(Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// The map pinned at `pin`, opened.
    fn open(pin: &Path) -> Result<(OwnedFd, MapInfo)> {
        let path = CString::new(pin.as_os_str().as_bytes()).map_err(Error::other)?;
        let mut get = ObjGet {
            pathname: path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        // SAFETY: OBJ_GET returns a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(sys_bpf(OBJ_GET, &mut get)? as i32) };
        let mut info = MapInfo::default();
        let mut by_fd = InfoByFd {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: &mut info as *mut MapInfo as u64,
        };
        sys_bpf(OBJ_GET_INFO_BY_FD, &mut by_fd)?;
        Ok((fd, info))
    }

    /// The value of `key` in the map open at `fd`, if it has one.
    fn lookup(fd: &OwnedFd, info: &MapInfo, key: &[u8]) -> Option<Vec<u8>> {
        let mut value = vec![0u8; info.value_size as usize];
        let mut lookup = Elem {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_mut_ptr() as u64,
        };
        sys_bpf(MAP_LOOKUP_ELEM, &mut lookup).ok().map(|_| value)
    }

    /// The values of the map pinned at `pin`, one per entry.
    pub fn values(pin: &Path) -> Result<Vec<Vec<u8>>> {
        let (fd, info) = open(pin)?;
        let mut key = vec![0u8; info.key_size as usize];
        let mut next = vec![0u8; info.key_size as usize];
        let mut values = Vec::new();
        let mut first = true;
        for _ in 0..MAX_ENTRIES {
            let mut elem = Elem {
                map_fd: fd.as_raw_fd() as u32,
                _pad: 0,
                // NULL asks for the first key.
                key: if first { 0 } else { key.as_ptr() as u64 },
                value_or_next_key: next.as_mut_ptr() as u64,
            };
            match sys_bpf(MAP_GET_NEXT_KEY, &mut elem) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(values),
                Err(e) => return Err(e),
            }
            first = false;
            std::mem::swap(&mut key, &mut next);
            // An entry removed between the two calls is simply not counted.
            values.extend(lookup(&fd, &info, &key));
        }
        Ok(values)
    }

    /// (entries, distinct values) of the map pinned at `pin`.
    pub fn entries(pin: &Path) -> Result<(usize, usize)> {
        let values = values(pin)?;
        let distinct: BTreeSet<&Vec<u8>> = values.iter().collect();
        Ok((values.len(), distinct.len()))
    }

    /// The distinct values the array pinned at `pin` holds at the indices `slots`
    /// (4-byte keys, as the other map holds them).
    pub fn distinct_at(pin: &Path, slots: &[Vec<u8>]) -> Result<usize> {
        let (fd, info) = open(pin)?;
        let found: BTreeSet<Vec<u8>> = slots
            .iter()
            .filter_map(|slot| lookup(&fd, &info, slot))
            .collect();
        Ok(found.len())
    }
}

/// What the agent holds at one moment.
#[derive(Debug)]
struct Footprint {
    /// Entries per checked map.
    maps: BTreeMap<&'static str, usize>,
    /// Distinct values of PEERS at the slots IPCACHE names: peer identities (with the
    /// host flag).
    identities: usize,
    /// Conntrack entries (reported only: they expire on their own).
    conntrack: usize,
    /// Link pin names under `<pin dir>/links`.
    links: BTreeSet<String>,
    fds: usize,
    rss_kib: u64,
}

impl Footprint {
    fn read(lab: &Lab, agent: &AgentProcess) -> Footprint {
        let maps_dir = lab.pin_dir().join("maps");
        let count = |name: &str| {
            bpf::entries(&maps_dir.join(name))
                .unwrap_or_else(|e| panic!("counting the entries of pinned map {name}: {e}"))
        };
        let mut maps = BTreeMap::new();
        for name in CHECKED_MAPS {
            maps.insert(name, count(name).0);
        }
        let pid = agent.pid().expect("the agent runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        Footprint {
            maps,
            identities: bpf::values(&maps_dir.join("IPCACHE"))
                .and_then(|slots| bpf::distinct_at(&maps_dir.join("PEERS"), &slots))
                .unwrap_or_else(|e| panic!("reading the identities of IPCACHE and PEERS: {e}")),
            conntrack: count("CT4").0 + count("CT6").0,
            links: link_pins(&lab.pin_dir()),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("/proc/<pid>/fd")
                .count(),
            rss_kib,
        }
    }
}

fn link_pins(pin_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(pin_dir.join("links"))
        .map(|dir| {
            dir.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// The run.

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: not a number")),
    )
}

struct Churn {
    // Field order is drop order: the agent stops before the lab goes away.
    agent: AgentProcess,
    manifests: ManifestDir,
    lab: Lab,
    policies: Policies,
    /// Explicit IPv6 addresses, never reused (IPv4 ones are the lab's, never reused).
    next_v6: u16,
    /// The last operations, for failure reports.
    history: Vec<String>,
    checkpoints: u64,
    probes: u64,
}

impl Churn {
    fn add(&mut self, ns: &str, name: &str, labels: &[(&str, &str)]) {
        self.next_v6 += 1;
        let mut spec = PodSpec::new(ns, name)
            .ports([Port::tcp(80), Port::tcp(81)])
            .ipv6(Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0xc, self.next_v6));
        for (k, v) in labels {
            spec = spec.label(*k, *v);
        }
        self.lab
            .add_pod(spec)
            .unwrap_or_else(|e| panic!("adding {ns}/{name}: {e:#}"));
    }

    fn write(&mut self) -> u64 {
        self.manifests
            .write(&self.lab, &self.policies.yaml())
            .expect("writing manifests")
    }

    fn note(&mut self, op: String) {
        if self.history.len() == 12 {
            self.history.remove(0);
        }
        self.history.push(op);
    }

    /// Waits until the agent has the current state in the kernel and has attached to
    /// every pod, then checks the attachments and every pod-to-pod cell (TCP 80 and 81).
    fn checkpoint(&mut self, when: &str) {
        // Written twice: the agent reads the files one after the other and `.generation`
        // last, so a read overlapping a write can report the new generation with part of
        // the previous files (fixed at its next poll). A generation reported after an
        // earlier one was reported comes from a read that began after the first write had
        // completed, and both writes hold the same state.
        let first = self.write();
        self.agent
            .wait_generation(first, AGENT_TIMEOUT)
            .expect("the agent applied the change");
        let generation = self.write();
        let status = self
            .agent
            .wait_generation(generation, AGENT_TIMEOUT)
            .expect("the agent applied the change");
        assert_eq!(status.invalid, 0, "{when}: a policy was rejected");
        let pods = self.lab.pods().len() as u64;
        let deadline = Instant::now() + AGENT_TIMEOUT;
        while self.agent.status().is_none_or(|s| s.attached != pods) {
            assert!(
                Instant::now() < deadline,
                "{when}: the agent is not attached to exactly the {pods} pods: {:?}\n{}",
                self.agent.status(),
                self.agent.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Every link pin belongs to a current pod's veth, and every veth has some.
        let pinned: BTreeSet<String> = link_pins(&self.lab.pin_dir())
            .iter()
            .map(|pin| {
                pin.rsplit_once(':')
                    .map_or(pin.as_str(), |(_, i)| i)
                    .to_owned()
            })
            .collect();
        let veths: BTreeSet<String> = self.lab.pods().iter().map(|p| p.host_if.clone()).collect();
        assert_eq!(
            pinned, veths,
            "{when}: veths with link pins vs the pods' veths"
        );

        let mut probes = Vec::new();
        let mut expected = Vec::new();
        for src in self.lab.pods() {
            for dst in self.lab.pods() {
                if src.id() == dst.id() {
                    continue;
                }
                for port in [80, 81] {
                    probes.push(Probe::tcp(src.id(), dst.id(), port));
                    expected.push(self.policies.allows(&self.lab, src, dst, port));
                }
            }
        }
        let results = self.lab.probe_all(&probes, PROBE_TIMEOUT).expect("probing");
        let wrong: Vec<String> = results
            .iter()
            .zip(&expected)
            .filter(|(r, allowed)| !r.outcome.matches(**allowed))
            .map(|(r, allowed)| {
                let expected = if *allowed { "allowed" } else { "blocked" };
                format!("  {}: expected {expected}, observed {}", r.probe, r.outcome)
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{when} ({:?}): {} of {} probes differ:\n{}\nlast operations:\n  {}\n{}",
            self.policies,
            wrong.len(),
            probes.len(),
            wrong.join("\n"),
            self.history.join("\n  "),
            self.agent.log_tail(30)
        );
        self.checkpoints += 1;
        self.probes += probes.len() as u64;
    }
}

#[derive(Default)]
struct Ops {
    created: u64,
    deleted: u64,
    flipped: u64,
    policies: u64,
    namespaces: u64,
}

impl Ops {
    fn total(&self) -> u64 {
        self.created + self.deleted + self.flipped + self.policies + self.namespaces
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[test]
fn churn_leaves_no_entries_identities_or_attachments_behind() {
    let Some(agent_path) = agent_bin("churn_leaves_no_entries_identities_or_attachments_behind")
    else {
        return;
    };
    let secs = env_u64("NETPOL_CHURN_SECS").unwrap_or(DEFAULT_SECS);
    let seed = env_u64("NETPOL_CHURN_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64
    });
    let mut rng = Rng(seed | 1);

    let mut lab = Lab::new().expect("creating the lab");
    lab.set_namespace_labels("x", [("ns", "x")]);
    lab.set_namespace_labels("y", [("ns", "y"), ("team", "blue")]);
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
    let generation = manifests.write(&lab, "").expect("manifests");
    let source = [
        OsString::from("--manifests"),
        manifests.path().as_os_str().to_owned(),
    ];
    let mut agent = AgentProcess::start_with_source(&lab, &agent_path, &source).expect("agent");
    agent
        .wait_generation(generation, AGENT_TIMEOUT)
        .expect("agent ready");
    let mut churn = Churn {
        agent,
        manifests,
        lab,
        policies: Policies::ClientsOnly,
        next_v6: 0,
        history: Vec::new(),
        checkpoints: 0,
        probes: 0,
    };
    // Stable pods: a server in each namespace, and x/web, whose `app` label flips.
    churn.add("x", "server", &[("app", "server")]);
    churn.add("y", "server", &[("app", "server")]);
    churn.add("x", "web", &[("app", "web")]);
    for (ns, name, role) in INITIAL {
        churn.add(ns, name, &[("role", role)]);
    }
    churn.checkpoint("initial state");
    let baseline = Footprint::read(&churn.lab, &churn.agent);

    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    // Bound on operations whatever the machine's speed (each takes well over 10 ms).
    let max_ops = secs * 100;
    let mut ops = Ops::default();
    let mut peak_rss = baseline.rss_kib;
    while Instant::now() < deadline && ops.total() < max_ops {
        let present: Vec<(&str, &str)> = SLOTS
            .into_iter()
            .filter(|(ns, name)| churn.lab.pod(&format!("{ns}/{name}")).is_some())
            .collect();
        let absent: Vec<(&str, &str)> =
            SLOTS.into_iter().filter(|s| !present.contains(s)).collect();
        let role = |rng: &mut Rng| if rng.below(2) == 0 { "client" } else { "other" };
        let op = match rng.below(100) {
            0..25 if !absent.is_empty() => {
                let (ns, name) = absent[rng.below(absent.len() as u64) as usize];
                let role = role(&mut rng);
                churn.add(ns, name, &[("role", role)]);
                ops.created += 1;
                format!("create {ns}/{name} role={role}")
            }
            25..45 if !present.is_empty() => {
                let (ns, name) = present[rng.below(present.len() as u64) as usize];
                let id = format!("{ns}/{name}");
                churn
                    .lab
                    .remove_pod(&id)
                    .unwrap_or_else(|e| panic!("removing {id}: {e:#}"));
                ops.deleted += 1;
                format!("delete {id}")
            }
            45..60 => {
                let next = ALL_POLICIES[rng.below(ALL_POLICIES.len() as u64) as usize];
                churn.policies = next;
                ops.policies += 1;
                format!("policies {next:?}")
            }
            60..70 => {
                let team = if rng.below(2) == 0 { "blue" } else { "red" };
                churn
                    .lab
                    .set_namespace_labels("y", [("ns", "y"), ("team", team)]);
                ops.namespaces += 1;
                format!("namespace y team={team}")
            }
            _ => {
                // Flip a label: a churning pod's role, or x/web's app.
                let pick = rng.below(present.len() as u64 + 1) as usize;
                let (id, labels) = match present.get(pick) {
                    Some((ns, name)) => (format!("{ns}/{name}"), ("role", role(&mut rng))),
                    None => {
                        let app = if rng.below(2) == 0 { "server" } else { "web" };
                        ("x/web".to_string(), ("app", app))
                    }
                };
                churn.lab.set_pod_labels(&id, [labels]).expect("labels");
                ops.flipped += 1;
                format!("label {id} {}={}", labels.0, labels.1)
            }
        };
        churn.note(op);
        churn.write();
        if ops.total() % CHECKPOINT_EVERY == 0 {
            let when = format!(
                "checkpoint {} (after {} operations)",
                churn.checkpoints,
                ops.total()
            );
            churn.checkpoint(&when);
            peak_rss = peak_rss.max(Footprint::read(&churn.lab, &churn.agent).rss_kib);
        } else {
            // Some changes reach the agent one by one, others in a batch.
            std::thread::sleep(Duration::from_millis(rng.below(120)));
        }
        if let Some(exit) = churn.agent.exited().expect("agent state") {
            panic!("the agent exited ({exit})\n{}", churn.agent.log_tail(30));
        }
    }
    let churned = started.elapsed();

    // Back to the initial state: the same pods (new addresses and veths, as re-created
    // pods get), labels and policies.
    for (ns, name) in SLOTS {
        let id = format!("{ns}/{name}");
        if churn.lab.pod(&id).is_some() {
            churn.lab.remove_pod(&id).expect("removing a pod");
        }
    }
    for (ns, name, role) in INITIAL {
        churn.add(ns, name, &[("role", role)]);
    }
    churn
        .lab
        .set_pod_labels("x/web", [("app", "web")])
        .expect("labels");
    churn
        .lab
        .set_namespace_labels("y", [("ns", "y"), ("team", "blue")]);
    churn.policies = Policies::ClientsOnly;
    churn.checkpoint("restored initial state");
    let last = Footprint::read(&churn.lab, &churn.agent);

    let rss_limit =
        baseline.rss_kib + (RSS_SLACK_MIB * 1024).max(baseline.rss_kib * RSS_SLACK_PERCENT / 100);
    let mut rows = Vec::new();
    for name in CHECKED_MAPS {
        rows.push((
            name.to_string(),
            baseline.maps[name].to_string(),
            last.maps[name].to_string(),
        ));
    }
    rows.push((
        "identities".into(),
        baseline.identities.to_string(),
        last.identities.to_string(),
    ));
    rows.push((
        "link pins".into(),
        baseline.links.len().to_string(),
        last.links.len().to_string(),
    ));
    rows.push((
        "CT4 + CT6 (not checked)".into(),
        baseline.conntrack.to_string(),
        last.conntrack.to_string(),
    ));
    rows.push((
        "agent fds".into(),
        baseline.fds.to_string(),
        last.fds.to_string(),
    ));
    rows.push((
        "agent RSS".into(),
        mib(baseline.rss_kib),
        format!(
            "{} (peak {}, limit {})",
            mib(last.rss_kib),
            mib(peak_rss),
            mib(rss_limit)
        ),
    ));
    eprintln!(
        "churn: {churned:.0?}, seed {seed}: {} operations ({} pods created, {} deleted, {} label \
         flips, {} policy swaps, {} namespace relabels), {} checkpoints, {} probes, all as expected",
        ops.total(),
        ops.created,
        ops.deleted,
        ops.flipped,
        ops.policies,
        ops.namespaces,
        churn.checkpoints,
        churn.probes
    );
    eprintln!("  {:<18} {:>10}  after", "", "baseline");
    for (what, before, after) in &rows {
        eprintln!("  {what:<18} {before:>10}  {after}");
    }

    assert!(
        ops.created > 0 && ops.deleted > 0,
        "the churn created and deleted pods"
    );
    assert_eq!(
        last.maps, baseline.maps,
        "map entries back at the baseline (seed {seed})"
    );
    assert_eq!(
        last.identities, baseline.identities,
        "identities back at the baseline (seed {seed})"
    );
    assert_eq!(
        last.links.len(),
        baseline.links.len(),
        "link pins back at the baseline: {:?}",
        last.links
    );
    assert!(
        last.fds <= baseline.fds + FD_SLACK,
        "descriptors: {} -> {} (seed {seed})",
        baseline.fds,
        last.fds
    );
    assert!(
        last.rss_kib <= rss_limit,
        "resident memory {} -> {}, more than the {} allowed (seed {seed})",
        mib(baseline.rss_kib),
        mib(last.rss_kib),
        mib(rss_limit)
    );
}

/// The lab's own check of [`Lab::remove_pod`] (no agent): the pod, its netns and its host
/// veth are gone, it leaves the manifests, the others still talk, and the name can be
/// used again.
#[test]
fn lab_removes_a_pod() {
    if !can_run("lab_removes_a_pod") {
        return;
    }
    let mut lab = support::standard_lab(&["x/a", "x/b", "y/a"]);
    let b = lab.pod("x/b").expect("x/b");
    let (netns, veth) = (b.netns.clone(), b.host_if.clone());
    lab.remove_pod("x/b").expect("removing x/b");
    assert!(lab.pod("x/b").is_none());
    assert!(lab.remove_pod("x/b").is_err(), "removing it twice");
    assert!(
        !netpol_lab::netns::netns_path(&netns).exists(),
        "{netns} is gone"
    );
    let veth_exists = lab
        .worker(netpol_lab::NODE)
        .expect("node worker")
        .run(move || nix::net::if_::if_nametoindex(veth.as_str()).is_ok())
        .expect("node worker");
    assert!(!veth_exists, "the host veth is gone");
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
    manifests.write(&lab, "").expect("manifests");
    let yaml =
        std::fs::read_to_string(manifests.path().join("cluster.yaml")).expect("cluster.yaml");
    assert!(
        yaml.contains("name: a") && !yaml.contains("name: b"),
        "{yaml}"
    );

    lab.add_pod(support::standard_pod("x", "b", 9))
        .expect("x/b again");
    let probes = support::all_probes(&lab, &["x/a", "x/b", "y/a"]);
    support::check(&lab, &support::expect(probes, |_| true), None);
}
