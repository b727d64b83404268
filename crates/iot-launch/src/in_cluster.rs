//! The platform installed into a [`KubeNode`] with its charts, the plan's in-cluster
//! shape: NATS and the auth callout in one pod (chart `iot-nats`), the operator's
//! replicas as pods (chart `iot-operator`). OpenBao stays outside, on the machine:
//! it is the identity root that devices enroll against before they can reach
//! anything in the cluster, and its unseal keys must not live in the cluster whose
//! credentials it issues.
//!
//! The node has no cluster DNS, so addresses are IPs: pods reach NATS on a fixed
//! Service cluster IP, devices on the node's address through a hostPort. The NATS
//! certificate names both, and 127.0.0.1 for the callout beside the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::{CalloutKeys, write_private};
use crate::helm::{chart_dir, helm_ok};
use crate::kube_node::KubeNode;
use crate::tls::Ca;

/// The namespace both charts are installed into.
pub const NAMESPACE: &str = "iot-system";
/// Release names.
pub const NATS_RELEASE: &str = "nats";
pub const OPERATOR_RELEASE: &str = "iot";
/// The NATS Service's cluster IP, fixed so the certificate and the operator's URL
/// can name it before anything is installed.
pub const NATS_SERVICE_IP: &str = "10.96.0.42";
/// The client port, in the pod, on the Service and as the node's hostPort.
pub const NATS_PORT: u16 = 4222;

/// What the in-cluster platform is given.
pub struct PlatformOptions<'a> {
    /// The stack's CA: NATS serves a certificate from it, OpenBao already does.
    pub ca: &'a Ca,
    pub keys: &'a CalloutKeys,
    /// OpenBao's address, reachable from pods (on the node's uplink side).
    pub bao_addr: &'a str,
    /// Enrollment JSON of the callout's and the operator's service identities.
    pub callout_enrollment: &'a str,
    pub operator_enrollment: &'a str,
    /// Where the NATS pod keeps JetStream (a hostPath: a single node has no
    /// storage provisioner). Survives the pod.
    pub nats_store: &'a Path,
    /// Files for the Secrets are written here (mode 0600).
    pub secrets_dir: &'a Path,
    /// The operator chart's `--set` values beyond the ones made here.
    pub operator_sets: Vec<String>,
}

/// Image tag of every platform image: the workspace version (scripts/build-image.sh).
pub fn image_tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The platform's images, to import into the node.
pub fn images() -> Vec<String> {
    ["iot-operator", "iot-auth-callout", "iot-nats"]
        .iter()
        .map(|n| format!("localhost/{n}:{}", image_tag()))
        .collect()
}

/// URL of NATS for pods (the Service) and for devices (the node's hostPort).
pub fn nats_pod_url() -> String {
    format!("tls://{NATS_SERVICE_IP}:{NATS_PORT}")
}

pub fn nats_device_url(node: &KubeNode) -> String {
    format!("tls://{}:{NATS_PORT}", node.node_ip())
}

/// The two Deployments the charts make.
pub const NATS_DEPLOYMENT: &str = "deployment/nats-iot-nats";
pub const OPERATOR_DEPLOYMENT: &str = "deployment/iot-iot-operator";

/// [`install_nats_chart`], then [`install_operator_chart`].
pub fn install(node: &KubeNode, o: &PlatformOptions<'_>) -> anyhow::Result<()> {
    install_nats_chart(node, o)?;
    install_operator_chart(node, o)
}

/// Creates the namespace, Secrets and ConfigMap, installs chart `iot-nats` and waits
/// until its pod (server and callout) is Ready.
pub fn install_nats_chart(node: &KubeNode, o: &PlatformOptions<'_>) -> anyhow::Result<()> {
    create_secrets(node, o)?;
    install_nats(node, o)?;
    wait_rollout(node, NATS_DEPLOYMENT, Duration::from_secs(120))
}

/// Installs chart `iot-operator` and waits until every replica is Ready.
pub fn install_operator_chart(node: &KubeNode, o: &PlatformOptions<'_>) -> anyhow::Result<()> {
    install_operator(node, &operator_sets(o))?;
    wait_rollout(node, OPERATOR_DEPLOYMENT, Duration::from_secs(120))
}

fn kubectl_ok(node: &KubeNode, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let (ok, out, err) = node.kubectl(args, stdin)?;
    anyhow::ensure!(ok, "kubectl {}: {err}", args.join(" "));
    Ok(out)
}

