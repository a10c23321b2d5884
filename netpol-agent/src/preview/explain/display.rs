//! How an explanation reads for people (`netpol-agent explain` without `--json`).

use super::{Explanation, HookExplanation, HookVerdict, Mismatch, Party, RuleResult, TierStep};
use netpol_compile::Direction;

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.allowed { "ALLOWED" } else { "BLOCKED" };
        writeln!(f, "{} -> {} {}: {verdict}", self.src, self.dst, self.port)?;
        if !matches!(self.src, Party::Pod { .. }) {
            writeln!(
                f,
                "  egress: {} is not a pod: no egress policy applies",
                self.src.name()
            )?;
        }
        for hook in &self.hooks {
            write!(f, "{hook}")?;
            if hook.direction == Direction::Egress && !matches!(self.dst, Party::Pod { .. }) {
                writeln!(
                    f,
                    "  ingress: {} is not a pod: no ingress policy applies",
                    self.dst.name()
                )?;
            }
        }
        if self.hooks.is_empty() {
            writeln!(
                f,
                "  ingress: {} is not a pod: no ingress policy applies",
                self.dst.name()
            )?;
        }
        if let Some(staged) = &self.staged {
            let names: Vec<String> = staged.policies.iter().map(ToString::to_string).collect();
            let would = match (staged.allowed, self.allowed) {
                (true, true) => "ALLOWED, as now",
                (false, false) => "BLOCKED, as now",
                (true, false) => "ALLOWED (staged-allow)",
                (false, true) => "BLOCKED (staged-drop)",
            };
            writeln!(
                f,
                "Staged (netpol.dev/staged: NetworkPolicy {}): would be {would}",
                names.join(", ")
            )?;
            // Only the hooks the staged policies change.
            for (hook, now) in staged.hooks.iter().zip(&self.hooks) {
                if hook.verdict != now.verdict || hook.isolated_by != now.isolated_by {
                    write!(f, "{hook}")?;
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for HookExplanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = self.direction.field();
        let (towards, peer) = match self.direction {
            Direction::Ingress => ("from", self.peer.name()),
            Direction::Egress => ("to", self.peer.name()),
        };
        write!(f, "  {field} of {}:", self.pod)?;
        if let HookVerdict::NotLocal = &self.verdict {
            return writeln!(f, " not on this node: its own node decides → allowed here");
        }
        if self.tiers.is_empty() {
            write!(f, " ")?;
        } else {
            writeln!(f)?;
            for step in &self.tiers {
                writeln!(f, "    {step}")?;
            }
            write!(f, "    ")?;
        }
        match &self.verdict {
            HookVerdict::ClusterAccepted { rule } => {
                return writeln!(f, "→ allowed by {rule}");
            }
            HookVerdict::ClusterDenied { rule } => {
                return writeln!(f, "→ dropped by {rule}");
            }
            HookVerdict::NotIsolated if !self.tiers.is_empty() => {
                return writeln!(
                    f,
                    "no NetworkPolicy with policyTypes {} selects it, no tier decides → allowed",
                    self.direction
                );
            }
            HookVerdict::NotIsolated => {
                return writeln!(
                    f,
                    "not isolated (no NetworkPolicy with policyTypes {} selects it) → allowed",
                    self.direction
                );
            }
            HookVerdict::Itself => {
                return writeln!(f, "the pod reaching itself: never blocked → allowed");
            }
            _ => {}
        }
        let names: Vec<String> = self.isolated_by.iter().map(ToString::to_string).collect();
        writeln!(f, "isolated by NetworkPolicy {}", names.join(", "))?;
        if let Some(identity) = &self.peer_identity {
            writeln!(
                f,
                "    peer {peer} has identity {} = {}",
                identity.id, identity.description
            )?;
        }
        for rule in &self.rules {
            write!(f, "    NetworkPolicy {}", rule.policy)?;
            if let Some(index) = rule.index {
                write!(f, " spec.{field}[{index}]")?;
            }
            match &rule.result {
                RuleResult::Matches => writeln!(f, ": matches")?,
                RuleResult::NoRules => writeln!(f, ": no {field} rules")?,
                RuleResult::NoMatch { mismatches } => {
                    let parts: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
                    writeln!(f, ": {}", parts.join("; "))?;
                }
            }
        }
        let port = self.port;
        match &self.verdict {
            HookVerdict::FromNode => writeln!(
                f,
                "  → allowed: traffic from the pod's own node always passes (kubelet probes)"
            )?,
            HookVerdict::Allowed { rule } => writeln!(f, "  → allowed by {rule}")?,
            HookVerdict::AuditAllowed => writeln!(
                f,
                "  → allowed in audit mode: no rule allows {port} {towards} {peer}"
            )?,
            HookVerdict::Denied => writeln!(
                f,
                "  → dropped: isolated, and no rule allows {port} {towards} {peer}"
            )?,
            HookVerdict::NotLocal
            | HookVerdict::NotIsolated
            | HookVerdict::Itself
            | HookVerdict::ClusterAccepted { .. }
            | HookVerdict::ClusterDenied { .. } => {}
        }
        if !self.analysis_agrees {
            writeln!(
                f,
                "  ! the per-rule reasoning above disagrees with the compiled maps; the verdict \
                 is the maps' (please report this)"
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for TierStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let next = |tier: &netpol_compile::cnp::Tier| match tier {
            netpol_compile::cnp::Tier::Admin => "on to NetworkPolicy",
            netpol_compile::cnp::Tier::Baseline => "on to the default, allow",
        };
        match self {
            TierStep::NoMatch { tier } => {
                write!(
                    f,
                    "{tier} tier: no ClusterNetworkPolicy rule matches → {}",
                    next(tier)
                )
            }
            TierStep::Passed { tier, rule } => {
                write!(f, "{tier} tier: Pass by {rule} → {}", next(tier))
            }
            TierStep::Decided { tier, action, rule } => {
                write!(f, "{tier} tier: {action} by {rule}")
            }
        }
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (part, needs) = match self {
            Mismatch::Peer { needs } => ("peer", needs),
            Mismatch::Protocol { needs } => ("protocol", needs),
            Mismatch::Port { needs } => ("port", needs),
        };
        if needs.len() == 1 {
            write!(f, "{part} does not match (needs {})", needs[0])
        } else {
            write!(
                f,
                "{part} does not match (needs one of: {})",
                needs.join("; ")
            )
        }
    }
}
