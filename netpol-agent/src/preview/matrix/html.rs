//! The matrix as a page to look at (`matrix --html FILE`): one self-contained HTML file
//! (inline CSS and script, nothing fetched), drawn from the [`MatrixReport`] that `--json`
//! prints, so the two cannot disagree.
//!
//! One table per port, sources as rows and destinations as columns, both grouped by
//! namespace. A cell is coloured allowed, blocked or allowed over one address family
//! only (`~`); its title says how each hook decided it (the rule, or the policies that
//! isolate the pod); with `--apply` the cells that change are outlined and split in the
//! colours before and after, and counted. The tables are written here, not by the
//! script: the page reads without it. The script adds a details panel (click a cell),
//! lights the row and column under the pointer, and counts the cells drawn into
//! `data-dom-*` attributes beside the counts written here, logging a console error
//! where they differ.
//!
//! Every name (namespaces, pods, policies, rules) comes from users and is escaped.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::{CellChange, CellDecision, Matrix, MatrixPod, MatrixReport, PortTable, Reach};
use crate::preview::PortProtocol;
use netpol_compile::state::ObjectRef;

const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// The page. `source` says what was read (e.g. the manifest directory and the files of
/// `--apply`); it is shown under the heading.
pub fn render(report: &MatrixReport, source: &str) -> String {
    let matrix = &report.matrix;
    let changes: HashMap<(PortProtocol, &ObjectRef, &ObjectRef), &CellChange> = report
        .diff
        .iter()
        .flat_map(|d| &d.changes)
        .map(|c| ((c.port, &c.src, &c.dst), c))
        .collect();
    let page = Page {
        report,
        changes,
        family_shown: matrix.family.is_none(),
    };
    let counts: Vec<Counts> = matrix.tables.iter().map(|t| page.counts(t)).collect();
    let total = counts.iter().fold(Counts::default(), |a, b| a.plus(b));

    let mut out = String::with_capacity(4096 + 256 * total.cells);
    out.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"netpol-agent matrix\">\n\
         <title>Reachability matrix · netpol</title>\n<style>\n",
    );
    out.push_str(STYLE);
    out.push_str("</style>\n</head>\n<body>\n<header>\n<h1>Reachability matrix</h1>\n");
    let mut meta = vec![
        source.to_string(),
        plural(matrix.pods.len(), "pod"),
        plural(matrix.tables.len(), "port"),
    ];
    if let Some(family) = matrix.family {
        meta.push(format!("over {family} only"));
    }
    let _ = writeln!(out, "<p class=\"meta\">{}</p>", escape(&meta.join(" · ")));
    page.legend(&mut out);
    let _ = write!(
        out,
        "<p id=\"totals\" class=\"totals\"{}>",
        total.attributes()
    );
    out.push_str(&escape(&total.sentence(false)));
    if let Some(diff) = &report.diff {
        let _ = write!(
            out,
            "<br><span class=\"diff\">--apply: {}</span>",
            escape(&diff.to_string())
        );
    }
    out.push_str("</p>\n");
    if !matrix.tables.is_empty() {
        out.push_str("<nav>");
        for (i, (table, counts)) in matrix.tables.iter().zip(&counts).enumerate() {
            let _ = write!(
                out,
                "<a href=\"#port-{i}\">{}<small>{}</small></a>",
                escape(&table.port.to_string()),
                escape(&counts.short())
            );
        }
        out.push_str("</nav>\n");
    }
    out.push_str("</header>\n<main>\n");
    if matrix.pods.is_empty() {
        out.push_str("<p class=\"empty\">No pods with addresses: nothing to show.</p>\n");
    }
    for (i, (table, counts)) in matrix.tables.iter().zip(&counts).enumerate() {
        page.table(&mut out, i, table, counts);
    }
    if !matrix.skipped.is_empty() {
        out.push_str("<section class=\"skipped\">\n<h2>Not shown</h2>\n<ul>\n");
        for s in &matrix.skipped {
            let _ = writeln!(
                out,
                "<li><b>{}</b>: {}</li>",
                escape(&s.pod.to_string()),
                escape(&s.reason)
            );
        }
        out.push_str("</ul>\n</section>\n");
    }
    out.push_str(
        "</main>\n<footer>Rows are sources, columns destinations. A cell is the verdict on \
         a new connection, as the kernel would decide it at the source's egress hook and \
         the destination's ingress hook; traffic from the node always passes and is not \
         shown. Click a cell for details.</footer>\n\
         <aside id=\"details\" hidden><button class=\"close\" type=\"button\" \
         title=\"Close (Esc)\">×</button><div class=\"body\"></div></aside>\n<script>\n",
    );
    out.push_str(SCRIPT);
    out.push_str("</script>\n</body>\n</html>\n");
    out
}

