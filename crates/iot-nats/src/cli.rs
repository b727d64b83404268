//! NATS connection flags shared by every binary (agent, operator, CLI), so flag and
//! environment names, and the rule for picking credentials, are defined once.

use std::path::PathBuf;

use harmony_reconciler_contracts::Id;

use crate::connect::{Anonymous, ClientOptions, CredentialSource, CredsFile, NatsTls, TokenAuth, UserPassword};
use crate::token_credentials::IdentityCredentials;

#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        value_delimiter = ',',
        default_value = "tls://127.0.0.1:4222"
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

    /// NATS token (development only: a shared secret; needs --dev-shared-credentials).
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, conflicts_with = "nats_user")]
    pub nats_token: Option<String>,

    /// NATS user name, with --nats-password (development only: a shared secret;
    /// needs --dev-shared-credentials).
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,

    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

    /// Allow --nats-token and --nats-user/--nats-password. Shared secrets identify
    /// nobody and cannot be revoked per device; production uses --nats-identity.
    #[arg(long, env = "NATS_DEV_SHARED_CREDENTIALS")]
    pub dev_shared_credentials: bool,

    /// Ping the server this often; a link that stops answering is dropped after two
    /// to three intervals and reconnected.
    #[arg(long, env = "NATS_PING_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub nats_ping_interval: std::time::Duration,

    /// PEM file of the CA that signed the NATS server's certificate (the
    /// platform's own CA). Only it is trusted; without it, the system's roots.
    #[arg(long, env = "NATS_CA_FILE")]
    pub nats_ca_file: Option<PathBuf>,

    /// PEM file of the CA that signed OpenBao's certificate, for --nats-identity
    /// (the system's roots without it).
    #[arg(long, env = "BAO_CACERT")]
    pub bao_ca_file: Option<PathBuf>,

    /// Talk to NATS without TLS when the URL is nats://, and to OpenBao over
    /// http://. For debugging only: the identity token, password or enrollment
    /// secret then crosses the network in the clear, and anyone on the path can
    /// replay it. Without it every connection must be TLS.
    #[arg(long, env = "NATS_INSECURE")]
    pub nats_insecure: bool,
}

impl NatsArgs {
    /// How `name` connects: TLS verified against --nats-ca-file, and required unless
    /// --nats-insecure.
    pub fn client_options(&self, name: &str) -> ClientOptions {
        ClientOptions::new(name)
            .ping_interval(self.nats_ping_interval)
            .tls(NatsTls {
                ca_file: self.nats_ca_file.clone(),
                required: !self.nats_insecure,
            })
    }

    /// The name of the enrollment given with --nats-identity, which must be for
    /// `role`: services address the operator, and pick their inbox, by it.
    pub fn enrolled_name(&self, role: iot_bao::enroll::Role) -> Result<Option<String>, crate::NatsError> {
        let Some(path) = &self.nats_identity else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::NatsError::Credentials(format!("reading {}: {e}", path.display())))?;
        let enrollment: iot_bao::enroll::Enrollment = serde_json::from_str(&text)
            .map_err(|e| crate::NatsError::Credentials(format!("parsing {}: {e}", path.display())))?;
        if enrollment.role != role {
            return Err(crate::NatsError::Credentials(format!(
                "{} is the enrollment of a {} identity; this needs a {} one",
                path.display(),
                enrollment.role.as_str(),
                role.as_str()
            )));
        }
        Ok(Some(enrollment.name))
    }

    /// The credential source the flags select. No flags means no credentials, which
    /// only a NATS server without auth accepts; there are no built-in defaults.
    pub fn credentials(&self) -> Result<Box<dyn CredentialSource>, crate::NatsError> {
        self.credentials_for(None)
    }

    /// Whether the selected credentials are an identity token, which on a guarded
    /// server comes with scoped permissions (so reads go through the responder).
    pub fn uses_identity(&self) -> bool {
        self.nats_identity.is_some() || self.nats_identity_token_file.is_some()
    }

    /// As [`Self::credentials`]; `device` is who connects, for a token file (an
    /// enrollment file names its device itself).
    pub fn credentials_for(&self, device: Option<&Id>) -> Result<Box<dyn CredentialSource>, crate::NatsError> {
        Ok(if let Some(path) = &self.nats_identity {
            Box::new(IdentityCredentials::from_enrollment_file(
                path,
                self.bao_ca_file.as_deref(),
                self.nats_insecure,
            )?)
        } else if let Some(path) = &self.nats_identity_token_file {
            Box::new(IdentityCredentials::from_token_file(path.clone(), device.cloned()))
        } else if let Some(path) = &self.nats_creds {
            Box::new(CredsFile(path.clone()))
        } else if (self.nats_token.is_some() || self.nats_user.is_some()) && !self.dev_shared_credentials {
            return Err(crate::NatsError::Credentials(
                "--nats-token and --nats-user are shared secrets for development only: pass --dev-shared-credentials \
                 (NATS_DEV_SHARED_CREDENTIALS=true), or use --nats-identity"
                    .into(),
            ));
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    fn parse(args: &[&str]) -> NatsArgs {
        let mut all = vec!["x"];
        all.extend(args);
        Cli::parse_from(all).nats
    }

    #[test]
    fn shared_secrets_need_the_development_flag() {
        let refused = parse(&["--nats-token", "t"]).credentials();
        assert!(matches!(refused, Err(crate::NatsError::Credentials(m)) if m.contains("--dev-shared-credentials")));
        assert!(
            parse(&["--nats-user", "u", "--nats-password", "p"])
                .credentials()
                .is_err()
        );
        let allowed = parse(&["--nats-token", "t", "--dev-shared-credentials"]).credentials();
        assert!(allowed.is_ok_and(|c| c.describe() == "token"));
        // Identities and anonymous (an open development server) need no flag.
        assert!(parse(&[]).credentials().is_ok());
        assert!(!parse(&[]).uses_identity());
        assert!(parse(&["--nats-identity-token-file", "/x"]).uses_identity());
    }

    #[test]
    fn tls_is_required_unless_insecure_is_asked_for() {
        let tls = parse(&["--nats-ca-file", "/ca.pem"]).client_options("x").tls;
        assert_eq!(
            tls,
            NatsTls {
                ca_file: Some("/ca.pem".into()),
                required: true
            }
        );
        assert!(!parse(&["--nats-insecure"]).client_options("x").tls.required);
    }
}
