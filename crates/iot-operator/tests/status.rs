//! How `.status` is built from the write outcome, the aggregate and the live object.

use chrono::{Duration, TimeZone, Utc};
use iot_api::conditions::*;
use iot_api::{AggregateStatus, DeploymentStatus};
use iot_operator::conditions::{StatusInputs, WriteOutcome, build_status};

fn agg(generation: i64, succeeded: u32) -> AggregateStatus {
    AggregateStatus {
        observed_generation: Some(generation),
        spec_hash: format!("hash{generation}"),
        targets: 1,
        succeeded,
        pending: 1 - succeeded,
        ..Default::default()
    }
}

fn cond<'a>(s: &'a DeploymentStatus, t: &str) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == t).expect("condition")
}

#[test]
fn conditions_carry_the_generation_of_their_own_input() {
    // Generation 2 is written, but the fleet summary is still about generation 1.
    let inputs = StatusInputs {
        write_generation: Some(2),
        write: Some(WriteOutcome::written(1)),
        last_written: None,
        aggregate: Some(agg(1, 1)),
        rollout: None,
    };
    let s = build_status(None, &inputs, Utc::now());
    assert_eq!(s.observed_generation, Some(1), "the older of the two inputs");
    assert_eq!(cond(&s, DESIRED_STATE_WRITTEN).observed_generation, Some(2));
    let ready = cond(&s, READY);
    assert_eq!((ready.status.as_str(), ready.observed_generation), ("True", Some(1)));
    // Once the summary catches up, and devices have not picked up the new spec yet:
    let inputs = StatusInputs {
        aggregate: Some(agg(2, 0)),
        ..inputs
    };
    let s = build_status(None, &inputs, Utc::now());
    assert_eq!(s.observed_generation, Some(2));
    let ready = cond(&s, READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str(), ready.observed_generation),
        ("False", REASON_ROLLING_OUT, Some(2))
    );
}

#[test]
fn unchanged_conditions_keep_the_live_transition_time() {
    let t0 = Utc.timestamp_opt(1_800_000_000, 0).single().expect("time");
    let inputs = StatusInputs {
        write_generation: Some(1),
        write: Some(WriteOutcome::written(1)),
        last_written: None,
        aggregate: Some(agg(1, 1)),
        rollout: None,
    };
    let live = build_status(None, &inputs, t0);
    // An operator restart an hour later computes exactly the live status.
    let again = build_status(Some(&live), &inputs, t0 + Duration::hours(1));
    assert_eq!(again, live);
    // A real transition gets a new time; the others keep theirs.
    let failed = StatusInputs {
        aggregate: Some(AggregateStatus {
            failed: 1,
            succeeded: 0,
            pending: 0,
            ..agg(1, 1)
        }),
        ..inputs
    };
    let later = build_status(Some(&live), &failed, t0 + Duration::hours(2));
    assert_ne!(
        cond(&later, READY).last_transition_time,
        cond(&live, READY).last_transition_time
    );
    assert_eq!(
        cond(&later, DESIRED_STATE_WRITTEN).last_transition_time,
        cond(&live, DESIRED_STATE_WRITTEN).last_transition_time
    );
}

#[test]
fn a_failed_write_keeps_the_revision_and_the_held_removals_of_the_last_good_one() {
    use iot_operator::conditions::HeldRemovals;
    let written = WriteOutcome::Written {
        devices: 5,
        matched: Some(2),
        held: Some(HeldRemovals {
            count: 3,
            token: "abc123".into(),
            namespace: "default".into(),
            name: "web".into(),
        }),
        revision: Some(7),
        images: [("reg:5000/iot/web:v1".to_owned(), "sha256:abc".to_owned())].into(),
    };
    // The registry is down while a new revision's tag is resolved: the status
    // keeps the revision and digests the devices run.
    let failed = WriteOutcome::Failed {
        reason: iot_api::conditions::REASON_REGISTRY_UNAVAILABLE,
        message: "registry reg:5000 is unreachable: connection refused".into(),
    };
    let inputs = StatusInputs {
        write_generation: Some(3),
        write: Some(failed),
        last_written: Some(written),
        aggregate: Some(agg(3, 1)),
        rollout: None,
    };
    let s = build_status(None, &inputs, Utc::now());
    let written_cond = cond(&s, DESIRED_STATE_WRITTEN);
    assert_eq!(
        (written_cond.status.as_str(), written_cond.reason.as_str()),
        ("False", "RegistryUnavailable")
    );
    assert_eq!(s.current_revision, Some(7));
    assert_eq!(
        s.images,
        [iot_api::PinnedImage {
            image: "reg:5000/iot/web:v1".into(),
            digest: "sha256:abc".into()
        }]
    );
    assert_eq!(s.matched_devices, Some(2));
    let held = cond(&s, iot_api::conditions::REMOVALS_HELD);
    assert_eq!(held.status, "True");
    assert!(
        held.message.contains("iot.nationtech.io/confirm-shrink=abc123"),
        "{}",
        held.message
    );
}
