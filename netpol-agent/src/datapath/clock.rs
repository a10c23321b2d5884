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
    let hz = measure(|| jiffies(program))?;
    Ok(*HZ.get_or_init(|| hz))
}

/// The low 32 bits of jiffies, as the program returns them.
fn jiffies(program: &SchedClassifier) -> Result<u32, ClockError> {
    // Any frame will do: the program does not look at it (TC wants an Ethernet header).
    let frame = [0u8; 64];
    let result = program.test_run(TestRunOptions {
        data_in: Some(&frame),
        repeat: 1,
        ..TestRunOptions::new()
    })?;
    Ok(result.return_value)
}

/// Ticks between two tick edges `SPAN` apart, over the time between them.
fn measure(mut read: impl FnMut() -> Result<u32, ClockError>) -> Result<u32, ClockError> {
    let (start_jiffies, start) = next_edge(&mut read)?;
    std::thread::sleep(SPAN);
    let (end_jiffies, end) = next_edge(&mut read)?;
    let ticks = u64::from(end_jiffies.wrapping_sub(start_jiffies));
    hz_of(ticks, end - start)
}

/// The jiffies value right after the next tick, and when it was read.
fn next_edge(
    read: &mut impl FnMut() -> Result<u32, ClockError>,
) -> Result<(u32, Instant), ClockError> {
    let first = read()?;
    let started = Instant::now();
    loop {
        let now = read()?;
        let at = Instant::now();
        if now != first {
            return Ok((now, at));
        }
        if at - started > EDGE_TIMEOUT {
            return Err(ClockError::Stalled(EDGE_TIMEOUT));
        }
        std::thread::yield_now();
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

    #[test]
    fn a_counter_that_wraps_between_the_edges_still_measures() {
        // A fake clock of 250 ticks per second whose low 32 bits wrap.
        let origin = Instant::now();
        let measured = measure(|| {
            let ticks = origin.elapsed().as_millis() as u64 / 4;
            Ok((u64::from(u32::MAX) - 5 + ticks) as u32)
        })
        .unwrap();
        assert_eq!(measured, 250);
    }

    #[test]
    fn a_clock_that_does_not_tick_is_an_error() {
        assert!(matches!(measure(|| Ok(7)), Err(ClockError::Stalled(_))));
    }
}
