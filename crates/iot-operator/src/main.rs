use std::time::Duration;

use clap::{Parser, Subcommand};
use iot_kv::NatsArgs;
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
    /// Serve /metrics (Prometheus), /healthz and /readyz here; "off" to disable.
    #[arg(long, env = "IOT_HTTP_ADDR", default_value = "0.0.0.0:8080", value_parser = parse_addr)]
    http_addr: HttpAddr,
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
                nats_url: args.nats.nats_url.clone(),
                nats_ping_interval: args.nats.nats_ping_interval,
                resync: args.resync,
                status_min_interval: args.status_min_interval,
                aggregator: iot_operator::aggregator::AggregatorConfig {
                    stale_after: args.stale_after,
                    ..Default::default()
                },
                http_addr: args.http_addr.0,
            };
            iot_operator::run::run(client, args.nats.credentials()?, opts, shutdown_signal()).await
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => if let Err(e) = r { tracing::warn!(error = %e, "ctrl-c handler failed") },
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "ctrl-c handler failed");
            }
        }
    }
}

async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach a Kubernetes API server (set KUBECONFIG or run in a cluster): {e}"))
}
