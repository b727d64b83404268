//! The pure aggregation: counts, staleness, rollouts, error grouping, events,
//! restarts; and the conditions built from it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, TimeZone, Utc};
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::*;
use iot_api::conditions::{DEGRADED, READY, REASON_DEVICES_FAILED};
use iot_operator::conditions::fleet_conditions;
use iot_operator::fleet_aggregate::{
    AggregateInput, AggregateLimits, DeviceReport, aggregate, without_heartbeat_churn,
};

fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_900_000_000, 0).single().expect("time")
}

fn dep() -> DeploymentRef {
    DeploymentRef::new("ns", "web").expect("ref")
}

fn h(s: &str) -> SpecHash {
    SpecHash::from_reported(s)
}

fn report(age_s: i64, phase: Option<(Phase, &str, Option<&str>)>) -> DeviceReport {
    let mut deployments = BTreeMap::new();
    if let Some((p, hash, err)) = phase {
        deployments.insert(
            dep(),
            DeploymentPhase::new(
                p,
                Some(h(hash)),
                err.map(str::to_owned),
                now() - Duration::seconds(age_s),
            ),
        );
    }
    DeviceReport {
        received_at: now() - Duration::seconds(age_s),
        deployments,
        events: vec![],
        about: Default::default(),
        restarts_seen: Default::default(),
    }
}

fn targets(n: usize) -> BTreeSet<Id> {
    (0..n).map(|i| Id::new(format!("d{i}")).expect("id")).collect()
}

fn run(reports: &HashMap<Id, DeviceReport>, n: usize) -> iot_api::AggregateStatus {
    aggregate(
        AggregateInput {
            deployment: &dep(),
            generation: Some(4),
            spec_hash: &h("new"),
            targets: &targets(n),
            revision: None,
        },
        reports,
        now(),
        Staleness::default(),
        AggregateLimits::default(),
    )
}

fn id(s: &str) -> Id {
    Id::new(s).expect("id")
}

#[test]
fn counts_partition_the_targets() {
    let mut r = HashMap::new();
    r.insert(id("d0"), report(1, Some((Phase::Running, "new", None))));
    r.insert(id("d1"), report(1, Some((Phase::Failed, "new", Some("boom")))));
    r.insert(id("d2"), report(1, Some((Phase::Pending, "new", None))));
    r.insert(id("d3"), report(1, None)); // alive, has not picked it up yet
    // d4: never reported
    let a = run(&r, 5);
    assert_eq!(
        (a.targets, a.succeeded, a.failed, a.pending, a.unreported),
        (5, 1, 1, 2, 1)
    );
    assert_eq!(
        a.observed_generation,
        Some(4),
        "the summary says which generation it is for"
    );
    assert_eq!(a.succeeded + a.failed + a.pending + a.unreported, a.targets);
}

#[test]
fn old_spec_counts_as_pending_never_succeeded() {
    let mut r = HashMap::new();
    r.insert(id("d0"), report(1, Some((Phase::Running, "old", None))));
    r.insert(id("d1"), report(1, Some((Phase::Failed, "old", Some("old failure")))));
    let a = run(&r, 2);
    assert_eq!((a.succeeded, a.failed, a.pending), (0, 0, 2));
    assert!(a.last_error.is_none());
}

#[test]
fn silent_device_is_unreported_even_if_it_last_said_running() {
    let mut r = HashMap::new();
    r.insert(id("d0"), report(31, Some((Phase::Running, "new", None))));
    r.insert(id("d1"), report(29, Some((Phase::Running, "new", None))));
    let a = run(&r, 2);
    assert_eq!((a.succeeded, a.unreported), (1, 1));
    assert_eq!(a.last_heartbeat_at, Some(now() - Duration::seconds(29)));
    let ready = fleet_conditions(&a).into_iter().find(|c| c.0 == READY).expect("ready");
    assert_eq!(ready.1, "False");
}

#[test]
fn failures_are_grouped_by_message_with_examples() {
    let mut r = HashMap::new();
    for i in 0..500 {
        let msg = match i % 3 {
            0 => "image x not present".to_owned(),
            // Wording from an older agent: the device id and a container id inside.
            1 => format!(
                "container d{i}.ns.web.web created but failed to start: start {:012x}: port busy",
                0xabc000 + i
            ),
            _ => "invalid score".to_owned(),
        };
        r.insert(
            id(&format!("d{i}")),
            report(1, Some((Phase::Failed, "new", Some(&msg)))),
        );
    }
    let a = run(&r, 500);
    assert_eq!(a.failed, 500);
    assert_eq!(a.top_errors.len(), 3, "{:#?}", a.top_errors);
    assert_eq!(a.top_errors.iter().map(|g| g.devices).sum::<u32>(), 500);
    assert!(a.top_errors.iter().all(|g| g.example_devices.len() == 3));
    // Device ids and container ids inside messages are masked so they still group.
    assert!(
        a.top_errors
            .iter()
            .any(|g| g.message == "container <device>.ns.web.web created but failed to start: start <id>: port busy"),
        "{:#?}",
        a.top_errors
    );
    let degraded = fleet_conditions(&a)
        .into_iter()
        .find(|c| c.0 == "Degraded")
        .expect("degraded");
    assert!(degraded.3.contains("most common error"), "{}", degraded.3);
}

