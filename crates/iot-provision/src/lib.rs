//! Provisioning a device with cloud-init's NoCloud datasource.
//!
//! A device (a VM, a Raspberry Pi, an ARM board) boots a stock image with cloud-init
//! and a seed: `user-data`, `meta-data`, optionally `network-config`, plus the agent
//! binary next to them. At first boot cloud-init installs the agent (after checking
//! its sha256), writes its settings and enrollment file (both 0600), installs a
//! hardened systemd unit with `Restart=on-failure`, and enables it. Later boots do
//! nothing but start the unit: the instance id is stable, so cloud-init's per-instance
//! steps never run again.
//!
//! Everything here is typed and validated before a byte is written; the YAML is
//! rendered from structs, never kept by hand.

mod cloud_config;
mod seed;
mod unit;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

pub use cloud_config::{CloudConfig, User, WriteFile};
pub use seed::{
    AGENT_FILE, CA_FILE, ENROLLMENT_FILE, elf_arch, sha256_file, write_seed_dir, write_seed_iso, write_seed_vfat,
};
pub use unit::{AGENT_BINARY, AGENT_CA_FILE, AGENT_ENV_FILE, AGENT_IDENTITY_FILE, INSTALL_SCRIPT, agent_unit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("rendering YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Everything one device needs to join the fleet at first boot.
#[derive(Clone, Default)]
pub struct DeviceProvision {
    /// The device id (`IOT_DEVICE_ID`), also the default hostname.
    pub device_id: String,
    /// Hostname, if not the device id.
    pub hostname: Option<String>,
    /// NATS URLs as the device reaches them (through its gateway, not 127.0.0.1).
    pub nats_urls: Vec<String>,
    /// The enrollment file's contents (`iotctl device enroll`). A secret: a file of
    /// its own on the seed (never in `user-data`), installed 0600 on the device and
    /// removed from the seed after a good install when the seed is writable.
    pub enrollment: Option<String>,
    /// The CA (PEM) that signed NATS's and OpenBao's certificates: the agent
    /// verifies both servers against it.
    pub ca_pem: Option<String>,
    /// Allow `nats://` and `http://` (no TLS): for debugging only.
    pub insecure: bool,
    /// Where the agent serves /metrics, /healthz and /readyz.
    pub metrics_addr: Option<SocketAddr>,
    /// A static address; without it the image's default (DHCP on most) applies.
    pub network: Option<StaticNetwork>,
    /// A person's account for the console (and ssh, if the image has a server).
    pub admin: Option<AdminUser>,
    /// sha256 (hex) of the agent binary on the seed, checked before it is installed.
    pub agent_sha256: String,
    /// Image archives on the seed that the device `podman load`s before the agent
    /// starts, for devices that cannot reach a registry.
    pub preload_images: Vec<String>,
    /// Further agent settings, e.g. `IOT_STOP_TIMEOUT=5s`. Only `IOT_*` names.
    pub agent_env: Vec<(String, String)>,
}

impl std::fmt::Debug for DeviceProvision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceProvision")
            .field("device_id", &self.device_id)
            .field("nats_urls", &self.nats_urls)
            .field("enrollment", &self.enrollment.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.is_some())
            .field("insecure", &self.insecure)
            .field("network", &self.network)
            .field("agent_sha256", &self.agent_sha256)
            .finish_non_exhaustive()
    }
}

