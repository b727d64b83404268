//! Identities in OpenBao: enrolling and revoking devices and platform services, and
//! setting up a fresh OpenBao. Needs an OpenBao token allowed to manage auth,
//! identity and the `iot` KV mount (an administrator's, or the root token of a
//! development stack).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use harmony_reconciler_contracts::Id;
use iot_bao::Bao;
use iot_bao::enroll::{self, Enrollment, Role};

use crate::out;

#[derive(Debug, Clone, Args)]
pub struct BaoArgs {
    /// OpenBao address.
    #[arg(long, env = "BAO_ADDR", default_value = "https://127.0.0.1:8200", global = true)]
    pub bao_addr: String,
    /// OpenBao token with administrative rights.
    #[arg(long, env = "BAO_TOKEN", hide_env_values = true, global = true)]
    pub bao_token: Option<String>,
    /// The CA of OpenBao's certificate (from --bao-ca-file / BAO_CACERT).
    #[arg(skip)]
    pub ca_file: Option<PathBuf>,
    /// Whether an http:// OpenBao is allowed (from --nats-insecure).
    #[arg(skip)]
    pub insecure: bool,
}

impl BaoArgs {
    fn client(&self) -> anyhow::Result<Bao> {
        let token = self
            .bao_token
            .clone()
            .context("no OpenBao token: set BAO_TOKEN (or --bao-token)")?;
        anyhow::ensure!(
            !self.bao_addr.starts_with("http://") || self.insecure,
            "OpenBao at {} is not TLS: the token would cross the network in the clear (use https://, or --nats-insecure for a debugging stack)",
            self.bao_addr
        );
        Ok(Bao::with_ca(&self.bao_addr, self.ca_file.as_deref())?.with_token(token))
    }
}

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Enroll a device: creates its OpenBao identity, approle and enrollment record,
    /// and prints (or writes) the enrollment the device needs (`NATS_IDENTITY`).
    Enroll {
        id: String,
        /// Label recorded with the enrollment (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Write the enrollment to this file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a device: it is refused at its next connect. With the NATS system
    /// account's password its live sessions are ended at once; without, they end
    /// when their NATS user expires (the callout's user TTL, 10 minutes by default).
    Revoke {
        id: String,
        /// The NATS system account user that may end sessions.
        #[arg(long, env = "NATS_SYSTEM_USER", default_value = "sys")]
        nats_system_user: String,
        /// Its password; when set, live sessions of the device are ended (kicked).
        #[arg(long, env = "NATS_SYSTEM_PASSWORD", hide_env_values = true)]
        nats_system_password: Option<String>,
    },
    /// Enrolled devices.
    List,
    /// Write the cloud-init seed that makes a stock image (VM, Raspberry Pi) a
    /// fleet device at first boot: agent binary, settings, enrollment, systemd unit.
    Provision(Box<crate::provision::ProvisionArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ServiceRole {
    Operator,
    /// Read-only (the dashboard).
    Viewer,
    Callout,
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Enroll a platform service (the operator, the auth callout).
    Enroll {
        name: String,
        #[arg(long, value_enum)]
        role: ServiceRole,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a platform service.
    Revoke { name: String },
}

#[derive(Subcommand)]
pub enum BaoCmd {
    /// Configure an initialised, unsealed OpenBao for the platform (idempotent).
    Setup,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("labels are KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

pub async fn device(bao: &BaoArgs, nats: &iot_nats::NatsArgs, cmd: &DeviceCmd) -> anyhow::Result<()> {
    // Provisioning is offline (it needs only the enrollment file); the rest talk
    // to OpenBao.
    let client = || bao.client();
    match cmd {
        DeviceCmd::Enroll { id, labels, out } => {
            let id = Id::new(id.as_str())?;
            let labels: BTreeMap<String, String> = labels.iter().cloned().collect();
            let e = enroll::enroll_device(&client()?, id.as_str(), &labels)
                .await
                .with_context(|| format!("enrolling device {id}"))?;
            emit(&e, out.as_deref())
        }
        DeviceCmd::Revoke {
            id,
            nats_system_user,
            nats_system_password,
        } => {
            let id = Id::new(id.as_str())?;
            enroll::revoke_device(&client()?, id.as_str())
                .await
                .with_context(|| format!("revoking device {id}"))?;
            match nats_system_password {
                Some(password) => {
                    let kicked = kick(nats, nats_system_user, password, &format!("device-{id}"))
                        .await
                        .context("revoked, but ending its live sessions failed")?;
                    out::warn(&format!(
                        "revoked {id}: refused from its next connect; {kicked} live session(s) ended"
                    ));
                }
                None => out::warn(&format!(
                    "revoked {id}: refused from its next connect; a live session ends when its NATS user expires \
                     (set NATS_SYSTEM_PASSWORD to end it now)"
                )),
            }
            Ok(())
        }
        DeviceCmd::Provision(args) => crate::provision::provision(args),
        DeviceCmd::List => {
            for d in enroll::list_devices(&client()?).await? {
                out::line(&d);
            }
            Ok(())
        }
    }
}

pub async fn service(bao: &BaoArgs, cmd: &ServiceCmd) -> anyhow::Result<()> {
    let client = bao.client()?;
    match cmd {
        ServiceCmd::Enroll { name, role, out } => {
            let role = match role {
                ServiceRole::Operator => Role::Operator,
                ServiceRole::Viewer => Role::Viewer,
                ServiceRole::Callout => Role::Callout,
            };
            let e = enroll::enroll_service(&client, name, role)
                .await
                .with_context(|| format!("enrolling service {name}"))?;
            emit(&e, out.as_deref())
        }
        ServiceCmd::Revoke { name } => {
            enroll::revoke_service(&client, name)
                .await
                .with_context(|| format!("revoking service {name}"))?;
            Ok(())
        }
    }
}

pub async fn bao_cmd(bao: &BaoArgs, cmd: &BaoCmd) -> anyhow::Result<()> {
    match cmd {
        BaoCmd::Setup => {
            iot_bao::setup::configure(&bao.client()?)
                .await
                .context("configuring OpenBao")?;
            out::warn(&format!(
                "OpenBao at {} is set up; identity tokens are issued by {}",
                bao.bao_addr,
                iot_bao::setup::issuer_url(&bao.bao_addr)
            ));
            Ok(())
        }
    }
}

/// The enrollment holds a secret: to a 0600 file, or to stdout for piping.
fn emit(e: &Enrollment, path: Option<&Path>) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(e)?;
    match path {
        None => {
            out::line(&json);
            Ok(())
        }
        Some(p) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("writing {}", p.display()))?;
            // `mode` applies only when the file is created: an existing file keeps
            // its mode, so set it before the secret goes in.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            f.write_all(json.as_bytes())?;
            out::warn(&format!("wrote the enrollment of {} to {}", e.name, p.display()));
            Ok(())
        }
    }
}

/// Ends every live session of the NATS user `user` (as the auth callout names it):
/// asks every server for its connections (`$SYS.REQ.SERVER.PING.CONNZ`) and kicks
/// the matching ones (`$SYS.REQ.SERVER.<id>.KICK`). Returns how many were ended.
async fn kick(nats: &iot_nats::NatsArgs, sys_user: &str, sys_password: &str, user: &str) -> anyhow::Result<usize> {
    use futures::StreamExt;
    let system = iot_nats::UserPassword {
        user: sys_user.to_owned(),
        password: sys_password.to_owned(),
    };
    let client = iot_nats::connect_with(&nats.nats_url, &system, &nats.client_options("iotctl-revoke"))
        .await
        .context("connecting as the NATS system user")?
        .client;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let query = serde_json::json!({"auth": true, "user": user, "limit": 1024});
    client
        .publish_with_reply("$SYS.REQ.SERVER.PING.CONNZ", inbox, query.to_string().into())
        .await?;
    client.flush().await?;
    // Every server in the cluster answers: wait up to 5 s for the first, then a
    // moment for the others.
    let mut targets: Vec<(String, u64)> = Vec::new();
    let mut deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut first = true;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
        if first {
            deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
            first = false;
        }
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        let server = v
            .pointer("/data/server_id")
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_owned();
        for c in v
            .pointer("/data/connections")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            if c.get("authorized_user").and_then(|u| u.as_str()) == Some(user)
                && let Some(cid) = c.get("cid").and_then(|c| c.as_u64())
            {
                targets.push((server.clone(), cid));
            }
        }
    }
    anyhow::ensure!(!first, "no NATS server answered the connection query");
    for (server, cid) in &targets {
        client
            .request(
                format!("$SYS.REQ.SERVER.{server}.KICK"),
                serde_json::json!({"cid": cid}).to_string().into(),
            )
            .await
            .with_context(|| format!("kicking connection {cid} on {server}"))?;
    }
    Ok(targets.len())
}
