//! Counters: the per-CPU verdict, rule and event counters summed, and how full the maps
//! are.

use std::path::PathBuf;

use aya::Ebpf;
use aya::maps::HashMap;
use netpol_common::{Counter, DIR_EGRESS, DIR_INGRESS, REASON_COUNT, Reason, counter_index, names};

use super::{Datapath, Error, Result};
use netpol_compile::{Compiled, policy_maps};

impl Datapath {
    /// Map sizes as the kernel holds them: (ENDPOINTS, IPCACHE, POLICY).
    pub fn map_sizes(&self) -> (usize, usize, usize) {
        (self.endpoints.len(), self.ipcache.len(), self.policy.len())
    }

    /// (map, entries, capacity) of ENDPOINTS, IPCACHE, POLICY and POLICY_RANGES (from the shadows: no
    /// syscall), and of CT4 and CT6 when `conntrack_limit` is given (counted by walking
    /// their keys, at most `limit` of each).
    pub fn map_fill(&self, conntrack_limit: Option<usize>) -> Vec<(&'static str, u64, u64)> {
        let [endpoints, ipcache, policy, ranges, ct] = self.capacities.map(u64::from);
        let in_ranges = self
            .policy
            .contents()
            .keys()
            .filter(|key| matches!(policy_maps::slot(key), policy_maps::Slot::Ranges(_)))
            .count();
        let exact = self.policy.len() - in_ranges;
        let mut out = vec![
            (names::ENDPOINTS, self.endpoints.len() as u64, endpoints),
            (names::IPCACHE, self.ipcache.len() as u64, ipcache),
            (names::POLICY, exact as u64, policy),
            (names::POLICY_RANGES, in_ranges as u64, ranges),
        ];
        if let Some(limit) = conntrack_limit {
            fn count<K: aya::Pod>(ebpf: &Ebpf, name: &str, limit: usize) -> Option<u64> {
                let map = HashMap::<_, K, netpol_common::CtValue>::try_from(ebpf.map(name)?);
                Some(map.ok()?.keys().take(limit).count() as u64)
            }
            let tables = [
                (
                    names::CT4,
                    count::<netpol_common::CtKey4>(&self.ebpf, names::CT4, limit),
                ),
                (
                    names::CT6,
                    count::<netpol_common::CtKey6>(&self.ebpf, names::CT6, limit),
                ),
            ];
            for (name, entries) in tables {
                if let Some(entries) = entries {
                    out.push((name, entries, ct));
                }
            }
        }
        out
    }

    /// Packets and bytes per reason, summed over CPUs and both directions.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>> {
        let by_direction = self.counters_by_direction()?;
        Ok(Reason::ALL
            .into_iter()
            .map(|reason| {
                let total = sum(by_direction
                    .iter()
                    .filter(|(r, _, _)| *r == reason)
                    .map(|(_, _, c)| c));
                (reason, total)
            })
            .collect())
    }

    /// Packets and bytes per reason and direction (`DIR_INGRESS`/`DIR_EGRESS`, from the
    /// pod's point of view), summed over CPUs.
    pub fn counters_by_direction(&self) -> Result<Vec<(Reason, u8, Counter)>> {
        let mut out = Vec::with_capacity(2 * REASON_COUNT as usize);
        for direction in [DIR_INGRESS, DIR_EGRESS] {
            for reason in Reason::ALL {
                let per_cpu = self
                    .counters
                    .get(&counter_index(reason, direction), 0)
                    .map_err(|source| Error::Map {
                        name: names::COUNTERS,
                        source,
                    })?;
                out.push((reason, direction, sum(per_cpu.iter())));
            }
        }
        Ok(out)
    }

    /// Zeroes the counters of rule ids that now name another rule (or a rule this agent
    /// has not counted yet: a restarted agent numbers rules afresh), before any POLICY
    /// value points at them.
    pub(super) fn reset_reassigned_rule_counters(&mut self, compiled: &Compiled) -> Result<()> {
        if self.counted_rules.same(&compiled.rules) {
            return Ok(()); // the same table as last time (the compiler shares it)
        }
        // Both tables in id order: one merge, not a lookup per rule.
        let fresh: Vec<u32> = {
            let mut counted = self.counted_rules.iter().peekable();
            compiled
                .rules
                .iter()
                .filter(|&(id, rule)| {
                    while counted.next_if(|&(counted, _)| counted < id).is_some() {}
                    counted.next_if(|&(counted, _)| counted == id) != Some((id, rule))
                })
                .map(|(id, _)| *id)
                .filter(|id| *id < netpol_common::capacity::RULE_COUNTERS)
                .collect()
        };
        if !fresh.is_empty() {
            let cpus = aya::util::nr_cpus().map_err(|(_, source)| Error::Bpffs {
                path: PathBuf::from("/sys/devices/system/cpu/possible"),
                source,
            })?;
            for id in fresh {
                let zero = aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus])
                    .map_err(|source| Error::Map {
                        name: names::RULE_COUNTERS,
                        source: source.into(),
                    })?;
                self.rule_counters
                    .set(id, zero, 0)
                    .map_err(|source| Error::Map {
                        name: names::RULE_COUNTERS,
                        source,
                    })?;
            }
        }
        self.counted_rules = compiled.rules.clone();
        Ok(())
    }

    /// Packets and bytes of one rule (its id in `Compiled::rules`), summed over CPUs.
    pub fn rule_counter(&self, rule: u32) -> Result<Counter> {
        let per_cpu = self
            .rule_counters
            .get(&rule, 0)
            .map_err(|source| Error::Map {
                name: names::RULE_COUNTERS,
                source,
            })?;
        Ok(sum(per_cpu.iter()))
    }

    /// Conntrack entries the programs created (new keys in CT4 and CT6) since COUNTERS
    /// was created, summed over CPUs.
    pub fn conntrack_created(&self) -> Result<u64> {
        let per_cpu = self
            .counters
            .get(&netpol_common::COUNTER_CT_CREATED, 0)
            .map_err(|source| Error::Map {
                name: names::COUNTERS,
                source,
            })?;
        Ok(per_cpu.iter().map(|c| c.packets).sum())
    }

    /// Events suppressed by the in-kernel rate limit and lost to a full ring buffer,
    /// summed over CPUs.
    pub fn event_losses(&self) -> Result<(u64, u64)> {
        let per_cpu = self.event_budget.get(&0, 0).map_err(|source| Error::Map {
            name: names::EVENT_BUDGET,
            source,
        })?;
        Ok(per_cpu
            .iter()
            .fold((0, 0), |(s, l), b| (s + b.suppressed, l + b.lost)))
    }
}

fn sum<'a>(counters: impl Iterator<Item = &'a Counter>) -> Counter {
    counters.fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}
