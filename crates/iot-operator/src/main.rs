use std::time::Duration;

use clap::{Parser, Subcommand};
use iot_nats::NatsArgs;
use iot_observe::process::{init_logging, shutdown_signal};

#[derive(Parser)]
#[command(
    name = "iot-operator",
    version,
    about = "IoT fleet operator for iot.nationtech.io Deployments"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, env = "IOT_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply the CRDs (Deployment, Device, DeploymentRevision; from typed Rust) and wait until they are Established.
    Install {
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print the CRDs as YAML.
    Crd {
        /// Print the Helm chart's templates/crd.yaml instead.
        #[arg(long)]
        helm_template: bool,
    },
    /// Run the controller.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Re-check every resource this often even without changes.
    #[arg(long, env = "IOT_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// At most one status write per resource per this interval.
    #[arg(long, env = "IOT_STATUS_MIN_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    status_min_interval: Duration,
    /// A device whose last report reached NATS longer ago than this counts as
    /// unreported (default: 3x the agents' default 10 s heartbeat).
    #[arg(long, env = "IOT_STALE_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    /// A Device's `status.lastSeenAt` alone is written at most this often (other
    /// status changes are written at once). 15 minutes keeps an idle fleet of 10,000
    /// devices at about 11 writes per second.
    #[arg(long, env = "IOT_DEVICE_LAST_SEEN_EVERY", default_value = "15m", value_parser = humantime::parse_duration)]
    device_last_seen_every: Duration,
    /// An unfinished progressive rollout is stepped this often: its gates are
    /// checked, and its next devices dispatched, at this resolution.
    #[arg(long, env = "IOT_ROLLOUT_TICK", default_value = "1s", value_parser = humantime::parse_duration)]
    rollout_tick: Duration,
    /// Replicas of each KV bucket: 3 on a JetStream cluster of three or more servers
    /// (tolerates the loss of one), 1 on a single server. Buckets that exist with
    /// another count are moved to this one, online.
    #[arg(long, env = "IOT_KV_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    kv_replicas: u8,
    /// Serve /metrics (Prometheus), /healthz and /readyz here; "off" to disable.
    #[arg(long, env = "IOT_HTTP_ADDR", default_value = "0.0.0.0:8080", value_parser = parse_addr)]
    http_addr: HttpAddr,
    /// The operator's name on NATS when it connects without an enrollment (with
    /// one, the enrollment's name): its replies come to `_SVC_INBOX.operator.<name>`,
    /// the only inbox its permissions allow.
    #[arg(long, env = "IOT_NATS_SERVICE_NAME", default_value = "operator")]
    nats_service_name: String,
    #[command(flatten)]
    leader: LeaderArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// The platform's private registry (README "Images and registries"): devices get
/// short-lived pull grants for the repositories their deployments name.
#[derive(clap::Args)]
struct RegistryArgs {
    /// Registries (`host:port`, as image names spell them) whose tokens the signing
    /// key below signs. Images elsewhere are pulled as before, without a grant.
    #[arg(long = "registry", env = "IOT_REGISTRIES", value_delimiter = ',')]
    registries: Vec<String>,
    /// The P-256 key (PKCS#8 PEM) whose certificate is in the registry's
    /// `auth.token.rootcertbundle`. Required with --registry.
    #[arg(long, env = "IOT_REGISTRY_SIGNING_KEY")]
    registry_signing_key: Option<std::path::PathBuf>,
    /// The registry's `auth.token.issuer`.
    #[arg(long, env = "IOT_REGISTRY_ISSUER", default_value = "iot-registry-token")]
    registry_issuer: String,
    /// The registry's `auth.token.service`.
    #[arg(long, env = "IOT_REGISTRY_SERVICE", default_value = "iot-registry")]
    registry_service: String,
    /// PEM file of the CA that signed the registries' TLS certificates (the
    /// system's roots without it), for resolving tags to digests.
    #[arg(long, env = "IOT_REGISTRY_CA_FILE")]
    registry_ca_file: Option<std::path::PathBuf>,
}

type Signer = std::sync::Arc<iot_operator::device_services::registry_grant::GrantSigner>;

impl RegistryArgs {
    /// The grant signer and the tag resolver, both from the one signing key.
    fn parts(&self) -> anyhow::Result<(Option<Signer>, iot_operator::images::SharedPinner)> {
        let path = match (&self.registry_signing_key, self.registries.is_empty()) {
            (None, true) => return Ok((None, None)),
            (None, false) => anyhow::bail!("--registry needs --registry-signing-key (IOT_REGISTRY_SIGNING_KEY)"),
            (Some(_), true) => anyhow::bail!("--registry-signing-key needs --registry: which registries it signs for"),
            (Some(path), false) => path,
        };
        let registries: std::collections::BTreeSet<String> = self.registries.iter().cloned().collect();
        let signer = iot_operator::device_services::registry_grant::GrantSigner {
            key: iot_registry::SigningKey::from_pem_file(path)?,
            issuer: self.registry_issuer.clone(),
            service: self.registry_service.clone(),
            registries: registries.clone(),
        };
        let ca = match &self.registry_ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?),
            None => None,
        };
        let resolver = iot_registry::resolve::Resolver::new(
            ca.as_deref(),
            std::sync::Arc::new(iot_registry::SigningKey::from_pem_file(path)?),
            &self.registry_issuer,
            &self.registry_service,
        )?;
        let pinner = iot_operator::images::ImagePinner::new(resolver, registries);
        Ok((Some(std::sync::Arc::new(signer)), Some(std::sync::Arc::new(pinner))))
    }
}

