//! A private podman API socket.

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
