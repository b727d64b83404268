//! Progressive rollouts, as a pure step: what the rollout knows (its status, the
//! batch plan, what KV holds, what devices report) -> its next status, and which
//! devices get the new revision now, or the last good one back.
//!
//! The rules (README "Rolling out safely"):
//! - **Dispatch is the gate.** A device gets the new revision only once its batch
//!   started; devices outside keep what they hold. KV is the record of dispatch:
//!   a device holding the new payload was dispatched, at the time the server
//!   stored it, so a restarted operator neither forgets nor repeats a dispatch.
//! - **Acknowledged** means the device reported the new revision in any phase.
//! - **Outcomes** of a dispatched device: succeeded (Running, containers not coming
//!   back), failed, timed out (`updateTimeout` since dispatch), silent (no report for
//!   `silenceTimeout` on the server's clock, after acknowledging) or never
//!   acknowledged (the same, without). All but the first are failures.
//! - **Batches.** A batch is complete when every online device of it was dispatched
//!   and each dispatched one has an outcome; it passes when its success ratio
//!   reaches its threshold, and fails as soon as it no longer can. Offline devices
//!   are skipped (pending offline) and dispatched when they return, if the rollout
//!   is still going or done.
//! - **`failureThreshold`** is checked across the rollout at every step.
//! - **`maxUnavailable`** caps dispatched devices not yet succeeded (updating or
//!   failed); dispatch waits for room.
//! - A failed gate suspends the rollout, or with `onFailure: Rollback` (or an
//!   abort) writes the last good revision back to every device that holds the new
//!   one, and to nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::text::normalize_error;
use harmony_reconciler_contracts::{DeploymentRef, Id, SpecHash};
use iot_api::rollout::{
    REASON_ABORTED, REASON_BATCH_FAILED, REASON_DEADLINE, REASON_FAILURE_THRESHOLD, promote_value, resolve_amount,
    success_threshold,
};
use iot_api::{BatchStatus, FailureCluster, OnFailure, RolloutPhase, RolloutSpec, RolloutStatus};

use crate::fleet_aggregate::{DeviceReport, DeviceVerdict, RESTART_FAILURE_WINDOW, failure_message, verdict};

/// Failure clusters kept in status, and example devices per cluster.
const CLUSTERS_KEPT: usize = 5;
const EXAMPLES_KEPT: usize = 3;

/// One target device as the rollout sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceView<'a> {
    /// When it was given the new revision, if it holds it (KV's stored time).
    pub dispatched_at: Option<DateTime<Utc>>,
    /// `Device.spec.paused`: no rollout reaches it.
    pub paused: bool,
    pub report: Option<&'a DeviceReport>,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// Everything one step decides from.
pub struct RolloutInput<'a> {
    pub deployment: &'a DeploymentRef,
    pub spec: &'a RolloutSpec,
    /// The revision being rolled out, and the spec hash devices report for it.
    pub revision: u64,
    pub spec_hash: &'a SpecHash,
    /// The devices of each batch when the rollout started (the revision's plan).
    pub plan: &'a [Vec<Id>],
    /// The rollout's status so far; one for another revision starts a new rollout.
    pub previous: Option<&'a RolloutStatus>,
    /// The last good revision, for a new rollout's `stableRevision`.
    pub last_good: Option<u64>,
    /// Whether the stable revision's payload can be written (its score is known).
    pub stable_available: bool,
    /// Every target device.
    pub devices: &'a BTreeMap<Id, DeviceView<'a>>,
    pub now: DateTime<Utc>,
    /// The promote and abort annotations' values.
    pub promote: Option<&'a str>,
    pub abort: Option<&'a str>,
    pub staleness: Staleness,
}

/// What a step decided.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutDecision {
    pub status: RolloutStatus,
    /// Devices that get the new revision now.
    pub dispatch: BTreeSet<Id>,
    /// Devices that get the stable revision back (they hold the new one).
    pub roll_back: BTreeSet<Id>,
    /// Whether devices holding nothing get the stable revision (after a rollback)
    /// rather than the new one (after completion) or nothing (while rolling out).
    pub newcomers: Newcomers,
}

