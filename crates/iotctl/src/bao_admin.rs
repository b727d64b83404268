//! Identities in OpenBao: enrolling and revoking devices and platform services, and
//! setting up a fresh OpenBao. Needs an OpenBao token allowed to manage auth,
//! identity and the `iot` KV mount (an administrator's, or the root token of a
//! development stack).
//!
//! A device is also a `Device` object in Kubernetes ([`crate::registry`]), which
//! holds its labels. `device enroll` writes that object before the identity, so a
//! failure leaves at most a Device without an identity, which running the same
//! command again completes; `device revoke` revokes the identity first (what keeps
//! the device out), then marks the object.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::id::enrollable_device_id_problem;
use iot_bao::Bao;
use iot_bao::enroll::{self, Enrollment, Role};

use crate::registry::{self, Registered, Registration};
use crate::table::Table;
use crate::{k8s, out};

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
    /// Enroll a device: creates (or keeps) its Device object in Kubernetes with the
    /// given labels, then its OpenBao identity, approle and enrollment record, and
    /// prints (or writes) the enrollment the device needs (`NATS_IDENTITY`).
    /// Enrolling again rotates the secret and merges the labels.
    Enroll {
        /// The device id: a DNS-1123 label (it names the Device object).
        id: String,
        /// A label of the Device object (repeatable); merged into an existing one's.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Write the enrollment to this file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only the OpenBao identity: no Device object (no Kubernetes needed). No
        /// Deployment selects the device by label until it has one.
        #[arg(long, conflicts_with = "labels")]
        no_device: bool,
    },
    /// Revoke a device: it is refused at its next connect. With the NATS system
    /// account's password its live sessions are ended at once; without, they end
    /// when their NATS user expires (the callout's user TTL, 10 minutes by default).
    /// Its Device object, if any, is kept and annotated `iot.nationtech.io/revoked-at`.
    Revoke {
        id: String,
        /// Only the OpenBao identity: leave the Device object unmarked.
        #[arg(long)]
        no_device: bool,
        /// The NATS system account user that may end sessions.
        #[arg(long, env = "NATS_SYSTEM_USER", default_value = "sys")]
        nats_system_user: String,
        /// Its password; when set, live sessions of the device are ended (kicked).
        #[arg(long, env = "NATS_SYSTEM_PASSWORD", hide_env_values = true)]
        nats_system_password: Option<String>,
    },
    /// Enrolled devices, and (with KUBECONFIG) their Device objects: labels,
    /// registered or revoked.
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

pub async fn device(bao: &BaoArgs, nats: &iot_nats::NatsArgs, cmd: &DeviceCmd, json: bool) -> anyhow::Result<()> {
    // Provisioning is offline (it needs only the enrollment file); the rest talk
    // to OpenBao.
    let client = || bao.client();
    match cmd {
        DeviceCmd::Enroll {
            id,
            labels,
            out,
            no_device,
        } => {
            // Checked before anything is created: the id names the Device object.
            if let Some(problem) = enrollable_device_id_problem(id) {
                anyhow::bail!("{problem}");
            }
            let id = Id::new(id.as_str())?;
            let labels: BTreeMap<String, String> = labels.iter().cloned().collect();
            enroll_device(&client()?, id.as_str(), &labels, out.as_deref(), *no_device).await
        }
        DeviceCmd::Revoke {
            id,
            no_device,
            nats_system_user,
            nats_system_password,
        } => {
            let id = Id::new(id.as_str())?;
            enroll::revoke_device(&client()?, id.as_str())
                .await
                .with_context(|| format!("revoking device {id}"))?;
            let kicked = match nats_system_password {
                Some(password) => Some(kick(nats, nats_system_user, password, &format!("device-{id}")).await),
                None => None,
            };
            out::warn(&match &kicked {
                Some(Ok(n)) => format!("revoked {id}: refused from its next connect; {n} live session(s) ended"),
                Some(Err(_)) => format!("revoked {id}: refused from its next connect"),
                None => format!(
                    "revoked {id}: refused from its next connect; a live session ends when its NATS user expires \
                     (set NATS_SYSTEM_PASSWORD to end it now)"
                ),
            });
            // The identity is what keeps the device out; the mark on its Device
            // object follows, and a failure there does not undo the revocation.
            let marked = if *no_device {
                Ok(())
            } else {
                mark_revoked(id.as_str()).await
            };
            if let Some(Err(e)) = kicked {
                if let Err(m) = marked {
                    out::warn(&format!("iotctl: {}", crate::error_line(&m)));
                }
                return Err(e.context("revoked, but ending its live sessions failed"));
            }
            marked
        }
        DeviceCmd::Provision(args) => crate::provision::provision(args),
        DeviceCmd::List => list_devices(&client()?, json).await,
    }
}

