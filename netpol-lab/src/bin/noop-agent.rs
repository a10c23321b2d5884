//! A stand-in for netpol-agent that honours the local-mode contract of
//! README.md ("Using the agent") (`run --manifests DIR --status-file FILE ...`) but enforces
//! nothing: whenever `DIR/.generation` changes it writes the status file. The lab's own
//! tests use it to exercise the harness without the real agent.

use std::path::PathBuf;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("run") {
        return Err(
            "usage: noop-agent run --manifests DIR --status-file FILE [other agent flags]".into(),
        );
    }
    let (mut manifests, mut status) = (None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--manifests" => manifests = Some(PathBuf::from(value)),
            "--status-file" => status = Some(PathBuf::from(value)),
            _ => {} // --bpffs-dir, --node-name, --log-format: nothing to do
        }
    }
    let manifests = manifests.ok_or("--manifests is required")?;
    let status = status.ok_or("--status-file is required")?;
    eprintln!("noop-agent: watching {}", manifests.display());

    let mut reported = None;
    loop {
        let generation = std::fs::read_to_string(manifests.join(".generation"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(g) = generation.filter(|g| Some(*g) != reported) {
            let tmp = status.with_extension("tmp");
            let body = serde_json::json!({
                "generation": g, "endpoints": 0, "policies": 0, "invalid": 0, "attached": 0,
            });
            std::fs::write(&tmp, body.to_string())?;
            std::fs::rename(&tmp, &status)?;
            eprintln!("noop-agent: generation {g}");
            reported = Some(g);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
