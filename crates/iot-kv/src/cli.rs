//! NATS connection flags shared by every binary (agent, operator, CLI), so flag and
//! environment names, and the rule for picking credentials, are defined once.

use std::path::PathBuf;

use crate::connect::{Anonymous, CredentialSource, CredsFile, TokenAuth, UserPassword};

#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
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

    /// Ping the server this often; a link that stops answering is dropped after two
    /// to three intervals and reconnected.
    #[arg(long, env = "NATS_PING_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub nats_ping_interval: std::time::Duration,
}

impl NatsArgs {
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