/// What a device that holds nothing for the deployment gets, outside any batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Newcomers {
    /// It waits for its batch; it gets the stable revision meanwhile, if known.
    Stable,
    /// The rollout is complete: it gets the new revision.
    New,
}

/// How one dispatched device stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Updating,
    Succeeded,
    Failed(String),
    TimedOut,
    Silent,
    NeverAcknowledged,
}

impl Outcome {
    fn is_failure(&self) -> bool {
        !matches!(self, Outcome::Updating | Outcome::Succeeded)
    }

    fn message(&self, revision: u64, spec: &RolloutSpec) -> String {
        match self {
            Outcome::Failed(m) => m.clone(),
            Outcome::TimedOut => format!(
                "did not report revision {revision} Running within updateTimeout ({}s)",
                spec.update_timeout().as_secs()
            ),
            Outcome::Silent => format!(
                "reported revision {revision}, then fell silent for silenceTimeout ({}s)",
                spec.silence_timeout().as_secs()
            ),
            Outcome::NeverAcknowledged => format!(
                "never acknowledged revision {revision}, and silent for silenceTimeout ({}s)",
                spec.silence_timeout().as_secs()
            ),
            Outcome::Updating | Outcome::Succeeded => String::new(),
        }
    }
}

/// The outcome of a device dispatched at `dispatched_at`.
#[allow(clippy::too_many_arguments)]
pub fn outcome(
    report: Option<&DeviceReport>,
    deployment: &DeploymentRef,
    revision: u64,
    spec_hash: &SpecHash,
    dispatched_at: DateTime<Utc>,
    spec: &RolloutSpec,
    restart_window: Duration,
    now: DateTime<Utc>,
) -> Outcome {
    let since = |d: Duration| chrono::Duration::from_std(d).is_ok_and(|d| now - dispatched_at > d);
    let silent_for =
        |d: Duration| chrono::Duration::from_std(d).is_ok_and(|d| report.is_none_or(|r| now - r.received_at > d));
    let acknowledged = report
        .and_then(|r| r.deployments.get(deployment))
        .is_some_and(|p| p.spec_hash.as_ref() == Some(spec_hash) || p.revision == Some(revision));
    let silence = spec.silence_timeout();
    if since(silence) && silent_for(silence) {
        return if acknowledged {
            Outcome::Silent
        } else {
            Outcome::NeverAcknowledged
        };
    }
    // Freshness is judged above by the silence timeout, not the aggregate's window.
    let fresh = Staleness::after(Duration::MAX);
    match verdict(report, deployment, spec_hash, now, fresh, restart_window) {
        DeviceVerdict::Succeeded if acknowledged => Outcome::Succeeded,
        DeviceVerdict::Failed => Outcome::Failed(failure_message(report, deployment, now, restart_window)),
        _ if since(spec.update_timeout()) => Outcome::TimedOut,
        _ => Outcome::Updating,
    }
}

/// Devices of each batch now: the plan's, restricted to current targets, with
/// targets the plan does not know (matched since the start) in the last batch.
pub fn membership(plan: &[Vec<Id>], targets: &BTreeSet<Id>) -> Vec<Vec<Id>> {
    let mut batches: Vec<Vec<Id>> = plan
        .iter()
        .map(|b| b.iter().filter(|d| targets.contains(*d)).cloned().collect())
        .collect();
    if batches.is_empty() {
        batches.push(Vec::new());
    }
    let planned: BTreeSet<&Id> = plan.iter().flatten().collect();
    let joined: Vec<Id> = targets.iter().filter(|d| !planned.contains(d)).cloned().collect();
    if let Some(last) = batches.last_mut() {
        last.extend(joined);
    }
    batches
}

fn fresh_status(input: &RolloutInput<'_>, batches: &[Vec<Id>]) -> RolloutStatus {
    RolloutStatus {
        revision: input.revision,
        stable_revision: input.last_good.filter(|n| *n != input.revision),
        phase: RolloutPhase::Progressing,
        current_batch: 1,
        matched_at_start: input.plan.iter().map(Vec::len).sum::<usize>() as u32,
        started_at: input.now,
        progress_since: Some(input.now),
        waiting_since: None,
        finished_at: None,
        batches: batches.iter().map(|_| BatchStatus::default()).collect(),
        message: String::new(),
        failure_clusters: Vec::new(),
        summary: String::new(),
        reason: None,
    }
}

