//! The rollout view of one deployment, read from `spec.rollout` and
//! `.status.rollout` (the operator writes the latter; the dashboard only reads).
//! Pure functions of the two and the time, so the page and its tests agree.
//!
//! The batches' counts come from the status as they are. What a batch waits for
//! (promotion, bake time) is read from the status first: a batch that passed while
//! the rollout is `Paused` and `spec.rollout.paused` is off waits for promotion,
//! whatever the spec's batches say now (a rollout keeps the batches it started
//! with; the spec may have changed since).

use chrono::{DateTime, Utc};
use iot_api::rollout::success_threshold;
use iot_api::{BatchStatus, RolloutPhase, RolloutSpec, RolloutStatus};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// What the rollout part of a deployment's page shows.
#[derive(Debug, Clone, Copy)]
pub enum RolloutView<'a> {
    /// No `spec.rollout` and no rollout recorded: a new revision goes to every
    /// matched device at once.
    AllAtOnce,
    /// `spec.rollout`, but no rollout recorded yet.
    Configured(&'a RolloutSpec),
    /// A rollout, running or finished.
    Recorded {
        spec: Option<&'a RolloutSpec>,
        status: &'a RolloutStatus,
    },
}

pub fn rollout_view<'a>(spec: Option<&'a RolloutSpec>, status: Option<&'a RolloutStatus>) -> RolloutView<'a> {
    match (spec, status) {
        (spec, Some(status)) => RolloutView::Recorded { spec, status },
        (Some(spec), None) => RolloutView::Configured(spec),
        (None, None) => RolloutView::AllAtOnce,
    }
}

/// The badge of a phase: (css class, symbol, words).
pub fn phase_badge_parts(p: RolloutPhase) -> (&'static str, &'static str, &'static str) {
    match p {
        RolloutPhase::Progressing => ("info", "…", "progressing"),
        RolloutPhase::Paused => ("warn", "⏸", "paused"),
        RolloutPhase::Suspended => ("bad", "✕", "suspended"),
        RolloutPhase::RollingBack => ("warn", "↺", "rolling back"),
        RolloutPhase::RolledBack => ("bad", "↺", "rolled back"),
        RolloutPhase::Complete => ("ok", "✓", "complete"),
    }
}

/// Where one batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    NotStarted,
    /// Started, not passed yet.
    InProgress,
    /// Passed its gate; watched for its bake time until `until`.
    Baking {
        passed: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    /// Passed its gate, and a person has to promote it (`pause: {}`).
    WaitingForPromotion {
        passed: DateTime<Utc>,
    },
    Passed {
        at: DateTime<Utc>,
    },
    /// The rollout stopped (suspended or rolled back) at this batch before it passed.
    DidNotPass,
}

/// One batch as the page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchView<'a> {
    /// 1-based, as `.status.rollout.currentBatch` counts.
    pub number: u32,
    pub status: &'a BatchStatus,
    pub current: bool,
    pub state: BatchState,
    /// Percentage that must succeed, as the spec says now (`None` without a spec).
    pub success_threshold: Option<u32>,
    /// `pause: {}` or `bakeTime`, as the spec says now.
    pub pause: bool,
    pub bake_time: Option<String>,
}

/// Whether the rollout waits for `iotctl rollout promote`: its current batch passed
/// and the rollout is paused, not by `spec.rollout.paused` (or also by a `pause: {}`
/// on that batch).
pub fn waiting_for_promotion(spec: Option<&RolloutSpec>, status: &RolloutStatus) -> bool {
    if status.phase != RolloutPhase::Paused {
        return false;
    }
    let index = status.current_batch.saturating_sub(1) as usize;
    let Some(batch) = status.batches.get(index) else {
        return false;
    };
    let spec_paused = spec.is_some_and(|s| s.paused);
    let pause_batch = spec
        .and_then(|s| s.batches.get(index))
        .is_some_and(|b| b.pause.is_some());
    batch.passed_at.is_some() && (!spec_paused || pause_batch)
}

