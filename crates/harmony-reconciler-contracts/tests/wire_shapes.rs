//! Snapshot tests: they pin the JSON every other component and every deployed device
//! depends on. If one fails, the wire format changed: bump a format version or make
//! the change additive, do not just update the expectation.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use harmony_reconciler_contracts::*;
use serde_json::{Value, json};

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0).single().expect("valid time")
}

fn sample_score() -> IotScore {
    IotScore::PodmanV0(PodmanV0Score {
        services: vec![PodmanService {
            name: "web".into(),
            image: "localhost/iot-web:v1".into(),
            ports: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
            }],
            env: BTreeMap::from([("MODE".into(), "prod".into())]),
            command: None,
            args: Some(vec!["-v".into()]),
            restart_policy: RestartPolicy::OnFailure,
            resources: Some(ResourceLimits {
                memory_mib: Some(64),
                cpu_millicores: None,
            }),
        }],
    })
}

fn roundtrip<T>(value: &T, expected: Value)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_value(value).expect("serializes");
    assert_eq!(json, expected, "wire shape changed");
    let back: T = serde_json::from_value(json).expect("deserializes");
    assert_eq!(&back, value);
}

#[test]
fn desired_state_shape() {
    let ds = DesiredState::new(DeploymentRef::new("default", "web").expect("ok"), sample_score());
    let expected = json!({
        "format": 1,
        "deployment": "default/web",
        "score": {"PodmanV0": {"services": [{
            "name": "web",
            "image": "localhost/iot-web:v1",
            "ports": [{"host_port": 8080, "container_port": 80}],
            "env": {"MODE": "prod"},
            "args": ["-v"],
            "restart_policy": "OnFailure",
            "resources": {"memory_mib": 64}
        }]}}
    });
    roundtrip(&ds, expected);
}

#[test]
fn desired_state_with_revision_shape() {
    let ds = DesiredState::new(DeploymentRef::new("default", "web").expect("ok"), sample_score()).with_revision(3);
    let value = serde_json::to_value(&ds).expect("serializes");
    assert_eq!(value["revision"], json!(3));
    let decoded = DecodedDesiredState::from_slice(&ds.to_bytes()).expect("decodes");
    assert_eq!(decoded.state.revision, Some(3));
    // The revision is not part of what runs: the spec hash is the score's alone.
    assert_eq!(decoded.spec_hash, sample_score().spec_hash());
    // A payload from an operator that predates revisions decodes to none.
    let old = br#"{"format":1,"deployment":"default/web","score":{"PodmanV0":{"services":[]}}}"#;
    assert_eq!(
        DecodedDesiredState::from_slice(old).expect("decodes").state.revision,
        None
    );
}

#[test]
fn minimal_service_omits_defaults() {
    let score = IotScore::PodmanV0(PodmanV0Score {
        services: vec![PodmanService {
            name: "a".into(),
            image: "img".into(),
            ports: vec![],
            env: BTreeMap::new(),
            command: None,
            args: None,
            restart_policy: RestartPolicy::Always,
            resources: None,
        }],
    });
    roundtrip(
        &score,
        json!({"PodmanV0": {"services": [{"name": "a", "image": "img"}]}}),
    );
}

#[test]
fn agent_status_shape() {
    let dep = DeploymentRef::new("default", "web").expect("ok");
    let status = AgentStatus {
        format: 1,
        device_id: Id::new("dev1").expect("ok"),
        agent_version: "0.1.0".into(),
        heartbeat_at: t(10),
        deployments: BTreeMap::from([(
            dep.clone(),
            DeploymentPhase {
                phase: Phase::Failed,
                spec_hash: Some(SpecHash::from_reported("0123456789abcdef")),
                last_error: Some("image not found".into()),
                last_event_at: t(5),
                detail: None,
                restarts: 2,
                restores: 1,
                recent_restarts: 3,
                revision: Some(7),
                pull: None,
            },
        )]),
        recent_events: vec![EventEntry {
            at: t(5),
            severity: Severity::Error,
            deployment: Some(dep),
            message: "image not found".into(),
        }],
        inventory: Some(InventorySnapshot {
            hostname: "pi".into(),
            cpu_cores: 4,
            memory_bytes: 1024,
            disk_total_bytes: 2048,
            disk_free_bytes: 1000,
            kernel: "6.1".into(),
            arch: "aarch64".into(),
            os: "Debian".into(),
            agent_version: "0.1.0".into(),
        }),
        last_reconcile_at: Some(t(9)),
        runtime: RuntimeStatus {
            state: RuntimeState::Available,
            message: None,
        },
    };
    let expected = json!({
        "format": 1,
        "device_id": "dev1",
        "agent_version": "0.1.0",
        "heartbeat_at": "2027-01-15T08:00:10Z",
        "deployments": {"default/web": {
            "phase": "Failed",
            "spec_hash": "0123456789abcdef",
            "last_error": "image not found",
            "last_event_at": "2027-01-15T08:00:05Z",
            "restarts": 2,
            "restores": 1,
            "recent_restarts": 3,
            "revision": 7
        }},
        "recent_events": [{
            "at": "2027-01-15T08:00:05Z",
            "severity": "Error",
            "deployment": "default/web",
            "message": "image not found"
        }],
        "inventory": {
            "hostname": "pi", "cpu_cores": 4, "memory_bytes": 1024,
            "disk_total_bytes": 2048, "disk_free_bytes": 1000, "kernel": "6.1",
            "arch": "aarch64", "os": "Debian", "agent_version": "0.1.0"
        },
        "last_reconcile_at": "2027-01-15T08:00:09Z",
        "runtime": {"state": "Available"}
    });
    roundtrip(&status, expected);
}