/// The cells of a table (or the page) by state, as written and as the script counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    cells: usize,
    allowed: usize,
    blocked: usize,
    partial: usize,
    changed: usize,
    newly_blocked: usize,
    newly_allowed: usize,
}

impl Counts {
    fn plus(self, other: &Counts) -> Counts {
        Counts {
            cells: self.cells + other.cells,
            allowed: self.allowed + other.allowed,
            blocked: self.blocked + other.blocked,
            partial: self.partial + other.partial,
            changed: self.changed + other.changed,
            newly_blocked: self.newly_blocked + other.newly_blocked,
            newly_allowed: self.newly_allowed + other.newly_allowed,
        }
    }

    /// ` data-cells="…" data-allowed="…" …` (the script's `dataset` names).
    fn attributes(&self) -> String {
        format!(
            " data-cells=\"{}\" data-allowed=\"{}\" data-blocked=\"{}\" data-partial=\"{}\" \
             data-changed=\"{}\" data-newly-blocked=\"{}\" data-newly-allowed=\"{}\"",
            self.cells,
            self.allowed,
            self.blocked,
            self.partial,
            self.changed,
            self.newly_blocked,
            self.newly_allowed
        )
    }

    /// `12 cells: 9 allowed, 3 blocked`, and with `changes` where there are any `; 2
    /// changed by --apply (2 newly blocked, 0 newly allowed)`.
    fn sentence(&self, changes: bool) -> String {
        let mut parts = vec![
            format!("{} allowed", self.allowed),
            format!("{} blocked", self.blocked),
        ];
        if self.partial > 0 {
            parts.push(format!("{} allowed over one family only", self.partial));
        }
        let mut text = format!("{}: {}", plural(self.cells, "cell"), parts.join(", "));
        if changes && self.changed > 0 {
            let _ = write!(
                text,
                "; {} changed by --apply ({} newly blocked, {} newly allowed)",
                self.changed, self.newly_blocked, self.newly_allowed
            );
        }
        text
    }

    /// For the port list: `3 ✓ 1 ✗`, with `~` and changes where there are any.
    fn short(&self) -> String {
        let mut text = format!("{} ✓ {} ✗", self.allowed, self.blocked);
        if self.partial > 0 {
            let _ = write!(text, " {} ~", self.partial);
        }
        if self.changed > 0 {
            let _ = write!(text, " {} changed", self.changed);
        }
        text
    }
}

struct Page<'a> {
    report: &'a MatrixReport,
    changes: HashMap<(PortProtocol, &'a ObjectRef, &'a ObjectRef), &'a CellChange>,
    /// Whether both families are previewed (so a cell can be `~`).
    family_shown: bool,
}

/// A cell's CSS class for its state.
fn class(reach: Reach) -> &'static str {
    match reach {
        Reach::Allowed => "allowed",
        Reach::Blocked => "blocked",
        Reach::Partial => "partial",
    }
}

/// How a cell's state reads.
fn state(reach: Reach) -> &'static str {
    match reach {
        Reach::Allowed => "allowed",
        Reach::Blocked => "blocked",
        Reach::Partial => "allowed over one address family only",
    }
}

