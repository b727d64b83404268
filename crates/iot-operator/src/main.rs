use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use iot_kv::{Anonymous, CredentialSource, CredsFile, TokenAuth, UserPassword};
use tracing_subscriber::EnvFilter;

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
    /// Apply the Deployment CRD (from typed Rust) and wait until it is Established.
    Install {
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print the CRD as YAML (for the Helm chart).
    Crd,
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: Vec<String>,
    #[arg(long, env = "NATS_CREDS", conflicts_with_all = ["nats_token", "nats_user"])]
    nats_creds: Option<PathBuf>,
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, conflicts_with = "nats_user")]
    nats_token: Option<String>,
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    nats_user: Option<String>,
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Re-check every resource this often even without changes.
    #[arg(long, env = "IOT_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// At most one status write per resource per this interval.
    #[arg(long, env = "IOT_STATUS_MIN_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    status_min_interval: Duration,
    /// A device whose last heartbeat is older than this counts as unreported
    /// (default: 3x the agents' default 10 s heartbeat).
    #[arg(long, env = "IOT_STALE_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    stale_after: Duration,
}

impl RunArgs {
    fn credentials(&self) -> Box<dyn CredentialSource> {
        if let Some(p) = &self.nats_creds {
            Box::new(CredsFile(p.clone()))
        } else if let Some(t) = &self.nats_token {
            Box::new(TokenAuth(t.clone()))
        } else if let (Some(u), Some(p)) = (&self.nats_user, &self.nats_password) {
            Box::new(UserPassword {
                user: u.clone(),
                password: p.clone(),
            })
        } else {
            Box::new(Anonymous)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    match cli.cmd {
        Cmd::Crd => {
            print!("{}", iot_operator::install::crd_yaml()?);
            Ok(())
        }
        Cmd::Install { timeout } => {
            let client = kube_client().await?;
            iot_operator::install::install_crd(client, timeout).await
        }
        Cmd::Run(args) => {
            let client = kube_client().await?;
            let opts = iot_operator::run::RunOptions {
                nats_url: args.nats_url.clone(),
                resync: args.resync,
                status_min_interval: args.status_min_interval,
                aggregator: iot_operator::aggregator::AggregatorConfig {
                    stale_after: args.stale_after,
                    ..Default::default()
                },
            };
            iot_operator::run::run(client, args.credentials(), opts).await
        }
    }
}

async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach a Kubernetes API server (set KUBECONFIG or run in a cluster): {e}"))
}
