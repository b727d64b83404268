//! The chart's pod spec really runs: the rendered Deployment, with the locally built
//! operator image (scripts/build-image.sh), under `podman kube play` standing in for
//! a kubelet. The operator inside connects to the full kube-apiserver as the chart's
//! ServiceAccount and to NATS, reconciles, and answers its probes.
//!
//! What the stand-in adds is exactly what a kubelet and a cluster network would:
//! the ServiceAccount token, CA and namespace at
//! /var/run/secrets/kubernetes.io/serviceaccount, and KUBERNETES_SERVICE_HOST/PORT.
//! `hostNetwork` replaces the cluster network, so the pod reaches the loopback
//! servers.

use std::path::{Path, PathBuf};
use std::process::Command;

use harmony_reconciler_contracts::DeploymentRef;
use iot_e2e::chart::*;
use iot_e2e::stack::*;
use iot_testkit::{KubeApiServer, free_port, podman_cli, wait_until};

const NS: &str = "iot-system";
const RELEASE: &str = "iot";

/// Takes the pod down (and its containers) however the test ends.
struct Played(PathBuf);

impl Drop for Played {
    fn drop(&mut self) {
        let _ = Command::new("podman").arg("kube").arg("down").arg(&self.0).output();
    }
}

fn operator_image() -> anyhow::Result<String> {
    let image = format!("localhost/iot-operator:{}", env!("CARGO_PKG_VERSION"));
    if podman_cli(&["image", "exists", &image]).is_err() {
        // scripts/test.sh builds it first; a lone `cargo test` builds it here.
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/build-image.sh"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "scripts/build-image.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(image)
}

/// What a kubelet mounts for a pod's ServiceAccount.
fn service_account_dir(parent: &Path, token: &str, ca: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join("serviceaccount");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("token"), token)?;
    std::fs::copy(ca, dir.join("ca.crt"))?;
    std::fs::write(dir.join("namespace"), NS)?;
    // The operator runs as uid 65532, as the chart says.
    for f in ["token", "ca.crt", "namespace"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

#[tokio::test]
async fn the_rendered_pod_spec_runs_the_operator_image_under_podman_kube_play() -> anyhow::Result<()> {
    let image = operator_image()?;
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start_in(dir.path(), None).await?;
    let api_port = api.port();
    let ca = api.ca_file();
    let kc = api.kubeconfig().display().to_string();
    let admin = api.kube_client().await?;
    let mut stack = Stack::start_on(Cluster::Full(api), false).await?;
    let metrics_port = free_port()?;
    let sets = vec![
        "nats.credentials.type=none".to_owned(),
        format!("nats.urls[0]={}", stack.nats.url()),
        // The CA comes from a ConfigMap in a cluster; here a hostPath stands in.
        "nats.tls.caConfigMap=iot-ca".to_owned(),
        format!("metrics.port={metrics_port}"),
        "image.pullPolicy=Never".to_owned(),
        "logJson=false".to_owned(),
    ];
    let chart = chart_dir().display().to_string();
    let mut args = vec![
        "install",
        &chart,
        "--release",
        RELEASE,
        "--namespace",
        NS,
        "--kubeconfig",
        &kc,
        "--create-namespace",
    ];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    helm_ok(&args)?;

    let sa = "iot-iot-operator";
    let token = service_account_token(&admin, NS, sa).await?;
    let sa_dir = service_account_dir(dir.path(), &token, &ca)?;

    let rendered = render(RELEASE, NS, &sets)?;
    let mut deployment = docs_of_kind(&rendered, "Deployment")?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no Deployment rendered"))?;
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        image.as_str()
    );
    // The kubelet's and the cluster network's part (see the module docs).
    let pod = &mut deployment["spec"]["template"]["spec"];
    pod["hostNetwork"] = true.into();
    let ca_dir = dir.path().join("nats-ca");
    std::fs::create_dir_all(&ca_dir)?;
    let nats_ca = stack
        .nats
        .ca_file()
        .ok_or_else(|| anyhow::anyhow!("the stack's NATS serves TLS"))?;
    std::fs::copy(nats_ca, ca_dir.join("ca.crt"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(ca_dir.join("ca.crt"), std::fs::Permissions::from_mode(0o644))?;
    }
    assert!(
        pod["volumes"].as_array().is_some_and(|v| v
            .iter()
            .any(|v| v["name"] == "nats-ca" && v["configMap"]["name"] == "iot-ca")),
        "the chart mounts the CA ConfigMap: {}",
        pod["volumes"]
    );
    pod["volumes"] = serde_json::json!([
        {"name": "kube-api-access", "hostPath": {"path": sa_dir, "type": "Directory"}},
        {"name": "nats-ca", "hostPath": {"path": ca_dir, "type": "Directory"}},
    ]);
    let container = &mut pod["containers"][0];
    // On the host network a declared port is the host's port already; podman
    // refuses port declarations there (a kubelet would take them as hostPorts).
    container
        .as_object_mut()
        .ok_or_else(|| anyhow::anyhow!("container is not an object"))?
        .remove("ports");
    let mounts = container["volumeMounts"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no mounts"))?;
    mounts.push(serde_json::json!({
        "name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true
    }));
    let env = container["env"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no env"))?;
    // podman 4.3 resolves the metadata.name field reference but not
    // metadata.namespace; resolve that one as the kubelet would.
    for var in env.iter_mut() {
        if var["name"] == "POD_NAMESPACE" {
            *var = serde_json::json!({"name": "POD_NAMESPACE", "value": NS});
        }
    }
    env.push(serde_json::json!({"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}));
    env.push(serde_json::json!({"name": "KUBERNETES_SERVICE_PORT", "value": api_port.to_string()}));
    let manifest = dir.path().join("operator-pod.json");
    std::fs::write(&manifest, serde_json::to_string_pretty(&deployment)?)?;

    let out = Command::new("podman").arg("kube").arg("play").arg(&manifest).output()?;
    let _played = Played(manifest.clone());
    anyhow::ensure!(
        out.status.success(),
        "podman kube play: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let names = podman_cli(&["ps", "--format", "{{.Names}}", "--filter", "name=iot-iot-operator-pod"])?;
    let container_name = names
        .lines()
        .find(|n| n.ends_with("-operator"))
        .ok_or_else(|| anyhow::anyhow!("no operator container among {names:?}"))?
        .to_owned();
    let logs = || podman_cli(&["logs", &container_name]).unwrap_or_default();

    // Its probes answer, on the port and paths the chart declares.
    let probe = |kind: &str| -> (String, u16) {
        let p = &deployment["spec"]["template"]["spec"]["containers"][0][kind]["httpGet"];
        (p["path"].as_str().unwrap_or_default().to_owned(), metrics_port)
    };
    for kind in ["livenessProbe", "readinessProbe"] {
        let (path, port) = probe(kind);
        let ok = wait_until(WAIT, &format!("{kind} {path}"), || async {
            (iot_testkit::http::get_status("127.0.0.1", port, &path).await.ok()? == 200).then_some(())
        })
        .await;
        if ok.is_err() {
            anyhow::bail!("{kind} {path} never answered 200; operator log:\n{}", logs());
        }
    }
    // Ready comes first (a standby is ready too); then it takes the lease, alone.
    let led = wait_until(WAIT, "the pod leads", || async {
        let metrics = iot_testkit::http::get_text("127.0.0.1", metrics_port, "/metrics")
            .await
            .ok()?;
        (metric(&metrics, "iot_operator_leader ") == 1.0).then_some(())
    })
    .await;
    if led.is_err() {
        anyhow::bail!("the pod never took the lease; operator log:\n{}", logs());
    }
    // It runs as the image's and the chart's non-root user.
    let user = podman_cli(&["top", &container_name, "user"])?;
    assert!(!user.lines().skip(1).any(|l| l.trim() == "root"), "{user}");

    // It reconciles: a resource becomes desired state in NATS.
    stack.operator_env.clear();
    let mut cmd = stack.applier()?;
    cmd.args([
        "--name",
        "web",
        "--namespace",
        "default",
        "--target-device",
        "pi-kube-play",
    ])
    .args(["--image", "localhost/iot-web:v1"]);
    run_ok(cmd)?;
    let dep = DeploymentRef::new("default", "web")?;
    let keys = wait_until(WAIT, "desired-state key from the pod", || async {
        let keys = stack.keys_of(&dep).await.ok()?;
        (!keys.is_empty()).then_some(keys)
    })
    .await;
    if keys.is_err() {
        anyhow::bail!("no desired state; operator log:\n{}", logs());
    }
    stack
        .wait_resource_status("default", "web", "status written by the pod", |s| {
            s.observed_generation == Some(1)
        })
        .await?;
    let Cluster::Full(api) = &stack.api else {
        anyhow::bail!("not the full server")
    };
    let sa_user = format!("system:serviceaccount:{NS}:{sa}");
    let forbidden: Vec<_> = api
        .audit()?
        .into_iter()
        .filter(|e| e.user == sa_user && e.decision == "forbid")
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:#?}");
    Ok(())
}
