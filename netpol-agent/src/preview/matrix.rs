//! Reachability matrices: who can open a connection to whom, per port, as the kernel
//! would decide it (replayed over the compiled maps by [`model::decide`] at the source's
//! egress hook and the destination's ingress hook, as [`model::flow_allowed`] does).
//!
//! Rows are source pods, columns destination pods; by default one table per
//! (containerPort, protocol) that some pod declares, with only the pods that declare it
//! as columns (as in the conformance cases: a probe to a port nobody serves means
//! nothing). A pod and itself is never a cell (loopback is not filtered). Traffic from
//! the node always passes and is not shown.
//!
//! Each cell also says how it was decided ([`CellDecision`]: the source's egress hook
//! and the destination's ingress hook, with the rule or policies that decided each).
//!
//! [`diff`] compares two matrices (before and after `--apply`); [`render`] writes them
//! for people, [`html::render`] as a page to look at, `serde::Serialize` for machines
//! ([`MatrixReport`] is what `--json` prints and the page is drawn from).

pub mod html;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use super::explain::HookVerdict;
use super::text::as_display;
use super::{PodAddresses, PortProtocol, SkippedPod, pod_addresses, served_ports};
use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Compiled, Direction, LocalPod, model};

/// Whether a source reaches a destination on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reach {
    Blocked,
    /// Allowed over some address family but not another (dual-stack pods, ipBlocks of
    /// one family).
    Partial,
    Allowed,
}

impl Reach {
    /// `✓`, `✗` or `~`.
    pub fn symbol(self) -> &'static str {
        match self {
            Reach::Allowed => "✓",
            Reach::Blocked => "✗",
            Reach::Partial => "~",
        }
    }
}

/// Which ports and destinations a matrix covers.
#[derive(Clone, Debug, Default)]
pub struct MatrixOptions {
    /// Ports to show; empty: every (containerPort, protocol) some pod declares.
    pub ports: Vec<PortProtocol>,
    /// Show every pod as a destination of every port, declared or not.
    pub all_destinations: bool,
    /// Only addresses of this family (`--family`); `None`: every pair of addresses of
    /// the same family, a cell that differs between them being [`Reach::Partial`].
    pub family: Option<AddressFamily>,
    /// Only these pods, as rows and columns (`kubectl netpol matrix -n NS -l SELECTOR`);
    /// `None`: every pod. Pods outside it are not listed as "not shown" either.
    pub pods: Option<BTreeSet<ObjectRef>>,
}

/// An address family, as `--family` names it: `ipv4` or `ipv6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum AddressFamily {
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl AddressFamily {
    /// Whether `ip` is of this family.
    pub fn holds(self, ip: &IpAddr) -> bool {
        match self {
            AddressFamily::Ipv4 => ip.is_ipv4(),
            AddressFamily::Ipv6 => ip.is_ipv6(),
        }
    }
}

impl std::fmt::Display for AddressFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AddressFamily::Ipv4 => "IPv4",
            AddressFamily::Ipv6 => "IPv6",
        })
    }
}

impl std::str::FromStr for AddressFamily {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "ipv4" | "4" => Ok(AddressFamily::Ipv4),
            "ipv6" | "6" => Ok(AddressFamily::Ipv6),
            _ => Err(format!("{text:?} is no address family: ipv4 or ipv6")),
        }
    }
}

/// A pod in the matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatrixPod {
    #[serde(serialize_with = "as_display")]
    pub pod: ObjectRef,
    pub ips: Vec<IpAddr>,
    /// The (containerPort, protocol) pairs it declares.
    pub serves: Vec<PortProtocol>,
}

/// The matrix of one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortTable {
    pub port: PortProtocol,
    /// Indices into [`Matrix::pods`] of the columns.
    pub destinations: Vec<usize>,
    /// `cells[source][column]`; `None` for a pod and itself, or two pods without a
    /// common address family.
    pub cells: Vec<Vec<Option<Reach>>>,
    /// `decided[source][column]`: how the cell was decided, an index into
    /// [`Matrix::decisions`]; `None` where `cells` has `None`.
    pub decided: Vec<Vec<Option<usize>>>,
}

/// How a cell was decided over the address pairs of one family, or of several that
/// were decided alike: the two hooks a new connection crosses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct CellDecision {
    /// The families of the address pairs decided this way.
    pub families: Vec<AddressFamily>,
    /// Both hooks let it through.
    pub allowed: bool,
    /// The source pod's egress hook.
    pub egress: HookDecision,
    /// The destination pod's ingress hook.
    pub ingress: HookDecision,
}

/// What one hook decided, replayed over the compiled maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct HookDecision {
    #[serde(flatten)]
    pub verdict: HookVerdict,
    /// When no rule allows it (`denied`, `audit-allowed`): the NetworkPolicies that
    /// isolate the pod in this direction.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "super::text::display_list"
    )]
    pub isolated_by: Vec<ObjectRef>,
}