/// One step of the rollout.
pub fn step(input: &RolloutInput<'_>) -> RolloutDecision {
    let targets: BTreeSet<Id> = input.devices.keys().cloned().collect();
    let batches = membership(input.plan, &targets);
    let mut st = match input.previous {
        Some(p) if p.revision == input.revision => p.clone(),
        _ => fresh_status(input, &batches),
    };
    st.batches.resize(batches.len(), BatchStatus::default());
    let spec = input.spec;
    let now = input.now;
    let batch_of: BTreeMap<&Id, usize> = batches
        .iter()
        .enumerate()
        .flat_map(|(i, b)| b.iter().map(move |d| (d, i)))
        .collect();
    // A batch whose devices hold the new revision has started, whatever the status
    // says (its write may not have landed before a restart).
    let mut k = (st.current_batch.max(1) as usize - 1).min(batches.len() - 1);
    for (d, view) in input.devices {
        if view.dispatched_at.is_some()
            && let Some(&i) = batch_of.get(d)
        {
            k = k.max(i);
        }
    }
    let mut dispatched: BTreeMap<Id, DateTime<Utc>> = input
        .devices
        .iter()
        .filter_map(|(d, v)| v.dispatched_at.map(|t| (d.clone(), t)))
        .collect();
    let mut decision = RolloutDecision {
        status: st.clone(),
        dispatch: BTreeSet::new(),
        roll_back: BTreeSet::new(),
        newcomers: Newcomers::Stable,
    };
    let total = st.matched_at_start;
    let max_unavailable = spec
        .max_unavailable
        .as_ref()
        .and_then(|m| resolve_amount(m, total).ok())
        .map(|n| n.max(1) as usize);

    let eligible = |d: &Id| !input.devices.get(d).is_some_and(|v| v.paused);
    if st.phase == RolloutPhase::Complete {
        decision.newcomers = Newcomers::New;
        decision.dispatch = targets
            .iter()
            .filter(|d| !dispatched.contains_key(*d) && eligible(d))
            .cloned()
            .collect();
        st.current_batch = batches.len() as u32;
        finish(&mut st, input, &batches, &dispatched);
        decision.status = st;
        return decision;
    }
    let abort_requested = input.abort == Some(input.revision.to_string().as_str());
    // (reason, sentence, whether a person asked for the rollback)
    let mut failure: Option<(&'static str, String, bool)> = None;
    if abort_requested && !matches!(st.phase, RolloutPhase::RollingBack | RolloutPhase::RolledBack) {
        failure = Some((
            REASON_ABORTED,
            "aborted by a person (annotation iot.nationtech.io/rollout-abort)".into(),
            true,
        ));
    }
    let restart_window = |i: usize| {
        spec.batches
            .get(i)
            .and_then(|b| b.bake_time())
            .unwrap_or(RESTART_FAILURE_WINDOW)
    };
    let outcomes = |dispatched: &BTreeMap<Id, DateTime<Utc>>| -> BTreeMap<Id, Outcome> {
        dispatched
            .iter()
            .filter(|(d, _)| targets.contains(*d))
            .map(|(d, at)| {
                let view = input.devices.get(d).copied().unwrap_or_default();
                let window = restart_window(batch_of.get(d).copied().unwrap_or(0));
                let o = outcome(
                    view.report,
                    input.deployment,
                    input.revision,
                    input.spec_hash,
                    *at,
                    spec,
                    window,
                    now,
                );
                (d.clone(), o)
            })
            .collect()
    };
    let online = |d: &Id| {
        let v = input.devices.get(d).copied().unwrap_or_default();
        !v.paused && v.report.is_some_and(|r| !input.staleness.is_stale(r.received_at, now))
    };

    if matches!(
        st.phase,
        RolloutPhase::Progressing | RolloutPhase::Paused | RolloutPhase::Suspended
    ) {
        let mut out = outcomes(&dispatched);
        loop {
            if failure.is_some() || st.phase == RolloutPhase::Suspended {
                break;
            }
            st.current_batch = k as u32 + 1;
            let batch = &batches[k];
            let spec_batch = spec.batches.get(k);
            let threshold = success_threshold(spec_batch, k);
            if st.batches[k].started_at.is_none() {
                st.batches[k].started_at = Some(now);
            }
            // Gates first: failures count whatever else happens in this step.
            if let Some(why) = global_failure(spec, &out) {
                failure = Some((REASON_FAILURE_THRESHOLD, why, false));
                break;
            }
            if let Some(deadline) = spec.progress_deadline_seconds
                && st.phase == RolloutPhase::Progressing
                && st.waiting_since.is_none()
                && st
                    .progress_since
                    .is_some_and(|t| now - t > chrono::Duration::seconds(i64::from(deadline)))
            {
                failure = Some((
                    REASON_DEADLINE,
                    format!("progress deadline exceeded: the rollout did not finish within {deadline}s"),
                    false,
                ));
                break;
            }
            let in_batch: Vec<&Id> = batch.iter().collect();
            let dispatched_k = in_batch.iter().filter(|d| dispatched.contains_key(**d)).count();
            let failures_k = in_batch
                .iter()
                .filter(|d| out.get(**d).is_some_and(Outcome::is_failure))
                .count();
            // Online devices of started batches that do not hold it yet.
            let waiting: Vec<Id> = batches[..=k]
                .iter()
                .flatten()
                .filter(|d| !dispatched.contains_key(*d) && online(d))
                .cloned()
                .collect();
            let waiting_k = in_batch.iter().filter(|d| waiting.contains(d)).count();
            if failures_k * 100 > (100 - threshold as usize) * (dispatched_k + waiting_k) {
                failure = Some((
                    REASON_BATCH_FAILED,
                    format!(
                        "batch {} of {} failed its gate: {failures_k} of {} device(s) failed (success threshold {threshold}%)",
                        k + 1,
                        batches.len(),
                        dispatched_k + waiting_k
                    ),
                    false,
                ));
                break;
            }
            if spec.paused {
                st.phase = RolloutPhase::Paused;
                st.waiting_since.get_or_insert(now);
                st.message = format!("paused by spec.rollout.paused at batch {} of {}", k + 1, batches.len());
                break;
            }
            // Dispatch what there is room for.
            let unavailable = out.values().filter(|o| **o != Outcome::Succeeded).count();
            let room = max_unavailable.map_or(usize::MAX, |m| m.saturating_sub(unavailable));
            // A device pulls from dispatch until it reports Running or failed.
            // An offline device is not pulling: it must not hold a slot until it
            // times out.
            let pulling = out
                .iter()
                .filter(|(d, o)| **o == Outcome::Updating && online(d))
                .count();
            let pull_room = spec
                .max_concurrent_pulls
                .map_or(usize::MAX, |n| (n as usize).saturating_sub(pulling));
            let room = room.min(pull_room);
            for d in waiting.iter().take(room) {
                dispatched.insert(d.clone(), now);
                decision.dispatch.insert(d.clone());
            }
            if !decision.dispatch.is_empty() {
                out = outcomes(&dispatched);
            }
            let complete = waiting.len() <= room
                && in_batch
                    .iter()
                    .filter(|d| dispatched.contains_key(**d))
                    .all(|d| out.get(*d).is_some_and(|o| *o != Outcome::Updating));
            if !complete {
                resume_progress(&mut st, now);
                st.phase = RolloutPhase::Progressing;
                st.message = format!("batch {} of {}: updating", k + 1, batches.len());
                let held = waiting.len().saturating_sub(room);
                if held > 0
                    && let Some(n) = spec.max_concurrent_pulls
                    && pull_room <= room
                {
                    st.message.push_str(&format!(
                        "; {held} device(s) wait for a pull slot (maxConcurrentPulls {n})"
                    ));
                }
                break;
            }
            let dispatched_k = in_batch.iter().filter(|d| dispatched.contains_key(**d)).count();
            let succeeded_k = in_batch
                .iter()
                .filter(|d| out.get(**d) == Some(&Outcome::Succeeded))
                .count();
            if succeeded_k * 100 < threshold as usize * dispatched_k {
                failure = Some((
                    REASON_BATCH_FAILED,
                    format!(
                        "batch {} of {} fell short: {succeeded_k} of {dispatched_k} device(s) succeeded (success threshold {threshold}%)",
                        k + 1,
                        batches.len()
                    ),
                    false,
                ));
                break;
            }
            let passed_at = *st.batches[k].passed_at.get_or_insert(now);
            if spec_batch.is_some_and(|b| b.pause.is_some()) {
                let value = promote_value(input.revision, k as u32 + 1);
                if input.promote != Some(value.as_str()) {
                    st.phase = RolloutPhase::Paused;
                    st.waiting_since.get_or_insert(now);
                    st.message = format!(
                        "batch {} of {} passed; waiting for a person to promote it (iotctl rollout promote)",
                        k + 1,
                        batches.len()
                    );
                    break;
                }
            }
            if let Some(bake) = spec_batch.and_then(|b| b.bake_time())
                && chrono::Duration::from_std(bake).is_ok_and(|b| now < passed_at + b)
            {
                st.phase = RolloutPhase::Progressing;
                st.message = format!("batch {} of {} passed; baking", k + 1, batches.len());
                break;
            }
            resume_progress(&mut st, now);
            if k + 1 == batches.len() {
                st.phase = RolloutPhase::Complete;
                st.finished_at = Some(now);
                st.message = format!("every batch passed; revision {} is rolled out", input.revision);
                decision.newcomers = Newcomers::New;
                // The devices skipped while offline get it now, in KV, for when they
                // return: nothing steps a complete rollout again until a change.
                for d in targets.iter().filter(|d| !dispatched.contains_key(*d) && eligible(d)) {
                    decision.dispatch.insert(d.clone());
                }
                break;
            }
            k += 1;
        }
        if let Some((reason, why, abort)) = failure.take() {
            st.failure_clusters = clusters(input, &out);
            st.reason = Some(reason.to_owned());
            // Nothing decided in a step that fails is dispatched.
            for d in std::mem::take(&mut decision.dispatch) {
                dispatched.remove(&d);
            }
            let rollback = abort || spec.on_failure() == OnFailure::Rollback;
            if rollback && input.stable_available && st.stable_revision.is_some() {
                st.phase = RolloutPhase::RollingBack;
                st.message = format!(
                    "{why}; rolling back to revision {}",
                    st.stable_revision.unwrap_or_default()
                );
            } else {
                st.phase = RolloutPhase::Suspended;
                st.message = if rollback {
                    format!("{why}; no earlier good revision to roll back to, so every device keeps what it has")
                } else {
                    format!("{why}; suspended (onFailure: Pause): every device keeps what it has")
                };
            }
        }
    }
    if matches!(st.phase, RolloutPhase::RollingBack | RolloutPhase::RolledBack) {
        decision.roll_back = dispatched.keys().filter(|d| targets.contains(*d)).cloned().collect();
        if decision.roll_back.is_empty() {
            if st.phase == RolloutPhase::RollingBack {
                st.finished_at = Some(now);
            }
            st.phase = RolloutPhase::RolledBack;
        }
    }
    finish(&mut st, input, &batches, &dispatched);
    decision.status = st;
    decision
}

/// Time waiting for a person ends: it does not count against the deadline.
fn resume_progress(st: &mut RolloutStatus, now: DateTime<Utc>) {
    if let Some(since) = st.waiting_since.take()
        && let Some(p) = st.progress_since.as_mut()
    {
        *p += now - since;
    }
}

fn global_failure(spec: &RolloutSpec, out: &BTreeMap<Id, Outcome>) -> Option<String> {
    let t = spec.failure_threshold.as_ref()?;
    let failed = out.values().filter(|o| o.is_failure()).count();
    let completed = out.values().filter(|o| **o != Outcome::Updating).count();
    let min = t.min_completed.unwrap_or(1).max(1) as usize;
    (failed > 0 && completed >= min && failed * 100 >= t.percent as usize * completed).then(|| {
        format!(
            "failureThreshold reached: {failed} of {completed} completed device(s) failed (threshold {}%)",
            t.percent
        )
    })
}

/// Per-batch counts and the summary, from where things stand after the step.
fn finish(
    st: &mut RolloutStatus,
    input: &RolloutInput<'_>,
    batches: &[Vec<Id>],
    dispatched: &BTreeMap<Id, DateTime<Utc>>,
) {
    let current = st.current_batch.max(1) as usize - 1;
    let mut running = 0;
    for (i, batch) in batches.iter().enumerate() {
        let mut b = BatchStatus {
            selected: batch.len() as u32,
            started_at: st.batches[i].started_at,
            passed_at: st.batches[i].passed_at,
            ..Default::default()
        };
        for d in batch {
            let view = input.devices.get(d).copied().unwrap_or_default();
            let Some(at) = dispatched.get(d) else {
                let started = i <= current && b.started_at.is_some();
                let offline = view.paused
                    || view
                        .report
                        .is_none_or(|r| input.staleness.is_stale(r.received_at, input.now));
                if started && !st.phase.is_final() {
                    if offline {
                        b.pending_offline += 1;
                    } else if st.phase == RolloutPhase::Progressing {
                        b.pending_pull += 1;
                    }
                }
                continue;
            };
            b.dispatched += 1;
            let window = input
                .spec
                .batches
                .get(i)
                .and_then(|s| s.bake_time())
                .unwrap_or(RESTART_FAILURE_WINDOW);
            match outcome(
                view.report,
                input.deployment,
                input.revision,
                input.spec_hash,
                *at,
                input.spec,
                window,
                input.now,
            ) {
                Outcome::Succeeded => {
                    b.succeeded += 1;
                    running += 1;
                }
                Outcome::Failed(_) => b.failed += 1,
                Outcome::TimedOut => b.timed_out += 1,
                Outcome::Silent => b.silent += 1,
                Outcome::NeverAcknowledged => b.never_acknowledged += 1,
                Outcome::Updating => {}
            }
        }
        st.batches[i] = b;
    }
    let targets: usize = batches.iter().map(Vec::len).sum();
    st.summary = match st.phase {
        RolloutPhase::Complete => format!("complete, {running}/{targets}"),
        RolloutPhase::RolledBack => format!("rolled back to rev {}", st.stable_revision.unwrap_or_default()),
        _ => format!("batch {}/{}, {running}/{targets}", st.current_batch, batches.len()),
    };
}

/// Failures grouped by message, with the labels all of a group's devices share
/// that not every target shares.
fn clusters(input: &RolloutInput<'_>, out: &BTreeMap<Id, Outcome>) -> Vec<FailureCluster> {
    let mut groups: BTreeMap<String, Vec<&Id>> = BTreeMap::new();
    for (d, o) in out.iter().filter(|(_, o)| o.is_failure()) {
        let message = normalize_error(&o.message(input.revision, input.spec), Some(d.as_str()));
        groups.entry(message).or_default().push(d);
    }
    let labels_of = |d: &Id| input.devices.get(d).and_then(|v| v.labels);
    let everyone = shared(input.devices.keys().map(&labels_of));
    let mut out: Vec<FailureCluster> = groups
        .into_iter()
        .map(|(message, devices)| {
            let mut shared_labels = shared(devices.iter().map(|d| labels_of(d)));
            shared_labels.retain(|k, v| everyone.get(k) != Some(v));
            FailureCluster {
                message,
                devices: devices.len() as u32,
                example_devices: devices.iter().take(EXAMPLES_KEPT).map(|d| d.to_string()).collect(),
                shared_labels,
            }
        })
        .collect();
    out.sort_by(|a, b| b.devices.cmp(&a.devices).then_with(|| a.message.cmp(&b.message)));
    out.truncate(CLUSTERS_KEPT);
    out
}

/// The labels every one of `sets` carries with the same value.
fn shared<'a>(mut sets: impl Iterator<Item = Option<&'a BTreeMap<String, String>>>) -> BTreeMap<String, String> {
    let Some(first) = sets.next() else {
        return BTreeMap::new();
    };
    let mut common = first.cloned().unwrap_or_default();
    for s in sets {
        match s {
            Some(s) => common.retain(|k, v| s.get(k) == Some(v)),
            None => common.clear(),
        }
    }
    common
}