pub fn batch_views<'a>(
    spec: Option<&RolloutSpec>,
    status: &'a RolloutStatus,
    now: DateTime<Utc>,
) -> Vec<BatchView<'a>> {
    let waiting = waiting_for_promotion(spec, status);
    let stopped = matches!(
        status.phase,
        RolloutPhase::Suspended | RolloutPhase::RollingBack | RolloutPhase::RolledBack
    );
    status
        .batches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let number = i as u32 + 1;
            let current = number == status.current_batch;
            let batch_spec = spec.and_then(|s| s.batches.get(i));
            let bake = batch_spec.and_then(|b| b.bake_time());
            let state = match b.passed_at {
                Some(passed) if current && waiting => BatchState::WaitingForPromotion { passed },
                Some(passed) => match bake.and_then(|d| chrono::Duration::from_std(d).ok()) {
                    Some(d) if current && status.phase == RolloutPhase::Progressing && passed + d > now => {
                        BatchState::Baking {
                            passed,
                            until: passed + d,
                        }
                    }
                    _ => BatchState::Passed { at: passed },
                },
                None if current && stopped => BatchState::DidNotPass,
                None if b.started_at.is_some() || number <= status.current_batch => BatchState::InProgress,
                None => BatchState::NotStarted,
            };
            BatchView {
                number,
                status: b,
                current,
                state,
                success_threshold: spec.map(|_| success_threshold(batch_spec, i)),
                pause: batch_spec.is_some_and(|b| b.pause.is_some()),
                bake_time: batch_spec.and_then(|b| b.bake_time.clone()),
            }
        })
        .collect()
}

/// One part of a batch's bar: (css class, devices, words).
pub type Segment = (&'static str, u32, &'static str);

/// A batch's devices by outcome, in the order the bar draws them; every count
/// that is not zero, so the text equivalent names exactly what the bar shows.
/// `in flight` is dispatched and not yet decided; `waiting` is not dispatched yet.
pub fn segments(b: &BatchStatus) -> Vec<Segment> {
    let failed = b.failed + b.timed_out + b.silent + b.never_acknowledged;
    let decided = b.succeeded + failed;
    let in_flight = b.dispatched.saturating_sub(decided);
    let waiting = b
        .selected
        .saturating_sub(b.dispatched.max(decided))
        .saturating_sub(b.pending_offline)
        .saturating_sub(b.pending_pull);
    [
        ("ok", b.succeeded, "succeeded"),
        ("bad", b.failed, "failed"),
        ("bad", b.timed_out, "timed out"),
        ("bad", b.silent, "silent"),
        ("bad", b.never_acknowledged, "never acknowledged"),
        ("info", in_flight, "in flight"),
        ("warn", b.pending_offline, "pending offline"),
        ("warn", b.pending_pull, "waiting for a pull slot"),
        ("none", waiting, "not dispatched yet"),
    ]
    .into_iter()
    .filter(|(_, n, _)| *n > 0)
    .collect()
}

/// A command that acts on the rollout, and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub line: String,
    pub does: String,
}

