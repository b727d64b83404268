//! Old and new readers and writers must understand each other.

use harmony_reconciler_contracts::*;
use serde_json::json;

#[test]
fn unknown_score_variant_decodes_as_unsupported_not_error() {
    let bytes = serde_json::to_vec(&json!({
        "format": 1, "deployment": "default/web", "generation": 2,
        "score": {"OkdApplyV0": {"manifests": ["x"]}}
    }))
    .expect("json");
    let decoded = DecodedDesiredState::from_slice(&bytes).expect("must decode");
    match &decoded.state.score {
        ScoreSlot::Unsupported { variant, raw } => {
            assert_eq!(variant, "OkdApplyV0");
            assert_eq!(raw["OkdApplyV0"]["manifests"][0], "x");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // Written back unchanged: nothing is lost by a reader that does not understand it.
    let again = serde_json::to_value(&decoded.state).expect("ser");
    assert_eq!(again["score"], json!({"OkdApplyV0": {"manifests": ["x"]}}));
}

#[test]
fn known_variant_with_bad_body_is_an_error_naming_the_field() {
    let bytes = br#"{"deployment":"default/web","score":{"PodmanV0":{"services":[{"name":"a"}]}}}"#;
    let err = DecodedDesiredState::from_slice(bytes)
        .expect_err("missing image")
        .to_string();
    assert!(err.contains("image"), "{err}");
}

#[test]
fn score_that_is_not_a_single_variant_object_is_an_error() {
    for score in [json!("PodmanV0"), json!({}), json!({"PodmanV0": {}, "Other": {}})] {
        let bytes = serde_json::to_vec(&json!({"deployment": "a/b", "score": score})).expect("json");
        assert!(DecodedDesiredState::from_slice(&bytes).is_err());
    }
}

#[test]
fn newer_agent_status_is_read_by_older_reader() {
    // A future agent adds fields and a new phase value; this reader must cope.
    let future = json!({
        "format": 2,
        "device_id": "dev1",
        "agent_version": "9.0.0",
        "heartbeat_at": "2030-01-01T00:00:00Z",
        "gps": {"lat": 1.0},
        "deployments": {"ns/web": {"phase": "Hibernating", "last_event_at": "2030-01-01T00:00:00Z", "retries": 3}},
        "recent_events": [{"at": "2030-01-01T00:00:00Z", "severity": "Critical", "message": "m", "code": 7}],
        "inventory": {"cpu_cores": 8, "gpu": "none"}
    });
    let status: AgentStatus = serde_json::from_value(future).expect("older reader tolerates newer status");
    let phase = &status.deployments[&DeploymentRef::new("ns", "web").expect("ok")];
    assert_eq!(phase.phase, Phase::Unknown);
    assert_eq!(status.recent_events[0].severity, Severity::Unknown);
    assert_eq!(status.inventory.expect("inventory").cpu_cores, 8);
}

#[test]
fn older_agent_status_is_read_by_newer_reader() {
    // The first agents wrote only these fields.
    let old = json!({"device_id": "dev1", "heartbeat_at": "2026-04-21T00:00:00Z"});
    let status: AgentStatus = serde_json::from_value(old).expect("newer reader tolerates older status");
    assert_eq!(status.format, 1);
    assert!(status.deployments.is_empty() && status.recent_events.is_empty());
    assert!(status.inventory.is_none());
    let phase: DeploymentPhase =
        serde_json::from_value(json!({"phase": "Running", "last_event_at": "2026-04-21T00:00:00Z"}))
            .expect("phase without hash/error");
    assert_eq!((phase.spec_hash, phase.last_error), (None, None));
    // Fields added for restart accounting and runtime health default to "nothing seen".
    assert_eq!(
        (phase.restarts, phase.restores, phase.recent_restarts, phase.detail),
        (0, 0, 0, None)
    );
    assert_eq!(status.runtime.state, RuntimeState::Unknown);
    assert_eq!(status.last_reconcile_at, None);
    assert_eq!(phase.pull, None);
}

#[test]
fn a_pull_state_from_a_newer_agent_reads_as_unknown() {
    let phase: DeploymentPhase = serde_json::from_value(json!({
        "phase": "Pending", "last_event_at": "2026-04-21T00:00:00Z",
        "pull": {"image": "r.example/web:v2", "state": "Verifying", "started_at": "2026-04-21T00:00:00Z"}
    }))
    .expect("decodes");
    let pull = phase.pull.expect("pull");
    assert_eq!(pull.state, PullState::Unknown);
    assert_eq!((pull.bytes_done, pull.bytes_total, pull.layers_total), (0, None, 0));
}

#[test]
fn a_runtime_state_from_a_newer_agent_reads_as_unknown() {
    let status: AgentStatus = serde_json::from_value(json!({
        "device_id": "dev1", "heartbeat_at": "2026-04-21T00:00:00Z",
        "runtime": {"state": "Hibernating", "message": "zzz"}
    }))
    .expect("decodes");
    assert_eq!(status.runtime.state, RuntimeState::Unknown);
    assert_eq!(status.runtime.message.as_deref(), Some("zzz"));
}

#[test]
fn desired_state_without_optional_envelope_fields_decodes() {
    let bytes = br#"{"deployment":"default/web","score":{"PodmanV0":{"services":[{"name":"a","image":"i"}]}}}"#;
    let decoded = DecodedDesiredState::from_slice(bytes).expect("decodes");
    assert_eq!(decoded.state.format, 1);
}

#[test]
fn payload_from_an_older_operator_with_a_generation_decodes_to_the_same_hash() {
    let old = br#"{"format":1,"deployment":"default/web","generation":7,"score":{"PodmanV0":{"services":[{"name":"a","image":"i"}]}}}"#;
    let new =
        br#"{"format":1,"deployment":"default/web","score":{"PodmanV0":{"services":[{"name":"a","image":"i"}]}}}"#;
    let (old, new) = (
        DecodedDesiredState::from_slice(old).expect("old decodes"),
        DecodedDesiredState::from_slice(new).expect("new decodes"),
    );
    assert_eq!(old, new, "the generation was never part of what a device runs");
}

#[test]
fn validation_names_fields() {
    let score: IotScore = serde_json::from_value(json!({"PodmanV0": {"services": [
        {"name": "web", "image": ""},
        {"name": "web", "image": "has space"},
        {"name": "db", "image": "ok", "ports": [{"host_port": 0, "container_port": 80},
            {"host_port": 8080, "container_port": 80}, {"host_port": 8080, "container_port": 81}]}
    ]}}))
    .expect("decodes");
    let problems = validate_score(&score);
    let text = describe_problems(&problems);
    for needle in [
        "services[0].image: must not be empty",
        "services[1].name: duplicate service name \"web\"",
        "services[1].image",
        "services[2].ports[0].host_port",
        "services[2].ports[2].host_port: host port 8080/tcp is published twice",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
    let ok: IotScore =
        serde_json::from_value(json!({"PodmanV0": {"services": [{"name": "a", "image": "localhost/x:v1"}]}}))
            .expect("ok");
    assert!(validate_score(&ok).is_empty());
}

#[test]
fn resource_limits_out_of_range_name_their_field() {
    // u64::MAX MiB would overflow the byte count podman gets (u64::MAX * 2^20).
    let score: IotScore = serde_json::from_value(json!({"PodmanV0": {"services": [
        {"name": "a", "image": "x", "resources": {"memory_mib": u64::MAX, "cpu_millicores": u64::MAX}},
        {"name": "b", "image": "x", "resources": {"memory_mib": 1, "cpu_millicores": 0}},
        {"name": "c", "image": "x", "resources": {"memory_mib": MAX_MEMORY_MIB, "cpu_millicores": MAX_CPU_MILLICORES}},
    ]}}))
    .expect("decodes");
    let text = describe_problems(&validate_score(&score));
    for needle in [
        "services[0].resources.memory_mib: 18446744073709551615 is out of range (4-1048576 MiB)",
        "services[0].resources.cpu_millicores: 18446744073709551615 is out of range (1-1024000 millicores)",
        "services[1].resources.memory_mib: 1 is out of range",
        "services[1].resources.cpu_millicores: 0 is out of range",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
    assert!(!text.contains("services[2]"), "the bounds themselves are valid: {text}");
}