#[test]
fn a_device_named_like_a_word_does_not_mangle_messages() {
    let mut r = HashMap::new();
    let targets: BTreeSet<Id> = [id("web"), id("1")].into();
    for d in ["web", "1"] {
        r.insert(
            id(d),
            report(
                1,
                Some((Phase::Failed, "new", Some("service web-api: port 10 busy after 1.5s"))),
            ),
        );
    }
    let a = aggregate(
        AggregateInput {
            deployment: &dep(),
            generation: Some(1),
            spec_hash: &h("new"),
            targets: &targets,
            revision: None,
        },
        &r,
        now(),
        Staleness::default(),
        AggregateLimits::default(),
    );
    assert_eq!(a.top_errors.len(), 1);
    assert_eq!(
        a.top_errors[0].message,
        "service web-api: port 10 busy after <duration>"
    );
}

#[test]
fn repeated_restarts_count_as_failed_and_show_in_the_aggregate() {
    let mut r = HashMap::new();
    let mut noisy = report(1, Some((Phase::Running, "new", None)));
    if let Some(p) = noisy.deployments.get_mut(&dep()) {
        p.recent_restarts = 5;
        p.restarts = 9;
    }
    let mut once = report(1, Some((Phase::Running, "new", None)));
    if let Some(p) = once.deployments.get_mut(&dep()) {
        p.recent_restarts = 1;
        p.restores = 1;
    }
    r.insert(id("d0"), noisy);
    r.insert(id("d1"), once);
    let a = run(&r, 2);
    // A crash loop (3+ in the agent's 10 minutes) is a failure, however quickly the
    // agent brings the containers back; one restart long ago is not.
    assert_eq!((a.succeeded, a.failed, a.restarting, a.restarts), (1, 1, 1, 10));
    assert_eq!(
        a.last_error.as_ref().expect("error").message,
        "containers restarted or restored 5 time(s) within 10 minutes"
    );
    let conds = fleet_conditions(&a);
    let degraded = conds.iter().find(|c| c.0 == DEGRADED).expect("degraded");
    assert_eq!((degraded.1, degraded.2), ("True", REASON_DEVICES_FAILED));
    assert_eq!(conds.iter().find(|c| c.0 == READY).expect("ready").1, "False");
}

#[test]
fn a_restore_seen_within_the_window_counts_as_failed_until_it_passes() {
    // The operator sees the count grow between two reports (server times): a
    // `podman rm -f` that the agent repaired in 0.3 s still shows, for a minute.
    let before = report(20, Some((Phase::Running, "new", None)));
    let mut after = report(1, Some((Phase::Running, "new", None)));
    if let Some(p) = after.deployments.get_mut(&dep()) {
        p.restores = 1;
        p.recent_restarts = 1;
    }
    let after = after.follow(Some(&before));
    assert_eq!(
        after.restarts_within(&dep(), std::time::Duration::from_secs(60), now()),
        1
    );
    let a = run(&HashMap::from([(id("d0"), after.clone())]), 1);
    assert_eq!((a.succeeded, a.failed), (0, 1));
    assert!(
        a.last_error.as_ref().expect("error").message.contains("within 60s"),
        "the error says why"
    );
    // The next report with the same count adds nothing; once the window has passed
    // the device counts as succeeded again.
    let mut later = report(0, Some((Phase::Running, "new", None)));
    if let Some(p) = later.deployments.get_mut(&dep()) {
        p.restores = 1;
        p.recent_restarts = 1;
    }
    let later = later.follow(Some(&after));
    assert_eq!(later.restarts_seen.get(&dep()).map(Vec::len), Some(1));
    let in_two_minutes = now() + chrono::Duration::seconds(120);
    assert_eq!(
        later.restarts_within(&dep(), std::time::Duration::from_secs(60), in_two_minutes),
        0
    );
    // A count that drops (the agent restarted, or a new spec) is not a restart.
    let mut reset = report(0, Some((Phase::Running, "new", None)));
    if let Some(p) = reset.deployments.get_mut(&dep()) {
        p.restores = 0;
    }
    assert_eq!(
        reset.follow(Some(&later)).restarts_seen.get(&dep()).map(Vec::len),
        Some(1)
    );
}

