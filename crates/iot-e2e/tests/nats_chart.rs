//! The iot-nats chart (deploy/chart/iot-nats), with Helm's own Go SDK (hack/helm.py):
//! - lint (strict), `kubernetes-validate --strict` against Kubernetes 1.20, the
//!   workspace version, values-schema rejections;
//! - the store is exactly one of jetstream.hostPath and jetstream.existingClaim;
//! - the pod: Recreate, the server and the auth callout side by side, the hostPort,
//!   non-root with a read-only root, the probes, the callout's environment;
//! - the rendered nats.conf, with a real auth.conf from `CalloutKeys`, runs a real
//!   nats-server that answers the probe, and the callout started with the rendered
//!   container's environment connects to it and is ready;
//! - the registry's token service (registryToken) as a third container: its
//!   environment, port (Service and hostPort), mounts and refusals;
//! - the operator chart's values for reaching it without cluster DNS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use iot_e2e::chart::*;
use iot_testkit::auth::{CalloutKeys, write_private};
use iot_testkit::{Ca, LoggedProcess, cargo_bin, free_port, wait_until};
use serde_json::{Value, json};

const NS: &str = "iot-system";
const RELEASE: &str = "iot-nats";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What an install must give: the store and the callout's two addresses.
fn base() -> Vec<String> {
    vec![
        "jetstream.hostPath=/var/lib/iot-nats".into(),
        "callout.oidcIssuer=https://10.77.0.1:8200/v1/identity/oidc".into(),
        "callout.baoAddr=https://10.77.0.1:8200".into(),
    ]
}

fn with(extra: &[&str]) -> Vec<String> {
    let mut sets = base();
    sets.extend(extra.iter().map(|s| (*s).to_owned()));
    sets
}

fn render_nats(sets: &[String]) -> anyhow::Result<String> {
    render_chart(&nats_chart_dir(), RELEASE, NS, sets)
}

/// Helm's error text for values that must not render.
fn refusal(sets: &[String]) -> anyhow::Result<String> {
    let args = template_args(&nats_chart_dir(), RELEASE, NS, sets);
    let (ok, _, err) = helm(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    anyhow::ensure!(!ok, "{sets:?} rendered");
    Ok(err)
}

fn one_of_kind(rendered: &str, kind: &str) -> anyhow::Result<Value> {
    let mut docs = docs_of_kind(rendered, kind)?;
    anyhow::ensure!(docs.len() == 1, "expected one {kind}, got {}", docs.len());
    Ok(docs.remove(0))
}

fn pod_of(rendered: &str) -> anyhow::Result<Value> {
    Ok(one_of_kind(rendered, "Deployment")?["spec"]["template"]["spec"].clone())
}

fn container<'a>(pod: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    pod["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .ok_or_else(|| anyhow::anyhow!("no container {name} in {pod}"))
}

fn container_names(pod: &Value) -> Vec<String> {
    pod["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == name))
}

/// A container's environment, in order (every entry a plain value).
fn env_of(container: &Value) -> anyhow::Result<Vec<(String, String)>> {
    container["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| match (e["name"].as_str(), e["value"].as_str()) {
            (Some(n), Some(v)) => Ok((n.to_owned(), v.to_owned())),
            _ => anyhow::bail!("not a name and value: {e}"),
        })
        .collect()
}

fn port<'a>(container: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    container["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .ok_or_else(|| anyhow::anyhow!("no port {name} in {container}"))
}

fn nats_conf(rendered: &str) -> anyhow::Result<String> {
    let map = one_of_kind(rendered, "ConfigMap")?;
    map["data"]["nats.conf"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no nats.conf in {map}"))
}

fn chart_field(name: &str) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string(nats_chart_dir().join("Chart.yaml"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(|v| v.trim_matches('"').to_owned()))
}

#[test]
fn the_chart_lints_renders_and_validates_against_kubernetes_1_20() -> anyhow::Result<()> {
    let chart = nats_chart_dir().display().to_string();
    let lint: Value = serde_json::from_str(&helm_ok(&["lint", &chart, "--strict", "--kube-version", "v1.20.2"])?)?;
    assert_eq!(lint["errors"], json!([]), "{lint}");
    assert_eq!(chart_field("name")?.as_deref(), Some("iot-nats"));
    for field in ["version", "appVersion"] {
        assert_eq!(
            chart_field(field)?.as_deref(),
            Some(VERSION),
            "Chart.yaml {field}: run scripts/gen-artifacts.sh"
        );
    }

    let claim = vec![
        "jetstream.existingClaim=nats-store".to_owned(),
        "callout.enabled=false".to_owned(),
    ];
    for sets in [
        base(),
        claim,
        with(&["callout.enabled=false"]),
        with(&[
            "server.hostPort=0",
            "service.clusterIP=10.96.0.50",
            "jetstream.maxMemoryStore=256Mi",
            "jetstream.maxFileStore=10Gi",
            "hostAliases[0].ip=10.77.0.1,hostAliases[0].hostnames={bao,zitadel}",
            "callout.extraEnv[0].name=IOT_AUTH_OIDC_AUDIENCE,callout.extraEnv[0].value=fleet",
            "extraLabels.team=edge",
            "podAnnotations.note=x",
        ]),
        with(&[
            "registryToken.enabled=true",
            "registryToken.signingKeySecret=iot-registry-signing",
            "registryToken.publishersSecret=iot-registry-publishers",
        ]),
    ] {
        let rendered = render_nats(&sets)?;
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), &rendered)?;
        let report: Value = serde_json::from_str(&helm_ok(&[
            "validate-manifests",
            &file.path().display().to_string(),
            "--kube-version",
            "1.20.2",
        ])?)?;
        assert_eq!(report["skipped"], json!([]), "{sets:?}: {report}");
        let mut validated: Vec<String> = report["validated"]
            .as_array()
            .map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        validated.sort();
        assert_eq!(
            validated,
            [
                "apps/v1 deployment/iot-nats",
                "v1 configmap/iot-nats",
                "v1 service/iot-nats"
            ],
            "{sets:?}: {report}"
        );
    }
    Ok(())
}

