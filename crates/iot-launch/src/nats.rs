//! A real nats-server with JetStream on file storage, serving TLS by default (a
//! certificate from the stack's CA, or from a CA of its own).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::paths::find_binary;
use crate::process::{free_port, kill_child};
use crate::tls::TlsMode;

/// A nats-server process. Dropping it kills the server and deletes its store.
pub struct NatsServer {
    child: Option<Child>,
    extra_args: Vec<String>,
    host: String,
    port: u16,
    store: TempDir,
    binary: PathBuf,
    log: PathBuf,
    /// The CA clients must trust; `None` for a plain-TCP server.
    ca_file: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server on a free loopback port, JetStream stored in a temp dir, TLS
    /// with a CA of its own ([`Self::ca_file`]).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1").await
    }

    /// [`Self::start`] without TLS.
    pub async fn start_plain() -> anyhow::Result<Self> {
        Self::launch("127.0.0.1", &std::env::temp_dir(), &[], TlsMode::Plain).await
    }

    /// Starts a server with everything chosen: listen `host`, store under
    /// `parent`, an optional configuration file's text, extra flags, and TLS.
    pub async fn start_custom(
        host: &str,
        parent: &std::path::Path,
        config: Option<&str>,
        args: &[&str],
        tls: TlsMode<'_>,
    ) -> anyhow::Result<Self> {
        let store = tempfile::Builder::new().prefix("iot-nats-").tempdir_in(parent)?;
        let mut all: Vec<String> = Vec::new();
        if let Some(config) = config {
            let path = store.path().join("nats.conf");
            std::fs::write(&path, config)?;
            all.extend(["-c".to_owned(), path.to_string_lossy().into_owned()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Self::launch_in_store(host, store, &all, tls, None).await
    }

    /// A member of a cluster: like [`Self::start_custom`], on a port chosen by the
    /// caller (every member's configuration names the others' ports before any
    /// starts), with its certificate named `name`.
    pub async fn start_member(
        host: &str,
        parent: &std::path::Path,
        config: &str,
        port: u16,
        tls: TlsMode<'_>,
    ) -> anyhow::Result<Self> {
        let store = tempfile::Builder::new().prefix("iot-nats-").tempdir_in(parent)?;
        let path = store.path().join("nats.conf");
        std::fs::write(&path, config)?;
        let args = ["-c".to_owned(), path.to_string_lossy().into_owned()];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::launch_in_store(host, store, &args, tls, Some(port)).await
    }

    /// Starts a server listening on `host` only (e.g. the gateway address of a
    /// bridge that device namespaces reach it through).
    pub async fn start_on(host: &str) -> anyhow::Result<Self> {
        Self::start_on_in(host, &std::env::temp_dir()).await
    }

    /// Like [`start_on`](Self::start_on), with its store under `parent`.
    pub async fn start_on_in(host: &str, parent: &std::path::Path) -> anyhow::Result<Self> {
        Self::launch(host, parent, &[], TlsMode::OwnCa).await
    }

    /// Starts a loopback server with extra command-line flags (e.g. `--auth TOKEN`).
    pub async fn start_with_args(args: &[&str]) -> anyhow::Result<Self> {
        Self::launch("127.0.0.1", &std::env::temp_dir(), args, TlsMode::OwnCa).await
    }

    /// Starts a loopback server with a configuration file of this text (accounts,
    /// auth callout); listen address, port and store stay ours.
    pub async fn start_with_config(config: &str) -> anyhow::Result<Self> {
        Self::start_with_config_on_in("127.0.0.1", &std::env::temp_dir(), config).await
    }

    /// [`Self::start_with_config`] on `host`, with its store under `parent`.
    pub async fn start_with_config_on_in(host: &str, parent: &std::path::Path, config: &str) -> anyhow::Result<Self> {
        Self::start_custom(host, parent, Some(config), &[], TlsMode::OwnCa).await
    }

    async fn launch(host: &str, parent: &std::path::Path, args: &[&str], tls: TlsMode<'_>) -> anyhow::Result<Self> {
        let store = tempfile::Builder::new().prefix("iot-nats-").tempdir_in(parent)?;
        Self::launch_in_store(host, store, args, tls, None).await
    }

    async fn launch_in_store(
        host: &str,
        store: TempDir,
        args: &[&str],
        tls: TlsMode<'_>,
        port: Option<u16>,
    ) -> anyhow::Result<Self> {
        let binary = find_binary("nats-server", "IOT_NATS_SERVER")?;
        let log = store.path().join("nats.log");
        let port = match port {
            Some(port) => port,
            None => free_port()?,
        };
        let mut extra_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut ca_file = None;
        if let Some(tls) = tls.server_cert(&store.path().join("ca"), &format!("nats-{port}"), host)? {
            extra_args.extend([
                "--tls".to_owned(),
                "--tlscert".to_owned(),
                tls.cert.display().to_string(),
                "--tlskey".to_owned(),
                tls.key.display().to_string(),
            ]);
            ca_file = Some(tls.ca_file);
        }
        let mut me = Self {
            child: None,
            extra_args,
            host: host.to_owned(),
            port,
            store,
            binary,
            log,
            ca_file,
        };
        me.spawn().await?;
        Ok(me)
    }

    /// A TLS server this process did not start (a pod's, reached on `host:port`):
    /// the same URL and CA accessors, and nothing to stop or restart.
    pub fn remote(host: &str, port: u16, ca_file: PathBuf) -> anyhow::Result<Self> {
        let store = tempfile::Builder::new().prefix("iot-nats-remote-").tempdir()?;
        let log = store.path().join("nats.log");
        Ok(Self {
            child: None,
            extra_args: Vec::new(),
            host: host.to_owned(),
            port,
            store,
            binary: PathBuf::new(),
            log,
            ca_file: Some(ca_file),
        })
    }

    /// `tls://host:port`, or `nats://host:port` for a plain server.
    pub fn url(&self) -> String {
        let scheme = if self.ca_file.is_some() { "tls" } else { "nats" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The CA that signed the server's certificate (what clients must trust), or
    /// `None` for a plain-TCP server.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca_file.as_deref()
    }

    /// Points a platform binary (agent, operator, dashboard, iotctl) at this server:
    /// `NATS_URL`, and `NATS_CA_FILE`, or `NATS_INSECURE` for a plain server.
    pub fn configure_client(&self, cmd: &mut Command) {
        cmd.env("NATS_URL", self.url());
        crate::tls::trust_env(cmd, self.ca_file.as_deref(), None);
    }

    /// A client connected as `admin` would be: with the CA, no credentials. For
    /// the servers that admit anyone.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        self.client_with(async_nats::ConnectOptions::new()).await
    }

    /// A client with these options plus the server's CA.
    pub async fn client_with(&self, mut options: async_nats::ConnectOptions) -> anyhow::Result<async_nats::Client> {
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(options.connect(self.url()).await?)
    }

    /// The directory holding its store, configuration, certificate and log.
    pub fn dir(&self) -> &std::path::Path {
        self.store.path()
    }

    pub fn host(&self) -> &str {
        &self.host
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
        anyhow::ensure!(
            !self.binary.as_os_str().is_empty(),
            "nats-server at {}:{} runs elsewhere; this process cannot start it",
            self.host,
            self.port
        );
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
        // A server restarted on a JetStream store recovers it before it listens,
        // which takes seconds on a loaded machine; one that exits (its port taken
        // meanwhile) is reported at once, with its last words.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                anyhow::bail!(
                    "nats-server exited ({status}) before listening on {addr}: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("nats-server did not listen on {addr} within 30 s: {}", self.log_tail())
    }

    /// The last lines of the server's log, for an error message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        format!("{} (log {})", tail, self.log.display())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
