use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use harmony_reconciler_contracts::keys::kv_stream_name;

/// Median of a sample (sorts it).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    match samples.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2,
    }
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))
}

pub fn self_rss_kib() -> anyhow::Result<u64> {
    rss_kib(std::process::id())
}

/// JetStream consumers currently on a KV bucket's stream.
pub async fn consumer_count(js: &jetstream::Context, bucket: &str) -> anyhow::Result<usize> {
    let mut stream = js.get_stream(kv_stream_name(bucket)).await?;
    Ok(stream.info().await?.state.consumer_count)
}

/// A release binary built next to this one (target/release/<name>).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .ok_or_else(|| anyhow::anyhow!("no exe dir"))?;
    anyhow::ensure!(
        path.exists(),
        "{} not built; run `cargo build --release --workspace` first",
        path.display()
    );
    Ok(path)
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// API server with the CRD, nats-server with the buckets, and the release operator.
/// The servers are owned here so they live exactly as long as the benchmark.
pub struct ControlPlane {
    _api: iot_testkit::ApiServer,
    _nats: iot_testkit::NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    _operator: iot_testkit::LoggedProcess,
    pub operator_pid: u32,
    pub kube: kube::Client,
}

impl ControlPlane {
    pub fn kubeconfig(&self) -> PathBuf {
        self._api.kubeconfig()
    }

    /// Points a platform binary at this control plane's NATS (URL and CA).
    pub fn configure_client(&self, cmd: &mut std::process::Command) {
        self._nats.configure_client(cmd);
    }
}

pub async fn control_plane() -> anyhow::Result<ControlPlane> {
    use std::process::{Command, Stdio};
    let api = iot_testkit::ApiServer::start().await?;
    let nats = iot_testkit::NatsServer::start().await?;
    let conn = iot_nats::connect(&[nats.url()], &iot_nats::Anonymous, "bench", nats.ca_file()).await?;
    let js = jetstream::new(conn.client.clone());
    iot_nats::buckets::ensure_buckets(&js).await?;
    let operator_bin = sibling_binary("iot-operator")?;
    let out = Command::new(&operator_bin)
        .env("KUBECONFIG", api.kubeconfig())
        .arg("install")
        .stderr(Stdio::null())
        .output()?;
    anyhow::ensure!(out.status.success(), "iot-operator install failed");
    let mut cmd = Command::new(&operator_bin);
    nats.configure_client(&mut cmd);
    cmd.env("KUBECONFIG", api.kubeconfig())
        .env("RUST_LOG", "warn")
        .env("IOT_STALE_AFTER", "30s")
        .arg("run");
    let operator = iot_testkit::LoggedProcess::spawn("iot-operator", cmd, api.dir().join("operator.log"))?;
    let operator_pid = operator.pid().ok_or_else(|| anyhow::anyhow!("no operator pid"))?;
    let kube = api.kube_client().await?;
    Ok(ControlPlane {
        _api: api,
        _nats: nats,
        client: conn.client,
        js,
        _operator: operator,
        operator_pid,
        kube,
    })
}

pub use crate::follow_bench::cpu_ticks;

/// `count` Deployments (`default/app<k>`, one container each) that split `devices`
/// synthetic devices (`dev<i>`, i mod count = k); returns (device, deployment, spec
/// hash) for every device.
pub async fn spread_deployments(
    api: &kube::Api<iot_api::Deployment>,
    devices: usize,
    count: usize,
) -> anyhow::Result<
    Vec<(
        harmony_reconciler_contracts::Id,
        harmony_reconciler_contracts::DeploymentRef,
        harmony_reconciler_contracts::SpecHash,
    )>,
> {
    use harmony_reconciler_contracts::{DeploymentRef, Id, IotScore};
    use kube::api::{Patch, PatchParams};
    let mut fleet = Vec::with_capacity(devices);
    for d in 0..count {
        let score: IotScore = serde_json::from_value(
            serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": format!("localhost/app:{d}")}]}}),
        )?;
        let targets: Vec<String> = (0..devices)
            .filter(|i| i % count == d)
            .map(|i| format!("dev{i}"))
            .collect();
        let dep = DeploymentRef::new("default", format!("app{d}"))?;
        let hash = score.spec_hash();
        for t in &targets {
            fleet.push((Id::new(t.as_str())?, dep.clone(), hash.clone()));
        }
        let mut obj = iot_api::Deployment::new(
            dep.name(),
            iot_api::DeploymentSpec::for_devices(targets, iot_api::IotScore::from_wire(&score)),
        );
        obj.metadata.namespace = Some("default".into());
        api.patch(dep.name(), &PatchParams::apply("bench").force(), &Patch::Apply(&obj))
            .await?;
    }
    Ok(fleet)
}