/// A static IPv4 address on the interface with this MAC address.
#[derive(Debug, Clone)]
pub struct StaticNetwork {
    pub mac: String,
    /// Address with prefix length, e.g. `10.77.0.101/24`.
    pub address: String,
    pub gateway: IpAddr,
    pub nameservers: Vec<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct AdminUser {
    pub name: String,
    /// A crypt(3) hash (`openssl passwd -6`); without it the password is locked.
    pub password_hash: Option<String>,
    pub ssh_authorized_keys: Vec<String>,
}

impl DeviceProvision {
    /// Checks every field before anything is rendered, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), Error> {
        harmony_id(&self.device_id)?;
        hostname(&self.hostname())?;
        if self.nats_urls.is_empty() {
            return Err(invalid("nats_urls", "at least one NATS URL is needed"));
        }
        for url in &self.nats_urls {
            let ok =
                ["nats://", "tls://"].iter().any(|s| url.starts_with(s)) && !url.contains([',', ' ', '"', '\n', '\\']);
            if !ok {
                return Err(invalid("nats_urls", format!("{url:?} is not a nats:// or tls:// URL")));
            }
            if url.contains("://127.") || url.contains("://localhost") {
                return Err(invalid(
                    "nats_urls",
                    format!("{url} is the device's own loopback; give the address the device reaches NATS on"),
                ));
            }
            if url.starts_with("nats://") && !self.insecure {
                return Err(invalid(
                    "nats_urls",
                    format!(
                        "{url} is not TLS: the device's identity token would cross the network in the clear (use tls://, or --insecure for a debugging network)"
                    ),
                ));
            }
        }
        if let Some(e) = &self.enrollment {
            let v = serde_json::from_str::<serde_json::Value>(e)
                .map_err(|err| invalid("enrollment", format!("not JSON: {err}")))?;
            let bao = v.get("baoAddr").and_then(serde_json::Value::as_str).unwrap_or_default();
            if bao.starts_with("http://") && !self.insecure {
                return Err(invalid(
                    "enrollment",
                    format!(
                        "its OpenBao address {bao} is not TLS: the enrollment secret would cross the network in the clear (use https://, or --insecure)"
                    ),
                ));
            }
        }
        if let Some(ca) = &self.ca_pem
            && !ca.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(invalid("ca", "not a PEM certificate (-----BEGIN CERTIFICATE-----)"));
        }
        if self.agent_sha256.len() != 64 || !self.agent_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("agent_sha256", "must be 64 hex digits"));
        }
        if let Some(n) = &self.network {
            n.validate()?;
        }
        if let Some(a) = &self.admin {
            if a.name.is_empty()
                || a.name == "root"
                || !a
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(invalid(
                    "admin.name",
                    format!("{:?}: lowercase letters, digits, '-' (not root)", a.name),
                ));
            }
            if let Some(h) = &a.password_hash
                && !h.starts_with('$')
            {
                return Err(invalid(
                    "admin.password_hash",
                    "expected a crypt(3) hash such as `openssl passwd -6` prints",
                ));
            }
        }
        for image in &self.preload_images {
            seed::check_file_name("preload_images", image)?;
        }
        for (k, v) in &self.agent_env {
            let reserved = ["IOT_DEVICE_ID", "IOT_METRICS_ADDR"];
            if !k.starts_with("IOT_")
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(invalid("agent_env", format!("{k}: only IOT_* names in capitals")));
            }
            if reserved.contains(&k.as_str()) {
                return Err(invalid("agent_env", format!("{k} is set from its own field")));
            }
            if v.contains(['\n', '\r', '"', '\\']) {
                return Err(invalid(
                    "agent_env",
                    format!("{k}: value has a newline, quote or backslash"),
                ));
            }
        }
        Ok(())
    }

    /// The enrollment file as it goes on the seed and the device.
    pub fn enrollment_file(&self) -> Option<String> {
        self.enrollment.as_ref().map(|e| format!("{}\n", e.trim_end()))
    }

    fn hostname(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| self.device_id.to_lowercase().replace('_', "-"))
    }

    /// The agent's settings file (systemd `EnvironmentFile`).
    pub fn agent_env_file(&self) -> String {
        let mut lines = vec![
            format!("IOT_DEVICE_ID={}", self.device_id),
            format!("NATS_URL={}", self.nats_urls.join(",")),
        ];
        if self.enrollment.is_some() {
            lines.push(format!("NATS_IDENTITY={AGENT_IDENTITY_FILE}"));
        }
        if self.ca_pem.is_some() {
            lines.push(format!("NATS_CA_FILE={AGENT_CA_FILE}"));
            lines.push(format!("BAO_CACERT={AGENT_CA_FILE}"));
        }
        if self.insecure {
            lines.push("NATS_INSECURE=true".to_owned());
        }
        if let Some(a) = self.metrics_addr {
            lines.push(format!("IOT_METRICS_ADDR={a}"));
        }
        for (k, v) in &self.agent_env {
            lines.push(format!("{k}=\"{v}\""));
        }
        lines.join("\n") + "\n"
    }

    /// `user-data`: the `#cloud-config` document.
    pub fn user_data(&self) -> Result<String, Error> {
        self.validate()?;
        // The enrollment is not in here: cloud-init keeps its own copies of
        // user-data, and the seed's copy must be removable. The script checks the
        // files it takes from the seed against these hashes (which also make a new
        // enrollment a new instance id).
        let files = vec![
            WriteFile::new(AGENT_ENV_FILE, "0600", self.agent_env_file()),
            WriteFile::new("/etc/systemd/system/iot-agent.service", "0644", agent_unit()),
            WriteFile::new(
                INSTALL_SCRIPT,
                "0755",
                unit::install_script(&unit::SeedContents {
                    agent_sha256: &self.agent_sha256,
                    enrollment_sha256: self.enrollment_file().map(|e| sha256_text(&e)),
                    ca_sha256: self.ca_pem.as_deref().map(sha256_text),
                    preload_images: &self.preload_images,
                }),
            ),
        ];
        let users = match &self.admin {
            Some(a) => vec![User::admin(a)],
            None => Vec::new(),
        };
        let config = CloudConfig {
            hostname: self.hostname(),
            users,
            ssh_pwauth: false,
            write_files: files,
            // One command: the script enables the unit only once the agent is
            // installed (cloud-init would run later entries after a failure).
            runcmd: vec![vec![INSTALL_SCRIPT.into()]],
        };
        config.render(&self.device_id)
    }

    /// `meta-data`. The instance id names the device and this provisioning's
    /// content: a reboot with the same seed never runs the first-boot steps again,
    /// and a new seed (a new enrollment, say) does.
    pub fn meta_data(&self) -> Result<String, Error> {
        Ok(self.meta_data_for(&self.user_data()?))
    }

    /// [`Self::meta_data`] for `user_data` already rendered from this provisioning.
    pub(crate) fn meta_data_for(&self, user_data: &str) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(user_data.as_bytes());
        let short: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        format!(
            "instance-id: \"iot-{}-{short}\"\nlocal-hostname: \"{}\"\n",
            self.device_id,
            self.hostname()
        )
    }

    /// `network-config` (version 2), if a static address is set.
    pub fn network_config(&self) -> Result<Option<String>, Error> {
        let Some(n) = &self.network else { return Ok(None) };
        n.validate()?;
        let mut eth = serde_json::json!({
            "match": { "macaddress": n.mac.to_lowercase() },
            "addresses": [n.address],
            "gateway4": n.gateway.to_string(),
        });
        if !n.nameservers.is_empty() {
            eth["nameservers"] = serde_json::json!({ "addresses": n.nameservers });
        }
        let doc = serde_json::json!({ "version": 2, "ethernets": { "uplink": eth } });
        Ok(Some(serde_yaml_ng::to_string(&doc)?))
    }
}