impl HookDecision {
    /// Whether the hook lets the connection through.
    pub fn allowed(&self) -> bool {
        !matches!(
            self.verdict,
            HookVerdict::Denied | HookVerdict::ClusterDenied { .. }
        )
    }
}

/// `not isolated`, `allowed by NetworkPolicy x/p spec.ingress[0]`, `isolated by
/// NetworkPolicy x/p; no rule allows it`, `dropped by ClusterNetworkPolicy/...`.
impl std::fmt::Display for HookDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let isolated = || {
            let names: Vec<String> = self.isolated_by.iter().map(ToString::to_string).collect();
            if names.is_empty() {
                "isolated".to_string()
            } else {
                format!("isolated by NetworkPolicy {}", names.join(", "))
            }
        };
        match &self.verdict {
            HookVerdict::NotLocal => f.write_str("not on this node"),
            HookVerdict::NotIsolated => f.write_str("not isolated"),
            HookVerdict::FromNode => f.write_str("from the pod's own node: always allowed"),
            HookVerdict::Itself => f.write_str("the pod itself: never blocked"),
            HookVerdict::Allowed { rule } | HookVerdict::ClusterAccepted { rule } => {
                write!(f, "allowed by {rule}")
            }
            HookVerdict::AuditAllowed => write!(
                f,
                "{}; no rule allows it, let through in audit mode",
                isolated()
            ),
            HookVerdict::Denied => write!(f, "{}; no rule allows it", isolated()),
            HookVerdict::ClusterDenied { rule } => write!(f, "dropped by {rule}"),
        }
    }
}

/// Every pod pair, per port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// The family previewed (`--family`), or `None` for both.
    pub family: Option<AddressFamily>,
    /// Rows (sources), in name order; columns index them too.
    pub pods: Vec<MatrixPod>,
    pub tables: Vec<PortTable>,
    /// Every distinct way a cell was decided (one entry per family where the families
    /// of a cell were decided differently); [`PortTable::decided`] indexes it.
    pub decisions: Vec<Vec<CellDecision>>,
    /// Pods without a place in the matrix (hostNetwork, finished, no address).
    pub skipped: Vec<SkippedPod>,
}

impl Matrix {
    /// The matrix of `state` as compiled into `compiled` (all pods must be local, as
    /// [`super::load::load_manifests`] arranges).
    pub fn new(state: &ClusterState, compiled: &Compiled, options: &MatrixOptions) -> Matrix {
        let (mut addressed, mut skipped) = pod_addresses(state);
        if let Some(only) = &options.pods {
            addressed.retain(|p| only.contains(&p.pod));
            skipped.retain(|p| only.contains(&p.pod));
        }
        let mut pods: Vec<MatrixPod> = Vec::new();
        for PodAddresses { pod, mut ips } in addressed {
            if let Some(family) = options.family {
                ips.retain(|ip| family.holds(ip));
                if ips.is_empty() {
                    skipped.push(SkippedPod {
                        pod,
                        reason: format!("no {family} address"),
                    });
                    continue;
                }
            }
            pods.push(MatrixPod {
                serves: state.pods.get(&pod).map(served_ports).unwrap_or_default(),
                pod,
                ips,
            });
        }
        let ports: Vec<PortProtocol> = if options.ports.is_empty() {
            let all: BTreeSet<PortProtocol> =
                pods.iter().flat_map(|p| p.serves.iter().copied()).collect();
            all.into_iter().collect()
        } else {
            options.ports.clone()
        };
        let local: Vec<Option<&LocalPod>> = pods
            .iter()
            .map(|p| compiled.local_pods.iter().find(|l| l.pod == p.pod))
            .collect();
        let mut decisions = Decisions::default();
        let tables = ports
            .into_iter()
            .map(|port| {
                let destinations: Vec<usize> = (0..pods.len())
                    .filter(|&d| options.all_destinations || pods[d].serves.contains(&port))
                    .collect();
                let mut cells = Vec::with_capacity(pods.len());
                let mut decided = Vec::with_capacity(pods.len());
                for s in 0..pods.len() {
                    let (row, why): (Vec<_>, Vec<_>) = destinations
                        .iter()
                        .map(|&d| {
                            if s == d {
                                return (None, None);
                            }
                            let ends = [(&pods[s], local[s]), (&pods[d], local[d])];
                            let cell = decide(compiled, ends, port);
                            match reach(&cell) {
                                Some(reach) => (Some(reach), Some(decisions.intern(cell))),
                                None => (None, None),
                            }
                        })
                        .unzip();
                    cells.push(row);
                    decided.push(why);
                }
                PortTable {
                    port,
                    destinations,
                    cells,
                    decided,
                }
            })
            .collect();
        Matrix {
            family: options.family,
            pods,
            tables,
            decisions: decisions.list,
            skipped,
        }
    }

    /// The table of `port` and the row and column of `src -> dst` in it.
    fn place(
        &self,
        port: PortProtocol,
        src: &ObjectRef,
        dst: &ObjectRef,
    ) -> Option<(&PortTable, usize, usize)> {
        let table = self.tables.iter().find(|t| t.port == port)?;
        let row = self.pods.iter().position(|p| p.pod == *src)?;
        let column = table
            .destinations
            .iter()
            .position(|&d| self.pods[d].pod == *dst)?;
        Some((table, row, column))
    }

