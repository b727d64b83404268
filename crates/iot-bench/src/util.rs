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
    servers: Servers,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    _operator: Operator,
    pub operator_pid: u32,
    pub kube: kube::Client,
}

impl ControlPlane {
    pub fn kubeconfig(&self) -> PathBuf {
        self.servers.api.kubeconfig()
    }

    /// The operator's log file (its stderr), inside the API server's directory.
    pub fn operator_log(&self) -> PathBuf {
        self.servers.api.dir().join("operator.log")
    }

    /// Points a platform binary at this control plane's NATS (URL and CA).
    pub fn configure_client(&self, cmd: &mut std::process::Command) {
        self.servers.nats.configure_client(cmd);
    }
}

pub async fn control_plane() -> anyhow::Result<ControlPlane> {
    control_plane_with(&[]).await
}

/// [`control_plane`] with more environment variables for the operator (e.g.
/// `RUST_LOG`, which overrides `$IOT_BENCH_OPERATOR_LOG`).
pub async fn control_plane_with(env: &[(&str, String)]) -> anyhow::Result<ControlPlane> {
    let servers = Servers::start().await?;
    let mut all = vec![("IOT_STALE_AFTER", "30s".to_owned())];
    all.extend(env.iter().map(|(k, v)| (*k, v.clone())));
    let operator = servers.operator(&all)?;
    Ok(ControlPlane {
        client: servers.client.clone(),
        js: servers.js.clone(),
        operator_pid: operator.pid,
        kube: servers.kube.clone(),
        _operator: operator,
        servers,
    })
}

/// The API server (every CRD installed with `iot-operator install`) and nats-server
/// (the buckets created), without an operator: a benchmark that fills the API
/// server first starts the operator itself, with [`Servers::operator`].
pub struct Servers {
    pub api: iot_testkit::ApiServer,
    pub nats: iot_testkit::NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub kube: kube::Client,
}

impl Servers {
    pub async fn start() -> anyhow::Result<Self> {
        use std::process::{Command, Stdio};
        let api = iot_testkit::ApiServer::start().await?;
        let nats = iot_testkit::NatsServer::start().await?;
        let conn = iot_nats::connect(&[nats.url()], &iot_nats::Anonymous, "bench", nats.ca_file()).await?;
        let js = jetstream::new(conn.client.clone());
        iot_nats::buckets::ensure_buckets(&js).await?;
        let out = Command::new(sibling_binary("iot-operator")?)
            .env("KUBECONFIG", api.kubeconfig())
            .arg("install")
            .stderr(Stdio::null())
            .output()?;
        anyhow::ensure!(out.status.success(), "iot-operator install failed");
        let kube = api.kube_client().await?;
        Ok(Self {
            api,
            nats,
            client: conn.client,
            js,
            kube,
        })
    }

    /// Starts the release operator (`RUST_LOG=warn`, or `$IOT_BENCH_OPERATOR_LOG`)
    /// with these environment variables on top, serving `/metrics` on a free
    /// loopback port. Its log is `operator.log` in the API server's directory.
    pub fn operator(&self, env: &[(&str, String)]) -> anyhow::Result<Operator> {
        let http = iot_testkit::free_port()?;
        let mut cmd = std::process::Command::new(sibling_binary("iot-operator")?);
        self.nats.configure_client(&mut cmd);
        cmd.env("KUBECONFIG", self.api.kubeconfig())
            .env(
                "RUST_LOG",
                std::env::var("IOT_BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("IOT_HTTP_ADDR", format!("127.0.0.1:{http}"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.arg("run");
        let process = iot_testkit::LoggedProcess::spawn("iot-operator", cmd, self.api.dir().join("operator.log"))?;
        let pid = process.pid().ok_or_else(|| anyhow::anyhow!("no operator pid"))?;
        Ok(Operator {
            _process: process,
            pid,
            http,
        })
    }

    /// The API server's and etcd's process ids (children of this process).
    pub fn apiserver_pids(&self) -> Vec<u32> {
        children_named(&["iot-apiserver", "etcd"])
    }
}

/// The release operator, killed on drop.
pub struct Operator {
    _process: iot_testkit::LoggedProcess,
    pub pid: u32,
    pub http: u16,
}

impl Operator {
    /// Its `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        iot_testkit::http::get_text("127.0.0.1", self.http, "/metrics").await
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        while iot_testkit::http::get_status("127.0.0.1", self.http, "/readyz")
            .await
            .ok()
            != Some(200)
        {
            anyhow::ensure!(
                start.elapsed() < timeout,
                "the operator was not ready within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

/// Sum of the samples of metric `name` (Prometheus text) whose labels include every
/// `key="value"` pair of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, set) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\"").as_str()));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Process ids of this process's children whose command name is one of `names`.
pub fn children_named(names: &[&str]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
            ppid == Some(me) && names.contains(&comm)
        })
        .collect()
}

/// CPU time of several processes together, in clock ticks.
pub fn cpu_ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p).ok()).sum()
}

/// Clock ticks per second (USER_HZ; 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

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
