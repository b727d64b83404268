//! The pure parts of fleets: selector resolution over Devices, the shrink guard,
//! `Device.status` from reports and when it is written, revision counts and the
//! last good revision.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::{
    DeploymentPhase, DeploymentRef, Id, InventorySnapshot, Phase, RuntimeState, RuntimeStatus, SpecHash,
};
use iot_api::{AggregateStatus, Device, DeviceSelector, DeviceSpec, REVOKED_ANNOTATION};
use iot_operator::device_status::{Due, device_status, due};
use iot_operator::fleet_aggregate::{
    AggregateInput, AggregateLimits, DeviceFacts, DeviceReport, aggregate, last_good_revision,
};
use iot_operator::targeting::{guard_removals, select, shrink_token};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2027, 1, 15, 8, 0, 0).single().expect("time")
}

fn id(s: &str) -> Id {
    Id::new(s).expect("id")
}

fn ids(list: &[&str]) -> BTreeSet<Id> {
    list.iter().map(|s| id(s)).collect()
}

fn device(name: &str, labels: &[(&str, &str)]) -> Device {
    let mut d = Device::new(name, DeviceSpec::default());
    d.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    d.metadata.uid = Some(format!("uid-{name}"));
    d
}

fn madrid() -> DeviceSelector {
    DeviceSelector {
        match_labels: BTreeMap::from([("site".into(), "madrid".into())]),
        ..Default::default()
    }
}

#[test]
fn a_selector_matches_registered_unrevoked_devices_by_label() {
    let mut revoked = device("m3", &[("site", "madrid")]);
    revoked
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(REVOKED_ANNOTATION.into(), "2027-01-15T08:00:00Z".into());
    let devices = [
        device("m1", &[("site", "madrid")]),
        device("m2", &[("site", "madrid"), ("ring", "canary")]),
        revoked,
        device("p1", &[("site", "paris")]),
        // Not a valid device id: never selected.
        device("bad.name", &[("site", "madrid")]),
    ];
    assert_eq!(select(devices.iter(), &madrid()), ids(&["m1", "m2"]));
    // An empty selector matches no device at all.
    assert!(select(devices.iter(), &DeviceSelector::default()).is_empty());
}

#[test]
fn a_small_shrink_goes_through() {
    let holding = ids(&["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]);
    let matched = ids(&["a", "b", "c", "d", "e", "f", "g", "h", "i"]);
    let g = guard_removals(matched.clone(), &holding, &none(), 20, None);
    assert_eq!(g.targets, matched);
    assert!(g.held.is_none());
    // Two of ten is 20 %: not more than the limit.
    let g = guard_removals(
        ids(&["a", "b", "c", "d", "e", "f", "g", "h"]),
        &holding,
        &none(),
        20,
        None,
    );
    assert!(g.held.is_none());
    // One device always goes, even out of one.
    let g = guard_removals(ids(&[]), &ids(&["a"]), &none(), 20, None);
    assert!(g.targets.is_empty() && g.held.is_none());
}

#[test]
fn a_large_shrink_is_held_until_confirmed_with_its_token() {
    let holding = ids(&["a", "b", "c", "d", "e"]);
    let matched = ids(&["a", "b"]);
    let g = guard_removals(matched.clone(), &holding, &none(), 20, None);
    let held = g.held.clone().expect("held");
    assert_eq!(held.devices, ids(&["c", "d", "e"]));
    assert_eq!(g.targets, holding, "held devices keep the deployment");
    assert_eq!(g.matched, 2);
    // A stale or wrong confirmation does not release them.
    assert!(
        guard_removals(matched.clone(), &holding, &none(), 20, Some("nope"))
            .held
            .is_some()
    );
    assert_eq!(held.token, shrink_token(&ids(&["c", "d", "e"])));
    let confirmed = guard_removals(matched.clone(), &holding, &none(), 20, Some(&held.token));
    assert!(confirmed.held.is_none());
    assert_eq!(confirmed.targets, matched);
    // The token is for exactly that set: another shrink needs its own.
    assert_ne!(shrink_token(&ids(&["c", "d"])), held.token);
    // 100 turns the guard off.
    assert!(guard_removals(ids(&[]), &holding, &none(), 100, None).held.is_none());
}

fn none() -> BTreeSet<Id> {
    BTreeSet::new()
}

#[test]
fn a_region_relabelled_one_device_at_a_time_is_one_shrink() {
    // Ten devices hold it; they are labelled out one by one (one reconcile each).
    let all = ids(&["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]);
    let mut holding = all.clone();
    let mut recent = BTreeSet::new();
    let mut went = Vec::new();
    for gone in ["a", "b", "c", "d"] {
        let matched: BTreeSet<Id> = holding.iter().filter(|d| d.as_str() != gone).cloned().collect();
        let g = guard_removals(matched.clone(), &holding, &recent, 20, None);
        if g.held.is_some() {
            break;
        }
        went.push(gone);
        recent.insert(id(gone));
        holding = matched;
    }
    // Two of ten go (20 %); the third is held, although each step removes one.
    assert_eq!(went, ["a", "b"]);
    // A device that came back does not count.
    let back = ids(&["a", "c", "d", "e", "f", "g", "h", "i", "j"]);
    let g = guard_removals(
        back.iter().filter(|d| d.as_str() != "c").cloned().collect(),
        &back,
        &ids(&["a", "b"]),
        20,
        None,
    );
    assert!(g.held.is_none(), "b and c: 2 of 10");
}

fn report(age_s: i64, runtime: RuntimeState, phases: &[Phase]) -> DeviceReport {
    let deployments = phases
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                DeploymentRef::new("ns", format!("d{i}")).expect("ref"),
                DeploymentPhase::new(*p, None, None, now()),
            )
        })
        .collect();
    DeviceReport {
        received_at: now() - Duration::seconds(age_s),
        deployments,
        events: vec![],
        about: DeviceFacts {
            agent_version: "0.1.0".into(),
            inventory: Some(InventorySnapshot {
                arch: "aarch64".into(),
                memory_bytes: 4 << 30,
                disk_free_bytes: 12345,
                ..Default::default()
            }),
            runtime: RuntimeStatus {
                state: runtime,
                message: None,
            },
        },
        restarts_seen: Default::default(),
    }
}

fn condition<'a>(
    s: &'a iot_api::DeviceStatus,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == t).expect("condition")
}