    /// The cell `src -> dst` on `port`, if the matrix has it.
    pub fn get(&self, port: PortProtocol, src: &ObjectRef, dst: &ObjectRef) -> Option<Reach> {
        let (table, row, column) = self.place(port, src, dst)?;
        table.cells[row][column]
    }

    /// How the cell `src -> dst` on `port` was decided, if the matrix has it.
    pub fn decision(
        &self,
        port: PortProtocol,
        src: &ObjectRef,
        dst: &ObjectRef,
    ) -> Option<&[CellDecision]> {
        let (table, row, column) = self.place(port, src, dst)?;
        let index = table.decided[row][column]?;
        Some(&self.decisions[index])
    }

    /// Every cell: (port, source, destination, reach).
    pub fn cells(&self) -> impl Iterator<Item = (PortProtocol, &ObjectRef, &ObjectRef, Reach)> {
        self.tables.iter().flat_map(move |t| {
            t.cells.iter().enumerate().flat_map(move |(s, row)| {
                row.iter().enumerate().filter_map(move |(c, cell)| {
                    cell.map(|r| {
                        (
                            t.port,
                            &self.pods[s].pod,
                            &self.pods[t.destinations[c]].pod,
                            r,
                        )
                    })
                })
            })
        })
    }
}

/// The cells' decisions, each distinct one stored once.
#[derive(Default)]
struct Decisions {
    list: Vec<Vec<CellDecision>>,
    index: HashMap<Vec<CellDecision>, usize>,
}

impl Decisions {
    fn intern(&mut self, cell: Vec<CellDecision>) -> usize {
        if let Some(&i) = self.index.get(&cell) {
            return i;
        }
        self.list.push(cell.clone());
        self.index.insert(cell, self.list.len() - 1);
        self.list.len() - 1
    }
}

/// The decisions over every address pair of the same family, as the kernel would
/// make them at both hooks ([`model::decide`]); pairs decided alike are merged.
fn decide(
    compiled: &Compiled,
    [(src, src_local), (dst, dst_local)]: [(&MatrixPod, Option<&LocalPod>); 2],
    port: PortProtocol,
) -> Vec<CellDecision> {
    let hook = |s: IpAddr, d: IpAddr, direction: Direction| {
        let decision = model::decide(compiled, s, d, port.protocol, port.port, direction);
        let verdict = HookVerdict::of(compiled, &decision);
        let local = match direction {
            Direction::Egress => src_local,
            Direction::Ingress => dst_local,
        };
        let isolated_by = match (&verdict, local) {
            (HookVerdict::Denied | HookVerdict::AuditAllowed, Some(local)) => match direction {
                Direction::Egress => local.egress_policies.clone(),
                Direction::Ingress => local.ingress_policies.clone(),
            },
            _ => Vec::new(),
        };
        (
            decision.allowed(),
            HookDecision {
                verdict,
                isolated_by,
            },
        )
    };
    let mut out: Vec<CellDecision> = Vec::new();
    for s in &src.ips {
        for d in dst.ips.iter().filter(|d| d.is_ipv4() == s.is_ipv4()) {
            let family = if s.is_ipv4() {
                AddressFamily::Ipv4
            } else {
                AddressFamily::Ipv6
            };
            let (egress_allowed, egress) = hook(*s, *d, Direction::Egress);
            let (ingress_allowed, ingress) = hook(*s, *d, Direction::Ingress);
            let allowed = egress_allowed && ingress_allowed;
            match out
                .iter_mut()
                .find(|c| c.allowed == allowed && c.egress == egress && c.ingress == ingress)
            {
                Some(same) if same.families.contains(&family) => {}
                Some(same) => same.families.push(family),
                None => out.push(CellDecision {
                    families: vec![family],
                    allowed,
                    egress,
                    ingress,
                }),
            }
        }
    }
    out
}

/// The verdict of a cell decided over every address pair of the same family (`None`:
/// no pair).
fn reach(cell: &[CellDecision]) -> Option<Reach> {
    let allowed = cell.iter().any(|c| c.allowed);
    let blocked = cell.iter().any(|c| !c.allowed);
    match (allowed, blocked) {
        (true, false) => Some(Reach::Allowed),
        (false, true) => Some(Reach::Blocked),
        (true, true) => Some(Reach::Partial),
        (false, false) => None,
    }
}

/// A cell that `--apply` changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CellChange {
    pub port: PortProtocol,
    #[serde(serialize_with = "as_display")]
    pub src: ObjectRef,
    #[serde(serialize_with = "as_display")]
    pub dst: ObjectRef,
    pub before: Reach,
    pub after: Reach,
}

impl CellChange {
    /// Whether less gets through afterwards.
    pub fn newly_blocked(&self) -> bool {
        self.after < self.before
    }
}

