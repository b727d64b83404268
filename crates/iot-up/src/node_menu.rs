//! The menu's section for `--cluster`: the single-node Kubernetes, its pods, and
//! Helm through the project's wrapper (`hack/helm.py`, Helm's Go SDK).

use iot_launch::in_cluster::{NAMESPACE, NATS_DEPLOYMENT, NATS_RELEASE, OPERATOR_DEPLOYMENT, OPERATOR_RELEASE};

use crate::menu::line;
use crate::out;
use crate::up::Up;

pub fn section(m: &mut String, up: &Up) {
    let Some(node) = &up.node else { return };
    let ns = NAMESPACE;
    line(
        m,
        format!(
            "\n{} (node {} at {}, API server {})",
            out::bold("Kubernetes: one real node, the platform as pods"),
            node.name(),
            node.node_ip(),
            node.api_url()
        ),
    );
    line(m, "  kubectl get pods -A -o wide");
    line(
        m,
        format!(
            "  kubectl -n {ns} get lease iot-iot-operator -o jsonpath='{{.spec.holderIdentity}}{{\"\\n\"}}'   # the leading pod"
        ),
    );
    line(m, format!("  kubectl -n {ns} logs {OPERATOR_DEPLOYMENT} -f"));
    line(m, format!("  kubectl -n {ns} logs {NATS_DEPLOYMENT} -c nats"));
    line(m, format!("  kubectl -n {ns} logs {NATS_DEPLOYMENT} -c auth-callout"));
    line(
        m,
        format!("  kubectl -n {ns} delete pod <leader> --grace-period=0 --force   # the standby takes the Lease"),
    );
    line(
        m,
        format!(
            "  kubectl -n {ns} delete pod -l app.kubernetes.io/instance={NATS_RELEASE}   # back with its JetStream store ({})",
            up.state_dir.join("nats-store").display()
        ),
    );
    line(
        m,
        format!(
            "  ctr --address {} -n k8s.io images ls -q   # images imported from podman (no registry)",
            node.dir().join("containerd/containerd.sock").display()
        ),
    );

    let helm = format!("python3 {}", iot_launch::helm::wrapper().display());
    let chart = iot_launch::helm::chart_dir("iot-operator");
    let release = format!("--release {OPERATOR_RELEASE} --namespace {ns} --kubeconfig $KUBECONFIG");
    let sets: String = up.operator_sets.iter().map(|s| format!(" --set {s}")).collect();
    line(
        m,
        format!(
            "\n{} (Helm's own SDK; no helm binary needed)",
            out::bold("Helm: upgrade, history, rollback")
        ),
    );
    line(
        m,
        format!(
            "  podman tag localhost/iot-operator:{v} localhost/iot-operator:{v}-next && podman save --format oci-archive localhost/iot-operator:{v}-next | ctr --address {sock} -n k8s.io images import --index-name localhost/iot-operator:{v}-next -",
            v = iot_launch::in_cluster::image_tag(),
            sock = node.dir().join("containerd/containerd.sock").display()
        ),
    );
    line(
        m,
        format!(
            "  {helm} upgrade {} {release}{sets} --set image.tag={}-next",
            chart.display(),
            iot_launch::in_cluster::image_tag()
        ),
    );
    line(m, format!("  kubectl -n {ns} rollout status {OPERATOR_DEPLOYMENT}"));
    line(m, format!("  {helm} history {release}"));
    line(m, format!("  {helm} rollback {release} --revision 1"));
    line(
        m,
        format!("  {helm} uninstall {release}   # the CRD, your Deployments and the devices' containers stay"),
    );
}
