//! A private podman API socket, and cleanup of the containers a test created.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::paths::containers_conf;
use crate::process::kill_child;

/// `podman system service` on a socket of its own. All services share the host's
/// container store, so tests isolate by device-id labels, never by names alone.
pub struct PodmanService {
    child: Option<Child>,
    dir: TempDir,
}

impl PodmanService {
    pub async fn start() -> anyhow::Result<Self> {
        let mut me = Self::unstarted()?;
        me.spawn().await?;
        Ok(me)
    }

    /// A socket path with no service behind it yet (see [`spawn`](Self::spawn)), for
    /// tests of an agent that starts before podman does.
    pub fn unstarted() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("iot-podman-").tempdir()?;
        Ok(Self { child: None, dir })
    }

    /// Starts (or restarts) the service on this socket and waits until it answers.
    pub async fn spawn(&mut self) -> anyhow::Result<()> {
        self.stop();
        let socket = self.socket();
        if socket.exists() {
            std::fs::remove_file(&socket)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("podman-service.log"))?;
        let child = Command::new("podman")
            .env("CONTAINERS_CONF", containers_conf())
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("starting podman system service: {e} (is podman installed? run scripts/setup-host.sh)")
            })?;
        self.child = Some(child);
        for _ in 0..400 {
            if socket.exists() && tokio::net::UnixStream::connect(&socket).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("podman service socket {} never came up", socket.display())
    }

    /// Stops the service (containers keep running: they are not its children).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("podman.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        self.stop();
    }
}

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
