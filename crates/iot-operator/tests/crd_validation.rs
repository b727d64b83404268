//! The CRD on a real API server: installation, discovery, and server-side rejection
//! of bad resources with messages that name the field.

use std::time::Duration;

use iot_operator::install::{crd_yaml, install_crd};
use iot_testkit::ApiServer;

async fn server_with_crd() -> anyhow::Result<ApiServer> {
    let api = ApiServer::start().await?;
    let client = api.kube_client().await?;
    install_crd(client, Duration::from_secs(30)).await?;
    Ok(api)
}

fn manifest(name: &str, spec: serde_json::Value) -> String {
    serde_json::json!({
        "apiVersion": "iot.nationtech.io/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec
    })
    .to_string()
}

fn good_spec() -> serde_json::Value {
    serde_json::json!({
        "targetDevices": ["dev1"],
        "score": {"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v1",
            "ports": [{"hostPort": 8080, "containerPort": 80}]}]}}
    })
}

#[tokio::test]
async fn installed_crd_is_discoverable_and_explained() -> anyhow::Result<()> {
    let api = server_with_crd().await?;
    let (ok, out, err) = api.kubectl(&["api-resources", "--api-group=iot.nationtech.io"], None)?;
    assert!(ok, "{err}");
    assert!(out.contains("deployments") && out.contains("iotdep"), "{out}");
    let (ok, out, err) = api.kubectl(&["explain", "deployments.iot.nationtech.io.spec.targetDevices"], None)?;
    assert!(ok, "{err}");
    assert!(out.contains("subject token"), "{out}");
    // Installing twice is fine.
    install_crd(api.kube_client().await?, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test]
async fn valid_resource_is_accepted() -> anyhow::Result<()> {
    let api = server_with_crd().await?;
    let (ok, _, err) = api.kubectl(&["apply", "-f", "-"], Some(&manifest("web", good_spec())))?;
    assert!(ok, "{err}");
    let (ok, out, _) = api.kubectl(
        &[
            "get",
            "iotdep",
            "-n",
            "default",
            "web",
            "-o",
            "jsonpath={.spec.targetDevices[0]}",
        ],
        None,
    )?;
    assert!(ok && out == "dev1", "{out}");
    Ok(())
}

#[tokio::test]
async fn invalid_resources_are_rejected_naming_the_field() -> anyhow::Result<()> {
    let api = server_with_crd().await?;
    let mut cases: Vec<(&str, serde_json::Value, Vec<&str>)> = Vec::new();
    let mut s = good_spec();
    s["targetDevices"] = serde_json::json!([]);
    cases.push(("empty-targets", s, vec!["spec.targetDevices", "at least 1 items"]));
    let mut s = good_spec();
    s["targetDevices"] = serde_json::json!(["dev.1"]);
    cases.push(("bad-device", s, vec!["spec.targetDevices[0]", "should match"]));
    // Limits whose byte or quota count would overflow a u64 on the device.
    let mut s = good_spec();
    s["score"]["PodmanV0"]["services"][0]["resources"] = serde_json::json!({"memoryMib": 18_000_000_000_000_000u64});
    cases.push((
        "huge-memory",
        s,
        vec![
            "spec.score.PodmanV0.services[0].resources.memoryMib",
            "less than or equal to 1048576",
        ],
    ));
    let mut s = good_spec();
    s["score"]["PodmanV0"]["services"][0]["resources"] = serde_json::json!({"cpuMillicores": 2_000_000});
    cases.push((
        "huge-cpu",
        s,
        vec![
            "spec.score.PodmanV0.services[0].resources.cpuMillicores",
            "less than or equal to 1024000",
        ],
    ));
    // Rollouts: a batch waits for a person or a bake time, not both; durations
    // are Kubernetes-style; onFailure is Pause or Rollback.
    let mut s = good_spec();
    s["rollout"] = serde_json::json!({"batches": [{"limit": 1, "pause": {}, "bakeTime": "1m"}]});
    cases.push(("pause-and-bake", s, vec!["spec.rollout.batches[0]"]));
    let mut s = good_spec();
    s["rollout"] = serde_json::json!({"batches": [{"limit": "50%", "bakeTime": "ten minutes"}]});
    cases.push((
        "bad-bake-time",
        s,
        vec!["spec.rollout.batches[0].bakeTime", "should match"],
    ));
    let mut s = good_spec();
    s["rollout"] = serde_json::json!({"onFailure": "Retry"});
    cases.push(("bad-on-failure", s, vec!["spec.rollout.onFailure", "Unsupported value"]));
    let mut s = good_spec();
    s["targetDevices"] = serde_json::json!(["dev1", "dev1"]);
    cases.push(("dup-device", s, vec!["spec.targetDevices[1]", "Duplicate value"]));
    let mut s = good_spec();
    s["score"]["PodmanV0"]["services"][0]["image"] = serde_json::json!("");
    cases.push((
        "empty-image",
        s,
        vec!["spec.score.PodmanV0.services[0].image", "at least 1 chars"],
    ));
    let mut s = good_spec();
    s["score"]["PodmanV0"]["services"][0]["ports"][0]["hostPort"] = serde_json::json!(70000);
    cases.push((
        "port-high",
        s,
        vec![
            "spec.score.PodmanV0.services[0].ports[0].hostPort",
            "less than or equal to 65535",
        ],
    ));
    let mut s = good_spec();
    s["score"]["PodmanV0"]["services"][0]["ports"][0]["containerPort"] = serde_json::json!(0);
    cases.push((
        "port-zero",
        s,
        vec![
            "spec.score.PodmanV0.services[0].ports[0].containerPort",
            "greater than or equal to 1",
        ],
    ));
    let mut s = good_spec();
    s["score"]["PodmanV0"]["services"] =
        serde_json::json!([{"name": "web", "image": "a"}, {"name": "web", "image": "b"}]);
    cases.push((
        "dup-service",
        s,
        vec!["spec.score.PodmanV0.services[1]", "Duplicate value"],
    ));
    let mut s = good_spec();
    s["score"] = serde_json::json!({"OkdApplyV0": {}});
    cases.push(("unknown-variant", s, vec!["spec.score"]));
    // Exactly one of targetDevices and selector, and the message names the field.
    let mut s = good_spec();
    s["selector"] = serde_json::json!({"matchLabels": {"site": "madrid"}});
    cases.push((
        "both-targets",
        s,
        vec!["oneOf", "spec.targetDevices\" must not validate"],
    ));
    let mut s = good_spec();
    s.as_object_mut().map(|o| o.remove("targetDevices"));
    cases.push(("no-targets", s, vec!["oneOf", "spec.targetDevices: Required value"]));
    let mut s = good_spec();
    s.as_object_mut().map(|o| o.remove("targetDevices"));
    s["selector"] = serde_json::json!({"matchExpressions": [{"key": "site", "operator": "Near"}]});
    cases.push((
        "bad-operator",
        s,
        vec!["spec.selector.matchExpressions[0].operator", "Unsupported value"],
    ));

    for (name, spec, needles) in cases {
        let (ok, _, err) = api.kubectl(&["apply", "-f", "-"], Some(&manifest(name, spec)))?;
        assert!(!ok, "{name} was accepted");
        for n in needles {
            assert!(err.contains(n), "{name}: expected {n:?} in: {err}");
        }
    }
    let (_, out, _) = api.kubectl(&["get", "iotdep", "-A", "-o", "name"], None)?;
    assert!(out.trim().is_empty(), "nothing invalid was stored: {out}");
    Ok(())
}

/// kube-apiserver 1.20 (the full server the chart is tested on) refuses a CRD
/// whose enum lists `null` (what an `Option` of an enum renders as); the light
/// API server accepts it, so this is checked here on the generated schema.
#[test]
fn no_enum_in_the_crds_lists_null() -> anyhow::Result<()> {
    fn walk(v: &serde_json::Value, path: &str, bad: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::Array(values)) = m.get("enum")
                    && values.iter().any(serde_json::Value::is_null)
                {
                    bad.push(path.to_owned());
                }
                for (k, v) in m {
                    walk(v, &format!("{path}.{k}"), bad);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, path, bad)),
            _ => {}
        }
    }
    let mut bad = Vec::new();
    for crd in iot_operator::install::crds() {
        walk(&serde_json::to_value(&crd)?, "", &mut bad);
    }
    assert!(bad.is_empty(), "enums listing null: {bad:?}");
    Ok(())
}