impl Page<'_> {
    fn matrix(&self) -> &Matrix {
        &self.report.matrix
    }

    fn change(&self, port: PortProtocol, src: &ObjectRef, dst: &ObjectRef) -> Option<&CellChange> {
        self.changes.get(&(port, src, dst)).copied()
    }

    fn counts(&self, table: &PortTable) -> Counts {
        let m = self.matrix();
        let mut counts = Counts::default();
        for (s, row) in table.cells.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                let Some(reach) = cell else { continue };
                counts.cells += 1;
                match reach {
                    Reach::Allowed => counts.allowed += 1,
                    Reach::Blocked => counts.blocked += 1,
                    Reach::Partial => counts.partial += 1,
                }
                let dst = &m.pods[table.destinations[c]].pod;
                if let Some(change) = self.change(table.port, &m.pods[s].pod, dst) {
                    counts.changed += 1;
                    if change.newly_blocked() {
                        counts.newly_blocked += 1;
                    } else {
                        counts.newly_allowed += 1;
                    }
                }
            }
        }
        counts
    }

    fn legend(&self, out: &mut String) {
        out.push_str("<div class=\"legend\">");
        let mut key = |classes: &str, symbol: &str, text: &str| {
            let _ = write!(
                out,
                "<span class=\"key\"><span class=\"swatch {classes}\">{symbol}</span>{}</span>",
                escape(text)
            );
        };
        key("cell allowed", "✓", "allowed");
        key("cell blocked", "✗", "blocked");
        if self.family_shown {
            key(
                "cell partial",
                "~",
                "allowed over one address family only (dual-stack pods)",
            );
        }
        key("void", "·", "the pod itself (never filtered)");
        if self.report.diff.is_some() {
            key(
                "cell blocked changed newly-blocked was-allowed",
                "✗",
                "changed by --apply (upper left: before, lower right: after)",
            );
        }
        out.push_str("</div>\n");
    }

    fn table(&self, out: &mut String, index: usize, table: &PortTable, counts: &Counts) {
        let m = self.matrix();
        let port = table.port.to_string();
        let _ = writeln!(
            out,
            "<section class=\"port\" id=\"port-{index}\" data-port=\"{}\"{}>",
            escape(&port),
            counts.attributes()
        );
        let _ = writeln!(
            out,
            "<h2>{} <small>{}</small></h2>",
            escape(&port),
            plural(table.destinations.len(), "destination")
        );
        if table.destinations.is_empty() {
            out.push_str(
                "<p class=\"empty\">No pod declares this port (--all-destinations shows every \
                 pod).</p>\n</section>\n",
            );
            return;
        }
        let _ = writeln!(
            out,
            "<p class=\"counts\">{}</p>",
            escape(&counts.sentence(true))
        );
        out.push_str("<div class=\"scroll\">\n<table class=\"grid\">\n<thead>\n<tr class=\"ns\">");
        out.push_str("<th class=\"corner\" rowspan=\"2\">from ↓ &nbsp; to →</th>");
        let columns: Vec<&MatrixPod> = table.destinations.iter().map(|&d| &m.pods[d]).collect();
        // A column that starts a namespace gets a rule on its left.
        let starts: Vec<bool> = columns
            .iter()
            .enumerate()
            .map(|(c, p)| c == 0 || columns[c - 1].pod.namespace != p.pod.namespace)
            .collect();
        for group in columns.chunk_by(|a, b| a.pod.namespace == b.pod.namespace) {
            let namespace = &group[0].pod.namespace;
            let _ = write!(
                out,
                "<th class=\"g\" colspan=\"{n}\" title=\"namespace {ns}\"><div class=\"clip\" \
                 style=\"--span:{n}\">{ns}</div></th>",
                n = group.len(),
                ns = escape(namespace)
            );
        }
        out.push_str("</tr>\n<tr class=\"names\">");
        for (pod, start) in columns.iter().zip(&starts) {
            let _ = write!(
                out,
                "<th class=\"dst{}\" scope=\"col\" title=\"{}\"><span>{}</span></th>",
                if *start { " g" } else { "" },
                escape(&pod_title(pod)),
                escape(&pod.pod.name)
            );
        }
        out.push_str("</tr>\n</thead>\n");
        let rows: Vec<(usize, &MatrixPod)> = m.pods.iter().enumerate().collect();
        for group in rows.chunk_by(|(_, a), (_, b)| a.pod.namespace == b.pod.namespace) {
            let namespace = &group[0].1.pod.namespace;
            let _ = writeln!(
                out,
                "<tbody>\n<tr class=\"group\"><th scope=\"rowgroup\" title=\"namespace {ns}\">\
                 {ns}</th><td colspan=\"{}\"></td></tr>",
                columns.len(),
                ns = escape(namespace)
            );
            for &(s, src) in group {
                let _ = write!(
                    out,
                    "<tr><th class=\"src\" scope=\"row\" title=\"{}\">{}</th>",
                    escape(&pod_title(src)),
                    escape(&src.pod.name)
                );
                for (c, dst) in columns.iter().enumerate() {
                    self.cell(out, table, s, c, dst, starts[c]);
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</tbody>\n");
        }
        out.push_str("</table>\n</div>\n</section>\n");
    }

    fn cell(
        &self,
        out: &mut String,
        table: &PortTable,
        s: usize,
        c: usize,
        dst: &MatrixPod,
        start: bool,
    ) {
        let m = self.matrix();
        let src = &m.pods[s].pod;
        let group = if start { " g" } else { "" };
        let head = format!("{src} → {} {}", dst.pod, table.port);
        let Some(reach) = table.cells[s][c] else {
            let why = if *src == dst.pod {
                "the pod itself (never filtered)"
            } else {
                "no address family in common"
            };
            let _ = write!(
                out,
                "<td class=\"void{group}\" title=\"{}\">·</td>",
                escape(&format!("{head}: {why}"))
            );
            return;
        };
        let decisions = table.decided[s][c].map_or(&[][..], |i| &m.decisions[i][..]);
        let mut classes = format!("cell {}", class(reach));
        let mut title = String::new();
        match self.change(table.port, src, &dst.pod) {
            Some(change) => {
                let _ = write!(
                    classes,
                    " changed {} was-{}",
                    if change.newly_blocked() {
                        "newly-blocked"
                    } else {
                        "newly-allowed"
                    },
                    class(change.before)
                );
                let _ = writeln!(
                    title,
                    "{head}: {} → {} with --apply",
                    state(change.before),
                    state(change.after)
                );
                title.push_str("after --apply:\n");
                decision_lines(&mut title, "  ", src, &dst.pod, decisions);
                title.push_str("before:\n");
                let before = self
                    .report
                    .before
                    .as_ref()
                    .and_then(|b| b.decision(table.port, src, &dst.pod))
                    .unwrap_or_default();
                decision_lines(&mut title, "  ", src, &dst.pod, before);
            }
            None => {
                let _ = writeln!(title, "{head}: {}", state(reach));
                decision_lines(&mut title, "", src, &dst.pod, decisions);
            }
        }
        let _ = write!(
            out,
            "<td class=\"{classes}{group}\" title=\"{}\">{}</td>",
            escape(title.trim_end()),
            reach.symbol()
        );
    }
}

/// How each hook decided, one line each; per family where the families differ.
fn decision_lines(
    out: &mut String,
    indent: &str,
    src: &ObjectRef,
    dst: &ObjectRef,
    decisions: &[CellDecision],
) {
    let several = decisions.len() > 1;
    for d in decisions {
        let mut indent = indent.to_string();
        if several {
            let families: Vec<String> = d.families.iter().map(ToString::to_string).collect();
            let verdict = if d.allowed { "allowed" } else { "blocked" };
            let _ = writeln!(out, "{indent}over {}: {verdict}", families.join(" and "));
            indent.push_str("  ");
        }
        let _ = writeln!(out, "{indent}egress of {src}: {}", d.egress);
        let _ = writeln!(out, "{indent}ingress of {dst}: {}", d.ingress);
    }
}

/// A pod's header title: its name, addresses and the ports it declares.
fn pod_title(pod: &MatrixPod) -> String {
    let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
    let mut text = format!("{}\n{}", pod.pod, ips.join(", "));
    if !pod.serves.is_empty() {
        let ports: Vec<String> = pod.serves.iter().map(ToString::to_string).collect();
        let _ = write!(text, "\nserves {}", ports.join(", "));
    }
    text
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Text made safe for HTML content and quoted attribute values; a newline becomes
/// `&#10;` so that a title keeps its lines on one line of the page.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview::explain::HookVerdict;
    use crate::preview::fixtures::{self, STARS, STARS_POLICIES};
    use crate::preview::load::Overlay;
    use crate::preview::matrix::{AddressFamily, HookDecision, MatrixOptions};
    use crate::preview::{PortProtocol, SkippedPod};
    use netpol_compile::cnp::{Action, Tier};
    use netpol_compile::state::ClusterState;
    use netpol_compile::{Allocations, ClusterRule, Direction, RuleRef, compile};

    fn matrix(state: &ClusterState) -> Matrix {
        Matrix::new(
            state,
            &compile(state, &Allocations::default()),
            &MatrixOptions::default(),
        )
    }

    fn unescape(text: &str) -> String {
        text.replace("&#10;", "\n")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&")
    }

    /// The value of `name="..."` in a tag's text (empty when absent).
    fn attribute(tag: &str, name: &str) -> String {
        let key = format!(" {name}=\"");
        tag.find(&key).map_or_else(String::new, |at| {
            let value = &tag[at + key.len()..];
            unescape(&value[..value.find('"').unwrap()])
        })
    }

    /// Every cell of the page (`<td>` of class `cell` or `void`): (class without the
    /// namespace rule `g`, title).
    fn cells(page: &str) -> Vec<(String, String)> {
        let state = |class: String| {
            let words: Vec<&str> = class.split(' ').filter(|w| *w != "g").collect();
            words.join(" ")
        };
        page.split("<td ")
            .skip(1)
            .map(|rest| format!(" {}", &rest[..rest.find('>').unwrap()]))
            .map(|tag| (state(attribute(&tag, "class")), attribute(&tag, "title")))
            .filter(|(class, _)| class.starts_with("cell ") || class.starts_with("void"))
            .collect()
    }

    /// The one cell whose title starts with `head`.
    fn cell<'a>(cells: &'a [(String, String)], head: &str) -> &'a (String, String) {
        let found: Vec<&(String, String)> = cells
            .iter()
            .filter(|(_, title)| title.starts_with(&format!("{head}:")))
            .collect();
        assert_eq!(found.len(), 1, "{head}: {found:?}");
        found[0]
    }

    #[test]
    fn every_cell_appears_once_with_its_class_and_how_it_was_decided() {
        let m = matrix(&fixtures::stars_with_policies());
        let page = render(&MatrixReport::of(m.clone()), "manifests stars/");
        let drawn = cells(&page);
        let real: Vec<&(String, String)> = drawn
            .iter()
            .filter(|(c, _)| c.starts_with("cell "))
            .collect();
        assert_eq!(real.len(), m.cells().count());
        assert_eq!(real.len(), 12, "four ports, one server, three clients each");
        assert_eq!(drawn.len() - real.len(), 4, "each server and itself");
        for (port, src, dst, reach) in m.cells() {
            let (class, title) = cell(&drawn, &format!("{src} → {dst} {port}"));
            assert_eq!(*class, format!("cell {}", super::class(reach)));
            for d in m.decision(port, src, dst).unwrap() {
                assert!(title.contains(&format!("egress of {src}: {}", d.egress)));
                assert!(title.contains(&format!("ingress of {dst}: {}", d.ingress)));
            }
        }
        assert_eq!(
            cell(&drawn, "client/client → stars/backend TCP/6379").1,
            "client/client → stars/backend TCP/6379: blocked\n\
             egress of client/client: not isolated\n\
             ingress of stars/backend: isolated by NetworkPolicy stars/backend-policy; no rule \
             allows it"
        );
        assert_eq!(
            cell(&drawn, "stars/frontend → stars/backend TCP/6379").1,
            "stars/frontend → stars/backend TCP/6379: allowed\n\
             egress of stars/frontend: not isolated\n\
             ingress of stars/backend: allowed by NetworkPolicy stars/backend-policy \
             spec.ingress[0]"
        );
        let (class, title) = cell(&drawn, "stars/backend → stars/backend TCP/6379");
        assert!(class.starts_with("void"), "{class}");
        assert!(
            title.ends_with("the pod itself (never filtered)"),
            "{title}"
        );
        // Counts written for the script to check, per table and for the page.
        assert!(
            page.contains(
                "<section class=\"port\" id=\"port-1\" data-port=\"TCP/6379\" data-cells=\"3\" \
                 data-allowed=\"1\" data-blocked=\"2\" data-partial=\"0\" data-changed=\"0\""
            ),
            "{page}"
        );
        assert!(page.contains(
            "<p id=\"totals\" class=\"totals\" data-cells=\"12\" data-allowed=\"8\" \
             data-blocked=\"4\" data-partial=\"0\" data-changed=\"0\" data-newly-blocked=\"0\" \
             data-newly-allowed=\"0\">12 cells: 8 allowed, 4 blocked</p>"
        ));
        // Rows and columns are grouped by namespace.
        assert!(page.contains(
            "<tr class=\"group\"><th scope=\"rowgroup\" title=\"namespace management-ui\">\
             management-ui</th><td colspan=\"1\"></td></tr>"
        ));
        assert!(page.contains("<th class=\"src\" scope=\"row\" title=\"stars/frontend&#10;10.0.0.1&#10;serves TCP/80\">frontend</th>"));
        assert!(
            !page.contains("changed by --apply"),
            "no --apply, no changes"
        );
    }

    #[test]
    fn the_cells_apply_changes_are_highlighted_before_and_after_and_counted() {
        let state = fixtures::state(STARS, &[]);
        let compiled = compile(&state, &Allocations::default());
        let before = Matrix::new(&state, &compiled, &MatrixOptions::default());
        let mut overlay = Overlay::default();
        overlay.add_text(STARS_POLICIES, "stars-policies.yaml");
        let after_state = overlay.apply_to(&state);
        let after = Matrix::new(
            &after_state,
            &compile(&after_state, &compiled.allocations),
            &MatrixOptions::default(),
        );
        let report = MatrixReport::applied(before, after);
        let page = render(&report, "manifests stars/ + --apply stars-policies.yaml");
        let drawn = cells(&page);
        let changed: Vec<&(String, String)> = drawn
            .iter()
            .filter(|(c, _)| c.contains("changed"))
            .collect();
        let diff = report.diff.as_ref().unwrap();
        assert_eq!(changed.len(), diff.changes.len());
        assert_eq!(changed.len(), 4);
        for change in &diff.changes {
            let (class, title) = cell(
                &drawn,
                &format!("{} → {} {}", change.src, change.dst, change.port),
            );
            assert_eq!(class, "cell blocked changed newly-blocked was-allowed");
            assert!(
                title.contains(": allowed → blocked with --apply\n"),
                "{title}"
            );
        }
        assert_eq!(
            cell(
                &drawn,
                "management-ui/management-ui → stars/frontend TCP/80"
            )
            .1,
            "management-ui/management-ui → stars/frontend TCP/80: allowed → blocked with \
             --apply\n\
             after --apply:\n\
             \x20 egress of management-ui/management-ui: not isolated\n\
             \x20 ingress of stars/frontend: isolated by NetworkPolicy stars/frontend-policy; no \
             rule allows it\n\
             before:\n\
             \x20 egress of management-ui/management-ui: not isolated\n\
             \x20 ingress of stars/frontend: not isolated"
        );
        // A cell the policies leave allowed is not marked.
        let (class, _) = cell(&drawn, "client/client → stars/frontend TCP/80");
        assert_eq!(class, "cell allowed");
        assert!(page.contains(
            "data-cells=\"12\" data-allowed=\"8\" data-blocked=\"4\" data-partial=\"0\" \
             data-changed=\"4\" data-newly-blocked=\"4\" data-newly-allowed=\"0\""
        ));
        assert!(page.contains("--apply: 4 cells change: 4 newly blocked, 0 newly allowed"));
        assert!(page.contains(
            "<h2>TCP/80 <small>1 destination</small></h2>\n<p class=\"counts\">3 cells: 1 \
             allowed, 2 blocked; 2 changed by --apply (2 newly blocked, 0 newly allowed)</p>"
        ));
        assert!(
            page.contains("changed by --apply"),
            "the legend shows changes"
        );
    }

    #[test]
    fn a_cell_allowed_over_one_family_only_is_partial_and_says_which() {
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
        let page = render(&MatrixReport::of(matrix(&state)), "dual");
        let drawn = cells(&page);
        let (class, title) = cell(&drawn, "x/a → x/b TCP/80");
        assert_eq!(class, "cell partial");
        assert_eq!(
            title,
            "x/a → x/b TCP/80: allowed over one address family only\n\
             over IPv4: allowed\n\
             \x20 egress of x/a: allowed by NetworkPolicy x/v4-only spec.egress[0]\n\
             \x20 ingress of x/b: not isolated\n\
             over IPv6: blocked\n\
             \x20 egress of x/a: isolated by NetworkPolicy x/v4-only; no rule allows it\n\
             \x20 ingress of x/b: not isolated"
        );
        assert!(page.contains("data-partial=\"1\""));
        assert!(page.contains("allowed over one address family only (dual-stack pods)"));

        let compiled = compile(&state, &Allocations::default());
        let options = MatrixOptions {
            family: Some(AddressFamily::Ipv6),
            ..MatrixOptions::default()
        };
        let v6 = Matrix::new(&state, &compiled, &options);
        let page = render(&MatrixReport::of(v6), "dual");
        assert!(page.contains(" · over IPv6 only</p>"), "{page}");
        assert!(
            !page.contains("dual-stack pods"),
            "one family: no ~ in the legend"
        );
        assert_eq!(cell(&cells(&page), "x/a → x/b TCP/80").0, "cell blocked");
    }

    #[test]
    fn names_from_users_are_escaped_everywhere() {
        let hostile = ObjectRef::new(
            "x\"><img src=y onerror=alert(1)>",
            "<script>alert(2)</script>",
        );
        let other = ObjectRef::new("ok", "b'c&d");
        let port = PortProtocol::tcp(80);
        let np = RuleRef::network_policy(
            ObjectRef::new("x", "</script><script>alert(3)</script>"),
            Direction::Ingress,
            0,
        );
        let cnp = RuleRef {
            policy: ObjectRef::new("", "<b>cnp</b>"),
            direction: Direction::Egress,
            index: 0,
            cluster: Some(ClusterRule {
                tier: Tier::Admin,
                priority: 1,
                action: Action::Deny,
                name: Some("<i>rule</i>".into()),
            }),
        };
        let hook = |verdict| HookDecision {
            verdict,
            isolated_by: Vec::new(),
        };
        let m = Matrix {
            family: None,
            pods: vec![
                MatrixPod {
                    pod: hostile.clone(),
                    ips: vec!["10.0.0.1".parse().unwrap()],
                    serves: vec![port],
                },
                MatrixPod {
                    pod: other.clone(),
                    ips: vec!["10.0.0.2".parse().unwrap()],
                    serves: vec![port],
                },
            ],
            tables: vec![PortTable {
                port,
                destinations: vec![0, 1],
                cells: vec![
                    vec![None, Some(Reach::Blocked)],
                    vec![Some(Reach::Allowed), None],
                ],
                decided: vec![vec![None, Some(0)], vec![Some(1), None]],
            }],
            decisions: vec![
                vec![CellDecision {
                    families: vec![AddressFamily::Ipv4],
                    allowed: false,
                    egress: hook(HookVerdict::ClusterDenied { rule: cnp }),
                    ingress: HookDecision {
                        verdict: HookVerdict::Denied,
                        isolated_by: vec![ObjectRef::new("ok", "<u>iso</u>")],
                    },
                }],
                vec![CellDecision {
                    families: vec![AddressFamily::Ipv4],
                    allowed: true,
                    egress: hook(HookVerdict::NotIsolated),
                    ingress: hook(HookVerdict::Allowed { rule: np }),
                }],
            ],
            skipped: vec![SkippedPod {
                pod: ObjectRef::new("<ns>", "<em>gone</em>"),
                reason: "<why>".into(),
            }],
        };
        let page = render(&MatrixReport::of(m), "manifests <dir>&\"");
        // Our own script is the only one, and nothing a name carries became markup.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
        assert_eq!(page.matches("</script>").count(), 1, "{page}");
        for markup in [
            "<img", "<b>cnp", "<i>", "<u>", "<em>", "<ns>", "<why>", "<dir>",
        ] {
            assert!(!page.contains(markup), "{markup} in {page}");
        }
        assert!(page.contains("&lt;script&gt;alert(2)&lt;/script&gt;"));
        // And it all reads back as the names were.
        let drawn = cells(&page);
        let (class, title) = cell(&drawn, &format!("{hostile} → {other} TCP/80"));
        assert_eq!(class, "cell blocked");
        assert!(
            title.contains(
                "egress of x\"><img src=y onerror=alert(1)>/<script>alert(2)</script>: dropped by \
             ClusterNetworkPolicy/<b>cnp</b> (Admin, priority 1) egress rule \"<i>rule</i>\""
            ),
            "{title}"
        );
        assert!(title.contains("isolated by NetworkPolicy ok/<u>iso</u>; no rule allows it"));
        let (_, title) = cell(&drawn, &format!("{other} → {hostile} TCP/80"));
        assert!(title.contains("allowed by NetworkPolicy x/</script><script>alert(3)</script>"));
        assert!(page.contains("<li><b>&lt;ns&gt;/&lt;em&gt;gone&lt;/em&gt;</b>: &lt;why&gt;</li>"));
        assert!(page.contains("manifests &lt;dir&gt;&amp;&quot;"));
    }

    #[test]
    fn the_page_is_self_contained() {
        let page = render(
            &MatrixReport::of(matrix(&fixtures::stars_with_policies())),
            "stars",
        );
        assert!(page.starts_with("<!DOCTYPE html>\n"));
        assert!(page.ends_with("</html>\n"));
        for external in [
            "://",
            "<link",
            " src=",
            "url(",
            "@import",
            "fetch(",
            "XMLHttpRequest",
        ] {
            assert!(!page.contains(external), "{external}");
        }
        assert!(!SCRIPT.contains("</script") && !STYLE.contains("</style"));
    }

    #[test]
    fn empty_matrices_say_so() {
        let page = render(&MatrixReport::of(matrix(&ClusterState::default())), "empty");
        assert!(page.contains("No pods with addresses: nothing to show."));
        assert!(page.contains("data-cells=\"0\""));

        let state = fixtures::stars_with_policies();
        let options = MatrixOptions {
            ports: vec![PortProtocol::udp(53)],
            ..MatrixOptions::default()
        };
        let m = Matrix::new(&state, &compile(&state, &Allocations::default()), &options);
        let page = render(&MatrixReport::of(m), "stars");
        assert!(page.contains("<h2>UDP/53 <small>0 destinations</small></h2>"));
        assert!(page.contains("No pod declares this port"));
        assert!(cells(&page).is_empty());
    }
}
