//! The kernel's tick rate (CONFIG_HZ), for conntrack's clock.
//!
//! The programs time conntrack entries in jiffies: the verifier inlines `bpf_jiffies64`
//! into one load, where the coarse clock helper cost ~15 ns per packet. Timeouts are
//! seconds, so the programs need the jiffies per second, which the kernel does not
//! export. The agent measures it once per process with the object's `jiffies` program
//! (run through BPF_PROG_TEST_RUN, never attached): the jiffies counted between two tick
//! edges about 100 ms apart, over the monotonic time between them. Both instants are
//! taken right after a tick, so the quotient is exact to the syscall latency (µs).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};

/// How long to count ticks. 100 ms: 10 ticks at HZ = 100, and ~100 µs of timing error
/// would still round correctly.
const SPAN: Duration = Duration::from_millis(100);
/// Waiting for a tick edge gives up after this (the slowest tick, HZ = 24, is ~42 ms).
const EDGE_TIMEOUT: Duration = Duration::from_millis(200);

/// Why the tick rate could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("running the jiffies program: {0}")]
    Run(#[from] aya::programs::ProgramError),
    #[error("jiffies did not advance within {0:?}")]
    Stalled(Duration),
    #[error("measured {0} jiffies per second, outside 10..=10000")]
    Implausible(u64),
}

/// Jiffies per second, measured once per process with `program` (the object's
/// `jiffies` program, loaded).
pub fn kernel_hz(program: &SchedClassifier) -> Result<u32, ClockError> {
    static HZ: OnceLock<u32> = OnceLock::new();
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    let hz = measure(&mut KernelClock {
        program,
        origin: Instant::now(),
    })?;
    Ok(*HZ.get_or_init(|| hz))
}

/// What a measurement reads: the kernel's jiffies and the monotonic time beside them.
/// The real one runs the program and asks the system clock; tests step a fake one, so
/// no test depends on how the machine schedules it.
trait Clock {
    /// The low 32 bits of jiffies.
    fn jiffies(&mut self) -> Result<u32, ClockError>;
    /// Monotonic time since an origin of the clock's choosing.
    fn now(&mut self) -> Duration;
    fn sleep(&mut self, span: Duration);
    /// Lets the tick come while waiting for an edge.
    fn pause(&mut self);
}

struct KernelClock<'a> {
    program: &'a SchedClassifier,
    origin: Instant,
}

impl Clock for KernelClock<'_> {
    fn jiffies(&mut self) -> Result<u32, ClockError> {
        // Any frame will do: the program does not look at it (TC wants an Ethernet
        // header).
        let frame = [0u8; 64];
        let result = self.program.test_run(TestRunOptions {
            data_in: Some(&frame),
            repeat: 1,
            ..TestRunOptions::new()
        })?;
        Ok(result.return_value)
    }

    fn now(&mut self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&mut self, span: Duration) {
        std::thread::sleep(span);
    }

    fn pause(&mut self) {
        std::thread::yield_now();
    }
}

/// Ticks between two tick edges `SPAN` apart, over the time between them.
fn measure(clock: &mut impl Clock) -> Result<u32, ClockError> {
    let (start_jiffies, start) = next_edge(clock)?;
    clock.sleep(SPAN);
    let (end_jiffies, end) = next_edge(clock)?;
    let ticks = u64::from(end_jiffies.wrapping_sub(start_jiffies));
    hz_of(ticks, end.saturating_sub(start))
}

/// The jiffies value right after the next tick, and when it was read.
fn next_edge(clock: &mut impl Clock) -> Result<(u32, Duration), ClockError> {
    let first = clock.jiffies()?;
    let started = clock.now();
    loop {
        let now = clock.jiffies()?;
        let at = clock.now();
        if now != first {
            return Ok((now, at));
        }
        if at.saturating_sub(started) > EDGE_TIMEOUT {
            return Err(ClockError::Stalled(EDGE_TIMEOUT));
        }
        clock.pause();
    }
}

/// `ticks` counted in `elapsed`, as a whole number of ticks per second.
fn hz_of(ticks: u64, elapsed: Duration) -> Result<u32, ClockError> {
    let nanos = elapsed.as_nanos().max(1);
    let hz = ((u128::from(ticks) * 1_000_000_000 + nanos / 2) / nanos) as u64;
    if (10..=10_000).contains(&hz) {
        Ok(hz as u32)
    } else {
        Err(ClockError::Implausible(hz))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_ticks_per_second_round_to_the_nearest() {
        let ms = Duration::from_millis;
        assert_eq!(hz_of(25, ms(100)).unwrap(), 250);
        assert_eq!(hz_of(100, ms(100)).unwrap(), 1000);
        // Edge timing is off by the syscall latency, not by a tick.
        assert_eq!(hz_of(10, ms(100) + Duration::from_micros(80)).unwrap(), 100);
        assert_eq!(hz_of(30, ms(100) - Duration::from_micros(80)).unwrap(), 300);
        assert!(matches!(hz_of(0, ms(100)), Err(ClockError::Implausible(0))));
    }

    /// A simulated kernel: `hz` ticks per second, jiffies starting at `start`, time
    /// advancing by `step` at every read and by exactly the span when sleeping.
    struct FakeClock {
        hz: u64,
        start: u64,
        step: Duration,
        time: Duration,
    }

    impl Clock for FakeClock {
        fn jiffies(&mut self) -> Result<u32, ClockError> {
            self.time += self.step;
            let ticks = (self.time.as_nanos() * u128::from(self.hz) / 1_000_000_000) as u64;
            Ok(self.start.wrapping_add(ticks) as u32)
        }

        fn now(&mut self) -> Duration {
            self.time
        }

        fn sleep(&mut self, span: Duration) {
            self.time += span;
        }

        fn pause(&mut self) {}
    }

    #[test]
    fn a_counter_that_wraps_between_the_edges_still_measures() {
        // 250 ticks per second whose low 32 bits wrap during the measurement.
        let mut clock = FakeClock {
            hz: 250,
            start: u64::from(u32::MAX) - 5,
            step: Duration::from_micros(20),
            time: Duration::ZERO,
        };
        assert_eq!(measure(&mut clock).unwrap(), 250);
    }

    #[test]
    fn common_tick_rates_are_measured_exactly() {
        for hz in [100, 250, 300, 1000] {
            let mut clock = FakeClock {
                hz,
                start: 4_000_000_000,
                step: Duration::from_micros(7),
                time: Duration::ZERO,
            };
            assert_eq!(u64::from(measure(&mut clock).unwrap()), hz);
        }
    }

    #[test]
    fn a_clock_that_does_not_tick_is_an_error() {
        let mut clock = FakeClock {
            hz: 0,
            start: 7,
            step: Duration::from_millis(1),
            time: Duration::ZERO,
        };
        assert!(matches!(measure(&mut clock), Err(ClockError::Stalled(_))));
    }
}
