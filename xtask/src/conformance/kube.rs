//! `cargo xtask conformance --source kube`: the agent runs in Kubernetes mode, fed by
//! the in-process API server double (`netpol_lab::apiserver`)
//! instead of a manifest directory.
//!
//! The double listens on 127.0.0.1 *inside the lab's node network namespace* (its
//! socket is created by the node's netns worker), where the agent runs; it is served by
//! this process's own runtime. Each step renders the lab exactly as local mode would
//! (the same `cluster.yaml` and `policies.yaml`, into a staging directory the agent never
//! reads) and publishes the difference through the double as ADDED / MODIFIED / DELETED
//! watch events. The step is applied once the agent's status reports the double's
//! resourceVersion.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use netpol_lab::Lab;
use netpol_lab::apiserver::ApiServer;
use serde_json::{Value, json};

/// The double and the kubeconfig that points at it.
pub struct KubeFeed {
    // Dropped before the runtime that serves it.
    server: ApiServer,
    runtime: tokio::runtime::Runtime,
    kubeconfig: PathBuf,
    /// Inject a fault with every publication (see [`KubeFeed::publish`]).
    faults: bool,
    published: usize,
}

/// The faults injected in turn with `--faults`.
const FAULTS: [&str; 3] = ["killed watch streams", "410 Gone", "restarted API server"];

impl KubeFeed {
    /// Starts the double inside the lab's node namespace, with the node's Node object.
    pub fn start(lab: &Lab, faults: bool) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("apiserver-double")
            .enable_all()
            .build()
            .context("starting the API server double's runtime")?;
        let listener = lab
            .worker(netpol_lab::NODE)?
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))?
            .context("binding the API server double in the node namespace")?;
        let server = {
            let _entered = runtime.enter();
            ApiServer::start_on(listener).context("starting the API server double")?
        };
        server.apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": netpol_lab::NODE_NAME},
            "status": {"addresses": [
                {"type": "InternalIP", "address": netpol_lab::NODE_IPV4.to_string()},
                {"type": "InternalIP", "address": netpol_lab::NODE_IPV6.to_string()},
                {"type": "Hostname", "address": netpol_lab::NODE_NAME},
            ]},
        }));
        let kubeconfig = lab.workdir().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig())
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        Ok(KubeFeed {
            server,
            runtime,
            kubeconfig,
            faults,
            published: 0,
        })
    }

    /// The agent's source arguments.
    pub fn agent_args(&self) -> Vec<OsString> {
        vec!["--kubeconfig".into(), self.kubeconfig.clone().into()]
    }

    /// Publishes the objects of the rendered manifest directory; returns the double's
    /// resourceVersion, which the agent reports once it has all of it in the kernel.
    ///
    /// With faults on, every publication after the first comes with one, in turn: the
    /// watch streams are killed just before, or the history expires (410 Gone), or the
    /// server is down while the change is made and comes back after it.
    pub fn publish(&mut self, lab: &Lab, staging: &Path) -> Result<u64> {
        self.published += 1;
        let fault = (self.faults && self.published > 1)
            .then(|| FAULTS[(self.published - 2) % FAULTS.len()]);
        match fault {
            Some("killed watch streams") => self.server.kill_watches(),
            Some("410 Gone") => self.server.expire(),
            Some(_) => self.server.stop(),
            None => {}
        }
        let version = self.write(staging)?;
        if fault == Some("restarted API server") {
            self.restart(lab)?;
        }
        Ok(version)
    }

    /// Binds the same address again inside the node namespace (the old socket closes
    /// asynchronously: retried for up to 2 s) and serves on it.
    fn restart(&mut self, lab: &Lab) -> Result<()> {
        let addr = self.server.addr();
        let worker = lab.worker(netpol_lab::NODE)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let listener = loop {
            match worker.run(move || std::net::TcpListener::bind(addr))? {
                Ok(listener) => break listener,
                Err(error) if std::time::Instant::now() < deadline => {
                    let _ = error;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(error) => {
                    return Err(error).context("rebinding the API server double");
                }
            }
        };
        let _entered = self.runtime.enter();
        self.server
            .restart_on(listener)
            .context("restarting the API server double")
    }

    fn write(&self, staging: &Path) -> Result<u64> {
        let mut objects: Vec<Value> = Vec::new();
        for file in ["cluster.yaml", "policies.yaml"] {
            let path = staging.join(file);
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            for document in serde_norway::Deserializer::from_str(&text) {
                let value = <Value as serde::Deserialize>::deserialize(document)
                    .with_context(|| format!("parsing {}", path.display()))?;
                if !value.is_null() {
                    objects.push(value);
                }
            }
        }
        let _entered = self.runtime.enter();
        for kind in [
            "Node",
            "Namespace",
            "Pod",
            "NetworkPolicy",
            "Service",
            "EndpointSlice",
            "ServiceCIDR",
            "ClusterNetworkPolicy",
        ] {
            let of_kind: Vec<Value> = objects
                .iter()
                .filter(|o| o["kind"].as_str() == Some(kind))
                .cloned()
                .collect();
            self.server.replace_all(kind, of_kind);
        }
        Ok(self.server.resource_version())
    }
}
