//! `iotctl`: the fleet from a terminal. Reads NATS KV (desired state, device status)
//! and the Kubernetes API (Deployments); writes nothing.

mod table;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use chrono::Utc;
use clap::{Parser, Subcommand, ValueEnum};
use futures::TryStreamExt;
use harmony_reconciler_contracts::*;
use iot_api::Deployment;
use iot_kv::NatsArgs;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use table::{Table, age, bytes_gib};

#[derive(Parser)]
#[command(
    name = "iotctl",
    version,
    about = "Inspect the IoT fleet: KV state, devices, deployments"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Heartbeats older than this are shown as stale.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    stale_after: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Raw KV access.
    Kv {
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// Every device that reported: heartbeat age, deployments and their phase, inventory.
    Devices,
    /// Deployment resources with their fleet aggregate and top errors (needs KUBECONFIG).
    Deployments {
        /// Namespace (default: all).
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BucketArg {
    /// desired-state: what the operator asks each device to run.
    Desired,
    /// agent-status: what each device reports.
    Status,
}

impl BucketArg {
    fn name(self) -> &'static str {
        match self {
            BucketArg::Desired => DESIRED_STATE_BUCKET,
            BucketArg::Status => AGENT_STATUS_BUCKET,
        }
    }
}

#[derive(Subcommand)]
enum KvCmd {
    /// List keys.
    Ls {
        #[arg(value_enum)]
        bucket: BucketArg,
        /// Only keys of this device.
        #[arg(long)]
        device: Option<String>,
    },
    /// Print one value. desired: DEVICE NAMESPACE/NAME (or the raw key); status: DEVICE.
    Get {
        #[arg(value_enum)]
        bucket: BucketArg,
        /// Device id (or a raw key).
        target: String,
        /// For desired: the deployment as NAMESPACE/NAME.
        deployment: Option<String>,
    },
}

impl Cli {
    async fn store(&self, bucket: &str) -> anyhow::Result<kv::Store> {
        let urls = self.nats.nats_url.join(",");
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            iot_kv::connect(&self.nats.nats_url, self.nats.credentials().as_ref(), "iotctl", true),
        )
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach NATS at {urls} (timed out); set --nats-url or NATS_URL"))?
        .with_context(|| format!("cannot reach NATS at {urls}; set --nats-url or NATS_URL"))?;
        jetstream::new(conn.client)
            .get_key_value(bucket)
            .await
            .with_context(|| format!("KV bucket {bucket:?} not found at {urls}; is the operator running?"))
    }
}

