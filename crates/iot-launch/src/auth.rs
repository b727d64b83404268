//! A NATS server guarded by the platform's auth callout: the keys, the server
//! configuration and the callout processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nkeys::{KeyPair, XKey};

use crate::process::{LoggedProcess, free_port, wait_until};

/// The callout's keys and the passwords of the users that bypass it.
pub struct CalloutKeys {
    pub issuer: KeyPair,
    pub xkey: XKey,
    /// Password of `auth`, the callout's own user in the AUTH account.
    pub auth_password: String,
    /// Password of `admin`, an IOT-account user that bypasses the callout: for
    /// development tools and test setup, never for devices.
    pub admin_password: String,
    /// Password of `sys`, the system-account user that can end a revoked
    /// device's live session (`iotctl device revoke --kick`).
    pub system_password: String,
}

/// A random secret (hex).
pub fn random_secret() -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl CalloutKeys {
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self {
            issuer: KeyPair::new_account(),
            xkey: XKey::new(),
            auth_password: random_secret()?,
            admin_password: random_secret()?,
            system_password: random_secret()?,
        })
    }

    /// The nats-server configuration: accounts AUTH (the callout), IOT (the
    /// platform, JetStream on) and SYS; every client not listed in `auth_users` is
    /// decided by the callout. The authorization timeout is 5 s (the default is
    /// 2 s): after a server restart the whole fleet reconnects at once, and the
    /// callout needs time to work through the queue (see BENCHMARKS.md).
    pub fn nats_config(&self) -> String {
        format!(
            "accounts {{\n  AUTH {{ users: [ {{ user: auth, password: \"{auth}\", permissions: {callout} }} ] }}\n  \
             IOT {{ jetstream: enabled, {iot_limits}, users: [ {{ user: admin, password: \"{admin}\" }} ] }}\n  \
             SYS {{ users: [ {{ user: sys, password: \"{sys}\" }} ] }}\n}}\n\
             system_account: SYS\n\
             authorization {{\n  timeout: 5\n  auth_callout {{\n    issuer: {issuer}\n    auth_users: [ auth, admin, sys ]\n    account: AUTH\n    xkey: {xkey}\n  }}\n}}\n",
            auth = self.auth_password,
            callout = iot_auth::permissions::CALLOUT_NATS_PERMISSIONS,
            iot_limits = iot_auth::permissions::IOT_ACCOUNT_LIMITS,
            admin = self.admin_password,
            sys = self.system_password,
            issuer = self.issuer.public_key(),
            xkey = self.xkey.public_key(),
        )
    }

    /// Writes the two seeds (mode 0600) into `dir`; returns (issuer, xkey) paths.
    pub fn write_seeds(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        let issuer = dir.join("issuer.seed");
        let xkey = dir.join("xkey.seed");
        write_private(&issuer, &self.issuer.seed().map_err(|e| anyhow::anyhow!("{e}"))?)?;
        write_private(&xkey, &self.xkey.seed().map_err(|e| anyhow::anyhow!("{e}"))?)?;
        Ok((issuer, xkey))
    }
}

/// Everything a callout process needs.
pub struct CalloutLaunch<'a> {
    pub binary: &'a Path,
    pub nats_url: &'a str,
    /// The CA of NATS's and OpenBao's certificates (`None`: plain connections).
    pub ca_file: Option<&'a Path>,
    pub keys: &'a CalloutKeys,
    /// Where its log goes.
    pub dir: &'a Path,
    /// Where its key seeds are written (mode 0600).
    pub secrets_dir: &'a Path,
    pub bao_addr: &'a str,
    pub enrollment_file: &'a Path,
    /// The trusted token issuer; OpenBao's own when `None`.
    pub oidc_issuer: Option<String>,
    pub user_ttl: Duration,
    /// Extra environment (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

/// A running callout replica.
pub struct CalloutProcess {
    pub process: LoggedProcess,
    pub metrics_port: u16,
}

impl CalloutProcess {
    pub async fn spawn(l: &CalloutLaunch<'_>, name: &str) -> anyhow::Result<Self> {
        let (issuer, xkey) = l.keys.write_seeds(l.secrets_dir)?;
        let password = l.secrets_dir.join("callout-nats-password");
        write_private(&password, &l.keys.auth_password)?;
        let metrics_port = free_port()?;
        let mut cmd = Command::new(l.binary);
        crate::tls::trust_env(&mut cmd, l.ca_file, l.ca_file);
        cmd.env("NATS_URL", l.nats_url)
            .env("IOT_AUTH_NATS_USER", "auth")
            .env("IOT_AUTH_NATS_PASSWORD_FILE", password)
            .env("IOT_AUTH_ISSUER_SEED_FILE", issuer)
            .env("IOT_AUTH_XKEY_SEED_FILE", xkey)
            .env(
                "IOT_AUTH_OIDC_ISSUER",
                l.oidc_issuer
                    .clone()
                    .unwrap_or_else(|| iot_bao::setup::issuer_url(l.bao_addr)),
            )
            .env("BAO_ADDR", l.bao_addr)
            .env("IOT_AUTH_BAO_ENROLLMENT", l.enrollment_file)
            .env("IOT_AUTH_USER_TTL", format!("{}s", l.user_ttl.as_secs()))
            .env("IOT_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"));
        for (k, v) in &l.env {
            cmd.env(k, v);
        }
        let process = LoggedProcess::spawn(name, cmd, l.dir.join(format!("{name}.log")))?;
        wait_until(Duration::from_secs(30), "the auth callout to be ready", || async move {
            (crate::http::get_status("127.0.0.1", metrics_port, "/readyz")
                .await
                .ok()?
                == 200)
                .then_some(())
        })
        .await?;
        Ok(Self { process, metrics_port })
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }
}

/// Writes a secret to `path`, readable by its owner only (mode 0600).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only when the file is created; an existing file keeps its own.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