#[test]
fn device_status_says_online_runtime_and_counts_on_the_servers_clock() {
    let d = device("m1", &[("site", "madrid")]);
    let st = Staleness::after(StdDuration::from_secs(30));
    let r = report(
        5,
        RuntimeState::Available,
        &[Phase::Running, Phase::Running, Phase::Failed],
    );
    let s = device_status(&d, Some(&r), None, now(), st);
    assert_eq!(condition(&s, "Online").status, "True");
    assert_eq!(condition(&s, "RuntimeReady").status, "True");
    assert_eq!(condition(&s, "Revoked").status, "False");
    let counts = s.deployments.clone().expect("counts");
    assert_eq!((counts.total, counts.running, counts.failed), (3, 2, 1));
    assert_eq!(
        s.inventory.as_ref().map(|i| (i.arch.as_str(), i.memory_mib)),
        Some(("aarch64", 4096))
    );
    assert_eq!(s.last_seen_at, Some(now() - Duration::seconds(5)));
    // Silence past the window is offline, whatever the report said.
    let quiet = device_status(&d, Some(&report(31, RuntimeState::Available, &[])), Some(&s), now(), st);
    assert_eq!(condition(&quiet, "Online").status, "False");
    assert_eq!(condition(&quiet, "Online").reason, "Silent");
    assert_eq!(condition(&quiet, "RuntimeReady").status, "Unknown");
    // A runtime that does not answer.
    let hung = device_status(
        &d,
        Some(&report(1, RuntimeState::Unavailable, &[])),
        Some(&s),
        now(),
        st,
    );
    assert_eq!(condition(&hung, "RuntimeReady").status, "False");
    // Never reported.
    let never = device_status(&d, None, None, now(), st);
    assert_eq!(condition(&never, "Online").reason, "NeverReported");
    assert_eq!(never.last_seen_at, None);
}