impl std::fmt::Display for CellChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.newly_blocked() {
            "newly blocked"
        } else {
            "newly allowed"
        };
        write!(
            f,
            "{} -> {} {}: {} → {} ({what})",
            self.src,
            self.dst,
            self.port,
            self.before.symbol(),
            self.after.symbol()
        )
    }
}

/// The changes from `before` to `after`, and how many in each direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MatrixDiff {
    pub changes: Vec<CellChange>,
    pub newly_blocked: usize,
    pub newly_allowed: usize,
}

impl MatrixDiff {
    fn change(&self, port: PortProtocol, src: &ObjectRef, dst: &ObjectRef) -> Option<&CellChange> {
        self.changes
            .iter()
            .find(|c| c.port == port && c.src == *src && c.dst == *dst)
    }
}

/// `N cells change: A newly blocked, B newly allowed`.
impl std::fmt::Display for MatrixDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.changes.len();
        write!(
            f,
            "{n} {} change: {} newly blocked, {} newly allowed",
            if n == 1 { "cell" } else { "cells" },
            self.newly_blocked,
            self.newly_allowed
        )
    }
}

/// The cells present in both matrices whose verdict differs (in `after`'s order).
pub fn diff(before: &Matrix, after: &Matrix) -> MatrixDiff {
    let mut out = MatrixDiff::default();
    for (port, src, dst, now) in after.cells() {
        if let Some(was) = before.get(port, src, dst)
            && was != now
        {
            let change = CellChange {
                port,
                src: src.clone(),
                dst: dst.clone(),
                before: was,
                after: now,
            };
            if change.newly_blocked() {
                out.newly_blocked += 1;
            } else {
                out.newly_allowed += 1;
            }
            out.changes.push(change);
        }
    }
    out
}

/// What `matrix` shows, as `--json` prints it and [`html::render`] draws it: the matrix
/// (after `--apply`, if given) and, with `--apply`, the matrix before it and the cells
/// that change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatrixReport {
    pub matrix: Matrix,
    /// The matrix without `--apply` (`null` without it).
    pub before: Option<Matrix>,
    pub diff: Option<MatrixDiff>,
}

impl MatrixReport {
    /// A matrix alone.
    pub fn of(matrix: Matrix) -> MatrixReport {
        MatrixReport {
            matrix,
            before: None,
            diff: None,
        }
    }

    /// `after` shown, with the cells that change from `before`.
    pub fn applied(before: Matrix, after: Matrix) -> MatrixReport {
        let diff = diff(&before, &after);
        MatrixReport {
            matrix: after,
            before: Some(before),
            diff: Some(diff),
        }
    }
}

/// How text is decorated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours (only for terminals, and not with `NO_COLOR`).
    pub color: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn reach(self, reach: Reach) -> String {
        match reach {
            Reach::Allowed => self.paint("32", reach.symbol()),
            Reach::Blocked => self.paint("31", reach.symbol()),
            Reach::Partial => self.paint("33", reach.symbol()),
        }
    }
}

/// Display width of text without escapes (the symbols used are one column wide).
fn width(text: &str) -> usize {
    text.chars().count()
}

/// `text` centred in `w` columns (`styled` is what is printed, `text` its visible form).
fn centre(styled: &str, text: &str, w: usize) -> String {
    let pad = w.saturating_sub(width(text));
    let left = pad / 2;
    format!("{}{styled}{}", " ".repeat(left), " ".repeat(pad - left))
}

