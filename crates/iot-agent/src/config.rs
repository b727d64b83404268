//! Command line and environment configuration. Every flag is also an env variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use harmony_reconciler_contracts::Id;
use iot_nats::NatsArgs;

#[derive(Debug, Clone, Parser)]
#[command(name = "iot-agent", version, about = "Runs this device's desired state with podman")]
pub struct AgentConfig {
    /// This device's id: 1-64 characters of A-Z a-z 0-9 _ -.
    #[arg(long, env = "IOT_DEVICE_ID", value_parser = parse_id)]
    pub device_id: Id,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Podman API socket (`podman system service`).
    #[arg(long, env = "PODMAN_SOCKET", default_value = "/run/podman/podman.sock")]
    pub podman_socket: PathBuf,

    /// How often to publish status even when nothing changed.
    #[arg(long, env = "IOT_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// How often to re-read desired state and re-check containers.
    #[arg(long, env = "IOT_RESYNC_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,

    /// Grace period for a container to stop before it is killed.
    #[arg(long, env = "IOT_STOP_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,

    /// Longest an image pull may take (pulls run in the background, one per image).
    #[arg(long, env = "IOT_PULL_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub pull_timeout: Duration,

    /// How long a replacement container must stay up, without restarting, before the
    /// container it replaces is removed. 0s disables the check.
    #[arg(long, env = "IOT_UPGRADE_SETTLE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub upgrade_settle: Duration,

    /// Serve Prometheus metrics, /healthz and /readyz on this address (off by default).
    #[arg(long, env = "IOT_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "IOT_LOG_JSON")]
    pub log_json: bool,
}

fn parse_id(s: &str) -> Result<Id, String> {
    Id::new(s).map_err(|e| e.to_string())
}
