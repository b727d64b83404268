//! The devices' network: a bridge on the host (like libvirt's virbr0) with the
//! gateway address, and one network namespace per device attached to it by a veth
//! pair. Devices reach NATS through the gateway address, as VMs would.

use std::process::Command;

/// Default instance name; bridge, namespaces and veths are all named after it, so two
/// instances (say, a user's and the test suite's) never touch each other.
pub const DEFAULT_NAME: &str = "iotup";

#[derive(Debug, Clone)]
pub struct Net {
    /// Instance name (at most 8 characters, so interface names fit in 15).
    pub name: String,
    /// First three octets, e.g. "10.77.0".
    pub prefix: String,
}

impl Net {
    /// Device id of the index-th device: `device-N` for the default instance,
    /// `<name>-device-N` otherwise, so instances never share container labels.
    pub fn device_id(&self, index: usize) -> String {
        if self.name == DEFAULT_NAME {
            format!("device-{index}")
        } else {
            format!("{}-device-{index}", self.name)
        }
    }

    pub fn bridge(&self) -> String {
        format!("{}0", self.name)
    }

    pub fn netns_prefix(&self) -> String {
        format!("{}-", self.name)
    }

    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    pub fn device_ip(&self, index: usize) -> String {
        format!("{}.{}", self.prefix, 10 + index)
    }

    pub fn netns(&self, index: usize) -> String {
        format!("{}{index}", self.netns_prefix())
    }

    pub fn netns_path(&self, index: usize) -> String {
        format!("/var/run/netns/{}", self.netns(index))
    }

    /// Fails if the subnet is already used by another interface of this host.
    pub fn check_free(&self) -> anyhow::Result<()> {
        let out = run_capture(&["ip", "-o", "-4", "addr", "show"])?;
        let needle = format!(" {}.", self.prefix);
        if let Some(line) = out.lines().find(|l| l.contains(&needle)) {
            anyhow::bail!(
                "subnet {}.0/24 is already in use on this host ({}); pick another with --subnet",
                self.prefix,
                line.trim()
            );
        }
        Ok(())
    }

    pub fn create_bridge(&self) -> anyhow::Result<()> {
        let bridge = self.bridge();
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&["ip", "addr", "add", &format!("{}/24", self.gateway()), "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])
    }

    /// Host side of the index-th device's veth: `<name>-v<N>`. The dash cannot
    /// appear in an instance name, so no other instance's interface matches.
    pub fn veth(&self, index: usize) -> String {
        format!("{}-v{index}", self.name)
    }

    /// Whether `link` is a device veth or VM tap of this instance.
    pub fn owns_device_link(&self, link: &str) -> bool {
        ["-v", "-t"].iter().any(|kind| {
            link.strip_prefix(self.name.as_str())
                .and_then(|rest| rest.strip_prefix(kind))
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
    }

    pub fn create_device(&self, index: usize) -> anyhow::Result<()> {
        let ns = self.netns(index);
        let host_if = self.veth(index);
        run(&["ip", "netns", "add", &ns])?;
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        run(&["ip", "link", "set", &host_if, "master", &self.bridge(), "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", ns.as_str()];
            full.extend_from_slice(args);
            run(&full)
        };
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.device_ip(index)),
            "dev",
            "eth0",
        ])?;
        in_ns(&["ip", "link", "set", "eth0", "up"])?;
        in_ns(&["ip", "link", "set", "lo", "up"])?;
        in_ns(&["ip", "route", "add", "default", "via", &self.gateway()])
    }
}

impl Net {
    /// Device indexes of this instance's namespaces that exist now (this run's, or
    /// a crashed run's).
    pub fn existing_devices(&self) -> Vec<usize> {
        let list = run_capture(&["ip", "netns", "list"]).unwrap_or_default();
        let prefix = self.netns_prefix();
        list.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|n| n.strip_prefix(prefix.as_str()).and_then(|i| i.parse().ok()))
            .collect()
    }

    /// Removes every namespace, host-side veth and the bridge of this instance. A veth
    /// normally goes with its namespace, but not while a process (a container a
    /// killed run left) still holds the namespace.
    pub fn remove_all(&self) {
        for index in self.existing_devices() {
            let ns = self.netns(index);
            if let Err(e) = run(&["ip", "netns", "del", &ns]) {
                crate::print_line(&format!("  warning: could not delete netns {ns}: {e}"));
            }
        }
        let links = run_capture(&["ip", "-o", "link", "show"]).unwrap_or_default();
        for veth in links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| self.owns_device_link(n))
        {
            if let Err(e) = run(&["ip", "link", "del", &veth]) {
                crate::print_line(&format!("  warning: could not delete {veth}: {e}"));
            }
        }
        let bridge = self.bridge();
        if Command::new("ip")
            .args(["link", "show", &bridge])
            .output()
            .is_ok_and(|o| o.status.success())
            && let Err(e) = run(&["ip", "link", "del", &bridge])
        {
            crate::print_line(&format!("  warning: could not delete bridge {bridge}: {e}"));
        }
    }
}

pub fn run(args: &[&str]) -> anyhow::Result<()> {
    run_capture(args).map(drop)
}

pub fn run_capture(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str) -> Net {
        Net {
            name: name.into(),
            prefix: "10.77.0".into(),
        }
    }

    #[test]
    fn cleanup_never_matches_another_instances_interfaces() {
        // "iot" and "iotv" (or "iott"): one name is the other's prefix plus the
        // letter of an interface kind.
        let names = ["iot", "iotv", "iott", "iot1", "iotup"];
        for mine in names {
            let me = net(mine);
            assert!(me.owns_device_link(&me.veth(1)) && me.owns_device_link(&me.tap(12)));
            assert!(
                !me.owns_device_link(&me.bridge()),
                "{mine} would delete its bridge as a device link"
            );
            for theirs in names.iter().filter(|n| **n != mine) {
                let them = net(theirs);
                for link in [them.bridge(), them.veth(1), them.veth(90), them.tap(1)] {
                    assert!(
                        !me.owns_device_link(&link),
                        "{mine}'s cleanup would delete {theirs}'s {link}"
                    );
                }
            }
        }
        assert!(!net("iot").owns_device_link("iot-v"), "no index");
        assert!(!net("iot").owns_device_link("iot-vx1"), "not a number");
    }
}
