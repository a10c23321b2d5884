//! Running kubectl and docker: every command bounded by a deadline, its output
//! collected, kubectl with a fixed context.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// What a finished command printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// `program args...` as one line, for messages.
pub fn command_line(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_owned())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command with a deadline, `stdin` written to it; fails only when it cannot be
/// started or times out (it is killed then).
pub fn output(
    program: &str,
    args: &[String],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    let writer = stdin.map(|text| {
        let mut pipe = child.stdin.take().expect("piped");
        let text = text.to_owned();
        std::thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        })
    });
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped")));
    let stderr = read(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` timed out after {timeout:?}",
                command_line(program, args)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    Ok(Output {
        success: status.success(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Like [`output`], but fails with the command's stderr unless it succeeds; returns
/// stdout.
pub fn exec(
    program: &str,
    args: &[String],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let out = output(program, args, stdin, timeout)?;
    if !out.success {
        bail!(
            "`{}` failed: {}",
            command_line(program, args),
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// Owned arguments.
pub(super) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// kubectl with a fixed context.
#[derive(Clone, Debug, Default)]
pub struct Kubectl {
    pub context: Option<String>,
}

impl Kubectl {
    /// The full argument list: `--context C` first when set.
    pub fn args(&self, rest: &[&str]) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(context) = &self.context {
            args.push("--context".to_owned());
            args.push(context.clone());
        }
        args.extend(strings(rest));
        args
    }

    pub fn run(&self, rest: &[&str]) -> Result<String> {
        exec("kubectl", &self.args(rest), None, Duration::from_secs(120))
    }

    /// `kubectl <rest> -f -` with `objects` as a List on stdin.
    pub fn with_objects(&self, rest: &[&str], objects: &[Value]) -> Result<String> {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let mut rest = rest.to_vec();
        rest.extend(["-f", "-"]);
        exec(
            "kubectl",
            &self.args(&rest),
            Some(&list.to_string()),
            Duration::from_secs(120),
        )
    }
}

/// `docker args...` (two minutes at most): its stdout.
pub(super) fn docker(args: &[&str]) -> Result<String> {
    exec("docker", &strings(args), None, Duration::from_secs(120))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_time_out_and_report_output() {
        let out = output(
            "sh",
            &strings(&["-c", "cat; echo oops >&2; exit 3"]),
            Some("in"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            out,
            Output {
                success: false,
                stdout: "in".into(),
                stderr: "oops\n".into()
            }
        );
        let started = Instant::now();
        let err = output("sleep", &strings(&["5"]), None, Duration::from_millis(200)).unwrap_err();
        assert!(format!("{err}").contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let err = exec(
            "sh",
            &strings(&["-c", "echo bad >&2; false"]),
            None,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(format!("{err}").ends_with("failed: bad"), "{err}");
    }
}
