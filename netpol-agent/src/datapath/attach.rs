//! Attachment: the TC programs on the host-side interfaces of pods and `leave_node` on
//! the node's exit devices (TCX links pinned under `<dir>/links`, legacy netlink links
//! held in memory), and each pod interface bound to its pod's endpoint in IFACES.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aya::programs::links::{FdLink, LinkError, LinkOrder, PinnedLink};
use aya::programs::tc::{
    SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcAttachType,
};
use aya::programs::{ProgramError, SchedClassifier};
use aya::util::KernelVersion;
use netpol_common::{IFACE_REFUSED, IFACE_SHARED, names};
use tracing::{debug, info, warn};

use super::{ApplyReport, Datapath, Error, Result, chain, interfaces, program};
use netpol_compile::LocalPod;

/// A hook of a pod's host veth.
#[derive(Clone, Copy, Debug)]
struct Hook {
    program: &'static str,
    attach_type: TcAttachType,
}

/// The hooks of a pod's host veth.
const POD_HOOKS: [Hook; 2] = [
    Hook {
        program: names::PROG_FROM_POD,
        attach_type: TcAttachType::Ingress,
    },
    Hook {
        program: names::PROG_TO_POD,
        attach_type: TcAttachType::Egress,
    },
];

/// The hook of an exit device.
const EXIT_HOOKS: [Hook; 1] = [Hook {
    program: names::PROG_LEAVE_NODE,
    attach_type: TcAttachType::Egress,
}];

/// An interface the programs are attached to.
pub(super) struct Attachment {
    pub(super) ifindex: u32,
    /// Links of kernels without TCX (netlink/clsact); they cannot be pinned and detach
    /// when dropped. Empty with TCX, where the pins hold the links.
    pub(super) legacy: Vec<SchedClassifierLink>,
}

impl Datapath {
    /// Name prefixes of the host-side interfaces of pods (`veth`, `cali`, `lxc`, ...):
    /// such an interface gets the programs as soon as it appears, so a pod is never
    /// without enforcement, whatever the agent knows about it yet.
    pub fn set_pod_interfaces(&mut self, prefixes: Vec<String>) {
        self.pod_interface_prefixes = prefixes;
    }

    /// The node's exit devices, where `leave_node` judges Service connections that
    /// kube-proxy translated to a backend on another node: `Some` names them
    /// (`--exit-interface`), `None` discovers them from the routes at every apply.
    pub fn set_exit_interfaces(&mut self, interfaces: Option<Vec<String>>) {
        self.exit_interfaces = interfaces;
    }

