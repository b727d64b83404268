//! The pure rollout step: dispatch batch by batch, gates, silence on the server's
//! clock, offline devices, maxUnavailable, failureThreshold, pause and promote,
//! abort and rollback, and picking up after a restart from what KV holds.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::*;
use iot_api::rollout::{BatchPause, FailureThreshold, OnFailure, REASON_ABORTED, REASON_DEADLINE};
use iot_api::{RolloutBatch, RolloutPhase, RolloutSpec, RolloutStatus};
use iot_operator::fleet_aggregate::DeviceReport;
use iot_operator::rollout::{DeviceView, Newcomers, RolloutDecision, RolloutInput, step};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

const REV: u64 = 2;

fn t0() -> DateTime<Utc> {
    Utc.timestamp_opt(1_900_000_000, 0).single().expect("time")
}

fn dep() -> DeploymentRef {
    DeploymentRef::new("ns", "web").expect("ref")
}

fn id(s: &str) -> Id {
    Id::new(s).expect("id")
}

fn new_hash() -> SpecHash {
    SpecHash::from_reported("new")
}

/// What one device has said, last.
#[derive(Clone, Copy)]
enum Says {
    Nothing,
    /// Running the old revision.
    Old,
    NewPending,
    NewRunning,
    NewFailed,
}

fn report(says: Says, at: DateTime<Utc>) -> Option<DeviceReport> {
    let phase = |p: Phase, hash: &str, rev: u64, err: Option<&str>| {
        let mut ph = DeploymentPhase::new(p, Some(SpecHash::from_reported(hash)), err.map(str::to_owned), at);
        ph.revision = Some(rev);
        ph
    };
    let phase = match says {
        Says::Nothing => return None,
        Says::Old => phase(Phase::Running, "old", 1, None),
        Says::NewPending => phase(Phase::Pending, "new", REV, None),
        Says::NewRunning => phase(Phase::Running, "new", REV, None),
        Says::NewFailed => phase(Phase::Failed, "new", REV, Some("container web exited with code 1")),
    };
    Some(DeviceReport {
        received_at: at,
        deployments: [(dep(), phase)].into(),
        events: vec![],
        about: Default::default(),
        restarts_seen: Default::default(),
    })
}

/// A fleet the tests move through time.
struct Fleet {
    spec: RolloutSpec,
    plan: Vec<Vec<Id>>,
    now: DateTime<Utc>,
    status: Option<RolloutStatus>,
    /// Device -> when it got the new revision.
    dispatched: BTreeMap<Id, DateTime<Utc>>,
    reports: BTreeMap<Id, Option<DeviceReport>>,
    labels: BTreeMap<Id, BTreeMap<String, String>>,
    paused: BTreeSet<Id>,
    promote: Option<String>,
    abort: Option<String>,
    order: Vec<Id>,
}

impl Fleet {
    /// Devices d0..dN, every one running the old revision and reporting now.
    fn new(spec: RolloutSpec, plan: &[&[&str]]) -> Self {
        let plan: Vec<Vec<Id>> = plan.iter().map(|b| b.iter().map(|d| id(d)).collect()).collect();
        let now = t0();
        let reports = plan
            .iter()
            .flatten()
            .map(|d| (d.clone(), report(Says::Old, now)))
            .collect();
        Self {
            spec,
            plan,
            now,
            status: None,
            dispatched: BTreeMap::new(),
            reports,
            labels: BTreeMap::new(),
            paused: BTreeSet::new(),
            promote: None,
            abort: None,
            order: Vec::new(),
        }
    }

