//! The operator's two bucket indexes, without a server: feed them the entries
//! their follower would hand over, then look at what they hold.

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use harmony_reconciler_contracts::{DeploymentRef, Id};
use iot_nats::{BucketEntry, BucketIndex};
use iot_operator::desired_index::DesiredIndex;
use iot_operator::device_index::DeviceIndex;
use iot_operator::device_services::desired_read::DesiredSource;

fn at(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_900_000_000 + s, 0).single().expect("time")
}

fn put(key: &str, value: &[u8], s: i64) -> BucketEntry {
    BucketEntry {
        key: key.into(),
        value: Some(Bytes::copy_from_slice(value)),
        stored_at: at(s),
        sequence: u64::try_from(s).unwrap_or(0),
    }
}

fn del(key: &str, s: i64) -> BucketEntry {
    BucketEntry {
        key: key.into(),
        value: None,
        stored_at: at(s),
        sequence: u64::try_from(s).unwrap_or(0),
    }
}

fn id(s: &str) -> Id {
    Id::new(s).expect("id")
}

fn dep(name: &str) -> DeploymentRef {
    DeploymentRef::new("default", name).expect("ref")
}

#[test]
fn the_desired_index_holds_each_key_by_deployment_and_by_device() {
    let index = DesiredIndex::default();
    for e in [
        put("pi-1.default_web", b"w1", 1),
        put("pi-2.default_web", b"w2", 2),
        put("pi-1.default_db", b"d1", 3),
        put("not-a-desired-key", b"x", 4),
        put("pi-2.default_web", b"w2'", 5),
        del("pi-1.default_db", 6),
    ] {
        index.apply(e);
    }
    let web = index.existing(&dep("web"));
    assert_eq!(
        web.iter().map(|(d, v)| (d.to_string(), v.clone())).collect::<Vec<_>>(),
        vec![
            ("pi-1".to_owned(), Bytes::from_static(b"w1")),
            ("pi-2".to_owned(), Bytes::from_static(b"w2'"))
        ]
    );
    assert!(
        index.existing(&dep("db")).is_empty(),
        "a deleted key leaves no empty deployment"
    );
    assert_eq!(index.deployments().into_iter().collect::<Vec<_>>(), vec![dep("web")]);
    assert_eq!(index.key_count(), 2);
    // Devices read only once the follower says the index caught up.
    assert!(index.records_for(&id("pi-1")).is_none());
}

fn report(device: &str, deployment_phase: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "device_id": device,
        "agent_version": "1",
        "heartbeat_at": "2026-12-01T00:00:00Z",
        "deployments": {"default/web": {"phase": deployment_phase, "last_event_at": "2026-12-01T00:00:00Z"}},
    }))
    .expect("json")
}

#[test]
fn the_device_index_takes_only_each_devices_own_good_report() {
    let index = DeviceIndex::default();
    index.apply(put("status.pi-1", &report("pi-1", "Running"), 1));
    index.apply(put("status.pi-2", &report("pi-2", "Running"), 2));
    assert!(index.take_changed());
    assert!(!index.take_changed(), "changes are taken once");
    // pi-2's key, pi-1's name: refused; pi-1's next report is garbage: the last
    // good one stays.
    index.apply(put("status.pi-2", &report("pi-1", "Failed"), 3));
    index.apply(put("status.pi-1", b"{garbage", 4));
    let pi1 = index.report(&id("pi-1")).expect("pi-1 kept");
    assert_eq!(
        pi1.received_at,
        at(1),
        "stamped with the server's time of the good report"
    );
    let pi2 = index.report(&id("pi-2")).expect("pi-2 kept");
    assert_eq!(pi2.received_at, at(2));
    assert_eq!(
        pi2.deployments.get(&dep("web")).map(|p| p.phase),
        Some(harmony_reconciler_contracts::Phase::Running)
    );
    // A deleted report removes the device; a key that is no report is ignored.
    index.apply(del("status.pi-1", 5));
    index.apply(put("other.pi-3", &report("pi-3", "Running"), 6));
    assert!(index.report(&id("pi-1")).is_none());
    assert_eq!(index.len(), 1);
    assert_eq!(
        index.take_pending_since(),
        Some(at(1)),
        "lag counts from the oldest change"
    );
    index.caught_up();
    assert_eq!(index.take_pending_since(), None, "replayed history is not lag");
}
