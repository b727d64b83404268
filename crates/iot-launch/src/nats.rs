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
    extra_args: Vec<String>,
    host: String,
    port: u16,
    store: TempDir,
    binary: PathBuf,
    log: PathBuf,
}

impl NatsServer {
    /// Starts a server on a free loopback port, JetStream stored in a temp dir.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1").await
    }

    /// Starts a server listening on `host` only (e.g. the gateway address of a
    /// bridge that device namespaces reach it through).
    pub async fn start_on(host: &str) -> anyhow::Result<Self> {
        Self::start_on_in(host, &std::env::temp_dir()).await
    }

    /// Like [`start_on`](Self::start_on), with its store under `parent`.
    pub async fn start_on_in(host: &str, parent: &std::path::Path) -> anyhow::Result<Self> {
        Self::launch(host, parent, &[]).await
    }

    /// Starts a loopback server with extra command-line flags (e.g. `--auth TOKEN`).
    pub async fn start_with_args(args: &[&str]) -> anyhow::Result<Self> {
        Self::launch("127.0.0.1", &std::env::temp_dir(), args).await
    }

    /// Starts a loopback server with a configuration file of this text (accounts,
    /// auth callout); listen address, port and store stay ours.
    pub async fn start_with_config(config: &str) -> anyhow::Result<Self> {
        Self::start_with_config_on_in("127.0.0.1", &std::env::temp_dir(), config).await
    }

    /// [`Self::start_with_config`] on `host`, with its store under `parent`.
    pub async fn start_with_config_on_in(host: &str, parent: &std::path::Path, config: &str) -> anyhow::Result<Self> {
        let store = tempfile::Builder::new().prefix("iot-nats-").tempdir_in(parent)?;
        let path = store.path().join("nats.conf");
        std::fs::write(&path, config)?;
        let path = path.to_string_lossy().into_owned();
        Self::launch_in_store(host, store, &["-c", &path]).await
    }

    async fn launch(host: &str, parent: &std::path::Path, args: &[&str]) -> anyhow::Result<Self> {
        let store = tempfile::Builder::new().prefix("iot-nats-").tempdir_in(parent)?;
        Self::launch_in_store(host, store, args).await
    }

    async fn launch_in_store(host: &str, store: TempDir, args: &[&str]) -> anyhow::Result<Self> {
        let binary = find_binary("nats-server", "IOT_NATS_SERVER")?;
        let log = store.path().join("nats.log");
        let mut me = Self {
            child: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            host: host.to_owned(),
            port: free_port()?,
            store,
            binary,
            log,
        };
        me.spawn().await?;
        Ok(me)
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    pub fn log_path(&self) -> &std::path::Path {
        &self.log
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
            .args(["-a", &self.host, "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store.path().join("js"))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let addr = format!("{}:{}", self.host, self.port);
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
