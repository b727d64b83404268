//! The containers a test created: queried and cleaned up with the podman CLI.

use std::process::Command;

use iot_launch::paths::containers_conf;

/// Removes every container labelled with a device id when dropped, so a failing test
/// leaves no containers behind. Uses the podman CLI on purpose: this is test
/// cleanup, independent of the agent code under test.
pub struct DeviceContainers {
    pub device: String,
    cleanup_on_drop: bool,
}

impl DeviceContainers {
    pub fn new(device: &str) -> Self {
        Self {
            device: device.to_owned(),
            cleanup_on_drop: true,
        }
    }

    /// Same queries, but leaves cleanup to whoever owns the agent (so containers are
    /// removed only after the agent that would restore them is gone).
    pub fn observer(device: &str) -> Self {
        Self {
            device: device.to_owned(),
            cleanup_on_drop: false,
        }
    }

    /// IDs of this device's containers (any state), via the podman CLI.
    pub fn ids(&self) -> Vec<String> {
        podman_cli(&["ps", "-a", "-q", "--no-trunc", "--filter", &self.label_filter()])
            .map(|out| out.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// IDs of this device's running containers, via the podman CLI.
    pub fn running_ids(&self) -> Vec<String> {
        podman_cli(&["ps", "-q", "--no-trunc", "--filter", &self.label_filter()])
            .map(|out| out.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    pub fn label_filter(&self) -> String {
        format!("label=iot.nationtech.io/device={}", self.device)
    }

    pub fn remove_all(&self) {
        for id in self.ids() {
            if let Err(e) = podman_cli(&["rm", "-f", "-t", "0", &id]) {
                tracing::warn!(container = %id, error = %e, "cleanup failed");
            }
        }
    }
}

impl Drop for DeviceContainers {
    fn drop(&mut self) {
        if self.cleanup_on_drop {
            self.remove_all();
        }
    }
}

/// Runs the podman CLI with the dev containers.conf and returns stdout.
pub fn podman_cli(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("podman")
        .env("CONTAINERS_CONF", containers_conf())
        .args(args)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