    /// One step; its dispatches and rollbacks are applied to KV at once.
    fn step(&mut self) -> RolloutDecision {
        let views: BTreeMap<Id, DeviceView<'_>> = self
            .reports
            .iter()
            .map(|(d, r)| {
                (
                    d.clone(),
                    DeviceView {
                        dispatched_at: self.dispatched.get(d).copied(),
                        paused: self.paused.contains(d),
                        report: r.as_ref(),
                        labels: self.labels.get(d),
                    },
                )
            })
            .collect();
        let hash = new_hash();
        let decision = step(&RolloutInput {
            deployment: &dep(),
            spec: &self.spec,
            revision: REV,
            spec_hash: &hash,
            plan: &self.plan,
            previous: self.status.as_ref(),
            last_good: Some(1),
            stable_available: true,
            devices: &views,
            now: self.now,
            promote: self.promote.as_deref(),
            abort: self.abort.as_deref(),
            staleness: Staleness::after(std::time::Duration::from_secs(30)),
        });
        for d in &decision.dispatch {
            assert!(!self.dispatched.contains_key(d), "{d} dispatched twice");
            self.dispatched.insert(d.clone(), self.now);
            self.order.push(d.clone());
        }
        for d in &decision.roll_back {
            self.dispatched.remove(d);
        }
        self.status = Some(decision.status.clone());
        decision
    }

    fn says(&mut self, device: &str, says: Says) {
        self.reports.insert(id(device), report(says, self.now));
    }

    /// Every dispatched device that reports reports `says` (the others keep quiet).
    fn dispatched_say(&mut self, says: Says) {
        let ds: Vec<Id> = self.dispatched.keys().cloned().collect();
        for d in ds {
            self.reports.insert(d, report(says, self.now));
        }
    }

    /// Time passes; every device not in `silent` reports again (the same thing).
    fn advance(&mut self, secs: i64, silent: &[&str]) {
        self.now += Duration::seconds(secs);
        let now = self.now;
        for (d, r) in self.reports.iter_mut() {
            if silent.contains(&d.as_str()) {
                continue;
            }
            if let Some(r) = r.as_mut() {
                r.received_at = now;
            }
        }
    }

    fn phase(&self) -> RolloutPhase {
        self.status.as_ref().map(|s| s.phase).expect("status")
    }

    fn batch(&self) -> u32 {
        self.status.as_ref().map(|s| s.current_batch).expect("status")
    }
}

fn ids(list: &[&str]) -> BTreeSet<Id> {
    list.iter().map(|d| id(d)).collect()
}

fn batches(specs: Vec<RolloutBatch>) -> RolloutSpec {
    RolloutSpec {
        batches: specs,
        ..Default::default()
    }
}

fn count(n: i32) -> RolloutBatch {
    RolloutBatch::of(IntOrString::Int(n))
}

const PLAN: &[&[&str]] = &[&["d0"], &["d1", "d2"], &["d3", "d4", "d5"]];

