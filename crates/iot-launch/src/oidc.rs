//! The OIDC provider standing in for Zitadel (hack/oidc: `oidc-provider` on Node),
//! over HTTPS on a free loopback port with its own CA. Users, passwords and roles
//! come from `hack/oidc/users.json` unless a test gives its own file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::apiserver::make_certs;
use crate::kube_apiserver::OidcFlags;
use crate::paths::{find_binary, repo_root};
use crate::process::{LoggedProcess, wait_until};

/// The client id kubectl/iotctl use, and the API server's `--oidc-client-id`.
pub const FLEET_CLIENT_ID: &str = "iot-fleet";

#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// Lifetime of ID tokens (and access tokens).
    pub id_token_ttl: Duration,
    /// Users, roles and clients; default `hack/oidc/users.json`.
    pub users_file: Option<PathBuf>,
    /// Extra redirect URIs: (client id, URI).
    pub client_redirects: Vec<(String, String)>,
    /// Loopback port to serve on; 0 picks a free one.
    pub port: u16,
}

impl Default for OidcOptions {
    fn default() -> Self {
        Self {
            id_token_ttl: Duration::from_secs(300),
            users_file: None,
            client_redirects: Vec::new(),
            port: 0,
        }
    }
}

pub struct OidcStandIn {
    process: LoggedProcess,
    dir: TempDir,
    issuer: String,
}

#[derive(serde::Deserialize)]
struct Ready {
    issuer: String,
}

impl OidcStandIn {
    /// The directory with the provider's program and its npm dependencies.
    pub fn program_dir() -> PathBuf {
        repo_root().join("hack/oidc")
    }

    pub async fn start_in(parent: &Path, options: OidcOptions) -> anyhow::Result<Self> {
        let node = find_binary("node", "IOT_NODE")?;
        let program = Self::program_dir();
        anyhow::ensure!(
            program.join("node_modules/oidc-provider").is_dir(),
            "the OIDC stand-in's dependencies are missing in {}: run scripts/setup-host.sh (npm ci there)",
            program.display()
        );
        let dir = tempfile::Builder::new().prefix("iot-oidc-").tempdir_in(parent)?;
        let d = dir.path();
        make_certs(d)?;
        let ready = d.join("ready.json");
        let mut cmd = Command::new(node);
        cmd.arg(program.join("server.mjs"))
            .arg("--cert")
            .arg(d.join("server.crt"))
            .arg("--key")
            .arg(d.join("server.key"))
            .args(["--port", &options.port.to_string()])
            .args(["--id-token-ttl", &options.id_token_ttl.as_secs().max(1).to_string()])
            .arg("--ready-file")
            .arg(&ready);
        if let Some(users) = &options.users_file {
            cmd.arg("--config").arg(users);
        }
        for (client, uri) in &options.client_redirects {
            cmd.arg("--client-redirect").arg(format!("{client}={uri}"));
        }
        let mut process = LoggedProcess::spawn("oidc stand-in", cmd, d.join("oidc.log"))?;
        let found = wait_until(Duration::from_secs(30), "the OIDC stand-in's ready file", || {
            let ready = ready.clone();
            async move {
                std::fs::read(&ready)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Ready>(&b).ok())
            }
        })
        .await;
        let ready = match found {
            Ok(r) => r,
            Err(e) => {
                let log = process.log_text();
                process.kill();
                anyhow::bail!("{e}; its log:\n{log}");
            }
        };
        Ok(Self {
            process,
            dir,
            issuer: ready.issuer,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The CA that signed the provider's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The API server flags that trust this provider: `email` as the user name and
    /// `groups` as groups, both prefixed `oidc:`.
    pub fn api_server_flags(&self) -> OidcFlags {
        OidcFlags {
            issuer_url: self.issuer.clone(),
            client_id: FLEET_CLIENT_ID.to_owned(),
            ca_file: Some(self.ca_file()),
            groups_claim: "groups".to_owned(),
            username_claim: "email".to_owned(),
            prefix: "oidc:".to_owned(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Stops the provider (an outage): its sessions and refresh tokens, kept in
    /// memory, are gone with it.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
