//! Reachability matrices for people: rows are sources, columns are destinations
//! (`pod:port`), cells show what the probe observed and whether it was expected.

use std::collections::HashMap;
use std::fmt::Write;

use netpol_lab::{Outcome, Probe, ProbeResult};

use crate::ui;

/// One column: a destination endpoint and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Column {
    pub dst: String,
    pub port: u16,
    pub protocol: netpol_lab::Protocol,
}

impl Column {
    fn title(&self) -> String {
        match self.protocol {
            netpol_lab::Protocol::Tcp => format!("{}:{}", self.dst, self.port),
            p => format!("{}:{}/{p}", self.dst, self.port),
        }
    }
}

/// A cell: the observation and, if known, the expectation (`true` = allowed).
#[derive(Clone, Debug)]
pub struct Cell {
    pub outcome: Outcome,
    pub expected: Option<bool>,
}

impl Cell {
    pub fn is_mismatch(&self) -> bool {
        self.expected.is_some_and(|e| !self.outcome.matches(e))
    }
}

/// A matrix of probe results.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: Vec<String>,
    pub columns: Vec<Column>,
    cells: HashMap<(usize, usize), Cell>,
}

/// A cell that did not match its expectation.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub src: String,
    pub column: Column,
    pub expected: bool,
    pub outcome: Outcome,
}

impl Matrix {
    /// Probes for every (row, column) pair except an endpoint probing itself.
    pub fn probes(rows: &[String], columns: &[Column]) -> Vec<Probe> {
        rows.iter()
            .flat_map(|src| {
                columns
                    .iter()
                    .filter(move |c| &c.dst != src)
                    .map(move |c| Probe::new(src.clone(), c.dst.clone(), c.port, c.protocol))
            })
            .collect()
    }

    /// Builds the matrix from results; `expect(src, column)` gives the expectation.
    pub fn new(
        rows: Vec<String>,
        columns: Vec<Column>,
        results: &[ProbeResult],
        expect: impl Fn(&str, &Column) -> Option<bool>,
    ) -> Self {
        let mut cells = HashMap::new();
        for r in results {
            let p = &r.probe;
            let Some(ri) = rows.iter().position(|s| *s == p.src) else {
                continue;
            };
            let Some(ci) = columns
                .iter()
                .position(|c| c.dst == p.dst && c.port == p.port && c.protocol == p.protocol)
            else {
                continue;
            };
            let expected = expect(&p.src, &columns[ci]);
            cells.insert(
                (ri, ci),
                Cell {
                    outcome: r.outcome.clone(),
                    expected,
                },
            );
        }
        Self {
            rows,
            columns,
            cells,
        }
    }

    pub fn cell(&self, src: &str, column: &Column) -> Option<&Cell> {
        let ri = self.rows.iter().position(|s| s == src)?;
        let ci = self.columns.iter().position(|c| c == column)?;
        self.cells.get(&(ri, ci))
    }

    /// Number of cells with an expectation.
    pub fn checked(&self) -> usize {
        self.cells.values().filter(|c| c.expected.is_some()).count()
    }

    pub fn mismatches(&self) -> Vec<Mismatch> {
        let mut out = Vec::new();
        for (ri, src) in self.rows.iter().enumerate() {
            for (ci, column) in self.columns.iter().enumerate() {
                if let Some(cell) = self.cells.get(&(ri, ci))
                    && let Some(expected) = cell.expected
                    && cell.is_mismatch()
                {
                    out.push(Mismatch {
                        src: src.clone(),
                        column: column.clone(),
                        expected,
                        outcome: cell.outcome.clone(),
                    });
                }
            }
        }
        out
    }

    /// The table, e.g.
    ///
    /// ```text
    ///   from \ to        stars/frontend:80  stars/backend:6379
    ///   stars/frontend          -                  ✓
    ///   client/client           ✓                 [✗]
    /// ```
    ///
    /// `✓` allowed, `✗` blocked, `↛` one-way (reply lost), `!` rejected, `-` not probed
    /// (an endpoint and itself); brackets mark cells that differ from the expectation.
    pub fn render(&self) -> String {
        let corner = "from \\ to";
        let row_w = self
            .rows
            .iter()
            .map(|r| r.chars().count())
            .chain([corner.len()])
            .max()
            .unwrap_or(0);
        let titles: Vec<String> = self.columns.iter().map(Column::title).collect();
        let mut out = String::new();
        let _ = write!(out, "  {}", ui::dim(&format!("{corner:<row_w$}")));
        for t in &titles {
            let _ = write!(out, "  {}", ui::bold(t));
        }
        out.push('\n');
        for (ri, row) in self.rows.iter().enumerate() {
            let _ = write!(out, "  {row:<row_w$}");
            for (ci, t) in titles.iter().enumerate() {
                let w = t.chars().count();
                let (text, painted) = match self.cells.get(&(ri, ci)) {
                    None => ("-".to_string(), ui::dim("-")),
                    Some(cell) => {
                        let sym = match cell.outcome {
                            Outcome::Allowed => "✓",
                            Outcome::Blocked => "✗",
                            Outcome::OneWay => "↛",
                            Outcome::Rejected(_) => "!",
                        };
                        if cell.is_mismatch() {
                            let s = format!("[{sym}]");
                            (s.clone(), ui::yellow(&s))
                        } else if cell.outcome.is_allowed() {
                            (sym.to_string(), ui::green(sym))
                        } else {
                            (sym.to_string(), ui::red(sym))
                        }
                    }
                };
                // Centre the symbol under the column title.
                let len = text.chars().count();
                let left = (w.saturating_sub(len)) / 2;
                let right = w.saturating_sub(len + left);
                let _ = write!(out, "  {}{painted}{}", " ".repeat(left), " ".repeat(right));
            }
            out.truncate(out.trim_end_matches(' ').len());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_lab::Protocol;
    use std::time::Duration;

    fn result(src: &str, dst: &str, port: u16, outcome: Outcome) -> ProbeResult {
        ProbeResult {
            probe: Probe::tcp(src, dst, port),
            outcome,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn mismatches_and_render() {
        let rows = vec!["a/x".to_string(), "b/y".to_string()];
        let columns = vec![
            Column {
                dst: "a/x".into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Column {
                dst: "b/y".into(),
                port: 53,
                protocol: Protocol::Udp,
            },
        ];
        let probes = Matrix::probes(&rows, &columns);
        assert_eq!(probes.len(), 2, "self probes are skipped");
        let mut results = vec![
            result("a/x", "b/y", 53, Outcome::Allowed),
            result("b/y", "a/x", 80, Outcome::Allowed),
        ];
        results[0].probe.protocol = Protocol::Udp;
        let m = Matrix::new(rows, columns.clone(), &results, |src, _| Some(src == "a/x"));
        let mism = m.mismatches();
        assert_eq!(mism.len(), 1);
        assert_eq!(mism[0].src, "b/y");
        assert_eq!(m.checked(), 2);
        let text = m.render();
        assert!(text.contains("[✓]"), "{text}");
        assert!(text.contains("b/y:53/UDP"), "{text}");
    }
}
