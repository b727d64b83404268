//! The secured platform in a real single-node Kubernetes: NATS with the auth
//! callout and the operator's replicas run as pods from the charts, OpenBao and the
//! devices (real podman agents) on the machine, reaching NATS through the node's
//! hostPort. The result is an ordinary [`Stack`], so every helper of the other
//! tests (applier, status waits, KV reads, enrolled agents) works on it.

use std::time::Duration;

use iot_bao::enroll::Role;
use iot_launch::in_cluster::{self, PlatformOptions};
use iot_launch::kube_node::{KubeNode, NodeOptions, Uplink};
use iot_testkit::auth::CalloutKeys;
use iot_testkit::{NatsServer, OpenBao};

use crate::stack::{Cluster, Security, Stack};

/// What a test of the in-cluster platform holds beside the stack.
pub struct InCluster {
    pub stack: Stack,
    /// The operator chart's values as installed (an upgrade starts from them).
    pub operator_sets: Vec<String>,
    /// The NATS pod's JetStream store on the machine.
    pub nats_store: std::path::PathBuf,
}

impl InCluster {
    /// Brings up the node (about 20 s), OpenBao on the uplink's host end, and both
    /// charts (`iot-nats`, then `iot-operator` with `operator_replicas`), waiting
    /// until every pod is Ready.
    pub async fn start(operator_replicas: usize, operator_sets: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let uplink = Uplink::point_to_point(211, 0);
        let gateway = uplink.gateway.to_string();
        let node = KubeNode::start(&NodeOptions {
            name: format!("e{}", std::process::id() % 100_000),
            parent: dir.path().to_owned(),
            uplink,
            images: in_cluster::images(),
        })
        .await?;
        let ca = iot_testkit::Ca::create(&dir.path().join("ca"))?;
        // Pods reach OpenBao over the uplink, as devices reach it over their bridge.
        let bao = OpenBao::start_in_on_with(&dir.path().join("bao"), &gateway, iot_testkit::TlsMode::Ca(&ca)).await?;
        let root = bao.root()?;
        let callout = iot_bao::enroll::enroll_service(&root, "callout", Role::Callout).await?;
        let operator = iot_bao::enroll::enroll_service(&root, "operator", Role::Operator).await?;
        let operator_enrollment = dir.path().join("operator.json");
        iot_testkit::auth::write_private(&operator_enrollment, &serde_json::to_string(&operator)?)?;
        let keys = CalloutKeys::generate()?;
        let nats_store = dir.path().join("nats-store");
        let mut sets: Vec<String> = vec![format!("replicas={operator_replicas}")];
        sets.extend(operator_sets.iter().map(|s| (*s).to_owned()));
        let opts = PlatformOptions {
            ca: &ca,
            keys: &keys,
            bao_addr: &bao.addr(),
            callout_enrollment: &serde_json::to_string(&callout)?,
            operator_enrollment: &serde_json::to_string(&operator)?,
            nats_store: &nats_store,
            secrets_dir: &dir.path().join("secrets"),
            operator_sets: sets,
        };
        in_cluster::install(&node, &opts)?;
        let operator_sets = in_cluster::operator_sets(&opts);

        let nats = NatsServer::remote(&node.node_ip().to_string(), in_cluster::NATS_PORT, ca.cert_file())?;
        let admin = async_nats::ConnectOptions::with_user_and_password("admin".into(), keys.admin_password.clone())
            .add_root_certificates(ca.cert_file())
            .require_tls(true)
            .connection_timeout(Duration::from_secs(10))
            .connect(nats.url())
            .await?;
        let security = Security {
            bao,
            keys,
            callouts: Vec::new(),
            operator_enrollment,
            enrollments: Default::default(),
        };
        let mut stack = Stack::start_with(
            Cluster::Node(Box::new(node)),
            false,
            nats,
            admin,
            Some(security),
            Vec::new(),
        )
        .await?;
        stack.ca = Some(ca);
        stack.secured_dir = Some(dir);
        Ok(Self {
            stack,
            operator_sets,
            nats_store,
        })
    }

    pub fn node(&self) -> &KubeNode {
        match &self.stack.api {
            Cluster::Node(n) => n,
            _ => unreachable!("an in-cluster stack runs on a node"),
        }
    }
}
