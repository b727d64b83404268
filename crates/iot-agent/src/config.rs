//! Command line and environment configuration. Every flag is also an env variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use harmony_reconciler_contracts::Id;
use iot_kv::{Anonymous, CredentialSource, CredsFile, TokenAuth, UserPassword};

#[derive(Debug, Clone, Parser)]
#[command(name = "iot-agent", version, about = "Runs this device's desired state with podman")]
pub struct AgentConfig {
    /// This device's id: 1-64 characters of A-Z a-z 0-9 _ -.
    #[arg(long, env = "IOT_DEVICE_ID", value_parser = parse_id)]
    pub device_id: Id,

    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: Vec<String>,

    /// NATS credentials file (JWT + nkey seed).
    #[arg(long, env = "NATS_CREDS", conflicts_with_all = ["nats_token", "nats_user"])]
    pub nats_creds: Option<PathBuf>,

    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, conflicts_with = "nats_user")]
    pub nats_token: Option<String>,

    /// NATS user name (with --nats-password).
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,

    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

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

    /// Log as JSON lines instead of text.
    #[arg(long, env = "IOT_LOG_JSON")]
    pub log_json: bool,
}

fn parse_id(s: &str) -> Result<Id, String> {
    Id::new(s).map_err(|e| e.to_string())
}

impl AgentConfig {
    /// The credential source the flags select. No flags means no credentials, which
    /// only a NATS server without auth accepts; there are no built-in defaults.
    pub fn credentials(&self) -> Box<dyn CredentialSource> {
        if let Some(path) = &self.nats_creds {
            Box::new(CredsFile(path.clone()))
        } else if let Some(token) = &self.nats_token {
            Box::new(TokenAuth(token.clone()))
        } else if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            Box::new(UserPassword {
                user: user.clone(),
                password: password.clone(),
            })
        } else {
            Box::new(Anonymous)
        }
    }
}