    /// Attaches to pod interfaces (by name prefix) that appeared since the last look,
    /// touching nothing else: safe before the first complete state is known.
    pub fn attach_new_interfaces(&mut self) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        self.reconcile_attachments(None, &mut report)?;
        Ok(report)
    }

    /// What the kernel says about the node's interfaces: links and routes always; with
    /// pods of which some have no host route (bridge CNIs), also the neighbour entries,
    /// the bridges' FDBs and the addresses at the far end of veth bridge ports (read
    /// once per port while they name a local pod's address).
    fn read_kernel(&mut self, local_pods: Option<&[LocalPod]>) -> interfaces::Kernel {
        let mut kernel = interfaces::Kernel {
            links: crate::node::read_links().unwrap_or_else(|error| {
                warn!(%error, "cannot list interfaces");
                Vec::new()
            }),
            routes: crate::node::read_routes().unwrap_or_else(|error| {
                warn!(%error, "cannot read the routing table");
                Vec::new()
            }),
            ..interfaces::Kernel::default()
        };
        let Some(local_pods) = local_pods else {
            return kernel;
        };
        let bridged = local_pods
            .iter()
            .any(|pod| !kernel.routes_to_a_port(&pod.ips));
        if !bridged || !kernel.links.iter().any(|link| link.bridge) {
            self.port_peers.clear();
            return kernel;
        }
        kernel.neighbours = crate::node::read_neighbours().unwrap_or_else(|error| {
            warn!(%error, "cannot read the neighbour entries");
            Vec::new()
        });
        kernel.fdb = crate::node::read_fdb().unwrap_or_else(|error| {
            warn!(%error, "cannot read the bridges' forwarding databases");
            Vec::new()
        });
        // The far ends of veth bridge ports: kept while the port has the same peer and
        // its addresses name a local pod's, read again otherwise.
        let pod_ips: std::collections::BTreeSet<std::net::IpAddr> = local_pods
            .iter()
            .flat_map(|pod| pod.ips.iter().copied())
            .collect();
        let ports: BTreeMap<u32, (i32, u32)> = kernel.veth_bridge_ports().collect();
        self.port_peers.retain(|port, (peer, addresses)| {
            ports.get(port) == Some(peer) && addresses.iter().any(|ip| pod_ips.contains(ip))
        });
        let mut by_namespace: BTreeMap<i32, Option<Vec<(u32, std::net::IpAddr)>>> = BTreeMap::new();
        for (port, peer @ (namespace, peer_index)) in ports {
            if self.port_peers.contains_key(&port) {
                continue;
            }
            let read = by_namespace.entry(namespace).or_insert_with(|| {
                crate::node::read_peer_addresses(namespace)
                    .inspect_err(|error| {
                        debug!(%error, namespace, "cannot read a veth peer's addresses");
                    })
                    .ok()
            });
            if let Some(addresses) = read {
                let behind = addresses
                    .iter()
                    .filter(|(index, _)| *index == peer_index)
                    .map(|(_, ip)| *ip)
                    .collect();
                self.port_peers.insert(port, (peer, behind));
            }
        }
        kernel.behind_ports = self
            .port_peers
            .iter()
            .map(|(port, (_, addresses))| (*port, addresses.clone()))
            .collect();
        kernel
    }

    /// Attaches to the interfaces of `local_pods` and to every interface named like a
    /// pod's, detaches from the rest, and binds each interface to its pod. With `None`
    /// (the pods are not known yet) it only attaches to new pod-named interfaces.
    /// Interfaces come from the kernel alone ([`interfaces::assign`]); loopback, bridges
    /// and interfaces carrying node addresses never get the programs.
    pub(super) fn reconcile_attachments(
        &mut self,
        local_pods: Option<&[LocalPod]>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let kernel = self.read_kernel(local_pods);
        let assignment = interfaces::assign(&kernel, local_pods, &self.pod_interface_prefixes);
        for (name, why) in &assignment.unfit_named {
            if self.unfit_reported.insert(name.clone()) {
                warn!(interface = %name, %why, "named like a pod's interface, but never gets the programs");
            }
        }
        let wanted = assignment.interfaces;
        report.pending.extend(assignment.pending);
        report.refused_names = assignment.refused_names;
        if local_pods.is_some() {
            let gone: Vec<String> = self
                .attachments
                .iter()
                .filter(|(name, attachment)| wanted.get(*name) != Some(&attachment.ifindex))
                .map(|(name, _)| name.clone())
                .collect();
            for name in gone {
                self.detach(&name);
                report.detached.push(name);
            }
            self.reconcile_exits(&wanted, &kernel.routes, report);
            self.remove_stray_pins(&wanted);
        }
        for (name, ifindex) in wanted {
            if self.attachments.contains_key(&name) {
                continue;
            }
            match self.attach(&name, ifindex, &POD_HOOKS) {
                Ok(attachment) => {
                    self.attachments.insert(name.clone(), attachment);
                    report.attached.push(name);
                }
                Err(error) => {
                    warn!(interface = %name, error = chain(&error), "attach failed; will retry");
                    report.pending.push(format!("{name}: {}", chain(&error)));
                }
            }
        }
        self.keep_first();
        if local_pods.is_none() {
            return Ok(());
        }

        // Bind each attached interface to its pod's endpoint (anti-spoofing), or mark it
        // refused (its pod did not fit) or shared (claimed by several pods: their
        // policies apply, but the interface cannot vouch for a source address).
        let attached: std::collections::BTreeSet<u32> =
            self.attachments.values().map(|a| a.ifindex).collect();
        let mut bindings = BTreeMap::new();
        for (ifindex, endpoints) in assignment.owners {
            if !attached.contains(&ifindex) {
                continue;
            }
            let binding = match endpoints.as_slice() {
                [endpoint] if self.refused_endpoints.contains(endpoint) => IFACE_REFUSED,
                [endpoint] => *endpoint,
                _ => {
                    warn!(ifindex, ?endpoints, "several pods share one interface");
                    IFACE_SHARED
                }
            };
            bindings.insert(ifindex, binding);
        }
        let map_err = |source| Error::Map {
            name: names::IFACES,
            source,
        };
        report.maps += self.ifaces.upsert(&bindings).map_err(map_err)?;
        report.maps += self.ifaces.remove_stale(&bindings).map_err(map_err)?;
        Ok(())
    }

    /// Removes the pinned pod links of interfaces that are no pod's (left by an earlier
    /// agent, e.g. one that took an interface name from a pod object): a pinned link
    /// outlives its agent, and with it whatever it did to that interface's traffic.
    fn remove_stray_pins(&self, wanted: &BTreeMap<String, u32>) {
        let dir = self.dir.join("links");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some((program, interface)) = file.to_str().and_then(|f| f.split_once(':')) else {
                continue;
            };
            let interface = interface.replace(':', ".");
            let pod_hook = POD_HOOKS.iter().any(|hook| hook.program == program);
            if pod_hook && !wanted.contains_key(&interface) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        warn!(%interface, program, "removed a pinned link on an interface that is no pod's");
                    }
                    Err(error) => {
                        warn!(pin = %entry.path().display(), %error, "cannot remove a stray link pin");
                    }
                }
            }
        }
    }

    /// bpffs refuses names containing '.', which interface names may contain (VLANs);
    /// ':' can appear in neither, so it separates and stands in for '.'.
    fn link_pin(&self, interface: &str, hook: Hook) -> PathBuf {
        self.dir
            .join("links")
            .join(format!("{}:{}", hook.program, interface.replace('.', ":")))
    }

    /// Attaches `leave_node` to the exit devices (configured, or every routed interface
    /// that is not a pod's) and detaches it from interfaces that no longer are.
    fn reconcile_exits(
        &mut self,
        pod_interfaces: &BTreeMap<String, u32>,
        routes: &[crate::node::Route],
        report: &mut ApplyReport,
    ) {
        let names: std::collections::BTreeSet<String> = match &self.exit_interfaces {
            Some(configured) => configured.iter().cloned().collect(),
            None if routes.is_empty() => {
                if !std::mem::replace(&mut self.no_routes, true) {
                    warn!("no routes read; exit devices unchanged until there are");
                }
                return;
            }
            None => {
                if std::mem::replace(&mut self.no_routes, false) {
                    info!("routes read again; exit devices follow them");
                }
                let pods = pod_interfaces.keys().map(String::as_str).collect();
                interfaces::exit_devices(routes, &pods, &self.pod_interface_prefixes)
            }
        };
        let wanted: BTreeMap<String, u32> = names
            .into_iter()
            .filter(|name| !pod_interfaces.contains_key(name))
            .filter_map(|name| interfaces::ifindex(&name).map(|index| (name, index)))
            .collect();
        let gone: Vec<String> = self
            .exits
            .iter()
            .filter(|(name, attachment)| wanted.get(*name) != Some(&attachment.ifindex))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.detach_exit(&name);
        }
        for (name, ifindex) in wanted {
            if self.exits.contains_key(&name) {
                continue;
            }
            match self.attach(&name, ifindex, &EXIT_HOOKS) {
                Ok(attachment) => {
                    debug!(interface = %name, "exit device");
                    self.exits.insert(name, attachment);
                }
                Err(error) => {
                    warn!(interface = %name, error = chain(&error), "attach to exit device failed; will retry");
                    report
                        .pending
                        .push(format!("exit {name}: {}", chain(&error)));
                }
            }
        }
    }

    fn attach(&mut self, interface: &str, ifindex: u32, hooks: &[Hook]) -> Result<Attachment> {
        let mut legacy = Vec::new();
        for &hook in hooks {
            let pin = self.link_pin(interface, hook);
            let attach_error = |source| Error::Attach {
                interface: interface.to_owned(),
                source,
            };
            let prog = program(&mut self.ebpf, hook.program)?;
            // A pinned link from an earlier agent: swap our program in atomically, so
            // the hook is never empty. A stale pin (its interface is gone) is replaced.
            let adopted = match PinnedLink::from_pin(&pin) {
                Ok(pinned) => {
                    let replaced = match SchedClassifierLink::try_from(FdLink::from(pinned)) {
                        Ok(link) => prog.attach_to_link(link).map_err(|e| chain(&e)),
                        Err(error) => Err(chain(&error)),
                    };
                    match replaced {
                        Ok(id) => Some(id),
                        Err(error) => {
                            debug!(pin = %pin.display(), %error, "stale link pin replaced");
                            let _ = std::fs::remove_file(&pin);
                            None
                        }
                    }
                }
                Err(_) => None,
            };
            let id = match adopted {
                Some(id) => id,
                None => attach_first(prog, interface, hook.attach_type).map_err(attach_error)?,
            };
            let link = prog.take_link(id).map_err(attach_error)?;
            match FdLink::try_from(link) {
                // Pinned, the link holds itself; our descriptor can go.
                Ok(fd_link) if !pin.exists() => {
                    fd_link.pin(&pin).map_err(|error| Error::Pin {
                        path: pin.clone(),
                        message: chain(&error),
                    })?;
                }
                Ok(_already_pinned) => {}
                Err(LinkError::InvalidLink) => {
                    // Netlink attachment (no TCX): cannot be pinned; keep it alive here.
                    let prog = program(&mut self.ebpf, hook.program)?;
                    let id = prog
                        .attach(interface, hook.attach_type)
                        .map_err(attach_error)?;
                    legacy.push(prog.take_link(id).map_err(attach_error)?);
                }
                Err(error) => {
                    return Err(Error::Pin {
                        path: pin,
                        message: chain(&error),
                    });
                }
            }
        }
        debug!(%interface, ifindex, "attached");
        Ok(Attachment { ifindex, legacy })
    }

    /// Puts netpol's programs back at the front of every TCX chain they are on, where
    /// a program attached since (a CNI's, with "first" of its own) took their place: a
    /// program in front that returns OK or redirects would skip the verdict. Returns
    /// the interfaces where a program was moved.
    pub(super) fn keep_first(&mut self) -> Vec<String> {
        let attached: Vec<(String, &'static [Hook])> = self
            .attachments
            .iter()
            .filter(|(_, a)| a.legacy.is_empty())
            .map(|(name, _)| (name.clone(), &POD_HOOKS[..]))
            .chain(
                self.exits
                    .iter()
                    .filter(|(_, a)| a.legacy.is_empty())
                    .map(|(name, _)| (name.clone(), &EXIT_HOOKS[..])),
            )
            .collect();
        let mut moved = Vec::new();
        for (interface, hooks) in attached {
            for &hook in hooks {
                match self.move_to_front(&interface, hook) {
                    Ok(false) => {}
                    Ok(true) => {
                        warn!(
                            %interface,
                            program = hook.program,
                            "another program was attached in front of netpol's; moved back to the front"
                        );
                        moved.push(interface.clone());
                    }
                    Err(error) => {
                        debug!(%interface, error = chain(&error), "cannot check the TCX order");
                    }
                }
            }
        }
        moved
    }

    /// See [`Datapath::keep_first`]: `Ok(true)` when the program was moved. A program
    /// is on a hook at most once, so the old link is detached (at once, see
    /// [`detach_pinned`]) and unpinned before the new one is made in front: for that
    /// moment (microseconds) only the other programs run on the hook. Only a program
    /// attached by someone with CAP_BPF on the node causes this, never a pod.
    fn move_to_front(&mut self, interface: &str, hook: Hook) -> Result<bool> {
        let attach_error = |source| Error::Attach {
            interface: interface.to_owned(),
            source,
        };
        let pin = self.link_pin(interface, hook);
        let prog = program(&mut self.ebpf, hook.program)?;
        let ours = prog.info().map_err(attach_error)?.id();
        let (_, programs) =
            SchedClassifier::query_tcx(interface, hook.attach_type).map_err(attach_error)?;
        if programs.first().is_none_or(|first| first.id() == ours) {
            return Ok(false);
        }
        let pin_error = |message: String| Error::Pin {
            path: pin.clone(),
            message,
        };
        if pin.exists() {
            detach_pinned(&pin).map_err(|e| pin_error(e.to_string()))?;
        }
        if let Err(error) = std::fs::remove_file(&pin)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            return Err(pin_error(error.to_string()));
        }
        let id = attach_first(prog, interface, hook.attach_type).map_err(attach_error)?;
        let link = prog.take_link(id).map_err(attach_error)?;
        let link = FdLink::try_from(link).map_err(|e| pin_error(chain(&e)))?;
        link.pin(&pin).map_err(|e| pin_error(chain(&e)))?;
        Ok(true)
    }

    pub(super) fn detach(&mut self, interface: &str) {
        if let Some(attachment) = self.attachments.remove(interface) {
            drop(attachment.legacy);
        }
        self.remove_link_pins(interface, &POD_HOOKS);
        debug!(%interface, "detached");
    }

    pub(super) fn detach_exit(&mut self, interface: &str) {
        if let Some(attachment) = self.exits.remove(interface) {
            drop(attachment.legacy);
        }
        self.remove_link_pins(interface, &EXIT_HOOKS);
        debug!(%interface, "detached from exit device");
    }

    fn remove_link_pins(&self, interface: &str, hooks: &[Hook]) {
        for &hook in hooks {
            let pin = self.link_pin(interface, hook);
            if let Err(error) = std::fs::remove_file(&pin)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                warn!(pin = %pin.display(), %error, "cannot remove link pin");
            }
        }
    }

    /// Binds interface `ifindex` to `binding` (an endpoint id, `IFACE_REFUSED` or
    /// `IFACE_SHARED`) outside reconciliation: for verdict tests, whose packets arrive
    /// through BPF_PROG_TEST_RUN on loopback rather than on a pod's veth. The next
    /// [`Datapath::apply`] replaces every binding.
    pub fn bind_interface(&mut self, ifindex: u32, binding: u32) -> Result<()> {
        let mut bindings = self.ifaces.contents().clone();
        bindings.insert(ifindex, binding);
        self.ifaces
            .upsert(&bindings)
            .map(drop)
            .map_err(|source| Error::Map {
                name: names::IFACES,
                source,
            })
    }

    /// Interfaces with programs attached.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attachments.keys().map(String::as_str)
    }

    /// Exit devices with `leave_node` attached.
    pub fn exit_devices(&self) -> impl Iterator<Item = &str> {
        self.exits.keys().map(String::as_str)
    }
}

/// Attaches `prog` in front of every program already on the hook (TCX, Linux 6.6 and
/// later), so that no program before it (a CNI's that returns OK, or redirects to
/// another interface) can skip the verdict; on older kernels as a netlink classifier.
fn attach_first(
    prog: &mut SchedClassifier,
    interface: &str,
    attach_type: TcAttachType,
) -> std::result::Result<SchedClassifierLinkId, ProgramError> {
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if tcx {
        prog.attach_with_options(
            interface,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
    } else {
        prog.attach(interface, attach_type)
    }
}

/// Detaches the link pinned at `pin` from its hook now (`BPF_LINK_DETACH`). Removing the
/// pin alone releases the link only after an RCU grace period, and until then the same
/// program cannot be attached to that hook again.
fn detach_pinned(pin: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    /// `union bpf_attr` for BPF_OBJ_GET, up to `file_flags`.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// `union bpf_attr` for BPF_LINK_DETACH.
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` and the path it points to outlive the call; the kernel reads exactly
    // this many bytes of `union bpf_attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned; nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &attr as *const LinkDetachAttr,
            std::mem::size_of::<LinkDetachAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
