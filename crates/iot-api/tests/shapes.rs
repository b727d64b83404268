//! The API's JSON is camelCase (what kubectl users, kstatus, Argo CD and Flux read);
//! the wire payload keeps its own names; the conversion between them is exact.

use harmony_reconciler_contracts as wire;
use iot_api::*;
use serde_json::json;

fn api_spec_json() -> serde_json::Value {
    json!({
        "targetDevices": ["dev1", "dev2"],
        "score": {"PodmanV0": {"services": [{
            "name": "web",
            "image": "localhost/iot-web:v1",
            "ports": [{"hostPort": 8080, "containerPort": 80, "protocol": "udp"}],
            "env": {"MODE": "prod"},
            "command": ["/bin/httpd"],
            "args": ["-v"],
            "restartPolicy": "OnFailure",
            "resources": {"memoryMib": 64, "cpuMillicores": 500}
        }]}}
    })
}

#[test]
fn spec_reads_and_writes_camel_case() {
    let spec: DeploymentSpec = serde_json::from_value(api_spec_json()).expect("decodes");
    assert_eq!(serde_json::to_value(&spec).expect("encodes"), api_spec_json());
    // The snake_case spelling of the wire format is not the API.
    let snake = json!({"target_devices": ["dev1"], "score": {"PodmanV0": {"services": []}}});
    // (It decodes, but targets nothing: the API server rejects it, as neither
    // `targetDevices` nor `selector` is there once unknown fields are pruned.)
    let decoded: DeploymentSpec = serde_json::from_value(snake).expect("decodes");
    assert!(decoded.target_devices.is_empty() && decoded.selector.is_none());
}

#[test]
fn conversion_to_the_wire_keeps_every_field_and_the_spec_hash() {
    let spec: DeploymentSpec = serde_json::from_value(api_spec_json()).expect("decodes");
    let wire_json = serde_json::to_value(spec.score.to_wire()).expect("encodes");
    assert_eq!(
        wire_json,
        json!({"PodmanV0": {"services": [{
            "name": "web",
            "image": "localhost/iot-web:v1",
            "ports": [{"host_port": 8080, "container_port": 80, "protocol": "udp"}],
            "env": {"MODE": "prod"},
            "command": ["/bin/httpd"],
            "args": ["-v"],
            "restart_policy": "OnFailure",
            "resources": {"memory_mib": 64, "cpu_millicores": 500}
        }]}})
    );
    let direct: wire::IotScore = serde_json::from_value(wire_json).expect("wire decodes");
    assert_eq!(spec.score.spec_hash(), direct.spec_hash());
    assert_eq!(IotScore::from_wire(&direct), spec.score);
}

#[test]
fn status_is_camel_case_with_observed_generation() {
    let status = DeploymentStatus {
        observed_generation: Some(3),
        conditions: vec![],
        matched_devices: None,
        current_revision: Some(4),
        rollout: None,
        images: vec![iot_api::PinnedImage {
            image: "reg:5000/iot/web:v1".into(),
            digest: "sha256:d".into(),
        }],
        aggregate: Some(AggregateStatus {
            observed_generation: Some(3),
            spec_hash: "abc".into(),
            targets: 2,
            succeeded: 1,
            failed: 1,
            top_errors: vec![ErrorGroup {
                message: "m".into(),
                devices: 1,
                example_devices: vec![wire::Id::new("dev1").expect("id")],
            }],
            ..Default::default()
        }),
    };
    assert_eq!(
        serde_json::to_value(&status).expect("encodes"),
        json!({
            "observedGeneration": 3,
            "currentRevision": 4,
            "images": [{"image": "reg:5000/iot/web:v1", "digest": "sha256:d"}],
            "aggregate": {
                "observedGeneration": 3, "specHash": "abc", "targets": 2, "succeeded": 1,
                "failed": 1, "pending": 0, "unreported": 0, "restarting": 0,
                "topErrors": [{"message": "m", "devices": 1, "exampleDevices": ["dev1"]}]
            }
        })
    );
}