#[test]
fn committed_crd_matches_the_rust_types() -> anyhow::Result<()> {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/crd/iot.nationtech.io.yaml"
    ))?;
    assert_eq!(
        committed,
        crd_yaml()?,
        "deploy/crd is stale: regenerate with `cargo run -q -p iot-operator -- crd > deploy/crd/iot.nationtech.io.yaml`"
    );
    Ok(())
}

#[test]
fn the_chart_carries_the_same_crd_and_the_workspace_version() -> anyhow::Result<()> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/chart/iot-operator");
    let committed = std::fs::read_to_string(format!("{chart}/templates/crd.yaml"))?;
    assert_eq!(
        committed,
        iot_operator::install::crd_helm_template()?,
        "the chart's CRD is stale: run scripts/gen-artifacts.sh"
    );
    let chart_yaml = std::fs::read_to_string(format!("{chart}/Chart.yaml"))?;
    let field = |name: &str| {
        chart_yaml
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim_matches('"').to_owned())
    };
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        field("version").as_deref(),
        Some(version),
        "run scripts/gen-artifacts.sh"
    );
    assert_eq!(
        field("appVersion").as_deref(),
        Some(version),
        "run scripts/gen-artifacts.sh"
    );
    Ok(())
}

#[tokio::test]
async fn the_yaml_reads_back_as_the_same_crd() -> anyhow::Result<()> {
    // kubectl, not our own code, parses what our emitter wrote.
    let api = ApiServer::start().await?;
    let (ok, out, err) = api.kubectl(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(&crd_yaml()?),
    )?;
    assert!(ok, "{err}");
    // One JSON document per CRD.
    let parsed = serde_json::Value::Array(
        serde_json::Deserializer::from_str(&out)
            .into_iter::<serde_json::Value>()
            .collect::<Result<_, _>>()?,
    );
    let expected = serde_json::to_value(iot_operator::install::crds())?;
    assert_eq!(numbers_as_f64(parsed), numbers_as_f64(expected));
    Ok(())
}

/// schemars writes `65535.0` where kubectl reads `65535`: the same number.
fn numbers_as_f64(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Number(n)),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_f64).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, numbers_as_f64(v))).collect()),
        other => other,
    }
}