#[test]
fn unparseable_payload_failure_without_hash_counts_as_failed() {
    let mut rep = report(1, None);
    rep.deployments.insert(
        dep(),
        DeploymentPhase::new(Phase::Failed, None, Some("does not parse".into()), now()),
    );
    let a = run(&HashMap::from([(id("d0"), rep)]), 1);
    assert_eq!(a.failed, 1);
    assert_eq!(a.last_error.expect("error").message, "does not parse");
}

#[test]
fn recent_events_are_newest_first_deduplicated_and_bounded() {
    let mut r = HashMap::new();
    for i in 0..30 {
        let mut rep = report(1, Some((Phase::Running, "new", None)));
        rep.events = vec![
            EventEntry {
                at: now() - Duration::seconds(100 - i),
                severity: Severity::Info,
                deployment: Some(dep()),
                message: "running spec new".into(),
            },
            EventEntry {
                at: now() - Duration::seconds(50 - i),
                severity: Severity::Warning,
                deployment: Some(dep()),
                message: format!("restored container d{i}.ns.web.web"),
            },
            EventEntry {
                at: now(),
                severity: Severity::Info,
                deployment: Some(DeploymentRef::new("ns", "other").expect("ref")),
                message: "not mine".into(),
            },
        ];
        r.insert(id(&format!("d{i}")), rep);
    }
    let a = run(&r, 30);
    assert_eq!(a.recent_events.len(), 2, "{:#?}", a.recent_events);
    assert!(a.recent_events[0].at >= a.recent_events[1].at);
    assert!(a.recent_events.iter().all(|e| e.message != "not mine"));
}

#[test]
fn heartbeat_progress_alone_never_changes_the_summary() {
    let mut r = HashMap::new();
    r.insert(id("d0"), report(5, Some((Phase::Running, "new", None))));
    let first = run(&r, 1);
    for age in [2, 1, 0] {
        r.insert(id("d0"), report(age, Some((Phase::Running, "new", None))));
        let next = without_heartbeat_churn(Some(&first), run(&r, 1));
        assert_eq!(next, first, "heartbeat progress alone must not cause a write");
    }
    r.insert(id("d0"), report(1, Some((Phase::Failed, "new", Some("x")))));
    let changed = without_heartbeat_churn(Some(&first), run(&r, 1));
    assert_ne!(changed, first);
    assert_eq!(
        changed.last_heartbeat_at,
        Some(now() - Duration::seconds(1)),
        "refreshed with a real change"
    );
}

#[test]
fn reports_from_older_and_newer_agents_aggregate() {
    // Oldest agents sent only id + heartbeat; a future agent sends unknown fields and phases.
    let old: AgentStatus =
        serde_json::from_value(serde_json::json!({"device_id": "d0", "heartbeat_at": now()})).expect("old");
    let future: AgentStatus = serde_json::from_value(serde_json::json!({
        "format": 7, "device_id": "d1", "heartbeat_at": now(), "satellites": 3,
        "deployments": {"ns/web": {"phase": "Hibernating", "spec_hash": "new", "last_event_at": now()}}
    }))
    .expect("future");
    let r = HashMap::from([
        (id("d0"), DeviceReport::new(old, now())),
        (id("d1"), DeviceReport::new(future, now())),
    ]);
    let a = run(&r, 2);
    assert_eq!((a.pending, a.succeeded, a.unreported), (2, 0, 0));
}

#[test]
fn staleness_is_judged_by_when_nats_received_the_report_not_the_device_clock() {
    // A device whose clock is an hour off either way, but whose reports arrive on time.
    for skew in [-3600, 3600] {
        let status: AgentStatus = serde_json::from_value(serde_json::json!({
            "device_id": "d0",
            "heartbeat_at": now() + Duration::seconds(skew),
            "deployments": {"ns/web": {"phase": "Running", "spec_hash": "new",
                "last_event_at": now() + Duration::seconds(skew)}}
        }))
        .expect("status");
        let r = HashMap::from([(
            id("d0"),
            DeviceReport::new(status.clone(), now() - Duration::seconds(2)),
        )]);
        let a = run(&r, 1);
        assert_eq!((a.succeeded, a.unreported), (1, 0), "skew {skew}");
        // And a report that reached NATS a minute ago is stale, whatever the device claims.
        let r = HashMap::from([(id("d0"), DeviceReport::new(status, now() - Duration::seconds(60)))]);
        assert_eq!(run(&r, 1).unreported, 1, "skew {skew}");
    }
}