fn create_secrets(node: &KubeNode, o: &PlatformOptions<'_>) -> anyhow::Result<()> {
    let d = o.secrets_dir;
    std::fs::create_dir_all(d)?;
    let ip = node.node_ip().to_string();
    let (crt, key) = o.ca.issue("nats-in-cluster", &[&ip, NATS_SERVICE_IP, "127.0.0.1"])?;
    write_private(&d.join("auth.conf"), &o.keys.nats_config())?;
    let (issuer, xkey) = o.keys.write_seeds(d)?;
    write_private(&d.join("nats-password"), &o.keys.auth_password)?;
    write_private(&d.join("callout.json"), o.callout_enrollment)?;
    write_private(&d.join("operator.json"), o.operator_enrollment)?;
    let ns = NAMESPACE;
    kubectl_ok(node, &["create", "namespace", ns], None)?;
    let ca = o.ca.cert_file();
    create_from_files(node, &["configmap", "iot-ca"], &[("ca.crt", &ca)])?;
    kubectl_ok(
        node,
        &[
            "create",
            "secret",
            "tls",
            "iot-nats-tls",
            "-n",
            ns,
            "--cert",
            &p(&crt),
            "--key",
            &p(&key),
        ],
        None,
    )?;
    create_from_files(
        node,
        &["secret", "generic", "iot-nats-auth"],
        &[("auth.conf", &d.join("auth.conf"))],
    )?;
    create_from_files(
        node,
        &["secret", "generic", "iot-callout"],
        &[
            ("issuer.seed", &issuer),
            ("xkey.seed", &xkey),
            ("nats-password", &d.join("nats-password")),
            ("enrollment.json", &d.join("callout.json")),
        ],
    )?;
    create_from_files(
        node,
        &["secret", "generic", "iot-operator-nats"],
        &[("enrollment.json", &d.join("operator.json"))],
    )?;
    Ok(())
}

/// `kubectl create KIND... -n NAMESPACE --from-file=KEY=PATH...`.
fn create_from_files(node: &KubeNode, kind_and_name: &[&str], files: &[(&str, &Path)]) -> anyhow::Result<()> {
    let from: Vec<String> = files
        .iter()
        .map(|(k, path)| format!("--from-file={k}={}", p(path)))
        .collect();
    let mut args = vec!["create"];
    args.extend_from_slice(kind_and_name);
    args.extend(["-n", NAMESPACE]);
    args.extend(from.iter().map(String::as_str));
    kubectl_ok(node, &args, None).map(drop)
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// The `--set` values of chart `iot-nats` on this node.
pub fn nats_sets(o: &PlatformOptions<'_>) -> Vec<String> {
    vec![
        format!("service.clusterIP={NATS_SERVICE_IP}"),
        format!("server.hostPort={NATS_PORT}"),
        "server.tls.secretName=iot-nats-tls".into(),
        "server.auth.secretName=iot-nats-auth".into(),
        format!("jetstream.hostPath={}", o.nats_store.display()),
        "callout.secretName=iot-callout".into(),
        "callout.tls.caConfigMap=iot-ca".into(),
        format!("callout.baoAddr={}", o.bao_addr),
        format!("callout.oidcIssuer={}", iot_bao::setup::issuer_url(o.bao_addr)),
        "terminationGracePeriodSeconds=5".into(),
    ]
}

fn install_nats(node: &KubeNode, o: &PlatformOptions<'_>) -> anyhow::Result<()> {
    // The server runs as 65532 and owns its store.
    std::fs::create_dir_all(o.nats_store)?;
    std::os::unix::fs::chown(o.nats_store, Some(65532), Some(65532))?;
    helm_release(node, "install", NATS_RELEASE, &chart_dir("iot-nats"), &nats_sets(o))
}

/// The operator chart's values on this node: NATS by its Service IP, the
/// identity and CA from the Secrets made here, and short shutdowns (a test deletes
/// pods; the default grace is 30 s).
pub fn operator_sets(o: &PlatformOptions<'_>) -> Vec<String> {
    let mut sets = vec![
        format!("nats.urls[0]={}", nats_pod_url()),
        "nats.tls.caConfigMap=iot-ca".into(),
        "nats.credentials.type=identity".into(),
        "nats.credentials.secretName=iot-operator-nats".into(),
        "terminationGracePeriodSeconds=5".into(),
        "logJson=false".into(),
    ];
    sets.extend(o.operator_sets.iter().cloned());
    sets
}

/// `helm install` of the operator chart with these values.
pub fn install_operator(node: &KubeNode, sets: &[String]) -> anyhow::Result<()> {
    helm_release(node, "install", OPERATOR_RELEASE, &chart_dir("iot-operator"), sets)
}

/// `helm install` or `upgrade` of a chart in [`NAMESPACE`] on the node.
pub fn helm_release(node: &KubeNode, action: &str, release: &str, chart: &Path, sets: &[String]) -> anyhow::Result<()> {
    let chart = chart.display().to_string();
    let kc = node.kubeconfig().display().to_string();
    let mut args = vec![
        action,
        chart.as_str(),
        "--release",
        release,
        "--namespace",
        NAMESPACE,
        "--kubeconfig",
        &kc,
    ];
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    helm_ok(&args).map(drop)
}

/// Waits until a Deployment's rollout is complete (every replica updated and
/// available).
pub fn wait_rollout(node: &KubeNode, what: &str, timeout: Duration) -> anyhow::Result<()> {
    let t = format!("--timeout={}s", timeout.as_secs());
    let (ok, out, err) = node.kubectl(&["rollout", "status", what, "-n", NAMESPACE, &t], None)?;
    if ok {
        return Ok(());
    }
    let (_, pods, _) = node.kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "wide"], None)?;
    let (_, events, _) = node.kubectl(&["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"], None)?;
    anyhow::bail!("{what} did not roll out: {out}{err}\npods:\n{pods}\nevents:\n{events}")
}

/// Where the Secrets' files of a node's platform are kept.
pub fn secrets_dir(node: &KubeNode) -> PathBuf {
    node.dir().join("platform-secrets")
}
