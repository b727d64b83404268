//! `iot-dashboard`: the live fleet view.
//!
//! A binary of its own, not an operator subcommand: it faces people, not the
//! fleet. It scales and restarts on its own, needs only read access (the operator
//! needs write access to KV and `.status`), and acts as the signed-in person
//! towards the API server for changes, which the operator must never do.

mod auth;
mod fleet;
mod pages;
mod rollout;
mod sealed;
mod server;
mod view;
mod writes;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use iot_nats::NatsArgs;

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
    /// OIDC issuer for signing in. With it, people can sign in and change
    /// deployments as themselves (Kubernetes RBAC decides); without it the
    /// dashboard is read-only.
    #[arg(long, env = "IOT_DASHBOARD_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// Client id at the issuer. The API server must accept its ID tokens
    /// (--oidc-client-id).
    #[arg(long, env = "IOT_DASHBOARD_OIDC_CLIENT_ID", default_value = "iot-fleet")]
    oidc_client_id: String,
    /// CA bundle for the issuer's certificate, when it is not publicly trusted.
    #[arg(long, env = "IOT_DASHBOARD_OIDC_CA_FILE")]
    oidc_ca_file: Option<std::path::PathBuf>,
    /// The dashboard's URL as browsers reach it (default: http://<listen>); the
    /// sign-in returns to <public-url>/callback, which the issuer must allow.
    #[arg(long, env = "IOT_DASHBOARD_PUBLIC_URL")]
    public_url: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "IOT_LOG_JSON")]
    log_json: bool,
    /// The name this dashboard asks the operator for the fleet's reports under,
    /// when it connects without an enrollment (with one, the enrollment's name).
    #[arg(long, env = "IOT_VIEWER_NAME", default_value = "dashboard")]
    viewer_name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    iot_observe::process::init_logging(cli.log_json, "info");
    let kube_config = kube::Config::infer()
        .await
        .context("no Kubernetes API server configured (set KUBECONFIG or run in a cluster)")?;
    let client = kube::Client::try_from(kube_config.clone()).context("cannot build a Kubernetes client")?;
    let auth = match cli.oidc_issuer.as_ref().map(|issuer| {
        let public_url = cli
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", cli.listen))
            .trim_end_matches('/')
            .to_owned();
        tracing::info!(%issuer, %public_url, "sign-in enabled: changes are made as the signed-in user");
        auth::Auth::new(auth::AuthConfig {
            issuer: iot_sso::IssuerConfig {
                issuer_url: issuer.clone(),
                client_id: cli.oidc_client_id.clone(),
                ca_file: cli.oidc_ca_file.clone(),
            },
            public_url,
            kube: kube_config,
        })
    }) {
        None => None,
        Some(made) => Some(std::sync::Arc::new(made.context("setting up sign-in")?)),
    };
    let creds = cli.nats.credentials()?;
    tracing::info!(nats = %cli.nats.nats_url.join(","), credentials = %creds.describe(), "starting iot-dashboard {}", env!("CARGO_PKG_VERSION"));
    // The name it asks the operator under: its enrollment's, so its permissions
    // (publish iot.status.read.<name>, replies on its own inbox) match.
    let viewer = harmony_reconciler_contracts::Id::new(
        cli.nats
            .enrolled_name(iot_bao::enroll::Role::Viewer)?
            .unwrap_or_else(|| cli.viewer_name.clone()),
    )
    .context("the viewer name")?;
    let conn = iot_nats::connect_with(
        &cli.nats.nats_url,
        creds.as_ref(),
        &cli.nats.client_options("iot-dashboard").background().inbox_prefix(
            harmony_reconciler_contracts::read::service_inbox_prefix(
                harmony_reconciler_contracts::read::ServiceRole::Viewer,
                &viewer,
            ),
        ),
    )
    .await
    .context("connecting to NATS")?;

    let (store, run_reflector) = fleet::deployments_reflector(client.clone());
    let (registry, run_registry) = fleet::devices_reflector(client);
    let fleet = fleet::Fleet::new(store, registry, cli.stale_after);
    tokio::spawn(run_reflector(fleet.clone()));
    tokio::spawn(run_registry(fleet.clone()));
    tokio::spawn(fleet::follow_devices(fleet.clone(), conn, viewer));
    tokio::spawn(fleet::staleness_ticker(fleet.clone()));

    let app = server::router(server::App {
        fleet,
        page_size: cli.page_size.max(1),
        auth,
    });
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(url = %format!("http://{}", listener.local_addr()?), "dashboard serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(iot_observe::process::shutdown_signal())
        .await
        .context("serving")
}