#[test]
fn the_store_is_exactly_one_of_host_path_and_existing_claim() -> anyhow::Result<()> {
    let callout = [
        "callout.oidcIssuer=https://10.77.0.1:8200/v1/identity/oidc".to_owned(),
        "callout.baoAddr=https://10.77.0.1:8200".to_owned(),
    ];
    let err = refusal(&callout)?;
    assert!(
        err.contains("jetstream.hostPath or jetstream.existingClaim is required"),
        "{err}"
    );
    let mut both = callout.to_vec();
    both.extend([
        "jetstream.hostPath=/var/lib/iot-nats".to_owned(),
        "jetstream.existingClaim=nats-store".to_owned(),
    ]);
    let err = refusal(&both)?;
    assert!(
        err.contains("set one of jetstream.hostPath and jetstream.existingClaim, not both"),
        "{err}"
    );

    let pod = pod_of(&render_nats(&base())?)?;
    assert_eq!(
        volume(&pod, "store"),
        Some(&json!({"name": "store", "hostPath": {"path": "/var/lib/iot-nats", "type": "DirectoryOrCreate"}}))
    );
    let mut claim = callout.to_vec();
    claim.push("jetstream.existingClaim=nats-store".to_owned());
    let pod = pod_of(&render_nats(&claim)?)?;
    assert_eq!(
        volume(&pod, "store"),
        Some(&json!({"name": "store", "persistentVolumeClaim": {"claimName": "nats-store"}}))
    );
    let mounts = &container(&pod, "nats")?["volumeMounts"];
    assert!(
        mounts
            .as_array()
            .is_some_and(|m| m.iter().any(|v| v["name"] == "store" && v["mountPath"] == "/data")),
        "{mounts}"
    );
    // The configuration's store_dir is that mount.
    assert!(nats_conf(&render_nats(&claim)?)?.contains("store_dir: \"/data\""));
    Ok(())
}

