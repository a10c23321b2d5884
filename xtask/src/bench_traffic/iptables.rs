//! The same policies enforced the iptables + ipset way, as kube-router programs them.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use netpol_lab::Lab;

use super::policies::{Labels, Peer, Policy};

/// The mark a policy chain sets on traffic one of its rules allows.
const MARK: &str = "0x10000/0x10000";

/// The rule set kube-router would program on this node for these policies: per policy a
/// `<prefix>-NWPLCY-<n>` chain and ipsets (the selected pods as destination set, one
/// source set per peer group), one rule per (rule, port); per local pod selected by a
/// policy a `<prefix>-POD-FW-<n>` chain jumping to its policies' chains and dropping what
/// no rule marked; FORWARD accepts ESTABLISHED/RELATED first, then sends traffic to a
/// selected pod's veth to its pod chain.
///
/// Loading thousands of chains takes minutes with the nf_tables backend, so a rule set
/// is loaded once ([`IptablesRules::load`]) and switched on and off by its two FORWARD
/// rules ([`IptablesRules::enable`], [`IptablesRules::disable`]); chains nothing jumps
/// to are never traversed.
pub(super) struct IptablesRules {
    prefix: &'static str,
    restore: String,
    ipset: String,
    pub chains: usize,
    pub rules: usize,
    pub sets: usize,
    pub set_members: usize,
}

impl IptablesRules {
    /// The rules for `policies`, their chains and sets named after `prefix`.
    pub fn generate(lab: &Lab, policies: &[Policy], prefix: &'static str) -> Result<Self> {
        let ns_labels = |ns: &str| -> Labels {
            let mut v: Labels = lab
                .namespaces()
                .get(ns)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            v.push(("kubernetes.io/metadata.name".into(), ns.into()));
            v
        };
        let subset = |want: &Labels, have: &Labels| want.iter().all(|kv| have.contains(kv));
        let pod_labels = |p: &netpol_lab::Pod| -> Labels {
            p.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };

        let mut ipset = String::new();
        let mut filter = format!("*filter\n:{prefix}-FORWARD - [0:0]\n");
        let mut body = String::new();
        let (mut chains, mut rules, mut sets, mut members) = (1usize, 0usize, 0usize, 0usize);
        // pod id -> policy chains selecting it
        let mut selected: Vec<(String, String, Vec<String>)> = Vec::new();
        for (n, p) in policies.iter().enumerate() {
            let chain = format!("{prefix}-NWPLCY-{n}");
            let dst_set = format!("{prefix}-DST-{n}");
            let _ = writeln!(filter, ":{chain} - [0:0]");
            chains += 1;
            let _ = writeln!(ipset, "create {dst_set} hash:ip family inet hashsize 64");
            sets += 1;
            for pod in lab.pods() {
                if pod.namespace == p.namespace && subset(&p.selector, &pod_labels(pod)) {
                    let _ = writeln!(ipset, "add {dst_set} {}", pod.v4());
                    members += 1;
                    match selected.iter_mut().find(|(id, ..)| *id == pod.id()) {
                        Some((.., v)) => v.push(chain.clone()),
                        None => selected.push((pod.id(), pod.host_if.clone(), vec![chain.clone()])),
                    }
                }
            }
            for (r, rule) in p.ingress.iter().enumerate() {
                for (g, peer) in rule.from.iter().enumerate() {
                    let src_set = format!("{prefix}-SRC-{n}-{r}-{g}");
                    sets += 1;
                    match peer {
                        Peer::Cidr(c) => {
                            let _ = writeln!(ipset, "create {src_set} hash:net family inet");
                            let _ = writeln!(ipset, "add {src_set} {c}");
                            members += 1;
                        }
                        Peer::Pods { ns, pod: want } => {
                            let _ =
                                writeln!(ipset, "create {src_set} hash:ip family inet hashsize 64");
                            for pod in lab.pods() {
                                let ns_ok = match ns {
                                    None => pod.namespace == p.namespace,
                                    Some(sel) => subset(sel, &ns_labels(&pod.namespace)),
                                };
                                if ns_ok && subset(want, &pod_labels(pod)) {
                                    let _ = writeln!(ipset, "add {src_set} {}", pod.v4());
                                    members += 1;
                                }
                            }
                        }
                    }
                    for port in &rule.ports {
                        let _ = writeln!(
                            body,
                            "-A {chain} -p tcp --dport {port} -m set --match-set {src_set} src \
                             -m set --match-set {dst_set} dst -j MARK --set-xmark {MARK}"
                        );
                        rules += 1;
                    }
                }
                let _ = writeln!(body, "-A {chain} -m mark --mark {MARK} -j RETURN");
                rules += 1;
            }
        }
        if !selected.iter().any(|(id, ..)| id == "x/server") {
            bail!("no generated policy selects x/server");
        }
        let mut forward = String::new();
        // The two FORWARD rules ([`IptablesRules::enable`]).
        rules += 2;
        for (k, (id, host_if, policy_chains)) in selected.iter().enumerate() {
            let chain = format!("{prefix}-POD-FW-{k}");
            let _ = writeln!(filter, ":{chain} - [0:0]");
            chains += 1;
            let _ = writeln!(
                forward,
                "-A {prefix}-FORWARD -o {host_if} -m comment --comment {id} -j {chain}"
            );
            let _ = writeln!(
                body,
                "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
                 -A {chain} -m conntrack --ctstate INVALID -j DROP"
            );
            rules += 2;
            for pc in policy_chains {
                let _ = writeln!(body, "-A {chain} -j {pc}");
                rules += 1;
            }
            let _ = writeln!(
                body,
                "-A {chain} -m mark ! --mark {MARK} -j DROP\n\
                 -A {chain} -j MARK --set-xmark 0x0/{}\n\
                 -A {chain} -j ACCEPT",
                MARK.split('/').nth(1).expect("mask")
            );
            rules += 3;
        }
        let restore = format!("{filter}{forward}{body}COMMIT\n");
        Ok(Self {
            prefix,
            restore,
            ipset,
            chains,
            rules,
            sets,
            set_members: members,
        })
    }

    /// Creates the sets and chains; nothing jumps to them yet.
    pub fn load(&self, netns: &str) -> Result<()> {
        pipe(netns, &["ipset", "restore"], &self.ipset)?;
        pipe(netns, &["iptables-restore", "--noflush"], &self.restore)
    }

    /// Sends forwarded traffic through the loaded rules.
    pub fn enable(&self, netns: &str) -> Result<()> {
        pipe(
            netns,
            &["iptables-restore", "--noflush"],
            &self.forward_rules('A'),
        )
    }

    /// Takes the rules out of the path again.
    pub fn disable(&self, netns: &str) -> Result<()> {
        pipe(
            netns,
            &["iptables-restore", "--noflush"],
            &self.forward_rules('D'),
        )
    }

    /// FORWARD accepts ESTABLISHED/RELATED first, then hands the rest to the rule set
    /// (`op` `A`: append; `D`: delete).
    fn forward_rules(&self, op: char) -> String {
        let prefix = self.prefix;
        format!(
            "*filter\n-{op} FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             -{op} FORWARD -j {prefix}-FORWARD\nCOMMIT\n"
        )
    }

    /// Flushes and deletes every chain and set (deleting the node netns would too).
    pub fn unload(netns: &str) -> Result<()> {
        pipe(netns, &["iptables-restore"], "*filter\nCOMMIT\n")?;
        pipe(netns, &["ipset", "destroy"], "")
    }
}

fn pipe(netns: &str, cmd: &[&str], stdin: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?} in {netns}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
