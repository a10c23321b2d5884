//! What a person reads: one line per case, and for failures the expected and observed
//! truth tables side by side (like the upstream e2e suite), wrong cells marked.

use std::collections::BTreeSet;

use super::case::Verdict;
use super::{CaseResult, ExpectResult};
use crate::ui;

pub fn print_case_line(done: usize, total: usize, result: &CaseResult) {
    let width = total.to_string().len();
    let status = if result.passed {
        ui::green("PASS")
    } else if result.skipped.is_some() {
        ui::dim("SKIP")
    } else {
        ui::red("FAIL")
    };
    let detail = match (&result.error, result.passed) {
        _ if result.skipped.is_some() => {
            format!(
                "  {}",
                ui::dim(result.skipped.as_deref().unwrap_or_default())
            )
        }
        (Some(error), _) => format!("  {}", ui::red(error.lines().next().unwrap_or_default())),
        (None, true) => String::new(),
        (None, false) => {
            let wrong: usize = result
                .steps
                .iter()
                .flat_map(|s| &s.expects)
                .map(ExpectResult::wrong)
                .sum();
            format!("  {} of {} probes wrong", wrong, result.probes)
        }
    };
    println!(
        "[{done:>width$}/{total}] {status} {} {}{detail}",
        result.name,
        ui::dim(&format!(
            "({} probes, {:.1}s)",
            result.probes, result.seconds
        )),
    );
}

fn symbol(allowed: Option<bool>) -> &'static str {
    match allowed {
        Some(true) => "✓",
        Some(false) => "✗",
        None => "·",
    }
}

/// Prints the truth tables of every expectation of `result` that has wrong cells.
pub fn print_failure(result: &CaseResult) {
    println!("  {} {}", ui::dim("file"), result.file.display());
    if let Some(error) = &result.error {
        for line in error.lines() {
            println!("  {}", ui::red(line));
        }
    }
    for step in &result.steps {
        for expect in step.expects.iter().filter(|e| e.wrong() > 0) {
            println!();
            println!(
                "  {}",
                ui::bold(&format!(
                    "step {}, {}/{} over {}: {} wrong",
                    step.index,
                    expect.protocol,
                    expect.port,
                    expect.family,
                    expect.wrong()
                ))
            );
            print_tables(expect);
            for cell in expect.cells.iter().filter(|c| !c.ok) {
                let want = match cell.expected {
                    Verdict::Allowed => "allowed",
                    Verdict::Blocked => "blocked",
                };
                println!(
                    "    {} -> {} over {}: expected {want}, observed {}",
                    cell.src,
                    cell.dst,
                    expect.family,
                    ui::red(&cell.observed)
                );
            }
        }
    }
    if let Some(log) = &result.agent_log {
        println!();
        println!("  {}", ui::dim("agent log (last lines):"));
        for line in log.lines() {
            println!("    {}", ui::dim(line));
        }
    }
    println!();
}

fn print_tables(expect: &ExpectResult) {
    let sources: BTreeSet<&str> = expect.cells.iter().map(|c| c.src.as_str()).collect();
    let destinations: BTreeSet<&str> = expect.cells.iter().map(|c| c.dst.as_str()).collect();
    let sources: Vec<&str> = sources.into_iter().collect();
    let destinations: Vec<&str> = destinations.into_iter().collect();
    let row_width = sources.iter().map(|s| s.len()).max().unwrap_or(0).max(9);
    let col_width = destinations
        .iter()
        .map(|d| d.len())
        .max()
        .unwrap_or(0)
        .max(3);
    let cell = |src: &str, dst: &str| expect.cells.iter().find(|c| c.src == src && c.dst == dst);

    let table_width = row_width + destinations.len() * (col_width + 1);
    let header = |title: &str| format!("{title:<table_width$}");
    println!(
        "    {}   {}",
        header("expected"),
        header("observed (* = wrong)")
    );
    let mut columns = format!("{:<row_width$}", "from\\to");
    for dst in &destinations {
        columns.push_str(&format!(" {dst:^col_width$}"));
    }
    println!("    {columns}   {columns}");
    for src in &sources {
        let mut expected = format!("{src:<row_width$}");
        let mut observed = format!("{src:<row_width$}");
        for dst in &destinations {
            match cell(src, dst) {
                Some(c) => {
                    let want = symbol(Some(c.expected == Verdict::Allowed));
                    let got = match c.observed.as_str() {
                        "allowed" => "✓",
                        "blocked" => "✗",
                        _ => "!",
                    };
                    expected.push_str(&format!(" {want:^col_width$}"));
                    let text = if c.ok {
                        got.to_owned()
                    } else {
                        format!("{got}*")
                    };
                    let padded = format!(" {text:^col_width$}");
                    observed.push_str(&if c.ok { padded } else { ui::red(&padded) });
                }
                None => {
                    let blank = format!(" {:^col_width$}", symbol(None));
                    expected.push_str(&blank);
                    observed.push_str(&blank);
                }
            }
        }
        println!("    {expected}   {observed}");
    }
    println!(
        "    {}",
        ui::dim(
            "✓ allowed  ✗ blocked  ! one-way or rejected  · not probed (itself, or the port is not served)"
        )
    );
}
