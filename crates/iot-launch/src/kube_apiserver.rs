//! A full upstream kube-apiserver 1.20.2 (scripts/build-kube-apiserver.sh) on etcd:
//! RBAC on, an audit log of every request with its authorization decision,
//! ServiceAccount tokens through TokenRequest, and optionally OIDC. What the chart,
//! RBAC and SSO tests need and the CRD-only server lacks. There is no kubelet and no
//! controller manager: objects are stored, nothing is scheduled, and a deleted
//! Namespace stays Terminating.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::apiserver::{kube_client_from, make_certs, start_etcd, wait_readyz};
use crate::paths::find_binary;
use crate::process::{free_port, kill_child};

/// The ServiceAccount tokens' issuer and audience.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc";

/// OIDC settings handed to the server's `--oidc-*` flags.
#[derive(Debug, Clone)]
pub struct OidcFlags {
    pub issuer_url: String,
    pub client_id: String,
    pub ca_file: Option<PathBuf>,
    pub groups_claim: String,
    pub username_claim: String,
    /// Prefix for user and group names, so `fleet-admins` becomes `oidc:fleet-admins`.
    pub prefix: String,
}

pub struct KubeApiServer {
    etcd: Option<Child>,
    apiserver: Option<Child>,
    dir: TempDir,
    port: u16,
}

/// One line of the audit log, reduced to what tests ask about.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub user: String,
    pub verb: String,
    pub uri: String,
    pub decision: String,
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver on free loopback ports (about 4-8 s).
    pub async fn start_in(parent: &Path, oidc: Option<OidcFlags>) -> anyhow::Result<Self> {
        let mut last = None;
        for attempt in 1..=3 {
            match Self::try_start_in(parent, oidc.clone()).await {
                Ok(me) => return Ok(me),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "kube-apiserver did not start; retrying on new ports");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("kube-apiserver did not start")))
    }

    async fn try_start_in(parent: &Path, oidc: Option<OidcFlags>) -> anyhow::Result<Self> {
        let apiserver_bin = find_binary("kube-apiserver", "IOT_KUBE_APISERVER")?;
        let dir = tempfile::Builder::new()
            .prefix("iot-kube-apiserver-")
            .tempdir_in(parent)?;
        let d = dir.path().to_owned();
        make_certs(&d)?;
        openssl(&d, &["genrsa", "-out", "sa.key", "2048"])?;
        openssl(&d, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        // Metadata level records user, verb, resource and the authorization decision
        // for every request, without bodies (which would hold secrets).
        std::fs::write(
            d.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )?;
        let (etcd, client_port) = start_etcd(&d)?;
        let port = free_port()?;
        let mut me = Self {
            etcd: Some(etcd),
            apiserver: None,
            dir,
            port,
        };
        let path = |name: &str| d.join(name).display().to_string();
        let mut cmd = Command::new(apiserver_bin);
        cmd.args(["--etcd-servers", &format!("http://127.0.0.1:{client_port}")])
            .args(["--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1"])
            .args(["--secure-port", &port.to_string(), "--insecure-port", "0"])
            .args(["--tls-cert-file", &path("server.crt")])
            .args(["--tls-private-key-file", &path("server.key")])
            .args(["--client-ca-file", &path("ca.crt")])
            .args(["--authorization-mode", "RBAC"])
            .args(["--service-account-issuer", SERVICE_ACCOUNT_ISSUER])
            .args(["--service-account-signing-key-file", &path("sa.key")])
            .args(["--service-account-key-file", &path("sa.pub")])
            .args(["--api-audiences", SERVICE_ACCOUNT_ISSUER])
            .args(["--service-cluster-ip-range", "10.0.0.0/24"])
            // No kubelet, no nodes: nothing to reconcile the `kubernetes` Endpoints to.
            .args(["--endpoint-reconciler-type", "none"])
            .args(["--audit-log-path", &path("audit.log")])
            .args(["--audit-policy-file", &path("audit-policy.yaml")])
            .args(["--audit-log-mode", "blocking"])
            .args(["--profiling=false"]);
        if let Some(o) = &oidc {
            cmd.args(["--oidc-issuer-url", &o.issuer_url])
                .args(["--oidc-client-id", &o.client_id])
                .args(["--oidc-groups-claim", &o.groups_claim])
                .args(["--oidc-username-claim", &o.username_claim])
                .args(["--oidc-username-prefix", &o.prefix])
                .args(["--oidc-groups-prefix", &o.prefix])
                // A request without credentials gets 401 (log in), not 403 as
                // system:anonymous. Readiness is probed with the admin certificate.
                .arg("--anonymous-auth=false");
            if let Some(ca) = &o.ca_file {
                cmd.arg("--oidc-ca-file").arg(ca);
            }
        }
        let api = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("apiserver.log"))?)
            .spawn()?;
        me.apiserver = Some(api);
        crate::apiserver::write_kubeconfig(&d, &me.url())?;
        me.wait_ready(Duration::from_secs(90)).await?;
        Ok(me)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The secure port on 127.0.0.1 (what a pod sees as KUBERNETES_SERVICE_PORT).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Admin kubeconfig (client certificate in system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs kubectl as admin against this server; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", self.kubeconfig()).args(args);
        crate::process::run_captured(cmd, stdin)
    }

    /// An admin kube client.
    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        kube_client_from(&self.kubeconfig()).await
    }

    /// Writes a kubeconfig that authenticates with a bearer token (a
    /// ServiceAccount's, or a person's ID token) and returns its path.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: iot-local\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: iot-local\n    user: {name}\ncurrent-context: {name}\n",
            url = self.url(),
            ca = self.ca_file().display(),
        );
        crate::auth::write_private(&path, &text)?;
        Ok(path)
    }

    /// The audit log so far.
    pub fn audit(&self) -> anyhow::Result<Vec<AuditEntry>> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log"))?;
        Ok(text.lines().filter_map(parse_audit_line).collect())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.url();
        wait_readyz(&url, self.dir.path(), [&mut self.etcd, &mut self.apiserver], timeout).await
    }
}

pub(crate) fn parse_audit_line(line: &str) -> Option<AuditEntry> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
    Some(AuditEntry {
        user: s("/user/username"),
        verb: s("/verb"),
        uri: s("/requestURI"),
        decision: s("/annotations/authorization.k8s.io~1decision"),
    })
}

fn openssl(d: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").current_dir(d).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            let mut c = child;
            kill_child(&mut c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_lines_yield_user_verb_and_decision() {
        let line = r#"{"kind":"Event","verb":"delete","requestURI":"/apis/x","user":{"username":"system:serviceaccount:ns:sa"},"annotations":{"authorization.k8s.io/decision":"forbid","authorization.k8s.io/reason":""}}"#;
        let e = parse_audit_line(line).expect("parses");
        assert_eq!(e.user, "system:serviceaccount:ns:sa");
        assert_eq!(e.verb, "delete");
        assert_eq!(e.decision, "forbid");
        assert!(parse_audit_line("not json").is_none());
    }
}
