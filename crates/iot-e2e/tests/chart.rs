//! The Helm chart, with Helm's own Go SDK (hack/helm.py), on the full kube-apiserver
//! 1.20.2 with RBAC and an audit log:
//! - lint (strict), render, `kubernetes-validate --strict`, values-schema rejections;
//! - the registry values: environment and volumes only when registries are set;
//! - install, upgrade (a CRD that changed between chart versions), history,
//!   rollback, uninstall (what is kept), reinstall: Helm's semantics in seconds, on
//!   an API server without a node.
//!
//! The chart's pods really running, its RBAC in effect for the operator's pods, and
//! upgrades rolling real pods are tested on a real node: tests/in_cluster.rs.

use iot_e2e::chart::*;
use iot_e2e::stack::*;
use iot_testkit::{KubeApiServer, wait_until};
use k8s_openapi::api::apps::v1::Deployment as AppsDeployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

const CRD: &str = "deployments.iot.nationtech.io";

fn chart() -> String {
    chart_dir().display().to_string()
}

#[test]
fn the_chart_lints_renders_and_validates_against_kubernetes_1_20() -> anyhow::Result<()> {
    let lint: serde_json::Value =
        serde_json::from_str(&helm_ok(&["lint", &chart(), "--strict", "--kube-version", "v1.20.2"])?)?;
    assert_eq!(lint["errors"], serde_json::json!([]), "{lint}");

    // The operator's 9 objects (3 CRDs), plus the three iot-fleet-* ClusterRoles, plus the
    // SSO bindings when groups are set.
    for (sets, objects) in [
        (vec![], 12),
        (
            vec!["replicas=2".to_owned(), "nats.credentials.type=none".to_owned()],
            12,
        ),
        (
            vec![
                "nats.credentials.type=creds".to_owned(),
                "extraLabels.team=edge".to_owned(),
            ],
            12,
        ),
        (
            vec![
                "nats.tls.caConfigMap=iot-ca".to_owned(),
                "nats.credentials.type=none".to_owned(),
            ],
            12,
        ),
        (
            vec![
                "sso.groups.viewers={fleet-viewers}".to_owned(),
                "sso.groups.deployers={fleet-deployers,ops}".to_owned(),
                "sso.namespaces={team-a,team-b}".to_owned(),
            ],
            16,
        ),
        (
            vec![
                "registry.registries={10.77.0.1:5000,registry.example:443}".to_owned(),
                "registry.signingKeySecret=iot-registry-signing".to_owned(),
                "registry.tls.caConfigMap=registry-ca".to_owned(),
            ],
            12,
        ),
    ] {
        let rendered = render("iot", "iot-system", &sets)?;
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), &rendered)?;
        let report: serde_json::Value = serde_json::from_str(&helm_ok(&[
            "validate-manifests",
            &file.path().display().to_string(),
            "--kube-version",
            "1.20.2",
        ])?)?;
        assert_eq!(report["skipped"], serde_json::json!([]), "{sets:?}: {report}");
        assert_eq!(
            report["validated"].as_array().map(Vec::len),
            Some(objects),
            "{sets:?}: {report}"
        );
    }

    // What the values turn into.
    let rendered = render(
        "iot",
        "iot-system",
        &[
            "replicas=2".into(),
            "nats.credentials.type=none".into(),
            "image.tag=9.9.9".into(),
            "extraLabels.team=edge".into(),
        ],
    )?;
    let dep = &docs_of_kind(&rendered, "Deployment")?[0];
    assert_eq!(dep["spec"]["replicas"], 2);
    assert_eq!(dep["metadata"]["labels"]["team"], "edge");
    let pod = &dep["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "localhost/iot-operator:9.9.9");
    assert!(
        pod.get("volumes").is_none(),
        "no credentials volume for type none: {pod}"
    );
    let env = |name: &str| {
        container["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(env("IOT_LEADER_ELECT"), Some("true".into()));
    assert_eq!(env("NATS_IDENTITY"), None);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);

    let default = render("iot", "iot-system", &[])?;
    let dep = &docs_of_kind(&default, "Deployment")?[0];
    let container = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        format!("localhost/iot-operator:{}", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        container["env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v["name"] == "NATS_IDENTITY")),
        "identity credentials by default"
    );
    assert!(
        container["env"].as_array().is_some_and(|e| e
            .iter()
            .any(|v| v["name"] == "NATS_URL" && v["value"] == "tls://nats:4222")),
        "TLS by default"
    );
    let env_value = |name: &str| {
        container["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(env_value("IOT_KV_REPLICAS"), Some("1".into()), "one replica by default");
    // A cluster: every URL in one NATS_URL, and three replicas.
    let clustered = render(
        "iot",
        "iot-system",
        &[
            "nats.urls={tls://nats-0:4222,tls://nats-1:4222,tls://nats-2:4222}".into(),
            "nats.kvReplicas=3".into(),
        ],
    )?;
    let clustered_env = docs_of_kind(&clustered, "Deployment")?
        .first()
        .map(|d| d["spec"]["template"]["spec"]["containers"][0]["env"].clone())
        .unwrap_or_default();
    let clustered_value = |name: &str| {
        clustered_env
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(clustered_value("IOT_KV_REPLICAS"), Some("3".into()));
    assert_eq!(
        clustered_value("NATS_URL"),
        Some("tls://nats-0:4222,tls://nats-1:4222,tls://nats-2:4222".into())
    );

    // The CA value: mounted from its ConfigMap, given to NATS and OpenBao clients.
    let with_ca = render(
        "iot",
        "iot-system",
        &["nats.tls.caConfigMap=iot-ca".into(), "nats.tls.caKey=root.pem".into()],
    )?;
    let dep = &docs_of_kind(&with_ca, "Deployment")?[0];
    let pod = &dep["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let value_of = |name: &str| {
        container["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(value_of("NATS_CA_FILE"), Some("/etc/iot/ca/root.pem".into()));
    assert_eq!(value_of("BAO_CACERT"), Some("/etc/iot/ca/root.pem".into()));
    assert_eq!(value_of("NATS_INSECURE"), None);
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "nats-ca" && v["configMap"]["name"] == "iot-ca"),
        "{volumes:?}"
    );
    assert!(
        container["volumeMounts"]
            .as_array()
            .is_some_and(|m| m.iter().any(|v| v["mountPath"] == "/etc/iot/ca")),
        "{container}"
    );
    let insecure = render("iot", "iot-system", &["nats.insecure=true".into()])?;
    let dep = &docs_of_kind(&insecure, "Deployment")?[0];
    assert!(
        dep["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v["name"] == "NATS_INSECURE" && v["value"] == "true"))
    );

    // The ClusterRole is exactly what the operator uses (the RBAC test below proves
    // it is enough).
    let roles = docs_of_kind(&default, "ClusterRole")?;
    let role = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "iot-system-iot-iot-operator")
        .ok_or_else(|| anyhow::anyhow!("no operator ClusterRole"))?;
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": ["iot.nationtech.io"], "resources": ["deployments"], "verbs": ["list", "watch", "patch"]},
            {"apiGroups": ["iot.nationtech.io"], "resources": ["deployments/status", "devices/status"], "verbs": ["patch"]},
            {"apiGroups": ["iot.nationtech.io"], "resources": ["devices"], "verbs": ["list", "watch"]},
            {"apiGroups": ["iot.nationtech.io"], "resources": ["deploymentrevisions"], "verbs": ["get", "list", "create", "delete"]},
        ])
    );
    Ok(())
}

#[test]
fn sso_values_bind_oidc_groups_to_the_fleet_roles() -> anyhow::Result<()> {
    let names = |docs: &[serde_json::Value]| -> Vec<String> {
        docs.iter()
            .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    };
    let rendered = render("iot", "iot-system", &[])?;
    let roles = docs_of_kind(&rendered, "ClusterRole")?;
    for role in ["iot-fleet-viewer", "iot-fleet-deployer", "iot-fleet-admin"] {
        assert!(names(&roles).contains(&role.to_owned()), "{role} shipped by default");
    }
    let verbs_on = |role: &str, resource: &str| -> Vec<String> {
        roles
            .iter()
            .filter(|r| r["metadata"]["name"] == role)
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .filter(|rule| {
                rule["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|x| x == resource))
            })
            .flat_map(|rule| rule["verbs"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(verbs_on("iot-fleet-viewer", "*"), ["get", "list", "watch"]);
    assert!(
        verbs_on("iot-fleet-viewer", "deployments").is_empty(),
        "a viewer writes nothing"
    );
    assert!(verbs_on("iot-fleet-deployer", "deployments").contains(&"create".to_owned()));
    assert!(verbs_on("iot-fleet-admin", "deployments").contains(&"deletecollection".to_owned()));
    for role in ["iot-fleet-viewer", "iot-fleet-deployer", "iot-fleet-admin"] {
        for owned_by_the_operator in ["deployments/status", "devices/status", "deploymentrevisions"] {
            assert!(
                verbs_on(role, owned_by_the_operator).is_empty(),
                "{role} must not write {owned_by_the_operator}"
            );
        }
    }
    // Deployers label Devices (and pause them); only admins create and delete them.
    let deployer_on_devices = verbs_on("iot-fleet-deployer", "devices");
    assert!(deployer_on_devices.contains(&"patch".to_owned()));
    assert!(!deployer_on_devices.iter().any(|v| v == "create" || v == "delete"));
    let admin_on_devices = verbs_on("iot-fleet-admin", "devices");
    assert!(admin_on_devices.contains(&"create".to_owned()) && admin_on_devices.contains(&"delete".to_owned()));
    assert!(
        docs_of_kind(&rendered, "ClusterRoleBinding")?.len() == 1,
        "only the operator's binding without sso values"
    );

    // Cluster-wide bindings, with the API server's group prefix.
    let rendered = render(
        "iot",
        "iot-system",
        &[
            "sso.groups.deployers={fleet-deployers,ops}".into(),
            "sso.groupsPrefix=corp:".into(),
        ],
    )?;
    let bindings = docs_of_kind(&rendered, "ClusterRoleBinding")?;
    let deployers = bindings
        .iter()
        .find(|b| b["roleRef"]["name"] == "iot-fleet-deployer")
        .ok_or_else(|| anyhow::anyhow!("no deployer binding in {bindings:#?}"))?;
    let subjects: Vec<_> = deployers["subjects"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        subjects
            .iter()
            .map(|s| (s["kind"].as_str(), s["name"].as_str()))
            .collect::<Vec<_>>(),
        [
            (Some("Group"), Some("corp:fleet-deployers")),
            (Some("Group"), Some("corp:ops"))
        ]
    );

    // Namespaced: a RoleBinding per namespace, nothing cluster-wide for people.
    let rendered = render(
        "iot",
        "iot-system",
        &[
            "sso.groups.viewers={fleet-viewers}".into(),
            "sso.namespaces={team-a,team-b}".into(),
        ],
    )?;
    let role_bindings: Vec<_> = docs_of_kind(&rendered, "RoleBinding")?
        .into_iter()
        .filter(|b| b["roleRef"]["name"] == "iot-fleet-viewer")
        .collect();
    let namespaces: Vec<_> = role_bindings
        .iter()
        .filter_map(|b| b["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(namespaces, ["team-a", "team-b"]);
    assert_eq!(docs_of_kind(&rendered, "ClusterRoleBinding")?.len(), 1);

    // A second release leaves the shared roles to the first.
    let rendered = render("iot2", "iot-system", &["fleetRoles.create=false".into()])?;
    assert!(
        !names(&docs_of_kind(&rendered, "ClusterRole")?)
            .iter()
            .any(|n| n.starts_with("iot-fleet-"))
    );
    Ok(())
}

/// The operator's environment and volumes for one render.
fn operator_pod(sets: &[String]) -> anyhow::Result<serde_json::Value> {
    let rendered = render("iot", "iot-system", sets)?;
    Ok(docs_of_kind(&rendered, "Deployment")?[0]["spec"]["template"]["spec"].clone())
}

fn env_names(pod: &serde_json::Value) -> Vec<String> {
    pod["containers"][0]["env"]
        .as_array()
        .map(|e| e.iter().filter_map(|v| v["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn env_value(pod: &serde_json::Value, name: &str) -> Option<String> {
    pod["containers"][0]["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .and_then(|v| v["value"].as_str().map(str::to_owned))
}

fn named<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list.as_array().and_then(|l| l.iter().find(|v| v["name"] == name))
}

#[test]
fn registry_values_give_the_operator_its_signing_key_only_when_registries_are_set() -> anyhow::Result<()> {
    // Unset (and a key alone): no registry environment, no volume.
    for sets in [
        vec![],
        vec!["registry.signingKeySecret=iot-registry-signing".to_owned()],
    ] {
        let pod = operator_pod(&sets)?;
        let names = env_names(&pod);
        assert!(
            !names.iter().any(|n| n.starts_with("IOT_REGISTR")),
            "{sets:?}: {names:?}"
        );
        assert!(named(&pod["volumes"], "registry-signing-key").is_none(), "{sets:?}");
        assert!(named(&pod["volumes"], "registry-ca").is_none(), "{sets:?}");
    }
    // Nothing else to mount: no volumes at all.
    let pod = operator_pod(&["nats.credentials.type=none".to_owned()])?;
    assert!(pod.get("volumes").is_none(), "{pod}");

    // Set: the list, the key's path, issuer and service; the Secret read-only.
    let pod = operator_pod(&[
        "nats.credentials.type=none".to_owned(),
        "registry.registries={10.77.0.1:5000,registry.example}".to_owned(),
        "registry.signingKeySecret=iot-registry-signing".to_owned(),
    ])?;
    assert_eq!(
        env_value(&pod, "IOT_REGISTRIES").as_deref(),
        Some("10.77.0.1:5000,registry.example")
    );
    assert_eq!(
        env_value(&pod, "IOT_REGISTRY_SIGNING_KEY").as_deref(),
        Some("/etc/iot/registry/signing.key")
    );
    assert_eq!(
        env_value(&pod, "IOT_REGISTRY_ISSUER").as_deref(),
        Some("iot-registry-token")
    );
    assert_eq!(env_value(&pod, "IOT_REGISTRY_SERVICE").as_deref(), Some("iot-registry"));
    assert_eq!(env_value(&pod, "IOT_REGISTRY_CA_FILE"), None, "the system roots");
    assert_eq!(
        named(&pod["volumes"], "registry-signing-key"),
        Some(&serde_json::json!({"name": "registry-signing-key", "secret": {
            "secretName": "iot-registry-signing", "defaultMode": 288,
            "items": [{"key": "signing.key", "path": "signing.key"}]}}))
    );
    assert_eq!(
        pod["containers"][0]["volumeMounts"],
        serde_json::json!([{"name": "registry-signing-key", "mountPath": "/etc/iot/registry", "readOnly": true}])
    );

    // Its own CA ConfigMap, and its values.
    let pod = operator_pod(&[
        "registry.registries={10.77.0.1:5000}".to_owned(),
        "registry.signingKeySecret=sk".to_owned(),
        "registry.issuer=me".to_owned(),
        "registry.service=reg".to_owned(),
        "registry.tls.caConfigMap=registry-ca".to_owned(),
        "registry.tls.caKey=root.pem".to_owned(),
    ])?;
    assert_eq!(env_value(&pod, "IOT_REGISTRY_ISSUER").as_deref(), Some("me"));
    assert_eq!(env_value(&pod, "IOT_REGISTRY_SERVICE").as_deref(), Some("reg"));
    assert_eq!(
        env_value(&pod, "IOT_REGISTRY_CA_FILE").as_deref(),
        Some("/etc/iot/registry-ca/root.pem")
    );
    assert_eq!(
        named(&pod["volumes"], "registry-ca").map(|v| &v["configMap"]),
        Some(&serde_json::json!({"name": "registry-ca", "items": [{"key": "root.pem", "path": "root.pem"}]}))
    );
    assert!(
        named(&pod["containers"][0]["volumeMounts"], "registry-ca")
            .is_some_and(|m| m["mountPath"] == "/etc/iot/registry-ca" && m["readOnly"] == true),
        "{pod}"
    );
    // The NATS CA's ConfigMap: that volume, not a second one.
    let pod = operator_pod(&[
        "nats.tls.caConfigMap=iot-ca".to_owned(),
        "registry.registries={10.77.0.1:5000}".to_owned(),
        "registry.signingKeySecret=sk".to_owned(),
        "registry.tls.caConfigMap=iot-ca".to_owned(),
    ])?;
    assert_eq!(
        env_value(&pod, "IOT_REGISTRY_CA_FILE").as_deref(),
        Some("/etc/iot/ca/ca.crt")
    );
    assert!(named(&pod["volumes"], "registry-ca").is_none(), "{pod}");
    assert!(named(&pod["volumes"], "nats-ca").is_some(), "{pod}");

    // Registries without the signing key: refused by the schema, naming both values.
    let (ok, _, err) = helm(&[
        "template",
        &chart(),
        "--release",
        "iot",
        "--namespace",
        "ns",
        "--set",
        "registry.registries={10.77.0.1:5000}",
    ])?;
    assert!(!ok, "registries without a signing key were accepted");
    assert!(
        err.contains("values don't meet the specifications of the schema"),
        "{err}"
    );
    for field in ["/registry/registries", "/registry/signingKeySecret"] {
        assert!(err.contains(field), "expected {field:?} in: {err}");
    }
    Ok(())
}

#[test]
fn bad_values_are_rejected_naming_the_field() -> anyhow::Result<()> {
    let cases = [
        ("replicas=two", "/replicas"),
        ("replicas=0", "/replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("nats.credentials.type=password", "/nats/credentials/type"),
        ("nats.urls[0]=http://nats:4222", "/nats/urls/0"),
        ("nats.kvReplicas=0", "/nats/kvReplicas"),
        ("nats.kvReplicas=three", "/nats/kvReplicas"),
        ("metrics.port=80", "/metrics/port"),
        ("leaderElection.leaseDuration=15", "/leaderElection/leaseDuration"),
        ("replica=2", "replica"),
        ("leaderElection.leaseDuration=1500ms", "/leaderElection/leaseDuration"),
        (
            "extraLabels.app\\.kubernetes\\.io/instance=other",
            "app.kubernetes.io/instance",
        ),
        ("sso.groups.deployers=fleet-deployers", "/sso/groups/deployers"),
        ("sso.namespaces={Team_A}", "/sso/namespaces/0"),
        ("sso.group.viewers={x}", "group"),
        ("registry.registries=10.77.0.1:5000", "/registry/registries"),
        ("registry.registries={https://10.77.0.1:5000}", "/registry/registries/0"),
        ("registry.signingKeySecret=Bad_Name", "/registry/signingKeySecret"),
        ("registry.tls.caKey=a/b", "/registry/tls/caKey"),
        ("registry.issuer=", "/registry/issuer"),
        ("registry.registry={x:1}", "registry"),
    ];
    for (set, field) in cases {
        let (ok, _, err) = helm(&[
            "template",
            &chart(),
            "--release",
            "iot",
            "--namespace",
            "ns",
            "--set",
            set,
        ])?;
        assert!(!ok, "{set} was accepted");
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{set}: {err}"
        );
        assert!(err.contains(field), "{set}: expected {field:?} in: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn install_upgrade_history_rollback_uninstall_on_a_full_api_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start_in(dir.path(), None).await?;
    let kube = api.kube_client().await?;
    let kc = api.kubeconfig().display().to_string();
    let ns = "iot-system";
    let release = |verb: &str, extra: &[&str]| -> anyhow::Result<serde_json::Value> {
        let chart = chart();
        let mut args = vec![verb];
        if verb == "install" || verb == "upgrade" {
            args.push(&chart);
        }
        args.extend(["--release", "iot", "--namespace", ns, "--kubeconfig", &kc]);
        args.extend(extra);
        Ok(serde_json::from_str(&helm_ok(&args)?)?)
    };
    let deps: Api<AppsDeployment> = Api::namespaced(kube.clone(), ns);
    let container = |d: &AppsDeployment| -> (String, String) {
        let c = &d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .map(|s| s.containers[0].clone());
        let c = c.clone().unwrap_or_default();
        let log = c
            .env
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.name == "RUST_LOG")
            .and_then(|e| e.value)
            .unwrap_or_default();
        (c.image.unwrap_or_default(), log)
    };
    let version = env!("CARGO_PKG_VERSION");

    // Install an "older" chart whose CRD differs (another short name), so the
    // upgrade below must change the CRD on the server.
    let old_chart = dir.path().join("old-chart");
    copy_dir(&chart_dir(), &old_chart)?;
    let crd_template = old_chart.join("templates/crd.yaml");
    let text = std::fs::read_to_string(&crd_template)?;
    anyhow::ensure!(
        text.contains("    - iotdep\n"),
        "short name not found in the CRD template"
    );
    std::fs::write(&crd_template, text.replace("    - iotdep\n", "    - iotold\n"))?;
    let old = old_chart.display().to_string();
    let out: serde_json::Value = serde_json::from_str(&helm_ok(&[
        "install",
        &old,
        "--release",
        "iot",
        "--namespace",
        ns,
        "--kubeconfig",
        &kc,
        "--create-namespace",
        "--set",
        "nats.credentials.type=none",
    ])?)?;
    assert_eq!(out["revision"], 1, "{out}");
    let short_names = |crd: &CustomResourceDefinition| crd.spec.names.short_names.clone().unwrap_or_default();
    let d = deps.get("iot-iot-operator").await?;
    assert_eq!(
        container(&d),
        (format!("localhost/iot-operator:{version}"), "info".into())
    );
    Api::<ServiceAccount>::namespaced(kube.clone(), ns)
        .get("iot-iot-operator")
        .await?;
    Api::<ClusterRole>::all(kube.clone())
        .get("iot-system-iot-iot-operator")
        .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
    assert_eq!(short_names(&crds.get(CRD).await?), vec!["iotold".to_owned()]);
    wait_until(WAIT, "CRD Established", || async {
        let crd = crds.get(CRD).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await?;
    // A user's resource, to see what uninstall does to it.
    let (ok, _, err) = api.kubectl(
        &["apply", "-f", "-"],
        Some(
            r#"{"apiVersion":"iot.nationtech.io/v1alpha1","kind":"Deployment","metadata":{"name":"survivor","namespace":"default"},
                "spec":{"targetDevices":["pi-01"],"score":{"PodmanV0":{"services":[{"name":"web","image":"localhost/iot-web:v1"}]}}}}"#,
        ),
    )?;
    assert!(ok, "{err}");

    let out = release(
        "upgrade",
        &[
            "--set",
            "nats.credentials.type=none",
            "--set",
            "image.tag=0.0.0-next",
            "--set",
            "logLevel=debug",
        ],
    )?;
    assert_eq!(out["revision"], 2, "{out}");
    let d = deps.get("iot-iot-operator").await?;
    assert_eq!(
        container(&d),
        ("localhost/iot-operator:0.0.0-next".into(), "debug".into())
    );
    // The CRD moved with the chart (it is a template, not in crds/), and the user's
    // resource lived through it.
    assert_eq!(short_names(&crds.get(CRD).await?), vec!["iotdep".to_owned()]);
    let (ok, names, err) = api.kubectl(&["get", "iotdep", "-n", "default", "-o", "name"], None)?;
    assert!(ok && names.contains("survivor"), "{names}{err}");

    // A bad upgrade changes nothing and leaves no revision.
    let (ok, _, err) = helm(&[
        "upgrade",
        &chart(),
        "--release",
        "iot",
        "--namespace",
        ns,
        "--kubeconfig",
        &kc,
        "--set",
        "replicas=-1",
    ])?;
    assert!(!ok && err.contains("/replicas"), "{err}");

    let history = release("history", &[])?;
    let revisions: Vec<(i64, String)> = history
        .as_array()
        .map(|h| {
            h.iter()
                .map(|r| {
                    (
                        r["revision"].as_i64().unwrap_or(0),
                        r["status"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        revisions,
        vec![(1, "superseded".into()), (2, "deployed".into())],
        "{history}"
    );

    release("rollback", &["--revision", "1"])?;
    let d = deps.get("iot-iot-operator").await?;
    assert_eq!(
        container(&d),
        (format!("localhost/iot-operator:{version}"), "info".into())
    );
    // A rollback takes the schema back too (revision 1 had the old short name).
    assert_eq!(short_names(&crds.get(CRD).await?), vec!["iotold".to_owned()]);
    let history = release("history", &[])?;
    assert_eq!(history.as_array().map(Vec::len), Some(3), "{history}");

    let out = release("uninstall", &[])?;
    let kept = out["kept"].to_string();
    assert!(kept.contains(CRD), "uninstall should report the kept CRD: {out}");
    // The CRD and with it every user resource stay; the operator's objects go.
    crds.get(CRD).await?;
    let (ok, names, err) = api.kubectl(&["get", "iotdep", "-A", "-o", "name"], None)?;
    assert!(ok && names.contains("survivor"), "{names}{err}");
    assert!(deps.get_opt("iot-iot-operator").await?.is_none());
    assert!(
        Api::<ClusterRole>::all(kube.clone())
            .get_opt("iot-system-iot-iot-operator")
            .await?
            .is_none()
    );

    // Installing again adopts the kept CRD (it still carries the release's labels).
    let out = release("install", &["--set", "nats.credentials.type=none"])?;
    assert_eq!(out["revision"], 1, "{out}");
    assert_eq!(short_names(&crds.get(CRD).await?), vec!["iotdep".to_owned()]);
    Ok(())
}

#[test]
fn the_chart_packages_as_a_versioned_archive() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let packaged: serde_json::Value = serde_json::from_str(&helm_ok(&[
        "package",
        &chart(),
        "--out",
        &out.path().display().to_string(),
    ])?)?;
    let path = packaged["path"].as_str().unwrap_or_default();
    assert!(
        path.ends_with(&format!("iot-operator-{}.tgz", env!("CARGO_PKG_VERSION"))),
        "{packaged}"
    );
    assert!(std::fs::metadata(path)?.len() > 1000);
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
