//! Attachment: the TC programs on the host-side interfaces of pods (TCX links pinned
//! under `<dir>/links`, legacy netlink links held in memory), and each interface bound to
//! its pod's endpoint in IFACES.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachType};
use netpol_common::{IFACE_REFUSED, IFACE_SHARED, names};
use tracing::{debug, warn};

use super::{ApplyReport, Datapath, Error, Result, chain, interfaces, program};
use netpol_compile::LocalPod;

/// A hook of a pod's host veth.
#[derive(Clone, Copy, Debug)]
struct Hook {
    program: &'static str,
    attach_type: TcAttachType,
}

const HOOKS: [Hook; 2] = [
    Hook {
        program: names::PROG_FROM_POD,
        attach_type: TcAttachType::Ingress,
    },
    Hook {
        program: names::PROG_TO_POD,
        attach_type: TcAttachType::Egress,
    },
];

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

    /// Attaches to pod interfaces (by name prefix) that appeared since the last look,
    /// touching nothing else: safe before the first complete state is known.
    pub fn attach_new_interfaces(&mut self) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        self.reconcile_attachments(None, &mut report)?;
        Ok(report)
    }

    /// Attaches to the interfaces of `local_pods` and to every interface named like a
    /// pod's, detaches from the rest, and binds each veth to its pod. With `None` (the
    /// pods are not known yet) it only attaches to new pod-named interfaces.
    pub(super) fn reconcile_attachments(
        &mut self,
        local_pods: Option<&[LocalPod]>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut wanted: BTreeMap<String, u32> = BTreeMap::new();
        if !self.pod_interface_prefixes.is_empty() {
            match nix::net::if_::if_nameindex() {
                Ok(list) => {
                    for interface in list.iter() {
                        let name = interface.name().to_string_lossy();
                        if interfaces::is_pod_interface(&name, &self.pod_interface_prefixes) {
                            wanted.insert(name.into_owned(), interface.index());
                        }
                    }
                }
                Err(error) => warn!(%error, "cannot list interfaces"),
            }
        }
        // ifindex -> the endpoints whose pods sit behind it (one, unless misconfigured).
        let mut owners: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        if let Some(local_pods) = local_pods {
            let routes = match crate::node::read_routes() {
                Ok(routes) => routes,
                Err(error) => {
                    warn!(%error, "cannot read the routing table; only annotated interfaces are used");
                    Vec::new()
                }
            };
            for pod in local_pods {
                let interface = pod.host_interface.clone().or_else(|| {
                    pod.ips
                        .iter()
                        .find_map(|ip| crate::node::interface_for(&routes, *ip).map(str::to_owned))
                });
                match interface
                    .as_deref()
                    .and_then(|name| Some((name, interfaces::ifindex(name)?)))
                {
                    Some((name, ifindex)) => {
                        wanted.insert(name.to_owned(), ifindex);
                        owners.entry(ifindex).or_default().push(pod.endpoint_id);
                    }
                    None => report.pending.push(format!(
                        "{} (interface {})",
                        pod.pod,
                        interface.as_deref().unwrap_or("unknown")
                    )),
                }
            }

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
        }
        for (name, ifindex) in wanted {
            if self.attachments.contains_key(&name) {
                continue;
            }
            match self.attach(&name, ifindex) {
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
        if local_pods.is_none() {
            return Ok(());
        }

        // Bind each attached veth to its pod's endpoint (anti-spoofing), or mark it
        // refused (its pod did not fit) or shared (claimed by several pods: their
        // policies apply, but the interface cannot vouch for a source address).
        let attached: std::collections::BTreeSet<u32> =
            self.attachments.values().map(|a| a.ifindex).collect();
        let mut bindings = BTreeMap::new();
        for (ifindex, endpoints) in owners {
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

    /// bpffs refuses names containing '.', which interface names may contain (VLANs);
    /// ':' can appear in neither, so it separates and stands in for '.'.
    fn link_pin(&self, interface: &str, hook: Hook) -> PathBuf {
        self.dir
            .join("links")
            .join(format!("{}:{}", hook.program, interface.replace('.', ":")))
    }

    fn attach(&mut self, interface: &str, ifindex: u32) -> Result<Attachment> {
        let mut legacy = Vec::new();
        for hook in HOOKS {
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
                None => prog
                    .attach(interface, hook.attach_type)
                    .map_err(attach_error)?,
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

    pub(super) fn detach(&mut self, interface: &str) {
        if let Some(attachment) = self.attachments.remove(interface) {
            drop(attachment.legacy);
        }
        for hook in HOOKS {
            let pin = self.link_pin(interface, hook);
            if let Err(error) = std::fs::remove_file(&pin)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                warn!(pin = %pin.display(), %error, "cannot remove link pin");
            }
        }
        debug!(%interface, "detached");
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
}