impl StaticNetwork {
    fn validate(&self) -> Result<(), Error> {
        let parts: Vec<&str> = self.mac.split(':').collect();
        if parts.len() != 6
            || !parts
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(invalid("network.mac", format!("{:?} is not a MAC address", self.mac)));
        }
        let (ip, prefix) = self.address.split_once('/').ok_or_else(|| {
            invalid(
                "network.address",
                format!("{:?} needs a prefix length, e.g. /24", self.address),
            )
        })?;
        let ip: std::net::Ipv4Addr = ip
            .parse()
            .map_err(|_| invalid("network.address", format!("{ip:?} is not an IPv4 address")))?;
        match prefix.parse::<u8>() {
            Ok(p) if (1..=32).contains(&p) => {}
            _ => return Err(invalid("network.address", format!("prefix {prefix:?} is not 1-32"))),
        }
        if IpAddr::V4(ip) == self.gateway {
            return Err(invalid("network.gateway", "is the device's own address"));
        }
        Ok(())
    }
}

fn sha256_text(text: &str) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

fn harmony_id(id: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "device_id",
            format!("{id:?}: 1-64 characters of A-Z a-z 0-9 _ -"),
        ))
    }
}

fn hostname(h: &str) -> Result<(), Error> {
    let ok = (1..=63).contains(&h.len())
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid("hostname", format!("{h:?} is not a DNS label")))
    }
}

#[cfg(test)]
mod tests;
