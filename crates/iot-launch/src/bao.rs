//! A real OpenBao server: raft storage on disk, initialised and unsealed (not `-dev`
//! mode, whose in-memory store and fixed root token are nothing like production).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use iot_bao::Bao;
use tempfile::TempDir;

use crate::auth::write_private;
use crate::paths::find_binary;
use crate::process::{LoggedProcess, free_port, wait_until};
use crate::tls::TlsMode;

pub struct OpenBao {
    process: Option<LoggedProcess>,
    host: String,
    dir: PathBuf,
    /// (CA clients trust, server certificate, key); `None` serves plain HTTP.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    _temp: Option<TempDir>,
    port: u16,
    cluster_port: u16,
    unseal_key: String,
    root_token: String,
}

impl OpenBao {
    /// Starts a new OpenBao in a temporary directory, initialises, unseals and
    /// configures it for the platform (`iot_bao::setup::configure`). It serves
    /// HTTPS with a CA of its own ([`Self::ca_file`]).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_temp(TlsMode::OwnCa).await
    }

    /// [`Self::start`] with a certificate from `tls`.
    pub async fn start_temp(tls: TlsMode<'_>) -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new().prefix("iot-bao-").tempdir()?;
        let dir = temp.path().to_owned();
        let mut me = Self::start_in_on_with(&dir, "127.0.0.1", tls).await?;
        me._temp = Some(temp);
        Ok(me)
    }

    /// Starts OpenBao with its data in `dir`: initialised on first use (the unseal
    /// key and root token are kept in `dir/init.json`, mode 0600: a development
    /// stack's convenience, where production uses several key holders or an
    /// auto-unseal), unsealed on every start.
    pub async fn start_in(dir: &Path) -> anyhow::Result<Self> {
        Self::start_in_on_with(dir, "127.0.0.1", TlsMode::OwnCa).await
    }

    /// [`Self::start_in`], listening on `host` (e.g. the gateway address devices
    /// reach the platform through), with a certificate from `tls`.
    pub async fn start_in_on_with(dir: &Path, host: &str, tls: TlsMode<'_>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let port = free_port()?;
        let cluster_port = free_port()?;
        let tls = tls
            .server_cert(&dir.join("ca"), &format!("bao-{port}"), host)?
            .map(|c| (c.ca_file, c.cert, c.key));
        let mut me = Self {
            process: None,
            host: host.to_owned(),
            dir: dir.to_owned(),
            tls,
            _temp: None,
            port,
            cluster_port,
            unseal_key: String::new(),
            root_token: String::new(),
        };
        me.spawn().await?;
        let bao = me.client()?;
        let init_file = dir.join("init.json");
        if !iot_bao::setup::is_initialized(&bao).await? {
            let (key, root) = iot_bao::setup::init(&bao).await?;
            let json = serde_json::json!({"unsealKey": key, "rootToken": root}).to_string();
            write_private(&init_file, &json)?;
        }
        let init: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&init_file)?)?;
        me.unseal_key = init["unsealKey"].as_str().unwrap_or_default().to_owned();
        me.root_token = init["rootToken"].as_str().unwrap_or_default().to_owned();
        me.unseal().await?;
        iot_bao::setup::configure(&me.root()?).await?;
        Ok(me)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = find_binary("bao", "IOT_BAO")?;
        let listener_tls = match &self.tls {
            Some((_, cert, key)) => format!(
                "  tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n  tls_min_version = \"tls12\"\n",
                cert.display(),
                key.display()
            ),
            None => "  tls_disable = true\n".to_owned(),
        };
        let config = format!(
            "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"bao1\"\n  performance_multiplier = 1\n}}\n\
             listener \"tcp\" {{\n  address = \"{host}:{port}\"\n  cluster_address = \"127.0.0.1:{cport}\"\n{listener_tls}}}\n\
             api_addr = \"{api}\"\ncluster_addr = \"https://127.0.0.1:{cport}\"\n",
            host = self.host,
            data = self.dir.join("data").display(),
            port = self.port,
            cport = self.cluster_port,
            api = self.addr(),
        );
        let config_path = self.dir.join("bao.hcl");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(binary);
        cmd.arg("server").arg(format!("-config={}", config_path.display()));
        self.process = Some(LoggedProcess::spawn("bao", cmd, self.dir.join("bao.log"))?);
        let bao = self.client()?;
        wait_until(Duration::from_secs(30), "OpenBao to listen", || {
            let bao = bao.clone();
            async move { bao.get("sys/seal-status").await.ok().map(|_| ()) }
        })
        .await
    }

    async fn unseal(&self) -> anyhow::Result<()> {
        let bao = self.client()?;
        iot_bao::setup::unseal(&bao, &self.unseal_key).await?;
        // Unsealed is not yet active, and until raft makes it leader a standby
        // answers some reads but redirects writes (307): wait for sys/health's 200,
        // which only the active node gives.
        wait_until(Duration::from_secs(60), "OpenBao to become the active node", || {
            let bao = bao.clone();
            async move { bao.get("sys/health").await.ok().map(|_| ()) }
        })
        .await
    }

    pub fn addr(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The CA clients must trust (`BAO_CACERT`), or `None` for plain HTTP.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(ca, _, _)| ca.as_path())
    }

    /// A client without a token, trusting the server's CA.
    pub fn client(&self) -> anyhow::Result<Bao> {
        Ok(Bao::with_ca(&self.addr(), self.ca_file())?)
    }

    /// A client with the root token.
    pub fn root(&self) -> anyhow::Result<Bao> {
        Ok(self.client()?.with_token(self.root_token.clone()))
    }

    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(LoggedProcess::pid)
    }

    pub fn log_text(&self) -> String {
        self.process.as_ref().map(LoggedProcess::log_text).unwrap_or_default()
    }

    /// Freezes the process (SIGSTOP): it accepts connections and never answers,
    /// the worst kind of outage.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow::anyhow!("OpenBao is not running"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// Stops the server, keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = self.thaw_quietly(&p);
            p.stop(Duration::from_secs(5));
        }
    }

    fn thaw_quietly(&self, p: &LoggedProcess) -> Option<()> {
        let pid = p.pid()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGCONT,
        )
        .ok()
    }

    /// Starts it again on the same port and data, and unseals it.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await?;
        self.unseal().await
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}