/// The matrix for people: one table per port, then (with `diff`) the changed cells
/// and the summary, then a legend. A changed cell reads `✓→✗`.
pub fn render(matrix: &Matrix, diff: Option<&MatrixDiff>, style: Style) -> String {
    let mut out = String::new();
    let corner = "from \\ to";
    let row_width = matrix
        .pods
        .iter()
        .map(|p| width(&p.pod.to_string()))
        .chain([width(corner)])
        .max()
        .unwrap_or(0);
    if let Some(family) = matrix.family {
        let _ = writeln!(
            out,
            "{}\n",
            style.paint("1", &format!("over {family} only"))
        );
    }
    if matrix.pods.is_empty() {
        out.push_str("no pods with addresses: nothing to show\n");
    }
    for table in &matrix.tables {
        let count = table.destinations.len();
        let _ = writeln!(
            out,
            "{} ({count} destination{})",
            style.paint("1", &table.port.to_string()),
            if count == 1 { "" } else { "s" }
        );
        if count == 0 {
            out.push_str("  no pod declares this port (--all-destinations shows every pod)\n\n");
            continue;
        }
        let headers: Vec<String> = table
            .destinations
            .iter()
            .map(|&d| matrix.pods[d].pod.to_string())
            .collect();
        let widths: Vec<usize> = headers.iter().map(|h| width(h).max(3)).collect();
        let _ = write!(out, "  {corner:<row_width$}");
        for (h, w) in headers.iter().zip(&widths) {
            let _ = write!(out, "  {}", centre(h, h, *w));
        }
        out.push('\n');
        for (s, row) in table.cells.iter().enumerate() {
            let name = matrix.pods[s].pod.to_string();
            let _ = write!(out, "  {name:<row_width$}");
            for (c, cell) in row.iter().enumerate() {
                let dst = &matrix.pods[table.destinations[c]].pod;
                let change = diff.and_then(|d| d.change(table.port, &matrix.pods[s].pod, dst));
                let (styled, plain) = match (cell, change) {
                    (_, Some(change)) => {
                        let plain = format!("{}→{}", change.before.symbol(), change.after.symbol());
                        let code = if change.newly_blocked() {
                            "1;31"
                        } else {
                            "1;32"
                        };
                        (style.paint(code, &plain), plain)
                    }
                    (Some(reach), None) => (style.reach(*reach), reach.symbol().to_string()),
                    (None, None) => (style.paint("2", "-"), "-".to_string()),
                };
                let _ = write!(out, "  {}", centre(&styled, &plain, widths[c]));
            }
            out.push('\n');
        }
        out.push('\n');
    }
    if let Some(diff) = diff {
        if !diff.changes.is_empty() {
            out.push_str("changes:\n");
            for change in &diff.changes {
                let _ = writeln!(out, "  {change}");
            }
        }
        let _ = writeln!(out, "{}", style.paint("1", &diff.to_string()));
    }
    for s in &matrix.skipped {
        let _ = writeln!(out, "not shown: {} ({})", s.pod, s.reason);
    }
    let _ = write!(
        out,
        "legend: {} allowed  {} blocked  {} allowed for one address family only  {} the pod itself \
         (never filtered)",
        style.reach(Reach::Allowed),
        style.reach(Reach::Blocked),
        style.reach(Reach::Partial),
        style.paint("2", "-"),
    );
    if diff.is_some() {
        out.push_str("  ✓→✗ changed by --apply");
    }
    out.push_str(
        "\n        rows are sources, columns destinations; traffic from the node always passes\n",
    );
    // Centred cells leave trailing blanks.
    out.lines().map(|l| format!("{}\n", l.trim_end())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview::fixtures::{self, STARS, STARS_POLICIES};
    use crate::preview::load::Overlay;
    use netpol_compile::{Allocations, compile, reference};

    fn pod(s: &str) -> ObjectRef {
        let (ns, name) = s.split_once('/').unwrap();
        ObjectRef::new(ns, name)
    }

    fn matrix_of(state: &ClusterState) -> Matrix {
        let compiled = compile(state, &Allocations::default());
        let m = Matrix::new(state, &compiled, &MatrixOptions::default());
        // Every cell equals the independent reference evaluator.
        let reference = reference::Reference::new(state);
        for (port, src, dst, reach) in m.cells() {
            let ip = |p: &ObjectRef| m.pods.iter().find(|x| x.pod == *p).unwrap().ips[0];
            let expected = reference.flow_allowed(ip(src), ip(dst), port.protocol, port.port);
            assert_eq!(reach == Reach::Allowed, expected, "{src} -> {dst} {port}");
            // And every cell's decisions are those of its hooks, and make its verdict.
            let decided = m.decision(port, src, dst).expect("a decided cell");
            for d in decided {
                assert_eq!(d.allowed, d.egress.allowed() && d.ingress.allowed());
            }
            assert_eq!(super::reach(decided), Some(reach), "{src} -> {dst} {port}");
        }
        for table in &m.tables {
            for (row, why) in table.cells.iter().zip(&table.decided) {
                let decided: Vec<bool> = why.iter().map(Option::is_some).collect();
                let cells: Vec<bool> = row.iter().map(Option::is_some).collect();
                assert_eq!(
                    decided, cells,
                    "a decision for every cell and only for cells"
                );
            }
        }
        m
    }

    /// `(port, [(src, dst, allowed)])` as a person would write the table.
    fn assert_table(m: &Matrix, port: PortProtocol, expected: &[(&str, &str, Option<Reach>)]) {
        let table = m.tables.iter().find(|t| t.port == port).expect("table");
        let cells = table.destinations.len() * m.pods.len();
        assert_eq!(cells, expected.len(), "{port}: every cell is listed");
        for (src, dst, want) in expected {
            let s = m.pods.iter().position(|p| p.pod == pod(src)).unwrap();
            let c = table
                .destinations
                .iter()
                .position(|&d| m.pods[d].pod == pod(dst))
                .unwrap();
            assert_eq!(table.cells[s][c], *want, "{src} -> {dst} {port}");
        }
    }

    const A: Option<Reach> = Some(Reach::Allowed);
    const B: Option<Reach> = Some(Reach::Blocked);
    const SELF: Option<Reach> = None;

    #[test]
    fn stars_without_policies_is_open() {
        let m = matrix_of(&fixtures::state(STARS, &[]));
        let ports: Vec<String> = m.tables.iter().map(|t| t.port.to_string()).collect();
        assert_eq!(ports, ["TCP/80", "TCP/6379", "TCP/9000", "TCP/9001"]);
        assert!(m.cells().all(|(.., r)| r == Reach::Allowed));
        assert_eq!(
            m.cells().count(),
            4 * 3,
            "four ports, one server, three clients each"
        );
    }

    #[test]
    fn stars_matrix_by_hand() {
        let m = matrix_of(&fixtures::stars_with_policies());
        // frontend: TCP 80 only from namespaces role=client.
        assert_table(
            &m,
            PortProtocol::tcp(80),
            &[
                ("client/client", "stars/frontend", A),
                ("management-ui/management-ui", "stars/frontend", B),
                ("stars/backend", "stars/frontend", B),
                ("stars/frontend", "stars/frontend", SELF),
            ],
        );
        // backend: TCP 6379 only from role=frontend pods of stars.
        assert_table(
            &m,
            PortProtocol::tcp(6379),
            &[
                ("client/client", "stars/backend", B),
                ("management-ui/management-ui", "stars/backend", B),
                ("stars/backend", "stars/backend", SELF),
                ("stars/frontend", "stars/backend", A),
            ],
        );
        // client and management-ui are selected by nothing: open.
        assert_table(
            &m,
            PortProtocol::tcp(9000),
            &[
                ("client/client", "client/client", SELF),
                ("management-ui/management-ui", "client/client", A),
                ("stars/backend", "client/client", A),
                ("stars/frontend", "client/client", A),
            ],
        );
        assert_table(
            &m,
            PortProtocol::tcp(9001),
            &[
                ("client/client", "management-ui/management-ui", A),
                (
                    "management-ui/management-ui",
                    "management-ui/management-ui",
                    SELF,
                ),
                ("stars/backend", "management-ui/management-ui", A),
                ("stars/frontend", "management-ui/management-ui", A),
            ],
        );
    }

    #[test]
    fn every_cell_names_the_rule_or_the_policies_that_decided_it() {
        let m = matrix_of(&fixtures::stars_with_policies());
        let why = |port, src, dst| -> Vec<(String, String)> {
            m.decision(port, &pod(src), &pod(dst))
                .unwrap()
                .iter()
                .map(|d| (d.egress.to_string(), d.ingress.to_string()))
                .collect()
        };
        let not_isolated = || "not isolated".to_string();
        assert_eq!(
            why(PortProtocol::tcp(80), "client/client", "stars/frontend"),
            [(
                not_isolated(),
                "allowed by NetworkPolicy stars/frontend-policy spec.ingress[0]".into()
            )]
        );
        assert_eq!(
            why(PortProtocol::tcp(6379), "client/client", "stars/backend"),
            [(
                not_isolated(),
                "isolated by NetworkPolicy stars/backend-policy; no rule allows it".into()
            )]
        );
        assert_eq!(
            why(PortProtocol::tcp(9000), "stars/backend", "client/client"),
            [(not_isolated(), not_isolated())]
        );
        // Each distinct way is stored once: open, allowed by either policy's rule, or
        // blocked by either policy.
        assert_eq!(m.decisions.len(), 5, "{:#?}", m.decisions);

        let json = serde_json::to_value(&m).unwrap();
        let backend = m
            .tables
            .iter()
            .position(|t| t.port == PortProtocol::tcp(6379))
            .unwrap();
        let client = m
            .pods
            .iter()
            .position(|p| p.pod == pod("client/client"))
            .unwrap();
        let index = &json["tables"][backend]["decided"][client][0];
        let decided = &json["decisions"][index.as_u64().unwrap() as usize];
        assert_eq!(
            decided,
            &serde_json::json!([{
                "families": ["IPv4"],
                "allowed": false,
                "egress": {"verdict": "not-isolated"},
                "ingress": {"verdict": "denied", "isolated_by": ["stars/backend-policy"]},
            }])
        );
    }

    #[test]
    fn explicit_ports_and_all_destinations() {
        let state = fixtures::stars_with_policies();
        let compiled = compile(&state, &Allocations::default());
        let options = MatrixOptions {
            ports: vec![PortProtocol::tcp(6379), PortProtocol::udp(53)],
            all_destinations: false,
            ..MatrixOptions::default()
        };
        let m = Matrix::new(&state, &compiled, &options);
        assert_eq!(m.tables.len(), 2);
        assert_eq!(m.tables[1].destinations.len(), 0, "nobody serves UDP/53");
        assert!(render(&m, None, Style::default()).contains("no pod declares this port"));

        let options = MatrixOptions {
            ports: vec![PortProtocol::tcp(80)],
            all_destinations: true,
            ..MatrixOptions::default()
        };
        let m = Matrix::new(&state, &compiled, &options);
        assert_eq!(m.tables[0].destinations.len(), 4);
        // backend is isolated and allows only 6379: port 80 to it is blocked for all.
        for src in [
            "client/client",
            "stars/frontend",
            "management-ui/management-ui",
        ] {
            assert_eq!(
                m.get(PortProtocol::tcp(80), &pod(src), &pod("stars/backend")),
                Some(Reach::Blocked),
                "{src}"
            );
        }
        // client is not isolated: open on any port.
        assert_eq!(
            m.get(
                PortProtocol::tcp(80),
                &pod("stars/backend"),
                &pod("client/client")
            ),
            Some(Reach::Allowed)
        );
    }

    #[test]
    fn only_the_chosen_pods_are_rows_and_columns_and_their_verdicts_are_unchanged() {
        let state = fixtures::stars_with_policies();
        let compiled = compile(&state, &Allocations::default());
        let all = Matrix::new(&state, &compiled, &MatrixOptions::default());
        let options = MatrixOptions {
            pods: Some([pod("stars/frontend"), pod("stars/backend")].into()),
            ..MatrixOptions::default()
        };
        let m = Matrix::new(&state, &compiled, &options);
        let rows: Vec<String> = m.pods.iter().map(|p| p.pod.to_string()).collect();
        assert_eq!(rows, ["stars/backend", "stars/frontend"]);
        let ports: Vec<String> = m.tables.iter().map(|t| t.port.to_string()).collect();
        assert_eq!(
            ports,
            ["TCP/80", "TCP/6379"],
            "only the ports the chosen pods serve"
        );
        assert_eq!(m.cells().count(), 2);
        for (port, src, dst, reach) in m.cells() {
            assert_eq!(
                all.get(port, src, dst),
                Some(reach),
                "{src} -> {dst} {port}"
            );
        }
    }

    #[test]
    fn apply_shows_the_changed_cells() {
        let state = fixtures::state(STARS, &[]);
        let compiled = compile(&state, &Allocations::default());
        let before = Matrix::new(&state, &compiled, &MatrixOptions::default());

        let mut overlay = Overlay::default();
        overlay.add_text(STARS_POLICIES, "stars-policies.yaml");
        let after_state = overlay.apply_to(&state);
        let after_compiled = compile(&after_state, &compiled.allocations);
        let after = Matrix::new(&after_state, &after_compiled, &MatrixOptions::default());
        let d = diff(&before, &after);
        let changes: Vec<String> = d.changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            [
                "management-ui/management-ui -> stars/frontend TCP/80: ✓ → ✗ (newly blocked)",
                "stars/backend -> stars/frontend TCP/80: ✓ → ✗ (newly blocked)",
                "client/client -> stars/backend TCP/6379: ✓ → ✗ (newly blocked)",
                "management-ui/management-ui -> stars/backend TCP/6379: ✓ → ✗ (newly blocked)",
            ]
        );
        assert_eq!(
            d.to_string(),
            "4 cells change: 4 newly blocked, 0 newly allowed"
        );

        // Replacing backend-policy with one that admits every pod of the cluster on 6379
        // reopens the two cells it closed; frontend-policy is untouched.
        let mut replace = Overlay::default();
        replace.add_text(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: backend-policy, namespace: stars}\n\
             spec: {podSelector: {matchLabels: {role: backend}}, \
             ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 6379}]}]}\n",
            "open-backend.yaml",
        );
        let reopened_state = replace.apply_to(&after_state);
        let reopened = Matrix::new(
            &reopened_state,
            &compile(&reopened_state, &after_compiled.allocations),
            &MatrixOptions::default(),
        );
        let d = diff(&after, &reopened);
        assert_eq!(
            d.to_string(),
            "2 cells change: 0 newly blocked, 2 newly allowed"
        );
        assert!(d.changes.iter().all(|c| c.port == PortProtocol::tcp(6379)));

        let text = render(&reopened, Some(&d), Style::default());
        assert!(text.contains("✗→✓"), "{text}");
        assert!(text.contains("2 cells change: 0 newly blocked, 2 newly allowed"));
        assert!(text.contains("changed by --apply"));
    }

    #[test]
    fn rendering_is_aligned_and_coloured_only_on_request() {
        let m = matrix_of(&fixtures::stars_with_policies());
        let text = render(&m, None, Style::default());
        assert!(!text.contains('\x1b'));
        let expected = "\
TCP/80 (1 destination)
  from \\ to                    stars/frontend
  client/client                      ✓
  management-ui/management-ui        ✗
  stars/backend                      ✗
  stars/frontend                     -
";
        assert!(text.starts_with(expected), "{text}");
        assert!(text.contains("legend: ✓ allowed  ✗ blocked"));
        assert!(text.lines().all(|l| l == l.trim_end()));

        let coloured = render(&m, None, Style { color: true });
        assert!(coloured.contains("\x1b[31m✗\x1b[0m"));
        assert!(coloured.contains("\x1b[32m✓\x1b[0m"));
    }

    #[test]
    fn one_family_allowed_is_partial() {
        // Dual-stack pods; egress of a is limited to an IPv4 block containing b.
        let state = fixtures::state(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {containers: [{name: main}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: h, namespace: x}
spec: {hostNetwork: true, containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIP: 10.0.9.9}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: v4-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}}]}]
"#,
            &[],
        );
        let compiled = compile(&state, &Allocations::default());
        let m = Matrix::new(&state, &compiled, &MatrixOptions::default());
        assert_eq!(
            m.get(PortProtocol::tcp(80), &pod("x/a"), &pod("x/b")),
            Some(Reach::Partial)
        );
        // Decided once per family, each naming what decided it.
        let decided = m
            .decision(PortProtocol::tcp(80), &pod("x/a"), &pod("x/b"))
            .unwrap();
        let ways: Vec<(Vec<AddressFamily>, bool, String)> = decided
            .iter()
            .map(|d| (d.families.clone(), d.allowed, d.egress.to_string()))
            .collect();
        assert_eq!(
            ways,
            [
                (
                    vec![AddressFamily::Ipv4],
                    true,
                    "allowed by NetworkPolicy x/v4-only spec.egress[0]".into()
                ),
                (
                    vec![AddressFamily::Ipv6],
                    false,
                    "isolated by NetworkPolicy x/v4-only; no rule allows it".into()
                ),
            ]
        );
        // b reaches a (as a destination of every port) over both families alike: one
        // decision naming both.
        let options = MatrixOptions {
            all_destinations: true,
            ..MatrixOptions::default()
        };
        let every = Matrix::new(&state, &compiled, &options);
        let decided = every
            .decision(PortProtocol::tcp(80), &pod("x/b"), &pod("x/a"))
            .unwrap();
        assert_eq!(decided.len(), 1, "{decided:?}");
        assert_eq!(
            decided[0].families,
            [AddressFamily::Ipv4, AddressFamily::Ipv6]
        );
        assert_eq!(m.skipped.len(), 1);
        let text = render(&m, None, Style::default());
        assert!(
            text.contains("not shown: x/h (hostNetwork: it uses the node's addresses)"),
            "{text}"
        );
    }

    #[test]
    fn a_family_previews_only_its_addresses() {
        // a's egress allows only an IPv6 block holding b's IPv6 address; c has IPv4 only.
        let state = fixtures::state(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {containers: [{name: main}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {pod: c}}
spec: {containers: [{name: main, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: v6-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: "fd00::/120"}}]}]
"#,
            &[],
        );
        let compiled = compile(&state, &Allocations::default());
        let reference = reference::Reference::new(&state);
        let http = PortProtocol::tcp(80);
        let of = |family| {
            let options = MatrixOptions {
                family,
                ..MatrixOptions::default()
            };
            Matrix::new(&state, &compiled, &options)
        };
        let both = of(None);
        assert_eq!(
            both.get(http, &pod("x/a"), &pod("x/b")),
            Some(Reach::Partial)
        );
        assert_eq!(
            both.get(http, &pod("x/a"), &pod("x/c")),
            Some(Reach::Blocked)
        );

        let v4 = of(Some(AddressFamily::Ipv4));
        assert_eq!(v4.get(http, &pod("x/a"), &pod("x/b")), Some(Reach::Blocked));
        assert_eq!(v4.get(http, &pod("x/a"), &pod("x/c")), Some(Reach::Blocked));
        assert_eq!(v4.get(http, &pod("x/c"), &pod("x/b")), Some(Reach::Allowed));
        assert!(v4.pods.iter().all(|p| p.ips.iter().all(IpAddr::is_ipv4)));

        let v6 = of(Some(AddressFamily::Ipv6));
        assert_eq!(v6.get(http, &pod("x/a"), &pod("x/b")), Some(Reach::Allowed));
        assert_eq!(
            v6.get(http, &pod("x/a"), &pod("x/c")),
            None,
            "c has no IPv6 address"
        );
        assert!(
            v6.skipped
                .iter()
                .any(|s| s.pod == pod("x/c") && s.reason == "no IPv6 address")
        );
        // Each one-family cell is the reference evaluator's verdict on that family.
        for m in [&v4, &v6] {
            for (port, src, dst, reach) in m.cells() {
                let ip = |p: &ObjectRef| m.pods.iter().find(|x| x.pod == *p).unwrap().ips[0];
                let expected = reference.flow_allowed(ip(src), ip(dst), port.protocol, port.port);
                assert_eq!(reach == Reach::Allowed, expected, "{src} -> {dst} {port}");
            }
        }
        let text = render(&v6, None, Style::default());
        assert!(text.starts_with("over IPv6 only\n"), "{text}");
        assert!(text.contains("not shown: x/c (no IPv6 address)"), "{text}");
        let json = serde_json::to_value(&v6).unwrap();
        assert_eq!(json["family"], "IPv6");
        assert_eq!(
            serde_json::to_value(&both).unwrap()["family"],
            serde_json::Value::Null
        );
        assert_eq!("ipv6".parse::<AddressFamily>(), Ok(AddressFamily::Ipv6));
        assert_eq!("IPv4".parse::<AddressFamily>(), Ok(AddressFamily::Ipv4));
        assert!(
            "ipv5"
                .parse::<AddressFamily>()
                .unwrap_err()
                .contains("ipv4 or ipv6")
        );
    }
}
