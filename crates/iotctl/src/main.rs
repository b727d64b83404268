//! `iotctl`: the fleet from a terminal. Reads NATS KV (desired state, device status)
//! and writes nothing there, creating no JetStream consumer (every listing is a
//! batched direct get). Manages identities in OpenBao: device and service enrollment
//! and revocation ([`bao_admin`]). In Kubernetes it reads Deployments, keeps the
//! `Device` objects of the devices it enrolls and revokes ([`registry`]), and writes
//! an earlier revision's score back into a Deployment; shows and steers a
//! Deployment's progressive rollout with ordinary edits ([`rollout`]).
//! Output goes through [`out`], so `iotctl ... | head` ends quietly.

mod bao_admin;
mod k8s;
mod out;
mod provision;
mod registry;
mod rollout;
mod rollout_status;
mod sso;
mod table;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use chrono::Utc;
use clap::{Parser, Subcommand, ValueEnum};
use harmony_reconciler_contracts::*;
use iot_api::Deployment;
use iot_nats::{KvRecord, NatsArgs, last_values_for};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use registry::Registration;
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
    #[command(flatten)]
    bao: bao_admin::BaoArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Devices whose last report reached NATS longer ago than this are shown as stale.
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
    /// Every device that reported: heartbeat age, deployments and their phase,
    /// inventory; with KUBECONFIG, whether it has a Device object.
    Devices,
    /// Deployment resources with their fleet aggregate, pinned images and top errors
    /// (needs KUBECONFIG).
    Deployments {
        /// Namespace (default: all).
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Devices: enroll, revoke, list (their identities in OpenBao, needs BAO_ADDR and
    /// BAO_TOKEN; their Device objects in Kubernetes, KUBECONFIG); provision a seed
    /// for first boot (offline).
    Device {
        #[command(subcommand)]
        cmd: bao_admin::DeviceCmd,
    },
    /// A Deployment's revisions and progressive rollout: status, pause, resume,
    /// promote, abort, history, undo (needs KUBECONFIG).
    Rollout {
        #[command(subcommand)]
        cmd: rollout::RolloutCmd,
    },
    /// Platform service identities in OpenBao (the operator, the auth callout).
    Service {
        #[command(subcommand)]
        cmd: bao_admin::ServiceCmd,
    },
    /// OpenBao itself.
    Bao {
        #[command(subcommand)]
        cmd: bao_admin::BaoCmd,
    },
    /// Log in to the fleet's OpenID provider (browser with PKCE, or --device-code);
    /// --print-kubeconfig writes a kubeconfig that uses `iotctl credential`.
    Login(Box<sso::LoginArgs>),
    /// Forget the cached login and revoke its refresh token.
    Logout(sso::IssuerArgs),
    /// kubectl exec credential plugin: prints an ExecCredential with a fresh ID token.
    Credential(sso::IssuerArgs),
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
    async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let urls = self.nats.nats_url.join(",");
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            iot_nats::connect_with(
                &self.nats.nats_url,
                self.nats.credentials()?.as_ref(),
                &self.nats.client_options("iotctl"),
            ),
        )
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach NATS at {urls} (timed out); set --nats-url or NATS_URL"))?
        .with_context(|| format!("cannot reach NATS at {urls}; set --nats-url or NATS_URL"))?;
        Ok(conn.client)
    }

    async fn store(&self, bucket: &str) -> anyhow::Result<kv::Store> {
        let urls = self.nats.nats_url.join(",");
        jetstream::new(self.client().await?)
            .get_key_value(bucket)
            .await
            .with_context(|| format!("KV bucket {bucket:?} not found at {urls}; is the operator running?"))
    }

    /// The latest record of every key matching `filter`, without a consumer.
    async fn records(&self, bucket: &str, filter: &str) -> anyhow::Result<Vec<KvRecord>> {
        let client = self.client().await?;
        let mut records = last_values_for(&client, bucket, filter, Duration::from_secs(10))
            .await
            .with_context(|| format!("reading {bucket}"))?;
        records.retain(|r| r.value.is_some());
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(records)
    }
}