async fn keys(store: &kv::Store) -> anyhow::Result<Vec<String>> {
    let mut keys: Vec<String> = match store.keys().await {
        Ok(k) => k.try_collect().await?,
        // An empty bucket has nothing to list.
        Err(e) if e.to_string().contains("no keys") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    keys.sort();
    Ok(keys)
}

/// The current value of every key, streamed by one history watch instead of one
/// request per key (which would be thousands of round trips on a large fleet).
async fn latest_values(store: &kv::Store) -> anyhow::Result<Vec<(String, bytes::Bytes)>> {
    use futures::StreamExt;
    if store.status().await?.values() == 0 {
        return Ok(Vec::new());
    }
    let mut watch = store.watch_with_history(">").await?;
    let mut out = Vec::new();
    while let Some(entry) = watch.next().await {
        let entry = entry?;
        if entry.operation == kv::Operation::Put {
            out.push((entry.key, entry.value));
        }
        if entry.delta == 0 {
            break;
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn kv_cmd(cli: &Cli, cmd: &KvCmd) -> anyhow::Result<()> {
    match cmd {
        KvCmd::Ls { bucket, device } => {
            let store = cli.store(bucket.name()).await?;
            let all = keys(&store).await?;
            let keys: Vec<String> = all
                .into_iter()
                .filter(|k| match (device, bucket) {
                    (None, _) => true,
                    (Some(d), BucketArg::Desired) => k.starts_with(&format!("{d}.")),
                    (Some(d), BucketArg::Status) => k == &format!("status.{d}"),
                })
                .collect();
            match cli.output {
                Output::Json => print_json(&keys),
                Output::Table => {
                    for k in keys {
                        println!("{k}");
                    }
                    Ok(())
                }
            }
        }
        KvCmd::Get {
            bucket,
            target,
            deployment,
        } => {
            let key = match (bucket, deployment) {
                (BucketArg::Desired, Some(d)) => {
                    let dep: DeploymentRef = d.parse().context("deployment must be NAMESPACE/NAME")?;
                    desired_state_key(&Id::new(target.as_str())?, &dep)
                }
                (BucketArg::Status, None) if !target.starts_with("status.") => {
                    agent_status_key(&Id::new(target.as_str())?)
                }
                _ => target.clone(),
            };
            let store = cli.store(bucket.name()).await?;
            let value = store
                .get(&key)
                .await?
                .with_context(|| format!("no value for key {key:?} in {}", bucket.name()))?;
            // Values are JSON; pretty-print them whatever the output mode, raw if not JSON.
            match serde_json::from_slice::<serde_json::Value>(&value) {
                Ok(v) => print_json(&v),
                Err(_) => {
                    println!("{}", String::from_utf8_lossy(&value));
                    Ok(())
                }
            }
        }
    }
}

async fn devices(cli: &Cli) -> anyhow::Result<()> {
    let store = cli.store(AGENT_STATUS_BUCKET).await?;
    let mut statuses = Vec::new();
    for (key, bytes) in latest_values(&store).await? {
        match serde_json::from_slice::<AgentStatus>(&bytes) {
            Ok(s) => statuses.push(s),
            Err(e) => eprintln!("warning: {key}: undecodable status: {e}"),
        }
    }
    if cli.output == Output::Json {
        return print_json(&statuses);
    }
    let now = Utc::now();
    let mut t = Table::new(&[
        "DEVICE",
        "HEARTBEAT",
        "STATE",
        "DEPLOYMENTS",
        "ARCH",
        "CPUS",
        "MEM",
        "OS",
        "AGENT",
    ]);
    for s in statuses {
        let secs = (now - s.heartbeat_at).num_seconds();
        let state = if secs > cli.stale_after.as_secs() as i64 {
            "stale"
        } else {
            "fresh"
        };
        let deps = if s.deployments.is_empty() {
            "-".to_owned()
        } else {
            s.deployments
                .iter()
                .map(|(d, p)| format!("{d}={:?}", p.phase))
                .collect::<Vec<_>>()
                .join(",")
        };
        let inv = s.inventory.unwrap_or_default();
        t.row(vec![
            s.device_id.to_string(),
            format!("{} ago", age(secs)),
            state.into(),
            deps,
            if inv.arch.is_empty() { "-".into() } else { inv.arch },
            inv.cpu_cores.to_string(),
            bytes_gib(inv.memory_bytes),
            if inv.os.is_empty() { "-".into() } else { inv.os },
            s.agent_version,
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

async fn deployments(cli: &Cli, namespace: Option<&str>) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot reach a Kubernetes API server (set KUBECONFIG)")?;
    let api: Api<Deployment> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let list = api.list(&ListParams::default()).await.map_err(|e| match e {
        kube::Error::Api(ae) if ae.code == 404 => {
            anyhow::anyhow!("the Deployment CRD is not installed (run `iot-operator install`)")
        }
        other => anyhow::anyhow!("cannot list deployments: {other}"),
    })?;
    if cli.output == Output::Json {
        let items: Vec<serde_json::Value> = list
            .items
            .iter()
            .map(|d| {
                serde_json::json!({
                    "namespace": d.namespace(),
                    "name": d.name_any(),
                    "target_devices": d.spec.target_devices,
                    "status": d.status,
                })
            })
            .collect();
        return print_json(&items);
    }
    let mut t = Table::new(&[
        "NAMESPACE",
        "NAME",
        "TARGETS",
        "SUCCEEDED",
        "FAILED",
        "PENDING",
        "UNREPORTED",
        "READY",
        "TOP ERROR",
    ]);
    for d in &list.items {
        let status = d.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.clone())
            .unwrap_or_else(|| "-".into());
        let agg = status.aggregate.unwrap_or_default();
        let top = agg
            .top_errors
            .first()
            .map(|g| format!("{} device(s): {}", g.devices, g.message))
            .unwrap_or_else(|| "-".into());
        t.row(vec![
            d.namespace().unwrap_or_default(),
            d.name_any(),
            d.spec.target_devices.len().to_string(),
            agg.succeeded.to_string(),
            agg.failed.to_string(),
            agg.pending.to_string(),
            agg.unreported.to_string(),
            ready,
            top,
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Kv { cmd } => kv_cmd(&cli, cmd).await,
        Cmd::Devices => devices(&cli).await,
        Cmd::Deployments { namespace } => deployments(&cli, namespace.as_deref()).await,
    };
    if let Err(e) = result {
        // The top message plus the root cause; the middle of the chain only repeats.
        let top = e.to_string();
        let root = e.root_cause().to_string();
        if top.contains(&root) {
            eprintln!("iotctl: {top}");
        } else {
            eprintln!("iotctl: {top}: {root}");
        }
        std::process::exit(1);
    }
}