/// The `iotctl rollout` lines that act on this rollout now: resume when
/// `spec.rollout.paused`, promote when a batch waits for it, abort or undo when
/// suspended, and otherwise the status (watched while it moves).
pub fn commands(namespace: &str, name: &str, spec: Option<&RolloutSpec>, status: &RolloutStatus) -> Vec<Command> {
    let target = format!("{namespace}/{name}");
    let mut out = Vec::new();
    if spec.is_some_and(|s| s.paused) {
        out.push(Command {
            line: format!("iotctl rollout resume {target}"),
            does: "sets spec.rollout.paused back to false: dispatching goes on".into(),
        });
    }
    if waiting_for_promotion(spec, status) {
        let next = status.current_batch + 1;
        out.push(Command {
            line: format!("iotctl rollout promote {target}"),
            does: if (next as usize) <= status.batches.len() {
                format!("starts batch {next} of {}", status.batches.len())
            } else {
                "lets the rollout finish".into()
            },
        });
    }
    if status.phase == RolloutPhase::Suspended {
        out.push(Command {
            line: format!("iotctl rollout abort {target}"),
            does: match status.stable_revision {
                Some(s) => format!(
                    "writes revision {s} back to the devices that received revision {}",
                    status.revision
                ),
                None => format!("rolls back the devices that received revision {}", status.revision),
            },
        });
        out.push(match status.stable_revision {
            Some(s) => Command {
                line: format!("iotctl rollout undo {target} --to-revision {s}"),
                does: format!("writes revision {s}'s score back into the spec (recorded as a new revision)"),
            },
            None => Command {
                line: format!("iotctl rollout undo {target}"),
                does: "writes the previous revision's score back into the spec (recorded as a new revision)".into(),
            },
        });
    }
    if out.is_empty() {
        out.push(if status.phase.is_final() {
            Command {
                line: format!("iotctl rollout status {target}"),
                does: "shows this rollout".into(),
            }
        } else {
            Command {
                line: format!("iotctl rollout status {target} --watch"),
                does: "follows this rollout".into(),
            }
        });
    }
    out
}

