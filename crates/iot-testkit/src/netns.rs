//! A network namespace joined to the host by a veth pair: a second "machine" whose
//! link a test can cut and restore. Needs root (the tests run as root here).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// `<host_ip>/30` on the host end, `<ns_ip>/30` inside (or a port of a [`Bridge`]).
/// Deleted with its veths on drop.
pub struct NetNs {
    name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

/// A bridge with an address on the host, which namespaces join as ports: a site's
/// LAN, with one server (a registry, say) on the bridge's address that every device
/// reaches. Deleted on drop (after its namespaces).
pub struct Bridge {
    pub name: String,
    /// `10.215.<n>.1`; devices get `.2` and up.
    pub ip: String,
    subnet: String,
    next: AtomicU32,
}

impl Bridge {
    pub fn create() -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let third = (pid.wrapping_mul(7).wrapping_add(n * 13)) % 250 + 1;
        let me = Self {
            name: format!("iotb{:x}{n}", pid % 0xffff),
            ip: format!("10.215.{third}.1"),
            subnet: format!("10.215.{third}"),
            next: AtomicU32::new(2),
        };
        ip(&["link", "add", &me.name, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", me.ip), "dev", &me.name])?;
        ip(&["link", "set", &me.name, "up"])?;
        Ok(me)
    }

    /// A namespace joined to the bridge, with a default route through the host.
    pub fn join(&self) -> anyhow::Result<NetNs> {
        let host = self.next.fetch_add(1, Ordering::SeqCst);
        anyhow::ensure!(host < 255, "bridge {} is full", self.name);
        NetNs::create_with(Uplink::Bridge {
            bridge: &self.name,
            gateway: &self.ip,
            address: &format!("{}.{host}", self.subnet),
        })
    }

    /// Shapes everything the host sends onto the bridge (a registry's answers to
    /// every device together) to `rate` (`tc` units: `20mbit`).
    pub fn throttle(&self, rate: &str) -> anyhow::Result<()> {
        shape(&self.name, rate)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.name]) {
            tracing::warn!(bridge = %self.name, error = %e, "could not delete test bridge");
        }
    }
}

enum Uplink<'a> {
    PointToPoint,
    Bridge {
        bridge: &'a str,
        gateway: &'a str,
        address: &'a str,
    },
}

/// A token bucket on `dev`'s egress: `rate`, with bursts of 64 KB and at most
/// 200 ms of queue (beyond which packets drop, as on a congested link).
fn shape(dev: &str, rate: &str) -> anyhow::Result<()> {
    let out = Command::new("tc")
        .args([
            "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "tc on {dev}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl NetNs {
    pub fn create() -> anyhow::Result<Self> {
        Self::create_with(Uplink::PointToPoint)
    }

    fn create_with(uplink: Uplink<'_>) -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names are at most 15 characters.
        let tag = format!("{:x}{n}", pid % 0xffff);
        // A /30 out of 10.213.0.0/16 that depends on pid and counter.
        let slot = (pid.wrapping_mul(31).wrapping_add(n * 4)) % 16_000;
        let base = 4 * slot;
        let (a, b) = (base / 256, base % 256);
        let (host_ip, ns_ip, prefix) = match &uplink {
            Uplink::PointToPoint => (format!("10.213.{a}.{}", b + 1), format!("10.213.{a}.{}", b + 2), 30),
            Uplink::Bridge { gateway, address, .. } => ((*gateway).to_owned(), (*address).to_owned(), 24),
        };
        let me = Self {
            name: format!("iott-{tag}"),
            host_if: format!("ivh{tag}"),
            host_ip,
            ns_ip,
        };
        let peer = format!("ivn{tag}");
        ip(&["netns", "add", &me.name])?;
        ip(&[
            "link",
            "add",
            &me.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &me.name,
        ])?;
        match &uplink {
            Uplink::PointToPoint => ip(&["addr", "add", &format!("{}/30", me.host_ip), "dev", &me.host_if])?,
            Uplink::Bridge { bridge, .. } => ip(&["link", "set", &me.host_if, "master", bridge])?,
        }
        ip(&["link", "set", &me.host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", me.name.as_str(), "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        in_ns(&["addr", "add", &format!("{}/{prefix}", me.ns_ip), "dev", &peer])?;
        in_ns(&["link", "set", &peer, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        if matches!(uplink, Uplink::Bridge { .. }) {
            in_ns(&["route", "add", "default", "via", &me.host_ip])?;
        }
        Ok(me)
    }

    /// The namespace's path, for `nsenter --net=<path>`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// A command that runs inside the namespace (network only: the filesystem, and
    /// so unix sockets such as podman's, stay shared).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path())).arg(program);
        cmd
    }

    /// Cuts the link: packets are dropped silently, as when a cable or a radio link
    /// dies somewhere upstream. Open TCP connections are not told.
    pub fn link_down(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "down"])
    }

    pub fn link_up(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "up"])
    }

    /// Shapes what reaches the namespace (the host's and the bridge's traffic to it)
    /// to `rate` (`tc` units: `2mbit`): a slow shop uplink.
    pub fn throttle(&self, rate: &str) -> anyhow::Result<()> {
        shape(&self.host_if, rate)
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete test namespace");
        }
    }
}
