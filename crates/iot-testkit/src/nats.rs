//! A real nats-server with JetStream on file storage.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::paths::find_binary;
use crate::process::{free_port, kill_child};

/// A nats-server process. Dropping it kills the server and deletes its store.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: TempDir,
    binary: PathBuf,
    log: PathBuf,
}

impl NatsServer {
    /// Starts a server on a free loopback port, JetStream stored in a temp dir.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = find_binary("nats-server", "IOT_NATS_SERVER")?;
        let store = tempfile::Builder::new().prefix("iot-nats-").tempdir()?;
        let log = store.path().join("nats.log");
        let mut me = Self {
            child: None,
            port: free_port()?,
            store,
            binary,
            log,
        };
        me.spawn().await?;
        Ok(me)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server, keeping its store (to simulate an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store.path().join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("nats-server did not listen on {addr}; log: {}", self.log.display())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