#[test]
fn batches_are_dispatched_in_order_and_only_once_each_passed() {
    let mut f = Fleet::new(
        batches(vec![count(1), RolloutBatch::of(IntOrString::String("50%".into()))]),
        PLAN,
    );
    let d = f.step();
    assert_eq!(d.dispatch, ids(&["d0"]), "the canary alone");
    assert_eq!((f.phase(), f.batch()), (RolloutPhase::Progressing, 1));
    assert_eq!(d.newcomers, Newcomers::Stable);
    // Nothing more while the canary has not reported.
    f.advance(5, &[]);
    assert!(f.step().dispatch.is_empty());
    // Acknowledged but still pulling: still nothing.
    f.says("d0", Says::NewPending);
    assert!(f.step().dispatch.is_empty());
    f.says("d0", Says::NewRunning);
    let d = f.step();
    assert_eq!(d.dispatch, ids(&["d1", "d2"]));
    assert_eq!(f.batch(), 2);
    f.dispatched_say(Says::NewRunning);
    let d = f.step();
    assert_eq!(d.dispatch, ids(&["d3", "d4", "d5"]));
    f.dispatched_say(Says::NewRunning);
    let d = f.step();
    assert!(d.dispatch.is_empty());
    assert_eq!(f.phase(), RolloutPhase::Complete);
    assert_eq!(
        d.newcomers,
        Newcomers::New,
        "after completion newcomers get the new revision"
    );
    let st = f.status.clone().expect("status");
    assert_eq!(st.summary, "complete, 6/6");
    assert_eq!(st.batches.iter().map(|b| b.succeeded).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(f.order, ["d0", "d1", "d2", "d3", "d4", "d5"].map(id));
}

#[test]
fn a_failed_canary_suspends_and_nothing_else_is_dispatched() {
    let mut f = Fleet::new(batches(vec![count(1), count(3)]), PLAN);
    f.step();
    f.says("d0", Says::NewFailed);
    let d = f.step();
    assert!(d.dispatch.is_empty() && d.roll_back.is_empty());
    assert_eq!(f.phase(), RolloutPhase::Suspended);
    let st = f.status.clone().expect("status");
    assert!(st.message.contains("batch 1 of 3"), "{}", st.message);
    assert_eq!(st.failure_clusters.len(), 1);
    assert_eq!(st.failure_clusters[0].message, "container web exited with code 1");
    // It stays suspended, whatever the canary says later, until the spec changes.
    f.says("d0", Says::NewRunning);
    f.advance(60, &[]);
    assert!(f.step().dispatch.is_empty());
    assert_eq!(f.phase(), RolloutPhase::Suspended);
    assert_eq!(f.order, [id("d0")]);
}

#[test]
fn with_rollback_the_devices_that_got_it_get_the_last_good_one_and_only_they() {
    let mut spec = batches(vec![count(1), count(3)]);
    spec.on_failure = OnFailure::Rollback;
    let mut f = Fleet::new(spec, PLAN);
    f.labels.insert(id("d0"), [("hw".to_owned(), "rpi3".to_owned())].into());
    for d in ["d1", "d2", "d3", "d4", "d5"] {
        f.labels.insert(id(d), [("hw".to_owned(), "rpi4".to_owned())].into());
    }
    for labels in f.labels.values_mut() {
        labels.insert("site".into(), "lab".into());
    }
    f.step();
    f.says("d0", Says::NewFailed);
    let d = f.step();
    assert_eq!(d.roll_back, ids(&["d0"]));
    assert!(d.dispatch.is_empty());
    assert_eq!(f.phase(), RolloutPhase::RollingBack);
    let st = f.status.clone().expect("status");
    // The label the failing devices share and the others do not; not site=lab.
    assert_eq!(
        st.failure_clusters[0].shared_labels,
        [("hw".to_owned(), "rpi3".to_owned())].into()
    );
    // Written: nobody holds the new revision any more.
    f.step();
    assert_eq!(f.phase(), RolloutPhase::RolledBack);
    assert_eq!(f.status.as_ref().and_then(|s| s.stable_revision), Some(1));
    assert!(
        f.step().newcomers == Newcomers::Stable,
        "newcomers get the last good revision"
    );
}

#[test]
fn silence_counts_as_failure_after_silence_timeout_and_says_whether_it_was_acknowledged() {
    let mut spec = batches(vec![count(2)]);
    spec.silence_timeout = Some("20s".into());
    spec.update_timeout = Some("10m".into());
    spec.batches[0].success_threshold = Some(50);
    let mut f = Fleet::new(spec, &[&["d0", "d1"], &["d2"]]);
    f.step();
    // d0 acknowledges and then goes quiet; d1 never says anything again.
    f.says("d0", Says::NewPending);
    f.advance(15, &["d0", "d1"]);
    assert_eq!(f.step().status.phase, RolloutPhase::Progressing);
    f.advance(10, &["d0", "d1"]);
    f.step();
    let st = f.status.clone().expect("status");
    assert_eq!((st.batches[0].silent, st.batches[0].never_acknowledged), (1, 1));
    assert_eq!(st.phase, RolloutPhase::Suspended, "{}", st.message);
}

#[test]
fn a_device_that_keeps_reporting_without_running_times_out_after_update_timeout() {
    let mut spec = batches(vec![count(1)]);
    spec.update_timeout = Some("60s".into());
    let mut f = Fleet::new(spec, &[&["d0"], &["d1"]]);
    f.step();
    f.says("d0", Says::NewPending);
    f.advance(50, &[]);
    f.step();
    assert_eq!(f.phase(), RolloutPhase::Progressing);
    f.advance(20, &[]);
    f.step();
    assert_eq!(f.status.as_ref().map(|s| s.batches[0].timed_out), Some(1));
    assert_eq!(f.phase(), RolloutPhase::Suspended);
}

#[test]
fn an_offline_device_is_skipped_reported_pending_and_updated_when_it_returns() {
    let mut f = Fleet::new(batches(vec![count(1)]), &[&["d0"], &["d1", "d2"]]);
    // d2 went quiet a minute ago.
    f.advance(60, &["d2"]);
    f.step();
    f.says("d0", Says::NewRunning);
    let d = f.step();
    assert_eq!(d.dispatch, ids(&["d1"]), "d2 is skipped");
    f.says("d1", Says::NewRunning);
    let d = f.step();
    let st = f.status.clone().expect("status");
    assert_eq!(st.phase, RolloutPhase::Complete, "an offline device never blocks");
    // It gets the new revision in KV in the step that completes, for when it
    // returns: nothing steps a complete rollout again until something changes.
    assert_eq!(d.dispatch, ids(&["d2"]));
    f.says("d2", Says::Old);
    assert!(f.step().dispatch.is_empty(), "dispatched once");
    assert_eq!(f.phase(), RolloutPhase::Complete);
}

#[test]
fn an_offline_device_is_counted_pending_offline_while_its_batch_runs() {
    let mut f = Fleet::new(batches(vec![count(2)]), &[&["d0", "d1"], &["d2"]]);
    f.advance(60, &["d1"]);
    let d = f.step();
    assert_eq!(d.dispatch, ids(&["d0"]));
    assert_eq!(f.status.as_ref().map(|s| s.batches[0].pending_offline), Some(1));
}

#[test]
fn max_unavailable_caps_devices_updating_at_once() {
    let mut spec = batches(vec![count(4)]);
    spec.max_unavailable = Some(IntOrString::Int(2));
    let mut f = Fleet::new(spec, &[&["d0", "d1", "d2", "d3"]]);
    assert_eq!(f.step().dispatch.len(), 2);
    assert!(f.step().dispatch.is_empty(), "no room");
    f.dispatched_say(Says::NewRunning);
    assert_eq!(f.step().dispatch.len(), 2);
}

#[test]
fn max_concurrent_pulls_holds_the_rest_as_pending_pull_and_a_failed_pull_frees_its_slot() {
    let mut spec = batches(vec![count(6)]);
    spec.max_concurrent_pulls = Some(2);
    spec.batches[0].success_threshold = Some(0);
    let mut f = Fleet::new(spec, &[&["d0", "d1", "d2", "d3", "d4", "d5"]]);
    let first = f.step().dispatch;
    assert_eq!(first.len(), 2);
    let st = f.status.clone().expect("status");
    assert_eq!(st.batches[0].pending_pull, 4);
    assert!(
        st.message
            .contains("4 device(s) wait for a pull slot (maxConcurrentPulls 2)"),
        "{}",
        st.message
    );
    // Acknowledged but still pulling: the slot stays taken.
    f.dispatched_say(Says::NewPending);
    assert!(f.step().dispatch.is_empty(), "both slots are pulling");
    // One finished, one failed its pull: both slots are free.
    let mut held: Vec<Id> = first.into_iter().collect();
    let done = held.remove(0);
    f.says(done.as_str(), Says::NewRunning);
    f.says(held[0].as_str(), Says::NewFailed);
    assert_eq!(f.step().dispatch.len(), 2);
    assert_eq!(f.status.as_ref().map(|s| s.batches[0].pending_pull), Some(2));
}

#[test]
fn a_device_that_went_offline_after_dispatch_does_not_hold_a_pull_slot() {
    let mut spec = batches(vec![count(2)]);
    spec.max_concurrent_pulls = Some(1);
    let mut f = Fleet::new(spec, &[&["d0", "d1"]]);
    let first = f.step().dispatch;
    assert_eq!(first.len(), 1);
    assert!(f.step().dispatch.is_empty(), "the one slot is taken");
    let gone = first.iter().next().expect("one").to_string();
    // Offline (no report for 60 s, stale after 30 s), long before its silence timeout.
    f.advance(60, &[gone.as_str()]);
    assert_eq!(f.step().dispatch.len(), 1, "the other device gets the slot");
}

#[test]
fn the_failure_threshold_is_checked_across_batches_at_every_step() {
    let mut spec = batches(vec![count(6)]);
    spec.batches[0].success_threshold = Some(0);
    spec.failure_threshold = Some(FailureThreshold {
        percent: 50,
        min_completed: Some(2),
    });
    let mut f = Fleet::new(spec, &[&["d0", "d1", "d2", "d3", "d4", "d5"]]);
    f.step();
    f.says("d0", Says::NewFailed);
    f.step();
    assert_eq!(
        f.phase(),
        RolloutPhase::Progressing,
        "one completed is below minCompleted"
    );
    f.says("d1", Says::NewFailed);
    f.step();
    assert_eq!(f.phase(), RolloutPhase::Suspended);
    assert_eq!(
        f.status.as_ref().and_then(|s| s.reason.clone()).as_deref(),
        Some("FailureThreshold")
    );
}

#[test]
fn a_pause_batch_waits_for_the_exact_promotion_and_bake_time_holds() {
    let mut spec = batches(vec![count(1), count(3)]);
    spec.batches[0].pause = Some(BatchPause {});
    spec.batches[1].bake_time = Some("30s".into());
    let mut f = Fleet::new(spec, PLAN);
    f.step();
    f.says("d0", Says::NewRunning);
    assert!(f.step().dispatch.is_empty());
    assert_eq!(f.phase(), RolloutPhase::Paused);
    // A promotion of another batch or revision does nothing.
    f.promote = Some("2/2".into());
    assert!(f.step().dispatch.is_empty());
    f.promote = Some("1/1".into());
    assert!(f.step().dispatch.is_empty());
    f.promote = Some("2/1".into());
    assert_eq!(f.step().dispatch, ids(&["d1", "d2"]));
    f.dispatched_say(Says::NewRunning);
    assert!(f.step().dispatch.is_empty(), "baking");
    f.advance(20, &[]);
    assert!(f.step().dispatch.is_empty(), "still baking");
    f.advance(15, &[]);
    assert_eq!(f.step().dispatch, ids(&["d3", "d4", "d5"]));
}

#[test]
fn a_failure_during_bake_fails_the_batch() {
    let mut spec = batches(vec![count(1)]);
    spec.batches[0].bake_time = Some("60s".into());
    let mut f = Fleet::new(spec, &[&["d0"], &["d1"]]);
    f.step();
    f.says("d0", Says::NewRunning);
    f.step();
    f.advance(10, &[]);
    f.says("d0", Says::NewFailed);
    f.step();
    assert_eq!(f.phase(), RolloutPhase::Suspended);
    assert_eq!(f.order, [id("d0")]);
}

#[test]
fn pausing_stops_dispatch_and_resuming_goes_on() {
    let mut f = Fleet::new(batches(vec![count(1)]), &[&["d0"], &["d1"]]);
    f.step();
    f.says("d0", Says::NewRunning);
    f.spec.paused = true;
    assert!(f.step().dispatch.is_empty());
    assert_eq!(f.phase(), RolloutPhase::Paused);
    f.spec.paused = false;
    assert_eq!(f.step().dispatch, ids(&["d1"]));
}

#[test]
fn an_abort_rolls_back_even_with_on_failure_pause() {
    let mut f = Fleet::new(batches(vec![count(3)]), PLAN);
    f.step();
    f.abort = Some("1".into());
    assert!(
        f.step().roll_back.is_empty(),
        "an abort of another revision does nothing"
    );
    f.abort = Some(REV.to_string());
    let d = f.step();
    assert_eq!(d.roll_back, ids(&["d0"]), "the devices that got it, and only they");
    assert_eq!(
        f.status.as_ref().and_then(|s| s.reason.clone()).as_deref(),
        Some(REASON_ABORTED)
    );
}

#[test]
fn the_progress_deadline_fails_the_rollout_but_not_time_waiting_for_a_person() {
    let mut spec = batches(vec![count(1), count(2)]);
    spec.batches[0].pause = Some(BatchPause {});
    spec.progress_deadline_seconds = Some(60);
    let mut f = Fleet::new(spec, &[&["d0"], &["d1"], &["d2"]]);
    f.step();
    f.says("d0", Says::NewRunning);
    f.step();
    // Waiting for a person for an hour does not count.
    f.advance(3600, &[]);
    f.step();
    assert_eq!(f.phase(), RolloutPhase::Paused);
    f.promote = Some(format!("{REV}/1"));
    assert_eq!(f.step().dispatch, ids(&["d1"]));
    f.advance(30, &[]);
    f.step();
    assert_eq!(f.phase(), RolloutPhase::Progressing);
    f.advance(40, &[]);
    f.step();
    assert_eq!(f.phase(), RolloutPhase::Suspended);
    assert_eq!(
        f.status.as_ref().and_then(|s| s.reason.clone()).as_deref(),
        Some(REASON_DEADLINE)
    );
}

#[test]
fn a_restart_continues_from_what_kv_holds_even_when_status_lagged() {
    let mut f = Fleet::new(batches(vec![count(1), count(3)]), PLAN);
    f.step();
    f.says("d0", Says::NewRunning);
    f.step();
    assert_eq!(f.batch(), 2);
    // The operator died before its status write for batch 2 landed: the API server
    // still says batch 1, but KV holds batch 2's dispatches.
    if let Some(s) = f.status.as_mut() {
        s.current_batch = 1;
        s.batches[1].started_at = None;
    }
    let d = f.step();
    assert!(d.dispatch.is_empty(), "nothing dispatched twice");
    assert_eq!(f.batch(), 2);
    // With no status at all (lost), KV alone still tells the batch.
    f.status = None;
    let d = f.step();
    assert!(d.dispatch.is_empty());
    assert_eq!(f.batch(), 2);
}

#[test]
fn a_new_revision_mid_rollout_starts_again_from_the_first_batch() {
    let mut f = Fleet::new(batches(vec![count(1), count(3)]), PLAN);
    f.step();
    f.says("d0", Says::NewRunning);
    f.step();
    // The status now belongs to another revision: a fresh rollout.
    if let Some(s) = f.status.as_mut() {
        s.revision = REV - 1;
    }
    f.dispatched.clear();
    f.dispatched_say(Says::Old);
    f.says("d0", Says::Old);
    let d = f.step();
    assert_eq!(d.dispatch, ids(&["d0"]), "{:?}", d.status);
    assert_eq!(f.batch(), 1);
}

#[test]
fn a_crash_loop_fails_the_gate_even_when_the_agent_keeps_the_containers_up() {
    let mut f = Fleet::new(batches(vec![count(1)]), &[&["d0"], &["d1"]]);
    f.step();
    f.says("d0", Says::NewRunning);
    if let Some(Some(r)) = f.reports.get_mut(&id("d0"))
        && let Some(p) = r.deployments.get_mut(&dep())
    {
        p.recent_restarts = 4;
        p.restarts = 4;
    }
    f.step();
    assert_eq!(f.phase(), RolloutPhase::Suspended);
    let st = f.status.clone().expect("status");
    assert!(
        st.failure_clusters[0].message.contains("restarted"),
        "{:?}",
        st.failure_clusters
    );
}

#[test]
fn a_paused_device_is_never_dispatched_and_never_blocks() {
    let mut f = Fleet::new(batches(vec![count(1)]), &[&["d0"], &["d1", "d2"]]);
    f.paused.insert(id("d2"));
    f.step();
    f.says("d0", Says::NewRunning);
    assert_eq!(f.step().dispatch, ids(&["d1"]));
    f.says("d1", Says::NewRunning);
    let d = f.step();
    assert!(d.dispatch.is_empty());
    assert_eq!(f.phase(), RolloutPhase::Complete);
}

#[test]
fn a_device_that_joins_mid_rollout_waits_for_the_last_batch() {
    let mut f = Fleet::new(batches(vec![count(1)]), &[&["d0"], &["d1"]]);
    f.step();
    // d9 is matched now but was not when the rollout started.
    f.reports.insert(id("d9"), report(Says::Nothing, f.now));
    f.says("d9", Says::Old);
    assert!(f.step().dispatch.is_empty(), "the canary has not reported yet");
    f.says("d0", Says::NewRunning);
    assert_eq!(f.step().dispatch, ids(&["d1", "d9"]));
}