/// An error as iotctl prints it: the top message plus the root cause (the middle
/// of the chain only repeats).
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let top = e.to_string();
    let root = e.root_cause().to_string();
    if top.contains(&root) {
        top
    } else {
        format!("{top}: {root}")
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    out::line(&serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn kv_cmd(cli: &Cli, cmd: &KvCmd) -> anyhow::Result<()> {
    match cmd {
        KvCmd::Ls { bucket, device } => {
            let filter = match (device, bucket) {
                (None, _) => ">".to_owned(),
                (Some(d), BucketArg::Desired) => format!("{}.>", Id::new(d.as_str())?),
                (Some(d), BucketArg::Status) => agent_status_key(&Id::new(d.as_str())?),
            };
            let keys: Vec<String> = cli
                .records(bucket.name(), &filter)
                .await?
                .into_iter()
                .map(|r| r.key)
                .collect();
            match cli.output {
                Output::Json => print_json(&keys),
                Output::Table => {
                    for k in keys {
                        out::line(&k);
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
                    out::line(&String::from_utf8_lossy(&value));
                    Ok(())
                }
            }
        }
    }
}

async fn devices(cli: &Cli) -> anyhow::Result<()> {
    let mut statuses = Vec::new();
    for r in cli.records(AGENT_STATUS_BUCKET, ">").await? {
        let bytes = r.value.unwrap_or_default();
        match serde_json::from_slice::<AgentStatus>(&bytes) {
            Ok(s) => statuses.push((s, r.stored_at)),
            Err(e) => out::warn(&format!("warning: {}: undecodable status: {e}", r.key)),
        }
    }
    // Whether each has a Device object; left out when Kubernetes is not at hand.
    let registry = registry::optional_all().await;
    let registration = |id: &Id| registry.as_ref().map(|r| Registration::of(r, id.as_str()));
    if cli.output == Output::Json {
        // Each status as the device wrote it, plus when NATS received it (and, with
        // Kubernetes, `registration`).
        let items: Vec<serde_json::Value> = statuses
            .iter()
            .map(|(s, at)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("received_at".into(), serde_json::json!(at));
                    if let Some(r) = registration(&s.device_id) {
                        obj.insert("registration".into(), serde_json::json!(r));
                    }
                }
                v
            })
            .collect();
        return print_json(&items);
    }
    let now = Utc::now();
    let mut header = vec!["DEVICE", "REPORTED", "STATE"];
    if registry.is_some() {
        header.push("REGISTRATION");
    }
    header.extend(["RUNTIME", "DEPLOYMENTS", "ARCH", "CPUS", "MEM", "OS", "AGENT"]);
    let mut t = Table::new(&header);
    for (s, received) in statuses {
        // Judged by when NATS received the report: a device's clock may be wrong.
        let secs = received.map(|at| (now - at).num_seconds());
        let state = match secs {
            Some(secs) if secs <= cli.stale_after.as_secs() as i64 => "fresh",
            Some(_) => "stale",
            None => "unknown",
        };
        let deps = if s.deployments.is_empty() {
            "-".to_owned()
        } else {
            s.deployments
                .iter()
                .map(|(d, p)| match table::pull_text(p, now) {
                    Some(pull) => format!("{d}={:?} ({pull})", p.phase),
                    None => format!("{d}={:?}", p.phase),
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let inv = s.inventory.unwrap_or_default();
        let mut row = vec![
            s.device_id.to_string(),
            secs.map(|s| format!("{} ago", age(s))).unwrap_or_else(|| "-".into()),
            state.into(),
        ];
        if let Some(r) = registration(&s.device_id) {
            row.push(r.as_str().into());
        }
        row.extend([
            format!("{:?}", s.runtime.state),
            deps,
            if inv.arch.is_empty() { "-".into() } else { inv.arch },
            inv.cpu_cores.to_string(),
            bytes_gib(inv.memory_bytes),
            if inv.os.is_empty() { "-".into() } else { inv.os },
            s.agent_version,
        ]);
        t.row(row);
    }
    out::text(&t.render());
    Ok(())
}

async fn deployments(cli: &Cli, namespace: Option<&str>) -> anyhow::Result<()> {
    let client = k8s::client().await?;
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
                    "targetDevices": d.spec.target_devices,
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
        "IMAGES",
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
        let images = table::pinned_images(&status.images, true);
        let images = if images.is_empty() {
            "-".to_owned()
        } else {
            images.join(",")
        };
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
            images,
            top,
        ]);
    }
    out::text(&t.render());
    Ok(())
}

#[tokio::main]
async fn main() {
    let mut cli = Cli::parse();
    cli.bao.ca_file = cli.nats.bao_ca_file.clone();
    cli.bao.insecure = cli.nats.nats_insecure;
    let result = match &cli.cmd {
        Cmd::Kv { cmd } => kv_cmd(&cli, cmd).await,
        Cmd::Devices => devices(&cli).await,
        Cmd::Deployments { namespace } => deployments(&cli, namespace.as_deref()).await,
        Cmd::Device { cmd } => bao_admin::device(&cli.bao, &cli.nats, cmd, cli.output == Output::Json).await,
        Cmd::Rollout { cmd } => rollout::rollout(cmd, cli.output == Output::Json).await,
        Cmd::Service { cmd } => bao_admin::service(&cli.bao, cmd).await,
        Cmd::Bao { cmd } => bao_admin::bao_cmd(&cli.bao, cmd).await,
        Cmd::Login(args) => sso::login(args).await,
        Cmd::Logout(args) => sso::logout(args).await,
        Cmd::Credential(args) => sso::credential(args).await,
    };
    if let Err(e) = result {
        out::warn(&format!("iotctl: {}", error_line(&e)));
        std::process::exit(1);
    }
}
