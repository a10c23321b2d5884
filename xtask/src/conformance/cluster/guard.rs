//! What a case leaves behind: the guard that undoes it (also when the case fails), and
//! the sweep of what an interrupted run left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use serde_json::Value;

use super::command::{Kubectl, docker};
use super::objects::restore_labels;
use super::{ANNOTATION, STEP_ANNOTATION};
use crate::ui;

/// Removes leftovers of an interrupted run: annotated namespaces, annotated pods in
/// other namespaces, labelled host containers.
pub(super) fn sweep(kubectl: &Kubectl) -> Result<()> {
    let namespaces: Value =
        serde_json::from_str(&kubectl.run(&["get", "namespaces", "-o", "json"])?)?;
    let stale: Vec<String> = namespaces["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ns| !ns["metadata"]["annotations"][ANNOTATION].is_null())
        .filter_map(|ns| ns["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    if !stale.is_empty() {
        ui::doing(&format!(
            "removing leftover namespaces {}",
            stale.join(", ")
        ));
        let mut args = vec!["delete", "namespace", "--wait=true", "--timeout=180s"];
        args.extend(stale.iter().map(String::as_str));
        kubectl.run(&args)?;
    }
    let pods: Value = serde_json::from_str(&kubectl.run(&["get", "pods", "-A", "-o", "json"])?)?;
    for pod in pods["items"].as_array().into_iter().flatten() {
        if pod["metadata"]["annotations"][ANNOTATION].is_null() {
            continue;
        }
        let (Some(ns), Some(name)) = (
            pod["metadata"]["namespace"].as_str(),
            pod["metadata"]["name"].as_str(),
        ) else {
            continue;
        };
        ui::doing(&format!("removing leftover pod {ns}/{name}"));
        kubectl.run(&[
            "delete",
            "pod",
            "-n",
            ns,
            name,
            "--wait=true",
            "--timeout=60s",
        ])?;
    }
    let containers = docker(&["ps", "-aq", "--filter", &format!("label={ANNOTATION}")])?;
    for id in containers.split_whitespace() {
        docker(&["rm", "-f", id])?;
    }
    Ok(())
}

/// What a case created or changed, undone on drop (also when the case fails).
pub(super) struct Cleanup<'a> {
    pub(super) kubectl: &'a Kubectl,
    /// Namespaces the case created: deleted with everything in them.
    pub(super) namespaces: Vec<String>,
    /// Borrowed namespaces and their labels before the case.
    pub(super) borrowed: BTreeMap<String, BTreeMap<String, String>>,
    /// Pods and policies the case put into borrowed namespaces.
    pub(super) pods: Vec<(String, String)>,
    pub(super) policies: BTreeSet<(String, String)>,
    /// Host containers, and `(node, host ip)` routes on the nodes.
    pub(super) containers: Vec<String>,
    pub(super) routes: Vec<(String, Ipv4Addr)>,
}

impl Cleanup<'_> {
    fn undo(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        let mut note = |r: Result<String>| {
            if let Err(e) = r {
                errors.push(format!("{e:#}"));
            }
        };
        for (node, ip) in self.routes.drain(..) {
            note(docker(&[
                "exec",
                &node,
                "ip",
                "route",
                "del",
                &format!("{ip}/32"),
            ]));
        }
        for container in self.containers.drain(..) {
            note(docker(&["rm", "-f", &container]));
        }
        for (ns, name) in std::mem::take(&mut self.policies) {
            if self.borrowed.contains_key(&ns) {
                note(self.kubectl.run(&[
                    "delete",
                    "networkpolicy",
                    "-n",
                    &ns,
                    &name,
                    "--ignore-not-found",
                ]));
            }
        }
        for (ns, name) in self.pods.drain(..) {
            note(self.kubectl.run(&[
                "delete",
                "pod",
                "-n",
                &ns,
                &name,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=60s",
            ]));
        }
        for (ns, labels) in std::mem::take(&mut self.borrowed) {
            let annotation = format!("{STEP_ANNOTATION}-");
            note(
                self.kubectl
                    .run(&["annotate", "namespace", &ns, &annotation]),
            );
            note(restore_labels(self.kubectl, &ns, &labels));
        }
        if !self.namespaces.is_empty() {
            let mut args = vec![
                "delete",
                "namespace",
                "--ignore-not-found",
                "--wait=true",
                "--timeout=180s",
            ];
            args.extend(self.namespaces.iter().map(String::as_str));
            note(self.kubectl.run(&args));
            self.namespaces.clear();
        }
        if !errors.is_empty() {
            bail!("cleaning up: {}", errors.join("; "));
        }
        Ok(())
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            ui::note(&ui::red(&format!("{e:#}")));
        }
    }
}
