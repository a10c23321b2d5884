//! The control loop as a [`Reconciler`]: wait for a change (or a link notification, or
//! the resync interval), snapshot the source into the state, compile, apply, report
//! diagnostics and refusals, refresh the kernel metrics, write the status file.
//!
//! Nothing is applied before the source's first complete state: until then the compiled
//! state is empty and applying it would clear maps adopted from a previous agent; only
//! pod interfaces (by name prefix) get the programs meanwhile.

mod refusals;
mod report;
mod status;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::config::Config;
use crate::datapath::{self, Datapath, links::LinkEvents};
use crate::source::Source;
use crate::telemetry::addresses::AddressBook;
use crate::telemetry::flowlog::{Resolver, SharedAddressBook, SharedResolver};
use crate::telemetry::health::Health;
use crate::telemetry::kernel::KernelRefresh;
use netpol_compile::state::{ClusterState, ObjectRef};
use netpol_compile::{Compiled, Compiler, Diagnostic, Subject};
use refusals::Refusals;
pub use refusals::refusal_diagnostics;
use report::Reporter;
pub use status::Status;

/// Why the loop stopped. Each variant is one metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] crate::source::Error),
    #[error("status file {path}: {source}")]
    Status {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Why the loop woke up.
struct Wake {
    /// The source's state changed since the last snapshot (and is complete).
    changed: bool,
    /// A link appeared, changed or went away.
    links: bool,
}

/// When each phase of one pass that changed the kernel ended, from its start: where the
/// time from a change to the kernel goes (the `applied` log line).
struct Phases {
    started: Instant,
    snapshot: std::time::Duration,
    compiled: std::time::Duration,
    applied: std::time::Duration,
}

impl Phases {
    fn start() -> Self {
        Phases {
            started: Instant::now(),
            snapshot: Default::default(),
            compiled: Default::default(),
            applied: Default::default(),
        }
    }

    fn since_start(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The control loop's state between passes.
pub struct Reconciler<'a, S: Source> {
    config: &'a Config,
    source: S,
    datapath: &'a mut Datapath,
    resolver: &'a SharedResolver,
    health: &'a Health,
    links: Option<LinkEvents>,
    state: ClusterState,
    compiler: Compiler,
    compiled: Compiled,
    /// Compiles the state with its staged policies enforced, for the flow log's staged
    /// verdicts; reset (its memo dropped) while no policy is staged.
    staged_compiler: Compiler,
    /// The source's first complete state reached the kernel.
    primed: bool,
    generation: u64,
    reporter: Reporter,
    last_resync: Instant,
    status: Status,
    /// The last apply of a changed state failed: it is tried again at the resync interval.
    apply_failed: bool,
    refusals: Refusals,
    kernel_metrics: KernelRefresh,
    /// The diagnostics of the last snapshot and compile.
    diagnostics: Vec<Diagnostic>,
    /// Interfaces named for pods that the last apply did not use (local mode).
    interface_diagnostics: Vec<Diagnostic>,
    /// The pods' addresses for the flow log, updated after each apply.
    addresses: SharedAddressBook,
    /// Pods changed in the state since `addresses` last saw it (`None`: any).
    addresses_due: Option<BTreeSet<ObjectRef>>,
}

impl<'a, S: Source> Reconciler<'a, S> {
    pub fn new(
        config: &'a Config,
        source: S,
        datapath: &'a mut Datapath,
        resolver: &'a SharedResolver,
        health: &'a Health,
    ) -> Self {
        Reconciler {
            config,
            source,
            datapath,
            resolver,
            health,
            links: subscribe_links(config),
            state: ClusterState::default(),
            compiler: Compiler::new(),
            compiled: Compiled::default(),
            staged_compiler: Compiler::new(),
            primed: false,
            generation: 0,
            reporter: Reporter::default(),
            last_resync: Instant::now(),
            status: Status::default(),
            apply_failed: false,
            refusals: Refusals::default(),
            kernel_metrics: KernelRefresh::default(),
            diagnostics: Vec::new(),
            interface_diagnostics: Vec::new(),
            addresses: SharedAddressBook::default(),
            addresses_due: None,
        }
    }

    /// Runs passes until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        if self.links.is_some() {
            // Pod interfaces that exist already are covered before anything else is known
            // (the unprogrammed default applies to them until their pods are programmed).
            self.attach_new_interfaces();
        }
        loop {
            self.health.beat();
            let wake = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                () = wait_links(self.links.as_ref()) => Wake { changed: false, links: true },
                changed = self.source.changed() => Wake { changed: changed?, links: false },
            };
            self.pass(wake)?;
        }
    }

    /// One pass after a wake-up: what is due, and nothing else.
    fn pass(&mut self, wake: Wake) -> Result<(), Error> {
        if wake.links && !self.primed {
            self.attach_new_interfaces();
            return Ok(());
        }
        // A state the kernel refused is tried again at the resync interval.
        let resync_due = self.last_resync.elapsed() >= self.config.resync;
        let changed = wake.changed || (self.apply_failed && resync_due);
        if !self.primed && !changed {
            return Ok(());
        }
        if !changed && self.report_unchanged_generation() {
            self.write_status()?;
        }
        if !changed && !wake.links && !resync_due && self.status.pending.is_empty() {
            return Ok(());
        }
        self.last_resync = Instant::now();
        let applied = if changed {
            self.reconcile_change()?
        } else {
            self.recheck_interfaces()
        };
        if !applied {
            return Ok(());
        }
        self.kernel_metrics
            .refresh_if_due(self.datapath, &self.compiled, self.health);
        self.write_status()
    }

    /// Updates that changed nothing the source gives moved its generation: the
    /// kernel already holds that generation's state (unless the last apply failed), so
    /// the status says so without a compile. `true` when the status changed.
    fn report_unchanged_generation(&mut self) -> bool {
        let Some(generation) = self.source.unchanged_generation() else {
            return false;
        };
        if self.apply_failed || generation <= self.generation {
            return false;
        }
        debug!(generation, "updates changed nothing the agent keeps");
        self.health.metrics.unchanged_updates.inc();
        self.generation = generation;
        self.status.generation = generation;
        true
    }

    /// Snapshot, compile, apply: `false` when the kernel refused the state.
    fn reconcile_change(&mut self) -> Result<bool, Error> {
        let mut phases = Phases::start();
        self.snapshot_and_compile(&mut phases)?;
        let Some(report) = apply(self.datapath, &self.compiled, self.health) else {
            self.apply_failed = true;
            return Ok(false);
        };
        phases.applied = phases.since_start();
        self.apply_failed = false;
        self.applied(phases, report);
        Ok(true)
    }

    /// Fills the state from the source, compiles it and publishes the diagnostics.
    fn snapshot_and_compile(&mut self, phases: &mut Phases) -> Result<(), Error> {
        let update = self.source.snapshot(&mut self.state)?;
        self.state.audit_all = self.config.audit;
        self.state.configured_service_cidrs = self.config.service_cidrs.clone();
        phases.snapshot = phases.since_start();
        // Every snapshot is compiled by this compiler: the pods it changed are the pods
        // changed since the compiler's last compile. The last result shares its maps
        // with the compiler's memo: released first, they are updated in place, not
        // copied.
        self.compiled = Compiled::default();
        self.compiled = self.compiler.compile_changed(&self.state, &update.changes);
        phases.compiled = phases.since_start();
        self.addresses_due = match (self.addresses_due.take(), update.changes.pods) {
            (Some(mut due), Some(changed)) => {
                due.extend(changed);
                Some(due)
            }
            _ => None,
        };
        self.diagnostics = update.diagnostics;
        self.diagnostics
            .extend(self.compiled.diagnostics.iter().cloned());
        self.publish_diagnostics();
        self.generation = update.generation.unwrap_or(self.generation);
        Ok(())
    }

    /// The state compiled with its staged policies enforced (after the kernel has the
    /// state in force: the staged view never delays enforcement), or `None` when no
    /// policy is staged.
    fn staged_view(&mut self) -> Option<Compiled> {
        if self.state.staged_policies().next().is_none() {
            self.staged_compiler = Compiler::new();
            return None;
        }
        self.state.enforce_staged = true;
        let staged = self.staged_compiler.compile(&self.state);
        self.state.enforce_staged = false;
        Some(staged)
    }

    /// Brings the flow log's pod addresses up to date with the state: the pods changed
    /// since the last update, or all of them when the source could not say which.
    fn update_addresses(&mut self) {
        let Ok(mut book) = self.addresses.write() else {
            return;
        };
        match self.addresses_due.replace(BTreeSet::new()) {
            Some(pods) => book.update(&self.state, &pods),
            None => *book = AddressBook::of(&self.state),
        }
    }

    /// Publishes the diagnostics of the last compile and of the last apply together.
    fn publish_diagnostics(&mut self) {
        let diagnostics = self.diagnostics.iter().chain(&self.interface_diagnostics);
        self.reporter
            .publish(diagnostics, &mut self.source, self.health);
    }

    /// Reports the interfaces named for pods that an apply did not use, when they
    /// changed.
    fn report_interfaces(&mut self, refused: &[datapath::interfaces::RefusedName]) {
        let diagnostics = interface_diagnostics(refused);
        if diagnostics != self.interface_diagnostics {
            self.interface_diagnostics = diagnostics;
            self.publish_diagnostics();
        }
    }

    /// After a changed state reached the kernel: metrics, readiness, refusals, the flow
    /// log's names, the log line and the status.
    fn applied(&mut self, phases: Phases, report: datapath::ApplyReport) {
        self.report_interfaces(&report.refused_names);
        let health = self.health;
        health.metrics.applies.inc();
        health
            .metrics
            .propagation
            .observe(phases.applied.as_secs_f64());
        self.primed = true;
        health.set_ready(true);
        self.refusals
            .update(&report.refused, &self.compiled, &mut self.source, health);
        let staged = self.staged_view();
        self.update_addresses();
        let resolver =
            Resolver::with_addresses(self.addresses.clone(), &self.state, &self.compiled)
                .with_staged(&self.state, staged);
        if let Ok(mut current) = self.resolver.write() {
            *current = Arc::new(resolver);
        }
        info!(
            generation = self.generation,
            pods = self.state.pods.len(),
            policies = self.compiled.policies.len(),
            endpoints = self.compiled.local_pods.len(),
            invalid = self.reporter.len(),
            map_writes = report.maps.writes(),
            attached = report.attached.len(),
            detached = report.detached.len(),
            snapshot_ms = ms(phases.snapshot),
            compile_ms = ms(phases.compiled - phases.snapshot),
            apply_ms = ms(phases.applied - phases.compiled),
            names_ms = ms(phases.since_start() - phases.applied),
            elapsed_ms = ms(phases.since_start()),
            "applied"
        );
        self.status = Status {
            generation: self.generation,
            endpoints: self.compiled.local_pods.len(),
            policies: self.compiled.policies.len(),
            invalid: self.reporter.len(),
            attached: self.datapath.attached().count(),
            pending: report.pending,
            refused: self.refusals.listed(status::REFUSED_LISTED),
        };
    }

    /// The periodic re-check: the same compiled state applied again, so interfaces that
    /// appeared or went away are attached or detached. `false` when the kernel refused.
    fn recheck_interfaces(&mut self) -> bool {
        let Some(report) = apply(self.datapath, &self.compiled, self.health) else {
            return false;
        };
        if !report.attached.is_empty() || !report.detached.is_empty() {
            info!(attached = ?report.attached, detached = ?report.detached, "interfaces changed");
        }
        debug!(pending = report.pending.len(), "resync");
        self.report_interfaces(&report.refused_names);
        self.refusals.update(
            &report.refused,
            &self.compiled,
            &mut self.source,
            self.health,
        );
        self.status.attached = self.datapath.attached().count();
        self.status.invalid = self.reporter.len();
        self.status.pending = report.pending;
        self.status.refused = self.refusals.listed(status::REFUSED_LISTED);
        true
    }

    fn write_status(&self) -> Result<(), Error> {
        let Some(path) = &self.config.status_file else {
            return Ok(());
        };
        status::write(path, &self.status).map_err(|source| Error::Status {
            path: path.clone(),
            source,
        })
    }

    fn attach_new_interfaces(&mut self) {
        match self.datapath.attach_new_interfaces() {
            Ok(report) if !report.attached.is_empty() => {
                info!(attached = ?report.attached, "pod interfaces covered before their pods are known");
            }
            Ok(_) => {}
            Err(error) => {
                self.health.metrics.error(error.kind());
                warn!(
                    error = datapath::chain(&error),
                    "attaching to new interfaces failed"
                );
            }
        }
    }
}

