//! Folding device reports into one deployment's `.status.aggregate`. Pure.
//!
//! A device counts as `succeeded` or `failed` only for the *current* spec hash, so a
//! device still running an old version is `pending`, never `succeeded`. A device
//! whose last report reached NATS longer ago than the threshold is `unreported`,
//! whatever it said last: silence must never look like success. "Reached NATS" is
//! the server's timestamp on the KV entry, never the device's own clock, so a Pi
//! without a real-time clock reads neither as always stale nor as never stale.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::text::normalize_error;
use harmony_reconciler_contracts::{
    AgentStatus, DeploymentPhase, DeploymentRef, EventEntry, Id, InventorySnapshot, Phase, RuntimeStatus, SpecHash,
};
use iot_api::{AggregateStatus, DeviceError, DeviceEvent, ErrorGroup, RevisionCount};

/// Restarts or restores within the agent's recent window (10 minutes) that mark a
/// device as `restarting` for a deployment, and count it as failed.
pub const RESTARTING_THRESHOLD: u32 = 3;

/// A device whose containers of a deployment were restarted or restored within
/// this window (seen on the NATS server's clock) counts as failed for it, however
/// quickly the agent brought them back: a `podman rm -f` must show, and a
/// crash-looping version must never pass a rollout's gate. A rollout's batch with
/// a bake time uses that instead.
pub const RESTART_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Times kept per device and deployment at which its restart count was seen to grow.
const RESTARTS_SEEN_KEPT: usize = 8;

/// Limits that keep `.status` small whatever the fleet size.
#[derive(Debug, Clone, Copy)]
pub struct AggregateLimits {
    pub recent_events: usize,
    pub error_groups: usize,
    pub example_devices: usize,
}

impl Default for AggregateLimits {
    fn default() -> Self {
        Self {
            recent_events: 10,
            error_groups: 5,
            example_devices: 3,
        }
    }
}

/// What the aggregator keeps per device: the last report, trimmed to what
/// aggregation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReport {
    /// When the report reached NATS (the server's clock).
    pub received_at: DateTime<Utc>,
    pub deployments: BTreeMap<DeploymentRef, DeploymentPhase>,
    /// Deployment-tagged events, newest last, at most a few per device.
    pub events: Vec<EventEntry>,
    /// What the device says it is, for its `Device.status` (information only).
    pub about: DeviceFacts,
    /// Per deployment, when (the server's clock) a report first showed more
    /// restarts or restores than the one before, newest last, at most a few. Kept
    /// by the index across reports; an operator restart starts it afresh.
    pub restarts_seen: BTreeMap<DeploymentRef, Vec<DateTime<Utc>>>,
}

/// The parts of a report that `Device.status` shows besides phases.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceFacts {
    pub agent_version: String,
    pub inventory: Option<InventorySnapshot>,
    pub runtime: RuntimeStatus,
}

/// Events kept per device in memory.
pub const EVENTS_KEPT_PER_DEVICE: usize = 8;

impl DeviceReport {
    /// The parts of a status aggregation needs, stamped with the server's time.
    pub fn new(s: AgentStatus, received_at: DateTime<Utc>) -> Self {
        let mut events: Vec<EventEntry> = s.recent_events.into_iter().filter(|e| e.deployment.is_some()).collect();
        if events.len() > EVENTS_KEPT_PER_DEVICE {
            events.drain(..events.len() - EVENTS_KEPT_PER_DEVICE);
        }
        Self {
            received_at,
            deployments: s.deployments,
            events,
            about: DeviceFacts {
                agent_version: s.agent_version,
                inventory: s.inventory,
                runtime: s.runtime,
            },
            restarts_seen: BTreeMap::new(),
        }
    }

    /// Carries the restart history over from the device's previous report, adding
    /// this report's time for every deployment whose restarts plus restores grew
    /// (for the same spec: the agent counts per spec, and from zero after its own
    /// restart, so a drop is a new count, not a restart).
    pub fn follow(mut self, previous: Option<&DeviceReport>) -> Self {
        let Some(previous) = previous else { return self };
        for (dep, phase) in &self.deployments {
            let mut seen = previous.restarts_seen.get(dep).cloned().unwrap_or_default();
            if let Some(before) = previous.deployments.get(dep)
                && before.spec_hash == phase.spec_hash
                && phase.restarts + phase.restores > before.restarts + before.restores
            {
                seen.push(self.received_at);
                if seen.len() > RESTARTS_SEEN_KEPT {
                    seen.drain(..seen.len() - RESTARTS_SEEN_KEPT);
                }
            }
            if !seen.is_empty() {
                self.restarts_seen.insert(dep.clone(), seen);
            }
        }
        self
    }

    /// Restarts or restores of `deployment` seen within `window` before `now`.
    pub fn restarts_within(
        &self,
        deployment: &DeploymentRef,
        window: std::time::Duration,
        now: DateTime<Utc>,
    ) -> usize {
        let Ok(window) = chrono::Duration::from_std(window) else {
            return 0;
        };
        self.restarts_seen
            .get(deployment)
            .map_or(0, |seen| seen.iter().filter(|t| **t > now - window).count())
    }
}

