//! Retry and spreading rules shared by every part of the platform: NATS clients,
//! the agent's reconciler, the operator's writers.
//!
//! A fleet behaves like a herd: after a server restart, 10,000 agents that use the
//! same deterministic delays reconnect and re-read in lockstep. Every delay here is
//! either a capped exponential backoff or is spread with jitter drawn independently
//! on each device.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// A uniform random fraction in `[0, 1)`. Seeded by the standard library's per-process
/// random hasher keys, so two devices never draw the same sequence; good enough for
/// spreading load, and no extra dependency.
pub fn random_fraction() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `period` +/- 10 %, so a fleet that (re)connected at the same moment does not
/// re-read in lockstep forever.
pub fn jittered(period: Duration) -> Duration {
    period.mul_f64(0.9 + 0.2 * random_fraction())
}

/// A delay drawn uniformly from `[0, spread)`.
pub fn spread(spread: Duration) -> Duration {
    spread.mul_f64(random_fraction())
}

/// Retry delay after the n-th consecutive failure: 1 s, 2 s, 4 s ... capped at `cap`.
/// The one backoff rule of the platform (follower, agent reconciler, operator).
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(cap)
}

/// Reconnect delay: 100 ms doubling to a 10 s cap, each drawn from 50-150 % of that
/// value, so a fleet reconnecting after a server restart spreads out.
pub fn reconnect_delay(attempt: usize) -> Duration {
    let exp = attempt.min(7) as u32;
    let base = Duration::from_millis(100u64.saturating_mul(1u64 << exp)).min(Duration::from_secs(10));
    base.mul_f64(0.5 + random_fraction())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent_and_varies() {
        let draws: Vec<Duration> = (0..1000).map(|_| jittered(Duration::from_secs(10))).collect();
        assert!(
            draws
                .iter()
                .all(|d| *d >= Duration::from_secs(9) && *d < Duration::from_secs(11))
        );
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 900, "only {} distinct draws", distinct.len());
    }

    #[test]
    fn random_fraction_covers_the_unit_interval() {
        let draws: Vec<f64> = (0..10_000).map(|_| random_fraction()).collect();
        assert!(draws.iter().all(|f| (0.0..1.0).contains(f)));
        let low = draws.iter().filter(|f| **f < 0.1).count();
        let high = draws.iter().filter(|f| **f >= 0.9).count();
        // About 1000 each; far from 0 and 10000 on any fair source.
        assert!(
            (700..1300).contains(&low) && (700..1300).contains(&high),
            "{low} {high}"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let cap = Duration::from_secs(30);
        let got: Vec<u64> = (1..=7).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn reconnect_delays_grow_to_a_cap_with_jitter() {
        for attempt in 0..20 {
            let d = reconnect_delay(attempt);
            let base = Duration::from_millis(100 << attempt.min(7)).min(Duration::from_secs(10));
            assert!(d >= base / 2 && d <= base * 3 / 2, "attempt {attempt}: {d:?}");
        }
        let late: std::collections::BTreeSet<Duration> = (0..100).map(|_| reconnect_delay(30)).collect();
        assert!(late.len() > 90, "reconnect delays are not spread");
    }
}
