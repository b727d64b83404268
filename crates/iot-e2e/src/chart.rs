//! Helpers for the chart tests: Helm (hack/helm.py, Helm's Go SDK through
//! helm-python-sdk), ServiceAccount tokens and RBAC questions on the full
//! kube-apiserver, and operator replicas started by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use iot_testkit::{LoggedProcess, cargo_bin, free_port};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("deploy/chart/iot-operator")
}

/// The in-cluster NATS chart (nats-server and the auth callout).
pub fn nats_chart_dir() -> PathBuf {
    repo_root().join("deploy/chart/iot-nats")
}

pub use iot_launch::helm::{helm, helm_ok};

/// `helm template` of the operator's chart with `--set` overrides.
pub fn render(release: &str, namespace: &str, sets: &[String]) -> anyhow::Result<String> {
    render_chart(&chart_dir(), release, namespace, sets)
}

/// `helm template` of the chart in `dir` with `--set` overrides.
pub fn render_chart(dir: &Path, release: &str, namespace: &str, sets: &[String]) -> anyhow::Result<String> {
    helm_ok(
        &template_args(dir, release, namespace, sets)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
}

/// The `hack/helm.py` arguments of `helm template` of the chart in `dir` (for
/// [`helm`], to look at a failure).
pub fn template_args(dir: &Path, release: &str, namespace: &str, sets: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "template",
        &dir.display().to_string(),
        "--release",
        release,
        "--namespace",
        namespace,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    for s in sets {
        args.extend(["--set".to_owned(), s.clone()]);
    }
    args
}

/// The rendered documents of one kind, as JSON (parsed by PyYAML, which comes
/// with kubernetes-validate in the venv).
pub fn docs_of_kind(rendered: &str, kind: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut cmd = Command::new(venv_python());
    cmd.args([
        "-c",
        "import sys,json,yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
    ]);
    let (ok, json, err) = iot_testkit::run_captured(cmd, Some(rendered))?;
    anyhow::ensure!(ok, "cannot parse the rendered manifests: {err}");
    let docs: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    Ok(docs.into_iter().filter(|d| d["kind"] == kind).collect())
}

fn venv_python() -> PathBuf {
    let venv = std::env::var("IOT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/harmony-iot/venv"));
    venv.join("bin/python")
}

/// A bound token for a ServiceAccount (TokenRequest, as a kubelet would mount).
pub async fn service_account_token(kube: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(kube.clone(), namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![iot_testkit::kube_apiserver::SERVICE_ACCOUNT_ISSUER.to_owned()]),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = sas.create_token_request(name, &PostParams::default(), &req).await?;
    issued
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow::anyhow!("TokenRequest for {namespace}/{name} returned no token"))
}

/// What `kubectl auth can-i --as USER` asks: a SubjectAccessReview.
pub async fn can_i(
    kube: &kube::Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<bool> {
    let reviews: Api<SubjectAccessReview> = Api::all(kube.clone());
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(vec![
                "system:serviceaccounts".to_owned(),
                "system:authenticated".to_owned(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = reviews.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// One operator replica started by hand, with leader election.
pub struct Replica {
    pub process: LoggedProcess,
    pub http: u16,
    pub identity: String,
}

/// Starts `iot-operator run` with leader election on `lease` in `namespace`.
pub fn spawn_replica(
    identity: &str,
    kubeconfig: &Path,
    nats: &iot_testkit::NatsServer,
    namespace: &str,
    lease: &str,
    extra_env: &[(&str, &str)],
    log_dir: &Path,
) -> anyhow::Result<Replica> {
    let http = free_port()?;
    let mut cmd = Command::new(cargo_bin("iot-operator")?);
    if let Some(ca) = nats.ca_file() {
        cmd.env("NATS_CA_FILE", ca);
    }
    cmd.env("KUBECONFIG", kubeconfig)
        .env("NATS_URL", nats.url())
        .env("IOT_RESYNC_INTERVAL", "5s")
        .env("IOT_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("IOT_LEADER_ELECT", "true")
        .env("POD_NAMESPACE", namespace)
        .env("POD_NAME", identity)
        .env("IOT_LEADER_LEASE", lease)
        .env("RUST_LOG", "info")
        .arg("run");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let process = LoggedProcess::spawn(
        &format!("operator {identity}"),
        cmd,
        log_dir.join(format!("operator-{identity}.log")),
    )?;
    Ok(Replica {
        process,
        http,
        identity: identity.to_owned(),
    })
}

impl Replica {
    /// `iot_operator_leader` from its /metrics (None while it does not answer).
    pub async fn leader_gauge(&self) -> Option<f64> {
        let text = iot_testkit::http::get_text("127.0.0.1", self.http, "/metrics")
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with("iot_operator_leader "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        iot_testkit::http::get_text("127.0.0.1", self.http, "/metrics").await
    }
}

/// What the operator's ServiceAccount may do, and nothing more: asked as
/// `kubectl auth can-i` (a SubjectAccessReview) for every verb that matters, and
/// its own Lease only.
pub async fn assert_operator_rbac(admin: &kube::Client, sa_user: &str, ns: &str) -> anyhow::Result<()> {
    let admin = admin.clone();
    let checks: [(&str, &str, &str, Option<&str>, bool); 17] = [
        ("watch", "iot.nationtech.io", "devices", None, true),
        ("patch", "iot.nationtech.io", "devices/status", None, true),
        // A Device's labels and spec are people's: never the operator's.
        ("patch", "iot.nationtech.io", "devices", None, false),
        ("create", "iot.nationtech.io", "devices", None, false),
        (
            "create",
            "iot.nationtech.io",
            "deploymentrevisions",
            Some("default"),
            true,
        ),
        (
            "update",
            "iot.nationtech.io",
            "deploymentrevisions",
            Some("default"),
            false,
        ),
        ("list", "iot.nationtech.io", "deployments", None, true),
        (
            "patch",
            "iot.nationtech.io",
            "deployments/status",
            Some("default"),
            true,
        ),
        ("create", "coordination.k8s.io", "leases", Some(ns), true),
        (
            "delete",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            false,
        ),
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            false,
        ),
        ("get", "", "secrets", Some(ns), false),
        ("list", "", "secrets", None, false),
        ("create", "iot.nationtech.io", "deployments", Some("default"), false),
        ("delete", "iot.nationtech.io", "deployments", Some("default"), false),
        ("create", "coordination.k8s.io", "leases", Some("default"), false),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            false,
        ),
    ];
    for (verb, group, resource, namespace, expected) in checks {
        let allowed = can_i(&admin, sa_user, verb, group, resource, namespace, None).await?;
        assert_eq!(
            allowed, expected,
            "can {sa_user} {verb} {group}/{resource} in {namespace:?}?"
        );
    }
    // Its own Lease only.
    for (lease, expected) in [("iot-iot-operator", true), ("someone-elses-lease", false)] {
        let allowed = can_i(
            &admin,
            sa_user,
            "patch",
            "coordination.k8s.io",
            "leases",
            Some(ns),
            Some(lease),
        )
        .await?;
        assert_eq!(allowed, expected, "can {sa_user} patch lease {lease}?");
    }
    Ok(())
}