/// How one target device counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceVerdict {
    Succeeded,
    Failed,
    Pending,
    Unreported,
}

/// How one target counts for the current spec. A device running it whose
/// containers keep coming back (restarted or restored within `restart_window`, or
/// [`RESTARTING_THRESHOLD`] times in the agent's 10-minute window) counts as
/// failed: the agent's quick repairs must not hide a crash loop.
pub fn verdict(
    report: Option<&DeviceReport>,
    deployment: &DeploymentRef,
    spec_hash: &SpecHash,
    now: DateTime<Utc>,
    staleness: Staleness,
    restart_window: std::time::Duration,
) -> DeviceVerdict {
    let Some(report) = report else {
        return DeviceVerdict::Unreported;
    };
    if staleness.is_stale(report.received_at, now) {
        return DeviceVerdict::Unreported;
    }
    let Some(phase) = report.deployments.get(deployment) else {
        return DeviceVerdict::Pending;
    };
    let current = match &phase.spec_hash {
        Some(h) => h == spec_hash,
        // A payload the device could not even parse has no hash; its failure is about
        // whatever it was sent, which is the current spec once the write path is done.
        None => phase.phase == Phase::Failed,
    };
    match (current, phase.phase) {
        (true, Phase::Running) if restart_failure(report, deployment, restart_window, now).is_some() => {
            DeviceVerdict::Failed
        }
        (true, Phase::Running) => DeviceVerdict::Succeeded,
        (true, Phase::Failed) => DeviceVerdict::Failed,
        _ => DeviceVerdict::Pending,
    }
}

/// Why a running deployment counts as failed because of restarts, if it does.
pub fn restart_failure(
    report: &DeviceReport,
    deployment: &DeploymentRef,
    window: std::time::Duration,
    now: DateTime<Utc>,
) -> Option<String> {
    let phase = report.deployments.get(deployment)?;
    let seen = report.restarts_within(deployment, window, now);
    if seen > 0 {
        return Some(format!(
            "containers restarted or restored {seen} time(s) within {}s",
            window.as_secs()
        ));
    }
    (phase.recent_restarts >= RESTARTING_THRESHOLD).then(|| {
        format!(
            "containers restarted or restored {} time(s) within 10 minutes",
            phase.recent_restarts
        )
    })
}

/// What one aggregate is computed for.
#[derive(Debug, Clone, Copy)]
pub struct AggregateInput<'a> {
    pub deployment: &'a DeploymentRef,
    pub generation: Option<i64>,
    pub spec_hash: &'a SpecHash,
    pub targets: &'a BTreeSet<Id>,
    /// The current `DeploymentRevision` (none before the write path made one).
    pub revision: Option<u64>,
}

