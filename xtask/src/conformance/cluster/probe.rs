//! Probes: the `agnhost connect` command lines (through `kubectl exec` from pods,
//! `docker exec` from hosts), what their results mean, and running them a bounded number
//! at a time.

use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;

use super::PROBE_CONTAINER;
use super::command::{Kubectl, Output, output, strings};
use crate::conformance::case;
use netpol_lab::{self as lab, Outcome};

fn lab_protocol_word(protocol: lab::Protocol) -> &'static str {
    match protocol {
        lab::Protocol::Tcp => "tcp",
        lab::Protocol::Udp => "udp",
        lab::Protocol::Sctp => "sctp",
    }
}

/// `/agnhost connect IP:PORT --protocol=P --timeout=Nms`, as the upstream e2e suite
/// probes: TCP succeeds on a completed handshake, UDP when the datagram's reply comes
/// back, SCTP when the association is up and the server's message arrives.
pub fn agnhost_connect(
    ip: Ipv4Addr,
    port: u16,
    protocol: lab::Protocol,
    timeout: Duration,
) -> Vec<String> {
    vec![
        "/agnhost".into(),
        "connect".into(),
        format!("{ip}:{port}"),
        format!("--protocol={}", lab_protocol_word(protocol)),
        format!("--timeout={}ms", timeout.as_millis()),
    ]
}

/// `kubectl exec` of a probe from pod `ns/pod`: (program, arguments).
pub fn pod_probe_command(
    kubectl: &Kubectl,
    src: &str,
    connect: &[String],
) -> Result<(&'static str, Vec<String>)> {
    let (ns, pod) = case::split_pod(src)?;
    let mut args = kubectl.args(&["exec", "-n", ns, pod, "-c", PROBE_CONTAINER, "--"]);
    args.extend(connect.iter().cloned());
    Ok(("kubectl", args))
}

/// `docker exec` of a probe from a host container: (program, arguments).
pub fn host_probe_command(container: &str, connect: &[String]) -> (&'static str, Vec<String>) {
    let mut args = strings(&["exec", container]);
    args.extend(connect.iter().cloned());
    ("docker", args)
}

/// What a probe's command observed. agnhost exits 0 on success and otherwise prints
/// `TIMEOUT`, `REFUSED`, `DNS`, `OTHER` or `UNKNOWN` first on a line of stderr; only a
/// timeout is a block (a policy drops silently), anything else means the setup is
/// broken, including kubectl or docker failing before agnhost ran.
pub fn parse_probe(out: &Output) -> Outcome {
    if out.success {
        return Outcome::Allowed;
    }
    const CODES: [&str; 5] = ["TIMEOUT", "REFUSED", "DNS", "OTHER", "UNKNOWN"];
    let agnhost = out.stderr.lines().map(str::trim).find(|line| {
        CODES.iter().any(|c| {
            line.strip_prefix(c)
                .is_some_and(|r| r.is_empty() || r.starts_with(':'))
        })
    });
    match agnhost {
        Some(line) if line.starts_with("TIMEOUT") => Outcome::Blocked,
        Some(line) => Outcome::Rejected(line.to_owned()),
        None => {
            let first = out
                .stderr
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("command terminated with exit code"))
                .unwrap_or("failed without a message");
            Outcome::Rejected(format!("probe did not run: {first}"))
        }
    }
}