#[test]
fn a_heartbeat_alone_writes_only_after_the_refresh_period() {
    let d = device("m1", &[]);
    let st = Staleness::default();
    let every = StdDuration::from_secs(900);
    let first = device_status(
        &d,
        Some(&report(0, RuntimeState::Available, &[Phase::Running])),
        None,
        now(),
        st,
    );
    assert_eq!(due(None, &first, every), Due::Change);
    // Ten minutes of heartbeats later: nothing a person sees changed.
    let later = now() + Duration::minutes(10);
    let mut r = report(0, RuntimeState::Available, &[Phase::Running]);
    r.received_at = later;
    let next = device_status(&d, Some(&r), Some(&first), later, st);
    assert_eq!(due(Some(&first), &next, every), Due::No);
    // Transition times are kept, so recomputing changes nothing.
    assert_eq!(condition(&next, "Online"), condition(&first, "Online"));
    // Fifteen minutes: the last-seen time is refreshed.
    let later = now() + Duration::minutes(15);
    r.received_at = later;
    let next = device_status(&d, Some(&r), Some(&first), later, st);
    assert_eq!(due(Some(&first), &next, every), Due::Refresh);
    // Free disk space drifting is not a change; a phase change is.
    let mut r2 = report(0, RuntimeState::Available, &[Phase::Failed]);
    r2.received_at = now() + Duration::seconds(20);
    let next = device_status(&d, Some(&r2), Some(&first), now() + Duration::seconds(20), st);
    assert_eq!(due(Some(&first), &next, every), Due::Change);
}

#[test]
fn revocation_shows_as_a_condition() {
    let mut d = device("m1", &[]);
    d.metadata
        .annotations
        .get_or_insert_default()
        .insert(REVOKED_ANNOTATION.into(), "2027-01-15T07:00:00Z".into());
    let s = device_status(&d, None, None, now(), Staleness::default());
    assert_eq!(condition(&s, "Revoked").status, "True");
    assert!(condition(&s, "Revoked").message.contains("2027-01-15T07:00:00Z"));
}

fn running_on(revision: Option<u64>, hash: &str) -> DeviceReport {
    let mut r = report(1, RuntimeState::Available, &[]);
    let mut p = DeploymentPhase::new(Phase::Running, Some(SpecHash::from_reported(hash)), None, now());
    p.revision = revision;
    r.deployments.insert(DeploymentRef::new("ns", "web").expect("ref"), p);
    r
}

fn agg_for(reports: &HashMap<Id, DeviceReport>, targets: &BTreeSet<Id>, revision: u64) -> AggregateStatus {
    aggregate(
        AggregateInput {
            deployment: &DeploymentRef::new("ns", "web").expect("ref"),
            generation: Some(1),
            spec_hash: &SpecHash::from_reported("h7"),
            targets,
            revision: Some(revision),
        },
        reports,
        now(),
        Staleness::default(),
        AggregateLimits::default(),
    )
}

#[test]
fn devices_are_counted_by_revision_and_old_agents_as_unknown() {
    let targets = ids(&["a", "b", "c", "d", "e"]);
    let reports: HashMap<Id, DeviceReport> = [
        (id("a"), running_on(Some(7), "h7")),
        (id("b"), running_on(Some(7), "h7")),
        (id("c"), running_on(Some(7), "h7")),
        (id("d"), running_on(Some(6), "h6")),
        // An agent from before revisions: unknown, never a number.
        (id("e"), running_on(None, "h6")),
    ]
    .into();
    let agg = agg_for(&reports, &targets, 7);
    assert_eq!(agg.revision_summary.as_deref(), Some("3/5 on rev 7"));
    assert_eq!(
        agg.revisions
            .iter()
            .map(|r| (r.revision, r.devices))
            .collect::<Vec<_>>(),
        vec![(7, 3), (6, 1)]
    );
    assert_eq!(agg.unknown_revision, 1);
    // Not every target runs 7: the last good revision stays what it was.
    let before = AggregateStatus {
        last_good_revision: Some(6),
        ..Default::default()
    };
    assert_eq!(last_good_revision(Some(&before), &agg), Some(6));
}

#[test]
fn the_last_good_revision_is_the_newest_that_every_target_ran() {
    let targets = ids(&["a", "b"]);
    let reports: HashMap<Id, DeviceReport> = [
        (id("a"), running_on(Some(7), "h7")),
        (id("b"), running_on(Some(7), "h7")),
    ]
    .into();
    let agg = agg_for(&reports, &targets, 7);
    assert_eq!(last_good_revision(None, &agg), Some(7));
    // Running the right score but reporting no revision does not vouch for 7.
    let reports: HashMap<Id, DeviceReport> =
        [(id("a"), running_on(Some(7), "h7")), (id("b"), running_on(None, "h7"))].into();
    let agg = agg_for(&reports, &targets, 7);
    assert_eq!(agg.succeeded, 2);
    assert_eq!(last_good_revision(None, &agg), None);
}
