//! NATS connection flags shared by every binary (agent, operator, CLI), so flag and
//! environment names, and the rule for picking credentials, are defined once.

use std::path::PathBuf;

use harmony_reconciler_contracts::Id;

use crate::connect::{Anonymous, CredentialSource, CredsFile, TokenAuth, UserPassword};
use crate::identity::IdentityCredentials;

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

    /// Enrollment file (`iotctl device enroll`): log in to OpenBao with it and
    /// present a fresh identity token at every connect. The production setting.
    #[arg(long, env = "NATS_IDENTITY", conflicts_with_all = ["nats_identity_token_file", "nats_creds", "nats_token", "nats_user"])]
    pub nats_identity: Option<PathBuf>,

    /// A file holding an identity token that something else keeps fresh.
    #[arg(long, env = "NATS_IDENTITY_TOKEN_FILE", conflicts_with_all = ["nats_creds", "nats_token", "nats_user"])]
    pub nats_identity_token_file: Option<PathBuf>,

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
    pub fn credentials(&self) -> Result<Box<dyn CredentialSource>, crate::KvError> {
        self.credentials_for(None)
    }

    /// Whether the selected credentials are an identity token, which on a guarded
    /// server comes with scoped permissions (so reads go through the responder).
    pub fn uses_identity(&self) -> bool {
        self.nats_identity.is_some() || self.nats_identity_token_file.is_some()
    }

    /// As [`Self::credentials`]; `device` is who connects, for a token file (an
    /// enrollment file names its device itself).
    pub fn credentials_for(&self, device: Option<&Id>) -> Result<Box<dyn CredentialSource>, crate::KvError> {
        Ok(if let Some(path) = &self.nats_identity {
            Box::new(IdentityCredentials::from_enrollment_file(path)?)
        } else if let Some(path) = &self.nats_identity_token_file {
            Box::new(IdentityCredentials::from_token_file(path.clone(), device.cloned()))
        } else if let Some(path) = &self.nats_creds {
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
        })
    }
}