/// One diagnostic per interface named for a pod that is not used, naming the pod and
/// the annotation.
fn interface_diagnostics(refused: &[datapath::interfaces::RefusedName]) -> Vec<Diagnostic> {
    refused
        .iter()
        .map(|refused| {
            Diagnostic::new(
                Subject::pod(&refused.pod),
                format!(
                    "metadata.annotations[{}]",
                    netpol_compile::state::HOST_INTERFACE_ANNOTATION
                ),
                format!(
                    "{}; not used (the pod's interface is found from the kernel)",
                    refused.reason
                ),
            )
        })
        .collect()
}

/// Link notifications, when pod interfaces are attached by name prefix.
fn subscribe_links(config: &Config) -> Option<LinkEvents> {
    if config.pod_interface_prefixes.is_empty() {
        return None;
    }
    match LinkEvents::subscribe() {
        Ok(links) => Some(links),
        Err(error) => {
            warn!(%error, "no netlink link notifications; new interfaces are found at resync");
            None
        }
    }
}

async fn wait_links(links: Option<&LinkEvents>) {
    match links {
        Some(links) => links.changed().await,
        None => std::future::pending().await,
    }
}

/// Applies `compiled`; a refusal (e.g. a full map) is logged and counted, never fatal:
/// what is in the kernel stays enforced, and the caller tries again later.
fn apply(
    datapath: &mut Datapath,
    compiled: &Compiled,
    health: &Health,
) -> Option<datapath::ApplyReport> {
    match datapath.apply(compiled) {
        Ok(report) => Some(report),
        Err(error) => {
            health.metrics.error(error.kind());
            warn!(
                error = datapath::chain(&error),
                "applying to the kernel failed; will retry"
            );
            None
        }
    }
}