pub fn aggregate(
    input: AggregateInput<'_>,
    reports: &HashMap<Id, DeviceReport>,
    now: DateTime<Utc>,
    staleness: Staleness,
    limits: AggregateLimits,
) -> AggregateStatus {
    let AggregateInput {
        deployment,
        generation,
        spec_hash,
        targets,
        revision,
    } = input;
    let mut agg = AggregateStatus {
        observed_generation: generation,
        targets: targets.len() as u32,
        spec_hash: spec_hash.to_string(),
        revision,
        ..Default::default()
    };
    let mut on_revision: BTreeMap<u64, u32> = BTreeMap::new();
    // message (volatile tokens masked) -> devices
    let mut groups: BTreeMap<String, Vec<&Id>> = BTreeMap::new();
    let mut events: Vec<(&Id, &EventEntry)> = Vec::new();
    for device in targets {
        let report = reports.get(device);
        if let Some(r) = report {
            agg.last_heartbeat_at = agg.last_heartbeat_at.max(Some(r.received_at));
            events.extend(
                r.events
                    .iter()
                    .filter(|e| e.deployment.as_ref() == Some(deployment))
                    .map(|e| (device, e)),
            );
        }
        let verdict = verdict(report, deployment, spec_hash, now, staleness, RESTART_FAILURE_WINDOW);
        if verdict != DeviceVerdict::Unreported
            && let Some(phase) = report.and_then(|r| r.deployments.get(deployment))
        {
            match phase.revision {
                Some(n) => *on_revision.entry(n).or_default() += 1,
                None => agg.unknown_revision += 1,
            }
        }
        if matches!(verdict, DeviceVerdict::Succeeded | DeviceVerdict::Failed)
            && let Some(phase) = report.and_then(|r| r.deployments.get(deployment))
            && phase.spec_hash.as_ref() == Some(spec_hash)
        {
            agg.restarts += phase.restarts + phase.restores;
            if phase.recent_restarts >= RESTARTING_THRESHOLD {
                agg.restarting += 1;
            }
        }
        match verdict {
            DeviceVerdict::Succeeded => agg.succeeded += 1,
            DeviceVerdict::Pending => agg.pending += 1,
            DeviceVerdict::Unreported => agg.unreported += 1,
            DeviceVerdict::Failed => {
                agg.failed += 1;
                let phase = report.and_then(|r| r.deployments.get(deployment));
                let message = failure_message(report, deployment, now, RESTART_FAILURE_WINDOW);
                let at = phase.map(|p| p.last_event_at).unwrap_or(now);
                if agg.last_error.as_ref().is_none_or(|e| at > e.at) {
                    agg.last_error = Some(DeviceError {
                        device: device.clone(),
                        message: message.clone(),
                        at,
                    });
                }
                groups
                    .entry(normalize_error(&message, Some(device.as_str())))
                    .or_default()
                    .push(device);
            }
        }
    }
    let mut top: Vec<ErrorGroup> = groups
        .into_iter()
        .map(|(message, devices)| ErrorGroup {
            message,
            devices: devices.len() as u32,
            example_devices: devices.into_iter().take(limits.example_devices).cloned().collect(),
        })
        .collect();
    top.sort_by(|a, b| b.devices.cmp(&a.devices).then_with(|| a.message.cmp(&b.message)));
    top.truncate(limits.error_groups);
    agg.top_errors = top;
    agg.revisions = on_revision
        .into_iter()
        .rev()
        .map(|(revision, devices)| RevisionCount { revision, devices })
        .collect();
    agg.revision_summary = revision.map(|n| {
        let running = revision_running(targets, reports, deployment, n, now, staleness);
        format!("{running}/{} on rev {n}", agg.targets)
    });

    // Newest first; the same message from many devices is shown once.
    events.sort_by(|a, b| b.1.at.cmp(&a.1.at).then_with(|| a.0.cmp(b.0)));
    let mut seen = BTreeSet::new();
    agg.recent_events = events
        .into_iter()
        .filter(|(device, e)| seen.insert(normalize_error(&e.message, Some(device.as_str()))))
        .take(limits.recent_events)
        .map(|(device, e)| DeviceEvent {
            at: e.at,
            device: device.clone(),
            severity: e.severity,
            message: e.message.clone(),
        })
        .collect();
    agg
}

/// What a failed target says: its error, or why its restarts count as a failure.
pub fn failure_message(
    report: Option<&DeviceReport>,
    deployment: &DeploymentRef,
    now: DateTime<Utc>,
    restart_window: std::time::Duration,
) -> String {
    let Some(report) = report else {
        return "failed (no report)".into();
    };
    let Some(phase) = report.deployments.get(deployment) else {
        return "failed (no phase reported)".into();
    };
    if phase.phase == Phase::Running
        && let Some(why) = restart_failure(report, deployment, restart_window, now)
    {
        return why;
    }
    phase
        .last_error
        .clone()
        .unwrap_or_else(|| "failed (no error message)".into())
}

/// Targets that report the revision `n` Running (fresh reports only).
fn revision_running(
    targets: &BTreeSet<Id>,
    reports: &HashMap<Id, DeviceReport>,
    deployment: &DeploymentRef,
    n: u64,
    now: DateTime<Utc>,
    staleness: Staleness,
) -> usize {
    targets
        .iter()
        .filter_map(|d| reports.get(d))
        .filter(|r| !staleness.is_stale(r.received_at, now))
        .filter_map(|r| r.deployments.get(deployment))
        .filter(|p| p.phase == Phase::Running && p.revision == Some(n))
        .count()
}

/// The last good revision after `next`: the current revision once every target
/// runs it (succeeded counts the current spec hash; every target must also report
/// the current revision, so a device on an older revision with the same score, or
/// an agent that reports none, does not vouch for it). Otherwise the previous one.
pub fn last_good_revision(previous: Option<&AggregateStatus>, next: &AggregateStatus) -> Option<u64> {
    let before = previous.and_then(|p| p.last_good_revision);
    let all_on_current = next.targets > 0
        && next.succeeded == next.targets
        && next.revision.is_some_and(|n| {
            next.revisions.len() == 1 && next.revisions[0].revision == n && next.revisions[0].devices == next.targets
        });
    if all_on_current {
        next.revision.max(before)
    } else {
        before
    }
}

/// Keeps status writes to meaningful changes: if `next` differs from `previous` only
/// in `last_heartbeat_at`, `previous` is kept as it is. A healthy fleet then causes
/// no writes at all; silence shows as `unreported`, which is a real change.
pub fn without_heartbeat_churn(previous: Option<&AggregateStatus>, next: AggregateStatus) -> AggregateStatus {
    match previous {
        Some(prev)
            if AggregateStatus {
                last_heartbeat_at: prev.last_heartbeat_at,
                ..next.clone()
            } == *prev =>
        {
            prev.clone()
        }
        _ => next,
    }
}