/// A batch's cumulative `limit` in words: `1 device`, `5 devices`, `50%`.
pub fn limit_text(l: &IntOrString) -> String {
    match l {
        IntOrString::Int(1) => "1 device".into(),
        IntOrString::Int(n) => format!("{n} devices"),
        IntOrString::String(s) => s.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone as _;

    pub fn at(min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 4, 10, min, 0)
            .single()
            .unwrap_or_else(|| panic!("a time"))
    }

    pub fn spec(json: serde_json::Value) -> RolloutSpec {
        serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn status(json: serde_json::Value) -> RolloutStatus {
        serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Three batches: the canary passed at 10:05 and waits at `pause: {}`.
    pub fn waiting() -> (RolloutSpec, RolloutStatus) {
        (
            spec(serde_json::json!({
                "batches": [{"limit": 1, "pause": {}}, {"limit": "50%", "bakeTime": "10m"}],
            })),
            status(serde_json::json!({
                "revision": 5, "stableRevision": 4, "phase": "Paused", "currentBatch": 1,
                "matchedAtStart": 10, "startedAt": "2026-03-04T10:00:00Z",
                "batches": [
                    {"selected": 1, "dispatched": 1, "succeeded": 1,
                     "startedAt": "2026-03-04T10:00:00Z", "passedAt": "2026-03-04T10:05:00Z"},
                    {"selected": 4},
                    {"selected": 5},
                ],
                "message": "batch 1 passed; waiting for promotion",
                "summary": "batch 1/3, 1/10",
            })),
        )
    }

    #[test]
    fn a_passed_pause_batch_waits_for_promotion_and_says_how() {
        let (spec, st) = waiting();
        assert!(waiting_for_promotion(Some(&spec), &st));
        let views = batch_views(Some(&spec), &st, at(6));
        assert_eq!(
            views.iter().map(|v| v.state).collect::<Vec<_>>(),
            vec![
                BatchState::WaitingForPromotion { passed: at(5) },
                BatchState::NotStarted,
                BatchState::NotStarted
            ]
        );
        assert!(views[0].current && views[0].pause);
        assert_eq!(views[0].success_threshold, Some(100));
        assert_eq!(views[1].success_threshold, Some(90));
        assert_eq!(
            views[2].success_threshold,
            Some(90),
            "the final batch the spec does not name"
        );
        let cmds = commands("default", "web", Some(&spec), &st);
        assert_eq!(cmds.len(), 1, "{cmds:?}");
        assert_eq!(cmds[0].line, "iotctl rollout promote default/web");
        assert_eq!(cmds[0].does, "starts batch 2 of 3");
    }

    #[test]
    fn paused_by_the_spec_says_resume_and_not_promote() {
        let (mut spec, mut st) = waiting();
        spec.paused = true;
        spec.batches[0].pause = None;
        let cmds = commands("default", "web", Some(&spec), &st);
        assert_eq!(
            cmds.iter().map(|c| c.line.as_str()).collect::<Vec<_>>(),
            ["iotctl rollout resume default/web"]
        );
        // Paused by the spec at a `pause: {}` batch that passed: both.
        spec.batches[0].pause = Some(iot_api::rollout::BatchPause {});
        let cmds = commands("default", "web", Some(&spec), &st);
        assert_eq!(cmds.len(), 2, "{cmds:?}");
        assert_eq!(cmds[1].line, "iotctl rollout promote default/web");
        // While it moves, the status, watched.
        spec.paused = false;
        st.phase = RolloutPhase::Progressing;
        let cmds = commands("default", "web", Some(&spec), &st);
        assert_eq!(cmds[0].line, "iotctl rollout status default/web --watch");
        st.phase = RolloutPhase::Complete;
        let cmds = commands("default", "web", Some(&spec), &st);
        assert_eq!(cmds[0].line, "iotctl rollout status default/web");
    }

    #[test]
    fn a_batch_bakes_after_it_passed_then_counts_as_passed() {
        let (spec, mut st) = waiting();
        st.phase = RolloutPhase::Progressing;
        st.current_batch = 2;
        st.batches[1].started_at = Some(at(6));
        st.batches[1].passed_at = Some(at(20));
        let views = batch_views(Some(&spec), &st, at(25));
        assert_eq!(views[0].state, BatchState::Passed { at: at(5) });
        assert_eq!(
            views[1].state,
            BatchState::Baking {
                passed: at(20),
                until: at(30)
            }
        );
        let views = batch_views(Some(&spec), &st, at(31));
        assert_eq!(views[1].state, BatchState::Passed { at: at(20) });
    }

    #[test]
    fn a_suspended_rollout_offers_abort_and_undo_and_marks_its_batch() {
        let (spec, mut st) = waiting();
        st.phase = RolloutPhase::Suspended;
        st.current_batch = 2;
        st.batches[1].started_at = Some(at(6));
        let views = batch_views(Some(&spec), &st, at(25));
        assert_eq!(views[1].state, BatchState::DidNotPass);
        assert_eq!(views[2].state, BatchState::NotStarted);
        let cmds = commands("prod", "web", Some(&spec), &st);
        assert_eq!(
            cmds.iter().map(|c| c.line.as_str()).collect::<Vec<_>>(),
            [
                "iotctl rollout abort prod/web",
                "iotctl rollout undo prod/web --to-revision 4"
            ]
        );
        assert!(cmds[0].does.contains("revision 4 back"), "{cmds:?}");
    }

    #[test]
    fn segments_name_every_outcome_and_never_count_a_device_twice() {
        let b = BatchStatus {
            selected: 20,
            dispatched: 15,
            succeeded: 8,
            failed: 1,
            timed_out: 2,
            silent: 1,
            never_acknowledged: 1,
            pending_offline: 3,
            pending_pull: 1,
            ..BatchStatus::default()
        };
        let s = segments(&b);
        assert_eq!(
            s.iter().map(|(_, n, w)| (*n, *w)).collect::<Vec<_>>(),
            [
                (8, "succeeded"),
                (1, "failed"),
                (2, "timed out"),
                (1, "silent"),
                (1, "never acknowledged"),
                (2, "in flight"),
                (3, "pending offline"),
                (1, "waiting for a pull slot"),
                (1, "not dispatched yet"),
            ]
        );
        assert_eq!(s.iter().map(|(_, n, _)| n).sum::<u32>(), b.selected);
        // Inconsistent counts (more decided than dispatched) stay within the batch.
        let odd = BatchStatus {
            selected: 2,
            dispatched: 1,
            succeeded: 2,
            ..BatchStatus::default()
        };
        assert_eq!(segments(&odd), [("ok", 2, "succeeded")]);
    }
}