#[test]
fn the_pod_runs_the_server_and_the_callout_side_by_side() -> anyhow::Result<()> {
    let rendered = render_nats(&base())?;
    let dep = one_of_kind(&rendered, "Deployment")?;
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"], json!({"type": "Recreate"}));
    let labels = &dep["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "iot-nats");
    assert_eq!(labels["app.kubernetes.io/version"], VERSION);
    assert_eq!(labels["app.kubernetes.io/part-of"], "harmony-iot");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(container_names(pod), ["nats", "auth-callout"]);
    assert_eq!(pod["terminationGracePeriodSeconds"], 10);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["enableServiceLinks"], false);
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    for name in ["nats", "auth-callout"] {
        assert_eq!(
            container(pod, name)?["securityContext"],
            json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                   "capabilities": {"drop": ["ALL"]}}),
            "{name}"
        );
    }

    let nats = container(pod, "nats")?;
    assert_eq!(nats["image"], format!("localhost/iot-nats:{VERSION}"));
    assert_eq!(nats["imagePullPolicy"], "IfNotPresent");
    assert_eq!(nats["args"], json!(["-c", "/etc/nats/nats.conf"]));
    assert_eq!(
        port(nats, "client")?,
        &json!({"name": "client", "containerPort": 4222, "hostPort": 4222, "protocol": "TCP"})
    );
    assert_eq!(
        port(nats, "monitor")?,
        &json!({"name": "monitor", "containerPort": 8222, "protocol": "TCP"}),
        "the monitor port has no hostPort"
    );
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(
            nats[probe]["httpGet"],
            json!({"path": "/healthz?js-enabled-only=true", "port": "monitor"}),
            "{probe}"
        );
    }
    assert_eq!(nats["startupProbe"]["failureThreshold"], 60);

    let callout = container(pod, "auth-callout")?;
    assert_eq!(callout["image"], format!("localhost/iot-auth-callout:{VERSION}"));
    assert_eq!(
        port(callout, "callout-metrics")?,
        &json!({"name": "callout-metrics", "containerPort": 9466, "protocol": "TCP"})
    );
    assert_eq!(
        callout["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "callout-metrics"})
    );
    assert_eq!(
        callout["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "callout-metrics"})
    );
    let env: BTreeMap<String, String> = env_of(callout)?.into_iter().collect();
    let expected: BTreeMap<String, String> = [
        ("NATS_URL", "tls://127.0.0.1:4222"),
        ("NATS_CA_FILE", "/etc/iot/ca/ca.crt"),
        ("BAO_CACERT", "/etc/iot/ca/ca.crt"),
        ("IOT_AUTH_NATS_USER", "auth"),
        ("IOT_AUTH_NATS_PASSWORD_FILE", "/etc/iot/callout/nats-password"),
        ("IOT_AUTH_ISSUER_SEED_FILE", "/etc/iot/callout/issuer.seed"),
        ("IOT_AUTH_XKEY_SEED_FILE", "/etc/iot/callout/xkey.seed"),
        ("IOT_AUTH_OIDC_ISSUER", "https://10.77.0.1:8200/v1/identity/oidc"),
        ("BAO_ADDR", "https://10.77.0.1:8200"),
        ("IOT_AUTH_BAO_ENROLLMENT", "/etc/iot/callout/enrollment.json"),
        ("IOT_AUTH_USER_TTL", "10m"),
        ("IOT_METRICS_ADDR", "0.0.0.0:9466"),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(env, expected);

    // The callout's files: one Secret, group-readable (0440 = 288) by the non-root
    // user, and the CA from its ConfigMap.
    assert_eq!(
        volume(pod, "callout-secrets").map(|v| &v["secret"]),
        Some(&json!({"secretName": "iot-auth-callout", "defaultMode": 288, "items": [
            {"key": "issuer.seed", "path": "issuer.seed"},
            {"key": "xkey.seed", "path": "xkey.seed"},
            {"key": "nats-password", "path": "nats-password"},
            {"key": "enrollment.json", "path": "enrollment.json"},
        ]}))
    );
    assert_eq!(
        volume(pod, "ca").map(|v| &v["configMap"]),
        Some(&json!({"name": "iot-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}))
    );
    // The server's configuration, auth.conf (a Secret: it holds passwords) and
    // certificate, side by side in one directory, as nats.conf's include expects.
    assert_eq!(
        volume(pod, "config").map(|v| &v["projected"]),
        Some(&json!({"defaultMode": 288, "sources": [
            {"configMap": {"name": "iot-nats", "items": [{"key": "nats.conf", "path": "nats.conf"}]}},
            {"secret": {"name": "iot-nats-auth", "items": [{"key": "auth.conf", "path": "auth/auth.conf"}]}},
            {"secret": {"name": "iot-nats-tls", "items": [
                {"key": "tls.crt", "path": "tls/tls.crt"}, {"key": "tls.key", "path": "tls/tls.key"}]}},
        ]}))
    );

    let conf = nats_conf(&rendered)?;
    for line in [
        "server_name: \"nats-0\"",
        "listen: \"0.0.0.0:4222\"",
        "http: \"0.0.0.0:8222\"",
        "store_dir: \"/data\"",
        "cert_file: \"/etc/nats/tls/tls.crt\"",
        "key_file: \"/etc/nats/tls/tls.key\"",
        "timeout: 5",
        "include \"auth/auth.conf\"",
    ] {
        assert!(conf.lines().any(|l| l.trim() == line), "{line:?} not in:\n{conf}");
    }
    assert!(!conf.contains("max_memory_store"), "the server's default unless set");

    let service = one_of_kind(&rendered, "Service")?;
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert!(service["spec"].get("clusterIP").is_none(), "allocated unless set");
    assert_eq!(service["spec"]["selector"], dep["spec"]["selector"]["matchLabels"]);
    assert_eq!(
        service["spec"]["ports"],
        json!([
            {"name": "client", "port": 4222, "targetPort": "client", "protocol": "TCP"},
            {"name": "monitor", "port": 8222, "targetPort": "monitor", "protocol": "TCP"},
        ])
    );
    Ok(())
}

#[test]
fn the_values_change_what_they_name() -> anyhow::Result<()> {
    let rendered = render_nats(&with(&[
        "server.hostPort=0",
        "server.port=4333",
        "server.monitorPort=8333",
        "server.name=edge-1",
        "server.tls.secretName=my-tls",
        "server.auth.secretName=my-auth",
        "server.auth.secretKey=nats-auth.conf",
        "service.clusterIP=10.96.0.50",
        "jetstream.maxMemoryStore=256Mi",
        "jetstream.maxFileStore=10Gi",
        "terminationGracePeriodSeconds=25",
        "image.tag=9.9.9",
        "callout.image.tag=1.2.3",
        "callout.metricsPort=9500",
        "callout.userTtl=2m",
        "callout.tls.caConfigMap=root-ca",
        "callout.tls.caKey=root.pem",
        "hostAliases[0].ip=10.77.0.1,hostAliases[0].hostnames={bao}",
        "callout.extraEnv[0].name=IOT_AUTH_OIDC_AUDIENCE,callout.extraEnv[0].value=fleet",
        "extraLabels.team=edge",
    ]))?;
    let dep = one_of_kind(&rendered, "Deployment")?;
    assert_eq!(dep["metadata"]["labels"]["team"], "edge");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 25);
    assert_eq!(pod["hostAliases"], json!([{"ip": "10.77.0.1", "hostnames": ["bao"]}]));
    let nats = container(pod, "nats")?;
    assert_eq!(nats["image"], "localhost/iot-nats:9.9.9");
    assert_eq!(
        port(nats, "client")?,
        &json!({"name": "client", "containerPort": 4333, "protocol": "TCP"}),
        "hostPort 0: none"
    );
    assert_eq!(port(nats, "monitor")?["containerPort"], 8333);
    let callout = container(pod, "auth-callout")?;
    assert_eq!(callout["image"], "localhost/iot-auth-callout:1.2.3");
    assert_eq!(port(callout, "callout-metrics")?["containerPort"], 9500);
    let env = env_of(callout)?;
    let value = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(value("NATS_URL"), Some("tls://127.0.0.1:4333"));
    assert_eq!(value("IOT_METRICS_ADDR"), Some("0.0.0.0:9500"));
    assert_eq!(value("IOT_AUTH_USER_TTL"), Some("2m"));
    assert_eq!(value("NATS_CA_FILE"), Some("/etc/iot/ca/root.pem"));
    assert_eq!(value("BAO_CACERT"), Some("/etc/iot/ca/root.pem"));
    assert_eq!(
        env.last(),
        Some(&("IOT_AUTH_OIDC_AUDIENCE".to_owned(), "fleet".to_owned())),
        "extraEnv comes last"
    );
    assert_eq!(
        volume(pod, "ca").map(|v| &v["configMap"]),
        Some(&json!({"name": "root-ca", "items": [{"key": "root.pem", "path": "root.pem"}]}))
    );
    let sources = &volume(pod, "config").map(|v| v["projected"]["sources"].clone());
    assert_eq!(
        sources.as_ref().map(|s| (&s[1], &s[2]["secret"]["name"])),
        Some((
            &json!({"secret": {"name": "my-auth", "items": [{"key": "nats-auth.conf", "path": "auth/auth.conf"}]}}),
            &json!("my-tls")
        ))
    );
    let conf = nats_conf(&rendered)?;
    for line in [
        "server_name: \"edge-1\"",
        "listen: \"0.0.0.0:4333\"",
        "http: \"0.0.0.0:8333\"",
        "max_memory_store: 256Mi",
        "max_file_store: 10Gi",
    ] {
        assert!(conf.lines().any(|l| l.trim() == line), "{line:?} not in:\n{conf}");
    }
    let service = one_of_kind(&rendered, "Service")?;
    assert_eq!(service["spec"]["clusterIP"], "10.96.0.50");
    assert_eq!(service["spec"]["ports"][0]["port"], 4333);
    assert_eq!(service["spec"]["ports"][1]["port"], 8333);

    // A changed configuration changes the pod template (the server reads it at start).
    let checksum = |rendered: &str| -> anyhow::Result<Value> {
        Ok(
            one_of_kind(rendered, "Deployment")?["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                .clone(),
        )
    };
    let before = checksum(&render_nats(&base())?)?;
    assert!(before.as_str().is_some_and(|c| c.len() == 64), "{before}");
    assert_ne!(before, checksum(&render_nats(&with(&["server.name=nats-1"]))?)?);
    assert_eq!(before, checksum(&render_nats(&with(&["callout.logLevel=debug"]))?)?);

    // Without the callout: the server alone, and no callout values needed.
    let alone = render_nats(&[
        "jetstream.hostPath=/var/lib/iot-nats".into(),
        "callout.enabled=false".into(),
    ])?;
    let pod = pod_of(&alone)?;
    assert_eq!(container_names(&pod), ["nats"]);
    assert!(volume(&pod, "callout-secrets").is_none() && volume(&pod, "ca").is_none());

    // With it, its two addresses are required, by name.
    for (missing, message) in [
        (
            "callout.oidcIssuer",
            "callout.oidcIssuer is required while callout.enabled is true",
        ),
        (
            "callout.baoAddr",
            "callout.baoAddr is required while callout.enabled is true",
        ),
    ] {
        let sets: Vec<String> = base().into_iter().filter(|s| !s.starts_with(missing)).collect();
        let err = refusal(&sets)?;
        assert!(err.contains(message), "{missing}: {err}");
    }
    // Another release name: its own object names.
    let other = render_chart(&nats_chart_dir(), "edge", NS, &base())?;
    assert_eq!(one_of_kind(&other, "Deployment")?["metadata"]["name"], "edge-iot-nats");
    Ok(())
}

#[test]
fn bad_values_are_rejected_naming_the_field() -> anyhow::Result<()> {
    let cases = [
        ("replicas=2", "replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("callout.image.repository=", "/callout/image/repository"),
        ("server.port=0", "/server/port"),
        ("server.hostPort=-1", "/server/hostPort"),
        ("server.monitorPort=70000", "/server/monitorPort"),
        ("server.name=nats 0", "/server/name"),
        ("server.tls.secretName=Bad_Name", "/server/tls/secretName"),
        ("server.auth.secretKey=a/b", "/server/auth/secretKey"),
        ("jetstream.hostPath=var/lib/nats", "/jetstream/hostPath"),
        ("jetstream.maxFileStore=lots", "/jetstream/maxFileStore"),
        ("service.clusterIP=nats", "/service/clusterIP"),
        ("callout.enabled=yes", "/callout/enabled"),
        ("callout.userTtl=10", "/callout/userTtl"),
        ("callout.baoAddr=bao:8200", "/callout/baoAddr"),
        ("callout.metricsPort=80", "/callout/metricsPort"),
        ("callout.extraEnv[0].name=X", "/callout/extraEnv/0"),
        ("terminationGracePeriodSeconds=-1", "/terminationGracePeriodSeconds"),
        ("hostAliases[0].ip=10.0.0.1", "/hostAliases/0"),
        ("extraLabels.app\\.kubernetes\\.io/name=other", "app.kubernetes.io/name"),
        ("registryToken.enabled=1", "/registryToken/enabled"),
        ("registryToken.port=443", "/registryToken/port"),
        ("registryToken.hostPort=-1", "/registryToken/hostPort"),
        (
            "registryToken.signingKeySecret=Bad_Name",
            "/registryToken/signingKeySecret",
        ),
        ("registryToken.publishersSecret=a/b", "/registryToken/publishersSecret"),
        ("registryToken.tls.secretName=Bad_Name", "/registryToken/tls/secretName"),
        (
            "registryToken.image.pullPolicy=Sometimes",
            "/registryToken/image/pullPolicy",
        ),
        ("registryToken.extraEnv[0].name=X", "/registryToken/extraEnv/0"),
        ("registryToken.publisher=x", "publisher"),
    ];
    for (set, field) in cases {
        let err = refusal(&with(&[set]))?;
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{set}: {err}"
        );
        assert!(err.contains(field), "{set}: expected {field:?} in: {err}");
    }
    Ok(())
}

#[test]
fn the_registry_token_service_is_a_third_container_when_enabled() -> anyhow::Result<()> {
    // Off by default: two containers, two Service ports.
    let rendered = render_nats(&base())?;
    let pod = pod_of(&rendered)?;
    assert_eq!(container_names(&pod), ["nats", "auth-callout"]);
    assert!(volume(&pod, "registry-token").is_none());
    let service = one_of_kind(&rendered, "Service")?;
    assert_eq!(service["spec"]["ports"].as_array().map(Vec::len), Some(2));

    let rendered = render_nats(&with(&[
        "registryToken.enabled=true",
        "registryToken.signingKeySecret=iot-registry-signing",
        "registryToken.publishersSecret=iot-registry-publishers",
    ]))?;
    let pod = pod_of(&rendered)?;
    assert_eq!(container_names(&pod), ["nats", "auth-callout", "registry-token"]);
    let token = container(&pod, "registry-token")?;
    assert_eq!(token["image"], format!("localhost/iot-registry-token:{VERSION}"));
    assert_eq!(token["imagePullPolicy"], "IfNotPresent");
    assert!(token.get("args").is_none(), "configured by its environment: {token}");
    assert_eq!(
        env_of(token)?,
        [
            ("IOT_REGISTRY_TOKEN_LISTEN", "0.0.0.0:5001"),
            ("IOT_REGISTRY_TOKEN_TLS_CERT", "/etc/iot/registry-token/tls/tls.crt"),
            ("IOT_REGISTRY_TOKEN_TLS_KEY", "/etc/iot/registry-token/tls/tls.key"),
            ("IOT_REGISTRY_SIGNING_KEY", "/etc/iot/registry-token/signing.key"),
            ("IOT_REGISTRY_PUBLISHERS", "/etc/iot/registry-token/publishers"),
            ("IOT_REGISTRY_SERVICE", "iot-registry"),
            ("IOT_REGISTRY_ISSUER", "iot-registry-token"),
            ("RUST_LOG", "info"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    assert_eq!(
        port(token, "registry-token")?,
        &json!({"name": "registry-token", "containerPort": 5001, "hostPort": 5001, "protocol": "TCP"})
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            token[probe]["httpGet"],
            json!({"path": "/healthz", "port": "registry-token", "scheme": "HTTPS"}),
            "{probe}"
        );
    }
    // As the callout: non-root (the pod's), no privilege, a read-only root, and no
    // ServiceAccount token in the pod.
    assert_eq!(
        token["securityContext"],
        container(&pod, "auth-callout")?["securityContext"]
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        token["volumeMounts"],
        json!([{"name": "registry-token", "mountPath": "/etc/iot/registry-token", "readOnly": true}])
    );
    // The server's TLS Secret unless another is named; the signing key and the
    // publishers from their Secrets; group-readable (0440 = 288) by the non-root user.
    assert_eq!(
        volume(&pod, "registry-token").map(|v| &v["projected"]),
        Some(&json!({"defaultMode": 288, "sources": [
            {"secret": {"name": "iot-nats-tls", "items": [
                {"key": "tls.crt", "path": "tls/tls.crt"}, {"key": "tls.key", "path": "tls/tls.key"}]}},
            {"secret": {"name": "iot-registry-signing", "items": [{"key": "signing.key", "path": "signing.key"}]}},
            {"secret": {"name": "iot-registry-publishers", "items": [{"key": "publishers", "path": "publishers"}]}},
        ]}))
    );
    let service = one_of_kind(&rendered, "Service")?;
    assert_eq!(
        service["spec"]["ports"][2],
        json!({"name": "registry-token", "port": 5001, "targetPort": "registry-token", "protocol": "TCP"})
    );

    // Its values, and no publishers (pulls only) when no Secret names them.
    let rendered = render_nats(&with(&[
        "registryToken.enabled=true",
        "registryToken.signingKeySecret=sk",
        "registryToken.port=5443",
        "registryToken.hostPort=0",
        "registryToken.tls.secretName=registry-tls",
        "registryToken.service=reg",
        "registryToken.issuer=me",
        "registryToken.image.tag=1.2.3",
        "registryToken.logLevel=debug",
        "registryToken.extraEnv[0].name=X_EXTRA,registryToken.extraEnv[0].value=on",
    ]))?;
    let pod = pod_of(&rendered)?;
    let token = container(&pod, "registry-token")?;
    assert_eq!(token["image"], "localhost/iot-registry-token:1.2.3");
    let env = env_of(token)?;
    let value = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(value("IOT_REGISTRY_TOKEN_LISTEN"), Some("0.0.0.0:5443"));
    assert_eq!(value("IOT_REGISTRY_SERVICE"), Some("reg"));
    assert_eq!(value("IOT_REGISTRY_ISSUER"), Some("me"));
    assert_eq!(value("RUST_LOG"), Some("debug"));
    assert_eq!(value("IOT_REGISTRY_PUBLISHERS"), None);
    assert_eq!(env.last(), Some(&("X_EXTRA".to_owned(), "on".to_owned())));
    assert_eq!(
        port(token, "registry-token")?,
        &json!({"name": "registry-token", "containerPort": 5443, "protocol": "TCP"}),
        "hostPort 0: none"
    );
    let sources = volume(&pod, "registry-token").map(|v| v["projected"]["sources"].clone());
    assert_eq!(
        sources
            .as_ref()
            .map(|s| (s[0]["secret"]["name"].clone(), s.as_array().map(Vec::len))),
        Some((json!("registry-tls"), Some(2)))
    );
    assert_eq!(one_of_kind(&rendered, "Service")?["spec"]["ports"][2]["port"], 5443);

    // Enabled without its signing key: refused, naming both values.
    let err = refusal(&with(&["registryToken.enabled=true"]))?;
    assert!(
        err.contains("registryToken.signingKeySecret is required while registryToken.enabled is true"),
        "{err}"
    );
    Ok(())
}

/// The operator chart's values for a cluster without DNS: a name NATS's certificate
/// carries, mapped to the iot-nats Service's cluster IP.
#[test]
fn the_operator_chart_reaches_the_service_by_a_name_in_the_certificate() -> anyhow::Result<()> {
    let default = render("iot", NS, &[])?;
    let pod = &one_of_kind(&default, "Deployment")?["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert!(pod.get("hostAliases").is_none(), "{pod}");
    let default_env = pod["containers"][0]["env"].as_array().cloned().unwrap_or_default();

    let rendered = render(
        "iot",
        NS,
        &[
            "terminationGracePeriodSeconds=5".into(),
            "hostAliases[0].ip=10.96.0.50,hostAliases[0].hostnames={nats}".into(),
            "extraEnv[0].name=IOT_EXTRA,extraEnv[0].value=on".into(),
        ],
    )?;
    let pod = &one_of_kind(&rendered, "Deployment")?["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 5);
    assert_eq!(pod["hostAliases"], json!([{"ip": "10.96.0.50", "hostnames": ["nats"]}]));
    let env = pod["containers"][0]["env"].as_array().cloned().unwrap_or_default();
    assert_eq!(env.len(), default_env.len() + 1, "{env:?}");
    assert_eq!(env[..default_env.len()], default_env[..], "extraEnv only appends");
    assert_eq!(env.last(), Some(&json!({"name": "IOT_EXTRA", "value": "on"})));
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &rendered)?;
    helm_ok(&[
        "validate-manifests",
        &file.path().display().to_string(),
        "--kube-version",
        "1.20.2",
    ])?;

    let chart = chart_dir().display().to_string();
    for (set, field) in [
        ("terminationGracePeriodSeconds=-1", "/terminationGracePeriodSeconds"),
        ("terminationGracePeriodSeconds=soon", "/terminationGracePeriodSeconds"),
        ("hostAliases[0].ip=10.96.0.50", "/hostAliases/0"),
        ("extraEnv[0].name=IOT_EXTRA", "/extraEnv/0"),
        ("extraEnv[0].value=on", "/extraEnv/0"),
    ] {
        let (ok, _, err) = helm(&["template", &chart, "--release", "iot", "--namespace", NS, "--set", set])?;
        assert!(!ok, "{set} was accepted");
        assert!(err.contains(field), "{set}: expected {field:?} in: {err}");
    }
    Ok(())
}

/// Where the pod would see `path`, under `root`.
fn in_pod(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

#[tokio::test]
async fn the_rendered_config_and_callout_environment_run_a_real_server_and_callout() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pod");
    let (client_port, monitor_port, metrics_port, nothing_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let rendered = render_nats(&with(&[
        &format!("server.port={client_port}"),
        &format!("server.monitorPort={monitor_port}"),
        &format!("callout.metricsPort={metrics_port}"),
        "server.name=chart-test",
        "jetstream.maxMemoryStore=64Mi",
        "jetstream.maxFileStore=1Gi",
        // Nothing answers there: the callout is ready without OpenBao (it falls back
        // on its cache), and refused connections fail fast.
        &format!("callout.baoAddr=https://127.0.0.1:{nothing_port}"),
        &format!("callout.oidcIssuer=https://127.0.0.1:{nothing_port}/v1/identity/oidc"),
    ]))?;
    let pod = pod_of(&rendered)?;

    // The files the pod mounts, where it mounts them, under `root`.
    let keys = CalloutKeys::generate()?;
    let ca = Ca::create(&dir.path().join("ca"))?;
    let (crt, key) = ca.issue("iot-nats", &["127.0.0.1"])?;
    for d in [
        "/etc/nats/auth",
        "/etc/nats/tls",
        "/data",
        "/etc/iot/callout",
        "/etc/iot/ca",
    ] {
        std::fs::create_dir_all(in_pod(&root, d))?;
    }
    std::fs::write(in_pod(&root, "/etc/nats/auth/auth.conf"), keys.nats_config())?;
    std::fs::copy(&crt, in_pod(&root, "/etc/nats/tls/tls.crt"))?;
    std::fs::copy(&key, in_pod(&root, "/etc/nats/tls/tls.key"))?;
    // The rendered nats.conf with the pod's absolute paths moved under `root`, on
    // loopback only; every replaced text must be there.
    let conf = nats_conf(&rendered)?;
    let mut local = conf.clone();
    for (from, to) in [
        (
            format!("\"0.0.0.0:{client_port}\""),
            format!("\"127.0.0.1:{client_port}\""),
        ),
        (
            format!("\"0.0.0.0:{monitor_port}\""),
            format!("\"127.0.0.1:{monitor_port}\""),
        ),
        (
            "\"/data\"".to_owned(),
            format!("\"{}\"", in_pod(&root, "/data").display()),
        ),
        (
            "\"/etc/nats/".to_owned(),
            format!("\"{}/", in_pod(&root, "/etc/nats").display()),
        ),
    ] {
        anyhow::ensure!(local.contains(&from), "{from} not in the rendered nats.conf:\n{conf}");
        local = local.replace(&from, &to);
    }
    anyhow::ensure!(!local.contains("\"/etc/") && !local.contains("0.0.0.0"), "{local}");
    std::fs::write(in_pod(&root, "/etc/nats/nats.conf"), &local)?;

    // nats-server with the container's arguments.
    let nats = container(&pod, "nats")?;
    let args: Vec<String> = nats["args"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    anyhow::ensure!(args.len() == 2 && args[0] == "-c", "unexpected args {args:?}");
    let mut cmd = Command::new(iot_testkit::paths::find_binary("nats-server", "IOT_NATS_SERVER")?);
    cmd.arg("-c").arg(in_pod(&root, &args[1]));
    let server = LoggedProcess::spawn("nats-server", cmd, dir.path().join("nats.log"))?;
    // The readiness probe's own request.
    let probe = nats["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no readiness path in {nats}"))?
        .to_owned();
    assert_eq!(probe, "/healthz?js-enabled-only=true");
    wait_until(
        Duration::from_secs(30),
        "nats-server to answer its readiness probe with 200",
        || async {
            (iot_testkit::http::get_status("127.0.0.1", monitor_port, &probe)
                .await
                .ok()?
                == 200)
                .then_some(())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n---- nats-server log ----\n{}", server.log_text()))?;

    // The included auth.conf is in force, and the chart's JetStream limits.
    let varz: Value = serde_json::from_str(&iot_testkit::http::get_text("127.0.0.1", monitor_port, "/varz").await?)?;
    assert_eq!(varz["server_name"], "chart-test");
    assert_eq!(varz["tls_required"], true);
    assert_eq!(varz["auth_required"], true);
    assert_eq!(varz["system_account"], "SYS");
    assert_eq!(varz["jetstream"]["config"]["max_memory"], 64 * 1024 * 1024);
    assert_eq!(varz["jetstream"]["config"]["max_storage"], 1024 * 1024 * 1024);
    assert_eq!(
        varz["jetstream"]["config"]["store_dir"],
        in_pod(&root, "/data/jetstream").display().to_string()
    );
    let url = format!("tls://127.0.0.1:{client_port}");
    let connect = |user: &str, password: &str| {
        async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
            .add_root_certificates(ca.cert_file())
            .require_tls(true)
            .connect(url.clone())
    };
    assert!(
        connect("admin", "not-the-password").await.is_err(),
        "a wrong password is refused"
    );
    // admin (IOT account, bypasses the callout) writes KV on the store.
    let admin = connect("admin", &keys.admin_password).await?;
    let kv = async_nats::jetstream::new(admin)
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "chart-test".into(),
            ..Default::default()
        })
        .await?;
    kv.put("k", "v".into()).await?;
    assert_eq!(kv.get("k").await?.as_deref(), Some(&b"v"[..]));

    // The callout with exactly the rendered container's environment, its files where
    // the pod mounts them.
    let callout = container(&pod, "auth-callout")?;
    let secrets = in_pod(&root, "/etc/iot/callout");
    keys.write_seeds(&secrets)?;
    write_private(&secrets.join("nats-password"), &keys.auth_password)?;
    let enrollment = iot_bao::enroll::Enrollment {
        bao_addr: format!("https://127.0.0.1:{nothing_port}"),
        name: "iot-auth-callout".into(),
        role: iot_bao::enroll::Role::Callout,
        role_id: "role".into(),
        secret_id: "secret".into(),
    };
    write_private(&secrets.join("enrollment.json"), &serde_json::to_string(&enrollment)?)?;
    std::fs::copy(ca.cert_file(), in_pod(&root, "/etc/iot/ca/ca.crt"))?;
    let mut cmd = Command::new(cargo_bin("iot-auth-callout")?);
    cmd.env_clear();
    let mut mapped = 0;
    for (name, value) in env_of(callout)? {
        let value = if value.starts_with("/etc/iot/") {
            mapped += 1;
            in_pod(&root, &value).display().to_string()
        } else if name == "IOT_METRICS_ADDR" {
            value.replace("0.0.0.0:", "127.0.0.1:")
        } else {
            value
        };
        cmd.env(name, value);
    }
    assert_eq!(mapped, 6, "two CA paths and four secret files");
    let callout_process = LoggedProcess::spawn("auth-callout", cmd, dir.path().join("callout.log"))?;
    let path_of = |probe: &str| {
        callout[probe]["httpGet"]["path"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (readiness, liveness) = (path_of("readinessProbe"), path_of("livenessProbe"));
    wait_until(
        Duration::from_secs(60),
        "the callout to answer its readiness probe with 200",
        || async {
            (iot_testkit::http::get_status("127.0.0.1", metrics_port, &readiness)
                .await
                .ok()?
                == 200)
                .then_some(())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n---- callout log ----\n{}", callout_process.log_text()))?;
    assert_eq!(
        iot_testkit::http::get_status("127.0.0.1", metrics_port, &liveness).await?,
        200
    );
    // The server sees it as `auth`, over TLS from loopback.
    let connz: Value =
        serde_json::from_str(&iot_testkit::http::get_text("127.0.0.1", monitor_port, "/connz?auth=true").await?)?;
    assert!(
        connz["connections"].as_array().is_some_and(|cs| cs
            .iter()
            .any(|c| c["authorized_user"] == "auth" && c["ip"] == "127.0.0.1" && c["tls_version"].is_string())),
        "{connz}"
    );
    Ok(())
}
