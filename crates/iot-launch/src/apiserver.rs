//! A real Kubernetes API server (upstream apiextensions-apiserver with our main, see
//! hack/apiserver) on etcd, with fresh certificates and a kubeconfig.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::paths::find_binary;
use crate::process::{free_port, kill_child};

pub struct ApiServer {
    etcd: Option<Child>,
    apiserver: Option<Child>,
    dir: TempDir,
    port: u16,
}

impl ApiServer {
    /// Starts etcd and the API server on free loopback ports. Takes 1-3 s.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_in(&std::env::temp_dir()).await
    }

    /// Like [`start`](Self::start), with certificates, etcd data and logs under `parent`.
    /// Ports are picked free but not reserved, so a test running in parallel can take
    /// one in between; a start that fails that way is retried on new ports.
    pub async fn start_in(parent: &Path) -> anyhow::Result<Self> {
        let mut last = None;
        for attempt in 1..=3 {
            match Self::try_start_in(parent).await {
                Ok(me) => return Ok(me),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "API server did not start; retrying on new ports");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("API server did not start")))
    }

    async fn try_start_in(parent: &Path) -> anyhow::Result<Self> {
        let apiserver_bin = find_binary("iot-apiserver", "IOT_APISERVER")?;
        let dir = tempfile::Builder::new().prefix("iot-apiserver-").tempdir_in(parent)?;
        let d = dir.path();
        make_certs(d)?;
        let (etcd, client_port) = start_etcd(d)?;
        let port = free_port()?;
        let mut me = Self {
            etcd: Some(etcd),
            apiserver: None,
            dir,
            port,
        };
        let d = me.dir.path().to_owned();
        let api = Command::new(apiserver_bin)
            .args(["--etcd-servers", &format!("http://127.0.0.1:{client_port}")])
            .args(["--bind-address", "127.0.0.1", "--secure-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(d.join("server.crt"))
            .arg("--tls-private-key-file")
            .arg(d.join("server.key"))
            .arg("--client-ca-file")
            .arg(d.join("ca.crt"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("apiserver.log"))?)
            .spawn()?;
        me.apiserver = Some(api);
        write_kubeconfig(me.dir.path(), &me.url())?;
        me.wait_ready(Duration::from_secs(60)).await?;
        Ok(me)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kube client for this server.
    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        kube_client_from(&self.kubeconfig()).await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// Runs kubectl against this server; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", self.kubeconfig()).args(args);
        crate::process::run_captured(cmd, stdin)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.url();
        wait_readyz(&url, self.dir.path(), [&mut self.etcd, &mut self.apiserver], timeout).await
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            let mut c = child;
            kill_child(&mut c);
        }
    }
}

/// etcd on free loopback ports with its data and log under `d`; returns it and its
/// client port.
pub(crate) fn start_etcd(d: &Path) -> anyhow::Result<(Child, u16)> {
    let etcd_bin = find_binary("etcd", "IOT_ETCD")?;
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let etcd = Command::new(etcd_bin)
        .arg("--data-dir")
        .arg(d.join("etcd"))
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{client_port}")])
        .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client_port}")])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer_port}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer_port}"),
        ])
        .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer_port}")])
        .args(["--unsafe-no-fsync", "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("etcd.log"))?)
        .spawn()?;
    Ok((etcd, client_port))
}

/// Waits until `url/readyz` answers 200 to the admin certificate in `d`, failing
/// early if one of `children` exits.
pub(crate) async fn wait_readyz<'a>(
    url: &str,
    d: &Path,
    mut children: impl AsMut<[&'a mut Option<Child>]>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "2"])
            .arg("--cacert")
            .arg(d.join("ca.crt"))
            .arg("--cert")
            .arg(d.join("admin.crt"))
            .arg("--key")
            .arg(d.join("admin.key"))
            .arg(format!("{url}/readyz"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        for child in children.as_mut().iter_mut().filter_map(|c| c.as_mut()) {
            if let Ok(Some(status)) = child.try_wait() {
                anyhow::bail!("API server or etcd exited early ({status}); logs in {}", d.display());
            }
        }
        if start.elapsed() > timeout {
            anyhow::bail!("API server not ready after {timeout:?}; logs in {}", d.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `dir/kubeconfig`: the admin client certificate made by [`make_certs`].
pub(crate) fn write_kubeconfig(dir: &Path, url: &str) -> anyhow::Result<()> {
    let d = dir.display();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: iot-local\n  cluster:\n    server: {url}\n    certificate-authority: {d}/ca.crt\nusers:\n- name: admin\n  user:\n    client-certificate: {d}/admin.crt\n    client-key: {d}/admin.key\ncontexts:\n- name: iot-local\n  context:\n    cluster: iot-local\n    user: admin\ncurrent-context: iot-local\n"
    );
    std::fs::write(dir.join("kubeconfig"), text)?;
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1/localhost, and an admin client
/// certificate in group system:masters (which the server always authorizes).
pub(crate) fn make_certs(d: &Path) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl").current_dir(d).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    // A new P-256 key and a CSR (or, for the CA, a self-signed certificate).
    let new_key = |name: &str, subject: &str, self_signed: bool| {
        let (out_ext, days): (&str, &[&str]) = if self_signed {
            ("crt", &["-x509", "-days", "30"])
        } else {
            ("csr", &[])
        };
        let (key, out) = (format!("{name}.key"), format!("{name}.{out_ext}"));
        let mut args = vec!["req"];
        args.extend_from_slice(days);
        args.extend_from_slice(&EC_KEY);
        args.extend_from_slice(&["-nodes", "-keyout", &key, "-out", &out, "-subj", subject]);
        run(&args)
    };
    // Extensions make these X.509 v3 certificates, which rustls requires.
    let sign = |name: &str, extensions: &str| {
        let (csr, crt, ext) = (format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        std::fs::write(d.join(&ext), extensions)?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "30",
            "-extfile",
            &ext,
        ])
    };
    new_key("ca", "/CN=iot-local-ca", true)?;
    new_key("server", "/CN=localhost", false)?;
    sign(
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )?;
    new_key("admin", "/O=system:masters/CN=iot-admin", false)?;
    sign("admin", "extendedKeyUsage=clientAuth\n")
}

/// A kube client from a kubeconfig file (without touching `KUBECONFIG`).
pub async fn kube_client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}
