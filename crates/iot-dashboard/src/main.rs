//! `iot-dashboard`: the live fleet view.
//!
//! A binary of its own, not an operator subcommand: it faces people, not the
//! fleet. It scales and restarts on its own, needs only read access (the operator
//! needs write access to KV and `.status`), and will act as the logged-in user
//! towards the API server, which the operator must never do.

mod fleet;
mod pages;
mod server;
mod view;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use iot_kv::NatsArgs;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "iot-dashboard", version, about = "Live fleet dashboard for harmony-iot")]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Serve the dashboard here.
    #[arg(long, env = "IOT_DASHBOARD_ADDR", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// A device whose last report reached NATS longer ago than this is stale (the
    /// operator's default).
    #[arg(long, env = "IOT_STALE_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    /// Rows per page.
    #[arg(long, env = "IOT_DASHBOARD_PAGE_SIZE", default_value_t = 50)]
    page_size: usize,
    /// Log as JSON lines.
    #[arg(long, env = "IOT_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let client = kube::Client::try_default()
        .await
        .context("cannot reach a Kubernetes API server (set KUBECONFIG or run in a cluster)")?;
    let creds = cli.nats.credentials()?;
    tracing::info!(nats = %cli.nats.nats_url.join(","), credentials = %creds.describe(), "starting iot-dashboard {}", env!("CARGO_PKG_VERSION"));
    let conn = iot_kv::connect_with(
        &cli.nats.nats_url,
        creds.as_ref(),
        "iot-dashboard",
        false,
        cli.nats.nats_ping_interval,
    )
    .await
    .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(conn.client.clone());
    let status = js
        .get_key_value(harmony_reconciler_contracts::AGENT_STATUS_BUCKET)
        .await
        .context("opening the agent-status bucket (is the operator installed?)")?;

    let (store, run_reflector) = fleet::deployments_reflector(client);
    let fleet = fleet::Fleet::new(store, cli.stale_after);
    tokio::spawn(run_reflector(fleet.clone()));
    tokio::spawn(fleet::follow_devices(fleet.clone(), status));
    tokio::spawn(fleet::staleness_ticker(fleet.clone()));

    let app = server::router(server::App {
        fleet,
        page_size: cli.page_size.max(1),
    });
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(url = %format!("http://{}", listener.local_addr()?), "dashboard serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "ctrl-c handler failed");
            }
        })
        .await
        .context("serving")
}
