//! Restart and restore accounting per deployment.
//!
//! A service that crash-loops can look healthy at any single instant: podman restarts
//! it within milliseconds. So the agent counts restarts (podman's restart events, and
//! its own starts of exited containers) and restores (re-creations after an
//! out-of-band removal), and judges recent ones on its monotonic clock. Counts start
//! over when a deployment gets new containers (a new spec).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use harmony_reconciler_contracts::DeploymentRef;
use harmony_reconciler_contracts::status::RECENT_RESTART_WINDOW_SECS;
use tokio::time::Instant;

/// Restarts (or restores) within [`CRASH_LOOP_WINDOW`] that make a deployment Failed.
pub const CRASH_LOOP_RESTARTS: usize = 3;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(120);
const RECENT_WINDOW: Duration = Duration::from_secs(RECENT_RESTART_WINDOW_SECS);
/// Timestamps kept per deployment; enough to judge both windows.
const KEPT: usize = 256;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartCounts {
    pub restarts: u32,
    pub restores: u32,
    pub recent: u32,
}

#[derive(Debug, Default)]
struct Entry {
    restarts: u32,
    restores: u32,
    times: VecDeque<Instant>,
    last_exit_code: Option<i32>,
}

impl Entry {
    fn note(&mut self, at: Instant) {
        if self.times.len() == KEPT {
            self.times.pop_front();
        }
        self.times.push_back(at);
    }

    fn within(&self, now: Instant, window: Duration) -> usize {
        self.times
            .iter()
            .rev()
            .take_while(|t| now.saturating_duration_since(**t) <= window)
            .count()
    }
}

#[derive(Debug, Default)]
pub struct RestartBook {
    entries: BTreeMap<DeploymentRef, Entry>,
}

impl RestartBook {
    pub fn restarted(&mut self, dep: &DeploymentRef, at: Instant) {
        let e = self.entries.entry(dep.clone()).or_default();
        e.restarts = e.restarts.saturating_add(1);
        e.note(at);
    }

    pub fn restored(&mut self, dep: &DeploymentRef, at: Instant) {
        let e = self.entries.entry(dep.clone()).or_default();
        e.restores = e.restores.saturating_add(1);
        e.note(at);
    }

    pub fn died(&mut self, dep: &DeploymentRef, exit_code: Option<i32>) {
        if let Some(code) = exit_code {
            self.entries.entry(dep.clone()).or_default().last_exit_code = Some(code);
        }
    }

    /// The deployment got new containers: its history no longer applies.
    pub fn reset(&mut self, dep: &DeploymentRef) {
        self.entries.remove(dep);
    }

    pub fn retain(&mut self, keep: impl Fn(&DeploymentRef) -> bool) {
        self.entries.retain(|d, _| keep(d));
    }

    pub fn counts(&self, dep: &DeploymentRef, now: Instant) -> RestartCounts {
        self.entries
            .get(dep)
            .map(|e| RestartCounts {
                restarts: e.restarts,
                restores: e.restores,
                recent: e.within(now, RECENT_WINDOW) as u32,
            })
            .unwrap_or_default()
    }

    /// Why the deployment counts as crash-looping, if it does. The text is the same on
    /// every device (counts are in the phase's fields), so the fleet's errors group.
    pub fn crash_loop(&self, dep: &DeploymentRef, now: Instant) -> Option<String> {
        let e = self.entries.get(dep)?;
        if e.within(now, CRASH_LOOP_WINDOW) < CRASH_LOOP_RESTARTS {
            return None;
        }
        let code = e
            .last_exit_code
            .map(|c| format!(" (last exit code {c})"))
            .unwrap_or_default();
        Some(format!(
            "crash loop: containers keep stopping and coming back{code}; see restarts and restores"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep() -> DeploymentRef {
        DeploymentRef::new("default", "web").expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn three_quick_restarts_are_a_crash_loop_that_clears_when_quiet() {
        let mut book = RestartBook::default();
        let d = dep();
        let t0 = Instant::now();
        book.restarted(&d, t0);
        book.died(&d, Some(3));
        book.restarted(&d, t0);
        assert_eq!(book.crash_loop(&d, t0), None, "two restarts are not a loop");
        book.restored(&d, t0);
        let why = book.crash_loop(&d, t0).expect("three are");
        assert!(why.contains("last exit code 3"), "{why}");
        assert_eq!(
            book.counts(&d, t0),
            RestartCounts {
                restarts: 2,
                restores: 1,
                recent: 3
            }
        );
        let later = t0 + CRASH_LOOP_WINDOW + Duration::from_secs(1);
        assert_eq!(book.crash_loop(&d, later), None);
        assert_eq!(book.counts(&d, later).recent, 3, "still within the 10 minute window");
        let much_later = t0 + RECENT_WINDOW + Duration::from_secs(1);
        assert_eq!(book.counts(&d, much_later).recent, 0);
        assert_eq!(book.counts(&d, much_later).restarts, 2, "totals stay");
        book.reset(&d);
        assert_eq!(book.counts(&d, much_later), RestartCounts::default());
    }
}
