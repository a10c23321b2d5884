//! Console output for people: headings, check marks, colours when stdout is a terminal
//! (and `NO_COLOR` is unset).

use std::io::IsTerminal;
use std::sync::OnceLock;

/// Whether stdout gets ANSI colours.
pub fn color() -> bool {
    static COLOR: OnceLock<bool> = OnceLock::new();
    *COLOR.get_or_init(|| std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
}

fn paint(code: &str, s: &str) -> String {
    if color() {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_owned()
    }
}

pub fn green(s: &str) -> String {
    paint("32", s)
}

pub fn red(s: &str) -> String {
    paint("31", s)
}

pub fn yellow(s: &str) -> String {
    paint("1;33", s)
}

pub fn bold(s: &str) -> String {
    paint("1", s)
}

pub fn dim(s: &str) -> String {
    paint("2", s)
}

/// A section heading: `▶ text`.
pub fn step(text: &str) {
    println!("{} {}", bold("▶"), bold(text));
}

/// An item that was already in place.
pub fn ok(text: &str) {
    println!("  {} {text}", green("✓"));
}

/// An item being changed.
pub fn doing(text: &str) {
    println!("  {} {text}", yellow("→"));
}

/// Something left undone that must not go unnoticed.
pub fn warn(text: &str) {
    println!("  {} {}", yellow("!"), yellow(text));
}

/// A plain indented note.
pub fn note(text: &str) {
    println!("  {text}");
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_are_separated_by_commas() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