/// Runs `commands` (program, arguments), at most `parallel` at once, each bounded by
/// `timeout`; one outcome each, in order.
pub(super) fn run_probes(
    commands: Vec<(&'static str, Vec<String>)>,
    parallel: usize,
    timeout: Duration,
) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(vec![None; commands.len()]);
    std::thread::scope(|scope| {
        for _ in 0..parallel.clamp(1, commands.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((program, args)) = commands.get(i) else {
                        return;
                    };
                    let outcome = match output(program, args, None, timeout) {
                        Ok(out) => parse_probe(&out),
                        Err(e) => Outcome::Rejected(format!("{e:#}")),
                    };
                    results.lock().expect("not poisoned")[i] = Some(outcome);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("not poisoned")
        .into_iter()
        .map(|o| o.expect("every probe ran"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use super::super::command::command_line;
    use super::super::workspace;
    use crate::conformance::case::{Case, ClusterPlan};
    use crate::conformance::check_step;

    #[test]
    fn probe_command_lines() {
        let kubectl = Kubectl {
            context: Some("kind-netpol-e2e".into()),
        };
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        let connect = agnhost_connect(ip, 81, lab::Protocol::Udp, Duration::from_secs(2));
        let (program, args) = pod_probe_command(&kubectl, "x/a", &connect).unwrap();
        assert_eq!(
            command_line(program, &args),
            "kubectl --context kind-netpol-e2e exec -n x a -c probe -- \
             /agnhost connect 10.244.1.7:81 --protocol=udp --timeout=2000ms"
        );
        let connect = agnhost_connect(ip, 80, lab::Protocol::Sctp, Duration::from_millis(1500));
        let (program, args) = host_probe_command("netpol-conformance-backup", &connect);
        assert_eq!(
            command_line(program, &args),
            "docker exec netpol-conformance-backup /agnhost connect 10.244.1.7:80 --protocol=sctp --timeout=1500ms"
        );
        let connect = agnhost_connect(ip, 80, lab::Protocol::Tcp, Duration::from_secs(1));
        let (_, args) = pod_probe_command(&Kubectl::default(), "default/db", &connect).unwrap();
        assert_eq!(args[..6], ["exec", "-n", "default", "db", "-c", "probe"]);
        assert!(args.contains(&"--protocol=tcp".to_owned()));
        assert!(pod_probe_command(&kubectl, "nopod", &connect).is_err());
    }

    fn failed(stderr: &str) -> Output {
        Output {
            success: false,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn probe_results() {
        let ok = Output {
            success: true,
            ..Output::default()
        };
        assert_eq!(parse_probe(&ok), Outcome::Allowed);
        assert_eq!(
            parse_probe(&failed("TIMEOUT\ncommand terminated with exit code 1\n")),
            Outcome::Blocked
        );
        assert_eq!(
            parse_probe(&failed(
                "TIMEOUT: read udp 10.244.1.3:40001->10.244.2.4:80: i/o timeout\n"
            )),
            Outcome::Blocked
        );
        assert_eq!(
            parse_probe(&failed("REFUSED\ncommand terminated with exit code 1\n")),
            Outcome::Rejected("REFUSED".into())
        );
        assert_eq!(
            parse_probe(&failed(
                "OTHER: dial tcp 10.244.2.4:80: connect: no route to host\n"
            )),
            Outcome::Rejected("OTHER: dial tcp 10.244.2.4:80: connect: no route to host".into())
        );
        // kubectl failing before agnhost runs is not a block.
        let outcome = parse_probe(&failed(
            "Error from server (NotFound): pods \"a\" not found\n",
        ));
        assert_eq!(
            outcome,
            Outcome::Rejected(
                "probe did not run: Error from server (NotFound): pods \"a\" not found".into()
            )
        );
        assert!(!outcome.matches(false) && !outcome.matches(true));
        // A word merely starting like a code is not one.
        assert!(matches!(
            parse_probe(&failed("TIMEOUTS happen\n")),
            Outcome::Rejected(_)
        ));
    }

    #[test]
    fn probes_run_in_order_with_a_bound() {
        let commands = vec![
            ("sh", strings(&["-c", "sleep 0.2"])),
            ("sh", strings(&["-c", "echo TIMEOUT >&2; exit 1"])),
            ("sh", strings(&["-c", "echo REFUSED >&2; exit 1"])),
            ("sleep", strings(&["5"])),
        ];
        let outcomes = run_probes(commands, 2, Duration::from_secs(1));
        assert_eq!(
            outcomes[..3],
            [
                Outcome::Allowed,
                Outcome::Blocked,
                Outcome::Rejected("REFUSED".into())
            ]
        );
        assert!(matches!(&outcomes[3], Outcome::Rejected(e) if e.contains("timed out")));
    }

    /// The shared comparison with this backend's outcomes: a case's first step against
    /// probes that all connect fails exactly the cells its policy blocks.
    #[test]
    fn steps_are_checked_by_the_shared_code() {
        let file = workspace().join("../shared/conformance/cases/default-deny-ingress.yaml");
        let Ok(case) = Case::load(&file) else {
            eprintln!("skipped: no shared cases at {}", file.display());
            return;
        };
        let plan = ClusterPlan::of(&case).unwrap();
        let endpoints: Vec<crate::conformance::Endpoint> = plan
            .pods
            .iter()
            .map(|p| {
                let serves = p
                    .ports
                    .iter()
                    .map(|q| (q.port, crate::conformance::lab_protocol(q.protocol)));
                crate::conformance::Endpoint::new(p.name.clone(), serves.collect())
            })
            .collect();
        let step = &case.steps[0];
        let result = check_step(step, 1, &endpoints, |probes| {
            Ok(probes
                .iter()
                .map(|_| {
                    parse_probe(&Output {
                        success: true,
                        ..Output::default()
                    })
                })
                .collect())
        })
        .unwrap();
        let expected_blocked: usize = step
            .expect
            .iter()
            .map(|e| {
                let cells = result.expects.iter().find(|r| r.port == e.port).unwrap();
                cells
                    .cells
                    .iter()
                    .filter(|c| e.verdict(&c.src, &c.dst) == case::Verdict::Blocked)
                    .count()
            })
            .sum();
        let wrong: usize = result.expects.iter().map(|e| e.wrong()).sum();
        assert!(expected_blocked > 0);
        assert_eq!(wrong, expected_blocked);
    }
}
