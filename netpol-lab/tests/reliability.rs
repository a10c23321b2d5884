//! Tier 3: restarts without a gap. The agent is killed with SIGKILL and restarted again
//! and again while a long TCP stream runs through an isolated pod and blocked probes are
//! fired: no blocked probe may ever get through, and the stream may never break.

mod support;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use netpol_lab::{AgentProcess, ManifestDir, NetnsWorker, Probe};
use support::{AGENT_TIMEOUT, agent_bin, standard_lab};

const STREAM_PORT: u16 = 7000;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: a}}}]
      ports: [{port: 7000}, {port: 80}]
"#;

const CYCLES: usize = 20;
/// A blocked probe waits this long for a handshake that must never come.
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(300);

fn start(lab: &netpol_lab::Lab, agent: &std::path::Path, manifests: &ManifestDir) -> AgentProcess {
    let source = [
        OsString::from("--manifests"),
        manifests.path().as_os_str().to_owned(),
    ];
    let mut process =
        AgentProcess::start_with_source(lab, agent, &source).expect("starting the agent");
    process
        .wait_generation(manifests.generation(), AGENT_TIMEOUT)
        .expect("the agent applied the manifests");
    process
}

#[test]
fn kill_9_and_restart_twenty_times_without_a_gap() {
    let Some(agent_path) = agent_bin("kill_9_and_restart_twenty_times_without_a_gap") else {
        return;
    };
    let lab = standard_lab(&["x/a", "x/b", "x/c"]);
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
    manifests.write(&lab, POLICY).expect("manifests");
    let mut agent = start(&lab, &agent_path, &manifests);

    // A long TCP stream x/a -> x/b:7000: an echo server in x/b, a client in x/a that
    // sends a numbered message every 10 ms and checks each echo.
    let b = lab.pod("x/b").expect("x/b");
    let server_addr = SocketAddr::new(b.v4().into(), STREAM_PORT);
    let server_worker = NetnsWorker::spawn(&b.netns).expect("x/b worker");
    let listener = server_worker
        .run(move || TcpListener::bind(server_addr))
        .expect("worker")
        .expect("binding the stream server");
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 8];
            while conn.read_exact(&mut buf).is_ok() && conn.write_all(&buf).is_ok() {}
        }
    });
    let client_worker =
        NetnsWorker::spawn(&lab.pod("x/a").expect("x/a").netns).expect("x/a worker");
    let mut stream = client_worker
        .run(move || TcpStream::connect_timeout(&server_addr, Duration::from_secs(2)))
        .expect("worker")
        .expect("x/a opens the stream (allowed by the policy)");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let exchanged = Arc::new(AtomicU64::new(0));
    let streamer = {
        let (stop, exchanged) = (stop.clone(), exchanged.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                stream
                    .write_all(&n.to_be_bytes())
                    .map_err(|e| format!("write {n}: {e}"))?;
                let mut echo = [0u8; 8];
                stream
                    .read_exact(&mut echo)
                    .map_err(|e| format!("echo {n}: {e}"))?;
                if u64::from_be_bytes(echo) != n {
                    return Err(format!(
                        "echo {n} came back as {}",
                        u64::from_be_bytes(echo)
                    ));
                }
                exchanged.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
    };

    let blocked = [
        Probe::tcp("x/c", "x/b", 80),
        Probe::tcp("x/c", "x/b", STREAM_PORT),
        Probe::tcp("x/a", "x/b", 81),
        Probe::udp("x/c", "x/b", 80),
    ];
    let mut leaks = Vec::new();
    let mut fire = |when: &str| {
        for result in lab.probe_all(&blocked, BLOCKED_TIMEOUT).expect("probes") {
            if !result.outcome.is_blocked() {
                leaks.push(format!("{when}: {} was {}", result.probe, result.outcome));
            }
        }
    };
    fire("before the first crash");
    let started = Instant::now();
    for cycle in 1..=CYCLES {
        agent.crash().expect("kill -9");
        fire(&format!("cycle {cycle}, agent down"));
        agent = start(&lab, &agent_path, &manifests);
        fire(&format!("cycle {cycle}, agent back"));
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let stream_result = streamer.join().expect("stream thread");

    assert!(
        leaks.is_empty(),
        "blocked probes got through:\n{}",
        leaks.join("\n")
    );
    assert_eq!(stream_result, Ok(()), "the stream broke");
    let messages = exchanged.load(Ordering::Relaxed);
    assert!(
        messages > 50,
        "the stream made progress: {messages} messages in {elapsed:?}"
    );
    // Allowed traffic still flows after the last restart.
    let allowed = lab
        .probe(&Probe::tcp("x/a", "x/b", 80), Duration::from_secs(1))
        .expect("probe");
    assert!(
        allowed.outcome.is_allowed(),
        "x/a -> x/b:80 after the restarts: {}",
        allowed.outcome
    );
    eprintln!(
        "{CYCLES} kill -9 / restart cycles in {elapsed:.1?}: {messages} stream messages, 0 leaks"
    );
    drop(agent);
}

/// A supervisor that starts the agent with SIGTERM blocked (the mask is inherited across
/// exec) must still be able to stop it: the agent unblocks its stop signals, so SIGTERM
/// ends it cleanly (`--on-exit detach`: its pinned programs and maps removed) instead of
/// leaving it running until SIGKILL.
#[test]
fn an_agent_started_with_sigterm_blocked_still_stops_on_sigterm() {
    use nix::sys::signal::{SigSet, Signal};
    let Some(agent_path) = agent_bin("an_agent_started_with_sigterm_blocked_still_stops") else {
        return;
    };
    let lab = standard_lab(&["x/a"]);
    let mut manifests = ManifestDir::create(lab.workdir().join("manifests")).expect("manifest dir");
    manifests.write(&lab, POLICY).expect("manifests");
    let mut blocked = SigSet::empty();
    blocked.add(Signal::SIGTERM);
    blocked.add(Signal::SIGINT);
    // Only this thread's mask, and only while the agent is spawned.
    blocked
        .thread_block()
        .expect("blocking SIGTERM in this thread");
    let source = [
        OsString::from("--manifests"),
        manifests.path().as_os_str().to_owned(),
        OsString::from("--on-exit"),
        OsString::from("detach"),
    ];
    let started = AgentProcess::start_with_source(&lab, &agent_path, &source);
    blocked.thread_unblock().expect("unblocking SIGTERM again");
    let mut agent = started.expect("starting the agent");
    agent
        .wait_generation(manifests.generation(), AGENT_TIMEOUT)
        .expect("the agent applied the manifests");
    let pid = agent.pid().expect("running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM)
        .expect("sending SIGTERM");
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let status = loop {
        if let Some(status) = agent.exited().expect("waiting for the agent") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running {AGENT_TIMEOUT:?} after SIGTERM\n{}",
            agent.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(status.success(), "{status}\n{}", agent.log_tail(20));
    assert!(
        !agent.bpffs_dir().join("maps").exists(),
        "--on-exit detach removed the pinned maps\n{}",
        agent.log_tail(20)
    );
}