/// The Device object first, then the identity: if Kubernetes refuses (a bad label,
/// no access) nothing is enrolled, and if OpenBao fails after, the Device waits
/// for the same command to be run again (which keeps it and enrolls).
async fn enroll_device(
    bao: &Bao,
    id: &str,
    labels: &BTreeMap<String, String>,
    out_file: Option<&Path>,
    no_device: bool,
) -> anyhow::Result<()> {
    let registered = if no_device {
        None
    } else {
        let nothing_created = |problem: String| {
            anyhow::anyhow!(
                "{problem}. Nothing was created, neither the Device object nor the OpenBao identity: \
                 fix that and run the same command again, or pass --no-device to enroll only the OpenBao identity"
            )
        };
        let kube = match k8s::configured().await {
            Ok(Some(kube)) => kube,
            Ok(None) => {
                return Err(nothing_created(format!(
                    "no Kubernetes API server is configured to create the Device object {id} in (set KUBECONFIG)"
                )));
            }
            Err(e) => return Err(nothing_created(crate::error_line(&e))),
        };
        let registered = registry::register(&kube, id, labels)
            .await
            .map_err(|e| nothing_created(crate::error_line(&e)))?;
        Some(registered)
    };
    let e = enroll::enroll_device_identity(bao, id).await.map_err(|e| {
        let device = match &registered {
            None => String::new(),
            Some(_) => format!(
                " The Device object {id} exists, but the OpenBao identity was not created: \
                 run the same command again to enroll it (the Device is kept)."
            ),
        };
        anyhow::anyhow!("enrolling device {id} in OpenBao: {e}.{device}")
    })?;
    emit(&e, out_file)?;
    let device = match registered {
        None => "no Device object (--no-device)".to_owned(),
        Some(Registered::Created(d)) if d.label_map().is_empty() => format!("Device {id} created, without labels"),
        Some(Registered::Created(d)) => format!(
            "Device {id} created with labels {}",
            registry::labels_text(d.label_map())
        ),
        Some(Registered::Existing {
            device,
            labels_merged,
            unrevoked,
        }) => {
            let now = match device.label_map() {
                l if l.is_empty() => "none".to_owned(),
                l => registry::labels_text(l),
            };
            let labels = if labels_merged {
                "labels merged, now"
            } else {
                "labels unchanged"
            };
            let mut said = format!("Device {id} already existed and was kept; {labels}: {now}");
            if let Some(at) = unrevoked {
                said.push_str(&format!("; its revoked mark (revoked at {at}) was removed"));
            }
            said
        }
    };
    out::warn(&format!(
        "enrolled {id}: OpenBao identity created (a secret from an earlier enrollment no longer logs in); {device}"
    ));
    Ok(())
}

/// Marks the Device object of a revoked device, if it has one. Without any
/// Kubernetes configuration it says so and succeeds (the identity, what keeps the
/// device out, is revoked); a configured API server that fails is an error that
/// says how to finish.
async fn mark_revoked(id: &str) -> anyhow::Result<()> {
    if enrollable_device_id_problem(id).is_some() {
        out::warn(&format!(
            "{id} is not a valid Kubernetes name, so it has no Device object to mark"
        ));
        return Ok(());
    }
    let finish = |e: &anyhow::Error| {
        anyhow::anyhow!(
            "revoked {id} in OpenBao, but its Device object was not marked revoked: {}; \
             run `iotctl device revoke {id}` again once Kubernetes answers (revoking again is harmless)",
            crate::error_line(e)
        )
    };
    let kube = match k8s::configured().await {
        Ok(Some(k)) => k,
        Ok(None) => {
            out::warn(&format!(
                "no Kubernetes API server configured (KUBECONFIG): the Device object of {id}, if any, was not marked revoked"
            ));
            return Ok(());
        }
        Err(e) => return Err(finish(&e)),
    };
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    match registry::mark_revoked(&kube, id, &at).await {
        Ok(Some(_)) => {
            out::warn(&format!(
                "Device {id} kept and marked {}={at}",
                iot_api::REVOKED_ANNOTATION
            ));
            Ok(())
        }
        Ok(None) => {
            out::warn(&format!(
                "there is no Device object {id} in Kubernetes: only the OpenBao identity was revoked"
            ));
            Ok(())
        }
        Err(e) => Err(finish(&e)),
    }
}

/// Enrolled identities and Device objects, one row per device id.
async fn list_devices(bao: &Bao, json: bool) -> anyhow::Result<()> {
    let enrolled: BTreeSet<String> = enroll::list_devices(bao).await?.into_iter().collect();
    let objects = registry::optional_all().await;
    let mut ids = enrolled.clone();
    if let Some(objects) = &objects {
        ids.extend(objects.keys().cloned());
    }
    let rows: Vec<(String, bool, Option<&iot_api::Device>)> = ids
        .into_iter()
        .map(|id| {
            let object = objects.as_ref().and_then(|o| o.get(&id));
            let is_enrolled = enrolled.contains(&id);
            (id, is_enrolled, object)
        })
        .collect();
    if json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|(id, is_enrolled, object)| {
                let mut v = serde_json::json!({"device": id, "enrolled": is_enrolled});
                if let Some(objects) = &objects {
                    v["registration"] = serde_json::json!(Registration::of(objects, id));
                    v["labels"] = serde_json::json!(object.map(|d| d.label_map()));
                    v["revokedAt"] = serde_json::json!(object.and_then(|d| d.revoked_at()));
                }
                v
            })
            .collect();
        out::line(&serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    let mut header = vec!["DEVICE", "IDENTITY"];
    if objects.is_some() {
        header.extend(["REGISTRATION", "REVOKED-AT", "LABELS"]);
    }
    let mut t = Table::new(&header);
    for (id, is_enrolled, object) in &rows {
        let mut row = vec![id.clone(), if *is_enrolled { "enrolled" } else { "-" }.to_owned()];
        if let Some(objects) = &objects {
            row.push(Registration::of(objects, id).as_str().to_owned());
            row.push(object.and_then(|d| d.revoked_at()).unwrap_or("-").to_owned());
            row.push(object.map_or_else(|| "-".to_owned(), |d| registry::labels_text(d.label_map())));
        }
        t.row(row);
    }
    out::text(&t.render());
    Ok(())
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