#[test]
fn pull_progress_shape() {
    let mut phase = DeploymentPhase::new(Phase::Pending, None, None, t(5));
    phase.detail = Some("pulling image registry.example.com:5000/web:v2".into());
    phase.pull = Some(PullProgress {
        image: "registry.example.com:5000/web:v2".into(),
        state: PullState::Pulling,
        bytes_done: 3_822_592,
        bytes_total: Some(28_003_805),
        layers_done: 1,
        layers_total: 3,
        started_at: t(1),
    });
    let expected = json!({
        "phase": "Pending",
        "spec_hash": null,
        "last_error": null,
        "last_event_at": "2027-01-15T08:00:05Z",
        "detail": "pulling image registry.example.com:5000/web:v2",
        "restarts": 0,
        "restores": 0,
        "recent_restarts": 0,
        "pull": {
            "image": "registry.example.com:5000/web:v2",
            "state": "Pulling",
            "bytes_done": 3_822_592,
            "bytes_total": 28_003_805,
            "layers_done": 1,
            "layers_total": 3,
            "started_at": "2027-01-15T08:00:01Z"
        }
    });
    roundtrip(&phase, expected);
    // An unknown total is left out; a failed attempt keeps where it stopped.
    let failed = PullProgress {
        image: "r.example/web:v2".into(),
        state: PullState::Failed,
        bytes_done: 0,
        bytes_total: None,
        layers_done: 0,
        layers_total: 0,
        started_at: t(1),
    };
    roundtrip(
        &failed,
        json!({
            "image": "r.example/web:v2", "state": "Failed", "bytes_done": 0,
            "layers_done": 0, "layers_total": 0, "started_at": "2027-01-15T08:00:01Z"
        }),
    );
}

#[test]
fn spec_hash_is_pinned_and_ignores_key_order() {
    let hash = sample_score().spec_hash();
    // Pinned (and cross-checked with Python: sha256 of json.dumps(sort_keys=True,
    // separators=(",", ":")), first 16 hex digits). A change here would make every
    // device recreate its containers.
    assert_eq!(hash.as_str(), "96e874d310343716", "spec hash algorithm changed");
    let reordered: Value = serde_json::from_str(
        r#"{"PodmanV0":{"services":[{"restart_policy":"OnFailure","resources":{"memory_mib":64},
        "args":["-v"],"env":{"MODE":"prod"},"ports":[{"container_port":80,"host_port":8080}],
        "image":"localhost/iot-web:v1","name":"web"}]}}"#,
    )
    .expect("json");
    assert_eq!(spec_hash_of_value(&reordered), hash);
}

#[test]
fn reader_hash_from_raw_bytes_matches_writer_hash() {
    let ds = DesiredState::new(DeploymentRef::new("ns", "web").expect("ok"), sample_score());
    let decoded = DecodedDesiredState::from_slice(&ds.to_bytes()).expect("decodes");
    assert_eq!(decoded.spec_hash, sample_score().spec_hash());
    assert_eq!(decoded.state, ds);
}

#[test]
fn event_ring_is_bounded_and_keeps_newest() {
    let mut ring = EventRing::new(3);
    for i in 0..5 {
        ring.push(EventEntry {
            at: t(i),
            severity: Severity::Info,
            deployment: None,
            message: format!("e{i}"),
        });
    }
    let msgs: Vec<String> = ring.to_vec().into_iter().map(|e| e.message).collect();
    assert_eq!(msgs, ["e2", "e3", "e4"]);
}
