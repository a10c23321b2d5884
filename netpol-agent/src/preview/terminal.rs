//! Writing the answers to a terminal or a pipe, for the command-line tools
//! (`netpol-agent explain|matrix`, `kubectl netpol`).

use std::io::IsTerminal as _;

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error, any other write
/// error ends the process with a one-line message.
pub fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing the output: {error}");
        std::process::exit(1);
    }
}

/// Colours only on a terminal, and never with `NO_COLOR` set (https://no-color.org).
pub fn color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
