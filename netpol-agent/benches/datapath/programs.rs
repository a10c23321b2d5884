//! Running frames through the programs under test, and checking a scenario's verdict.

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use netpol_agent::datapath::Datapath;
use netpol_common::Reason;

use crate::scenarios::{Prog, Scenario};

/// The programs under test: netpol's, and the floor.
pub struct Bench {
    pub datapath: Datapath,
    pub empty: SchedClassifier,
}

impl Bench {
    /// (TC action, kernel mean ns per run).
    pub fn run(&self, prog: Prog, frame: &[u8], repeat: u32) -> (i32, f64) {
        self.run_marked(prog, frame, repeat, 0)
    }

    /// [`Bench::run`] of a frame arriving with skb mark `mark`.
    pub fn run_marked(&self, prog: Prog, frame: &[u8], repeat: u32, mark: u32) -> (i32, f64) {
        match prog {
            Prog::Netpol(hook) => {
                let v = self
                    .datapath
                    .test_run_marked(hook, frame, repeat, mark)
                    .expect("test run");
                (v.action, v.duration.as_nanos() as f64)
            }
            Prog::Empty => {
                let r = self
                    .empty
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat,
                        ..TestRunOptions::new()
                    })
                    .expect("test run of the floor program");
                (r.return_value as i32, r.duration.as_nanos() as f64)
            }
        }
    }

    fn counted(&self) -> Vec<u64> {
        let counters = self.datapath.counters().expect("counters");
        counters.iter().map(|(_, c)| c.packets).collect()
    }

    /// Runs a scenario once and checks its verdict and the reason it was counted under.
    pub fn verify(&self, s: &Scenario) {
        let before = self.counted();
        let (action, _) = self.run_marked(s.prog, &s.frame, 1, s.mark);
        let after = self.counted();
        assert_eq!(action, s.action, "{}: TC action", s.name);
        if let Some(reason) = s.reason {
            let moved: Vec<Reason> = Reason::ALL
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| a > b)
                .map(|(r, _)| *r)
                .collect();
            assert_eq!(moved, vec![reason], "{}: counted reason", s.name);
        }
    }
}
