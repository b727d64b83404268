//! The write-path planner: resource + KV contents -> puts and purges.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use harmony_reconciler_contracts::{DecodedDesiredState, DeploymentRef, Id, desired_state_key};
use iot_api::DeploymentSpec;
use iot_nats::KvOp;
use iot_operator::kv_plan::{payload, plan_apply, plan_cleanup, target_ids};

fn spec(targets: &[&str], image: &str) -> DeploymentSpec {
    serde_json::from_value(serde_json::json!({
        "targetDevices": targets,
        "score": {"PodmanV0": {"services": [{"name": "web", "image": image}]}}
    }))
    .expect("spec")
}

fn ids(v: &[&str]) -> BTreeSet<Id> {
    v.iter().map(|s| Id::new(*s).expect("id")).collect()
}

fn dep() -> DeploymentRef {
    DeploymentRef::new("ns", "web").expect("ref")
}

#[test]
fn fresh_resource_puts_every_target() {
    let p = payload(&dep(), &spec(&["a", "b"], "img:1"), Some(1));
    let plan = plan_apply(&ids(&["a", "b"]), &p, &BTreeMap::new());
    assert_eq!(plan.puts.len(), 2);
    assert!(plan.purges.is_empty());
}

#[test]
fn unchanged_bytes_produce_no_writes() {
    let p = payload(&dep(), &spec(&["a", "b"], "img:1"), Some(1));
    let existing: BTreeMap<Id, Bytes> = ids(&["a", "b"]).into_iter().map(|d| (d, p.clone())).collect();
    assert!(plan_apply(&ids(&["a", "b"]), &p, &existing).is_empty());
}

#[test]
fn payload_is_deterministic() {
    let s = spec(&["a"], "img:1");
    assert_eq!(payload(&dep(), &s, Some(1)), payload(&dep(), &s, Some(1)));
}

#[test]
fn changed_spec_rewrites_and_dropped_devices_are_purged() {
    let old = payload(&dep(), &spec(&["a", "b"], "img:1"), Some(1));
    let new = payload(&dep(), &spec(&["a", "c"], "img:2"), Some(1));
    let existing: BTreeMap<Id, Bytes> = ids(&["a", "b"]).into_iter().map(|d| (d, old.clone())).collect();
    let plan = plan_apply(&ids(&["a", "c"]), &new, &existing);
    let put_devices: Vec<&str> = plan.puts.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(put_devices, ["a", "c"]);
    assert_eq!(plan.purges, vec![Id::new("b").expect("id")]);
    // Purges are emitted before puts, with full keys.
    let ops = plan.ops(&dep());
    assert_eq!(ops[0], KvOp::Purge { key: "b.ns_web".into() });
    assert!(matches!(&ops[1], KvOp::Put { key, .. } if key == "a.ns_web"));
}

#[test]
fn cleanup_purges_everything_written() {
    let p = payload(&dep(), &spec(&["a"], "img:1"), Some(1));
    let existing: BTreeMap<Id, Bytes> = ids(&["a", "z"]).into_iter().map(|d| (d, p.clone())).collect();
    let plan = plan_cleanup(&existing);
    assert_eq!(plan.purges.len(), 2);
    assert!(plan.puts.is_empty());
}

#[test]
fn payload_decodes_on_the_device_side_with_the_same_hash() {
    let s = spec(&["a"], "img:1");
    let p = payload(&dep(), &s, Some(1));
    let decoded = DecodedDesiredState::from_slice(&p).expect("agent decodes it");
    assert_eq!(decoded.spec_hash, s.score.spec_hash());
    assert_eq!(desired_state_key(&Id::new("a").expect("id"), &dep()), "a.ns_web");
}

#[test]
fn adding_a_target_writes_only_the_new_device() {
    // The payload carries nothing that changes with the target list, so the devices
    // already targeted keep byte-identical values.
    let before = payload(&dep(), &spec(&["a", "b"], "img:1"), Some(1));
    let after = payload(&dep(), &spec(&["a", "b", "c"], "img:1"), Some(1));
    assert_eq!(before, after);
    let existing: BTreeMap<Id, Bytes> = ids(&["a", "b"]).into_iter().map(|d| (d, before.clone())).collect();
    let plan = plan_apply(&ids(&["a", "b", "c"]), &after, &existing);
    let put_devices: Vec<&str> = plan.puts.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(put_devices, ["c"]);
    assert!(plan.purges.is_empty());
}

#[test]
fn invalid_target_is_a_typed_error() {
    let mut s = spec(&["a"], "img:1");
    s.target_devices.push("bad.id".into());
    assert!(target_ids(&s).is_err());
}

#[test]
fn orphans_are_deployments_with_keys_but_no_resource() {
    use iot_operator::gc::orphaned;
    let r = |n: &str| DeploymentRef::new("ns", n).expect("ref");
    let in_kv: BTreeSet<DeploymentRef> = [r("a"), r("b"), r("c")].into();
    let resources: BTreeSet<DeploymentRef> = [r("a"), r("c"), r("d")].into();
    assert_eq!(orphaned(&in_kv, &resources), [r("b")].into());
    assert!(orphaned(&BTreeSet::new(), &resources).is_empty());
}

#[test]
fn paused_devices_keep_what_they_run() {
    use iot_operator::kv_plan::without_paused;
    let old = payload(&dep(), &spec(&["a", "b"], "img:1"), Some(1));
    let new = payload(&dep(), &spec(&["a", "b"], "img:2"), Some(2));
    let existing = BTreeMap::from([(id("a"), old.clone()), (id("b"), old.clone()), (id("c"), old)]);
    let targets: BTreeSet<Id> = [id("a"), id("b"), id("d")].into();
    let paused: BTreeSet<Id> = [id("b"), id("c"), id("d")].into();
    let plan = without_paused(plan_apply(&targets, &new, &existing), &paused);
    // Only a gets the new version; b keeps the old one, c is not taken off, d gets
    // nothing until it is resumed.
    assert_eq!(
        plan.puts.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        vec![id("a")]
    );
    assert!(plan.purges.is_empty());
}

fn id(s: &str) -> Id {
    Id::new(s).expect("id")
}
