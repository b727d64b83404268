//! `iotctl device provision`: the cloud-init seed that turns a stock image (a VM,
//! a Raspberry Pi, an ARM board) into a fleet device at first boot.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use iot_provision::{AdminUser, DeviceProvision, StaticNetwork};

use crate::out;

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// The device id (as enrolled).
    pub id: String,
    /// The agent binary for the device's architecture (its sha256 is checked on
    /// the device before it is installed).
    #[arg(long)]
    pub agent: PathBuf,
    /// NATS URL(s) as the device reaches them (comma-separated or repeated).
    #[arg(long = "device-nats-url", required = true, value_delimiter = ',')]
    pub device_nats_urls: Vec<String>,
    /// The enrollment file from `iotctl device enroll --out`. Without it the agent
    /// connects without credentials (development NATS only).
    #[arg(long)]
    pub enrollment: Option<PathBuf>,
    /// The CA certificate (PEM) that signed NATS's and OpenBao's certificates: it
    /// goes onto the seed, and the agent trusts only it.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Allow nats:// and an http:// OpenBao: the device's secrets then cross the
    /// network in the clear. For a debugging network only.
    #[arg(long)]
    pub insecure: bool,
    /// Write the seed files here (created 0700). Copy them to a Pi's boot partition
    /// or a USB stick labelled CIDATA.
    #[arg(long)]
    pub out: PathBuf,
    /// Also pack them into an ISO image labelled `cidata`, for a VM's second drive.
    #[arg(long)]
    pub iso: Option<PathBuf>,
    /// Static IPv4 address with prefix length (else the image's default, usually DHCP).
    #[arg(long, requires_all = ["gateway", "mac"])]
    pub address: Option<String>,
    /// Default gateway for --address.
    #[arg(long, requires = "address")]
    pub gateway: Option<IpAddr>,
    /// MAC address of the interface that gets --address.
    #[arg(long, requires = "address")]
    pub mac: Option<String>,
    /// DNS server for --address (repeatable).
    #[arg(long = "dns", requires = "address")]
    pub dns: Vec<IpAddr>,
    /// Where the agent serves /metrics, /healthz and /readyz on the device.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub metrics_addr: std::net::SocketAddr,
    /// A person's console account on the device (sudo).
    #[arg(long)]
    pub admin_user: Option<String>,
    /// Its password as a crypt(3) hash (`openssl passwd -6`); locked without.
    #[arg(long, requires = "admin_user")]
    pub admin_password_hash: Option<String>,
    /// Its ssh public key file (repeatable; needs an ssh server in the image).
    #[arg(long = "ssh-key", requires = "admin_user")]
    pub ssh_keys: Vec<PathBuf>,
    /// An image archive (`podman save`) the device loads before the agent starts,
    /// for devices that cannot reach a registry (repeatable).
    #[arg(long = "preload-image")]
    pub preload_images: Vec<PathBuf>,
    /// A further agent setting, e.g. IOT_STOP_TIMEOUT=5s (repeatable).
    #[arg(long = "agent-env", value_parser = parse_env)]
    pub agent_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("agent settings are KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

pub fn provision(a: &ProvisionArgs) -> anyhow::Result<()> {
    let enrollment = match &a.enrollment {
        Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?),
        None => None,
    };
    let ca_pem = match &a.ca_file {
        Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?),
        None => None,
    };
    let ssh_authorized_keys = a
        .ssh_keys
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|k| k.trim().to_owned())
                .with_context(|| format!("reading {}", f.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let network = match (&a.address, a.gateway, &a.mac) {
        (Some(address), Some(gateway), Some(mac)) => Some(StaticNetwork {
            mac: mac.clone(),
            address: address.clone(),
            gateway,
            nameservers: a.dns.clone(),
        }),
        _ => None,
    };
    let provision = DeviceProvision {
        device_id: a.id.clone(),
        nats_urls: a.device_nats_urls.clone(),
        enrollment,
        ca_pem,
        insecure: a.insecure,
        metrics_addr: Some(a.metrics_addr),
        network,
        admin: a.admin_user.as_ref().map(|name| AdminUser {
            name: name.clone(),
            password_hash: a.admin_password_hash.clone(),
            ssh_authorized_keys,
        }),
        agent_env: a.agent_env.clone(),
        ..Default::default()
    };
    let arch = iot_provision::elf_arch(&a.agent)?;
    let files = iot_provision::write_seed_dir(&provision, &a.agent, &a.preload_images, &a.out)?;
    out::line(&format!("seed for {} in {} (agent for {arch}):", a.id, a.out.display()));
    for f in &files {
        out::line(&format!("  {}", f.display()));
    }
    if let Some(iso) = &a.iso {
        iot_provision::write_seed_iso(&files, iso)?;
        out::line(&format!("ISO (label cidata, mode 0600): {}", iso.display()));
    }
    if provision.enrollment.is_none() {
        out::warn("no --enrollment: the agent will connect to NATS without credentials");
    } else {
        out::warn(&format!(
            "{} holds the device's enrollment secret: keep the seed private. A writable seed (USB stick, \
             boot partition) loses it at first boot; a read-only one (an ISO) keeps it: detach it after the first boot, or \
             rotate the secret (README: Enrollment secrets)",
            iot_provision::ENROLLMENT_FILE
        ));
    }
    if provision.ca_pem.is_none() && !a.insecure {
        out::warn("no --ca-file: the agent trusts the system's certificate roots for NATS and OpenBao");
    }
    Ok(())
}