/// Leader election on a coordination.k8s.io Lease: needed whenever more than one
/// replica can run at once (`replicas: 2`, or the overlap of a rolling update).
#[derive(clap::Args)]
struct LeaderArgs {
    /// Write nothing until this replica holds the leader Lease.
    #[arg(long, env = "IOT_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the Lease (in a pod: its own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_namespace: String,
    #[arg(long, env = "IOT_LEADER_LEASE", default_value = "iot-operator")]
    leader_lease: String,
    /// This replica's name in the Lease (in a pod: the pod name); default: host name
    /// and process id, so two replicas on one host never share it.
    #[arg(long, env = "POD_NAME")]
    leader_identity: Option<String>,
    /// A leader that has not renewed for this long is replaced.
    #[arg(long, env = "IOT_LEADER_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    leader_lease_duration: Duration,
    /// Renew this long before the lease would expire.
    #[arg(long, env = "IOT_LEADER_RENEW_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    leader_renew_grace: Duration,
}

impl LeaderArgs {
    fn election(&self) -> anyhow::Result<Option<iot_operator::leader::LeaderElection>> {
        if !self.leader_elect {
            return Ok(None);
        }
        let identity = match &self.leader_identity {
            Some(id) => id.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| format!("{}-{}", h.trim(), std::process::id()))
                .map_err(|e| anyhow::anyhow!("no --leader-identity and cannot read the host name: {e}"))?,
        };
        let election = iot_operator::leader::LeaderElection {
            namespace: self.leader_namespace.clone(),
            lease_name: self.leader_lease.clone(),
            identity,
            duration: self.leader_lease_duration,
            grace: self.leader_renew_grace,
        };
        election
            .validate()
            .map_err(|e| anyhow::anyhow!("leader election: {e}"))?;
        Ok(Some(election))
    }
}

/// An address, or `off`.
#[derive(Debug, Clone, Copy)]
struct HttpAddr(Option<std::net::SocketAddr>);

fn parse_addr(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (expected HOST:PORT or off)"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json, "info");
    match cli.cmd {
        Cmd::Crd { helm_template } => {
            if helm_template {
                print!("{}", iot_operator::install::crd_helm_template()?);
            } else {
                print!("{}", iot_operator::install::crd_yaml()?);
            }
            Ok(())
        }
        Cmd::Install { timeout } => {
            let client = kube_client().await?;
            iot_operator::install::install_crd(client, timeout).await
        }
        Cmd::Run(args) => {
            let leader_election = args.leader.election()?;
            let (registry, pinner) = args.registry.parts()?;
            let client = kube_client().await?;
            let opts = iot_operator::daemon::RunOptions {
                nats_url: args.nats.nats_url.clone(),
                nats: args.nats.client_options("iot-operator").background().inbox_prefix(
                    harmony_reconciler_contracts::read::service_inbox_prefix(
                        harmony_reconciler_contracts::read::ServiceRole::Operator,
                        &harmony_reconciler_contracts::Id::new(
                            args.nats
                                .enrolled_name(iot_bao::enroll::Role::Operator)?
                                .unwrap_or_else(|| args.nats_service_name.clone()),
                        )
                        .map_err(|e| anyhow::anyhow!("the operator's NATS name: {e}"))?,
                    ),
                ),
                resync: args.resync,
                status_min_interval: args.status_min_interval,
                aggregator: iot_operator::status_aggregator::AggregatorConfig {
                    stale_after: args.stale_after,
                    ..Default::default()
                },
                device_status: iot_operator::device_status::DeviceStatusConfig {
                    stale_after: args.stale_after,
                    last_seen_every: args.device_last_seen_every,
                },
                rollout_tick: args.rollout_tick,
                kv_replicas: usize::from(args.kv_replicas),
                http_addr: args.http_addr.0,
                leader_election,
                registry,
                pinner,
            };
            iot_operator::daemon::run(client, args.nats.credentials()?, opts, shutdown_signal()).await
        }
    }
}

async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach a Kubernetes API server (set KUBECONFIG or run in a cluster): {e}"))
}
