//! A network namespace joined to the host by a veth pair: a second "machine" whose
//! link a test can cut and restore. Needs root (the tests run as root here).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// `<host_ip>/30` on the host end, `<ns_ip>/30` inside. Deleted with its veths on drop.
pub struct NetNs {
    name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
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
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names are at most 15 characters.
        let tag = format!("{:x}{n}", pid % 0xffff);
        // A /30 out of 10.213.0.0/16 that depends on pid and counter.
        let slot = (pid.wrapping_mul(31).wrapping_add(n * 4)) % 16_000;
        let base = 4 * slot;
        let (a, b) = (base / 256, base % 256);
        let me = Self {
            name: format!("iott-{tag}"),
            host_if: format!("ivh{tag}"),
            host_ip: format!("10.213.{a}.{}", b + 1),
            ns_ip: format!("10.213.{a}.{}", b + 2),
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
        ip(&["addr", "add", &format!("{}/30", me.host_ip), "dev", &me.host_if])?;
        ip(&["link", "set", &me.host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", me.name.as_str(), "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        in_ns(&["addr", "add", &format!("{}/30", me.ns_ip), "dev", &peer])?;
        in_ns(&["link", "set", &peer, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
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
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete test namespace");
        }
    }
}
