//! People logging in for the SSO tests: `iotctl login` run as a user would, with
//! the browser part done by [`iot_testkit::SignIn`] against the OIDC stand-in.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};

use iot_testkit::{KubeApiServer, OidcStandIn, SignIn, cargo_bin};

/// Demo users of `hack/oidc/users.json`: (user, password, email).
pub const ALICE_ADMIN: (&str, &str, &str) = ("alice", "alice-dev", "alice@fleet.example");
pub const DAVE_DEPLOYER: (&str, &str, &str) = ("dave", "dave-dev", "dave@fleet.example");
pub const VERA_VIEWER: (&str, &str, &str) = ("vera", "vera-dev", "vera@fleet.example");
/// A deployer whose role is only in Zitadel's nested claim (no flatGroups Action).
pub const NORA_NESTED: (&str, &str, &str) = ("nora", "nora-dev", "nora@fleet.example");
/// A viewer here, and fleet-admins in another Zitadel project (which must not count).
pub const OLGA_OTHER_PROJECT: (&str, &str, &str) = ("olga", "olga-dev", "olga@fleet.example");
/// In no group at all.
pub const SAM_NOGROUPS: (&str, &str, &str) = ("sam", "sam-dev", "sam@fleet.example");

/// A person with their own config dir (token cache) and the kubeconfig that
/// `iotctl login --print-kubeconfig` wrote for them.
pub struct Person {
    pub user: String,
    pub config_home: PathBuf,
    pub kubeconfig: PathBuf,
    /// What `iotctl login` told them on stderr.
    pub login_messages: String,
}

impl Person {
    /// `iotctl ARGS` as this person (their config dir, their kubeconfig).
    pub fn iotctl(&self) -> anyhow::Result<std::process::Command> {
        let mut cmd = std::process::Command::new(cargo_bin("iotctl")?);
        cmd.env("XDG_CONFIG_HOME", &self.config_home)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("IOTCTL_CONFIG_DIR");
        Ok(cmd)
    }

    /// `kubectl ARGS` as this person; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.env("XDG_CONFIG_HOME", &self.config_home)
            .env_remove("IOTCTL_CONFIG_DIR")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args);
        iot_testkit::run_captured(cmd, stdin)
    }

    /// The ExecCredential `iotctl credential` prints now (runs the plugin once).
    pub fn credential_token(&self, oidc: &OidcStandIn) -> anyhow::Result<String> {
        let mut cmd = self.iotctl()?;
        cmd.args(["credential", "--issuer", oidc.issuer(), "--ca-file"])
            .arg(oidc.ca_file());
        let (ok, out, err) = iot_testkit::run_captured(cmd, None)?;
        anyhow::ensure!(ok, "iotctl credential failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no token in {out}"))
    }
}

/// How `iotctl login` is asked to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Browser,
    DeviceCode,
}

/// Runs `iotctl login --print-kubeconfig` for `who`, completes the login as that
/// person, and saves the printed kubeconfig.
pub async fn login(
    oidc: &OidcStandIn,
    api: &KubeApiServer,
    who: (&str, &str, &str),
    flow: Flow,
    dir: &Path,
) -> anyhow::Result<Person> {
    let (user, password, _) = who;
    let config_home = dir.join(format!("home-{user}"));
    std::fs::create_dir_all(&config_home)?;
    let mut cmd = tokio::process::Command::new(cargo_bin("iotctl")?);
    cmd.env("XDG_CONFIG_HOME", &config_home)
        .env_remove("IOTCTL_CONFIG_DIR")
        .env_remove("DISPLAY")
        .args(["login", "--issuer", oidc.issuer(), "--ca-file"])
        .arg(oidc.ca_file())
        .args([
            "--no-browser",
            "--timeout",
            "60s",
            "--print-kubeconfig",
            "--server",
            &api.url(),
        ])
        .arg("--certificate-authority")
        .arg(api.ca_file())
        .args(["--context", "fleet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if flow == Flow::DeviceCode {
        cmd.arg("--device-code");
    }
    let mut child = cmd.spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut lines = BufReader::new(stderr).lines();
    let mut said = String::new();
    // The browser flow prints the authorization URL; the device flow prints the
    // verification URL with the code filled in ("or open ... directly").
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            said.push_str(&line);
            said.push('\n');
            let found = match flow {
                Flow::Browser => line.trim().starts_with("https://").then(|| line.trim().to_owned()),
                Flow::DeviceCode => line
                    .trim()
                    .strip_prefix("(or open ")
                    .and_then(|r| r.strip_suffix(" directly)"))
                    .map(str::to_owned),
            };
            if let Some(u) = found {
                return Ok(u);
            }
        }
        anyhow::bail!("iotctl login printed no URL:\n{said}")
    })
    .await
    .map_err(|_| anyhow::anyhow!("iotctl login printed no URL in 30 s"))??;
    let outcome = SignIn::new(&oidc.ca_file())?.complete(&url, user, password).await?;
    anyhow::ensure!(
        outcome.status == 200,
        "sign-in as {user} ended with {} at {}: {}",
        outcome.status,
        outcome.url,
        outcome.body
    );
    let rest = async {
        let mut tail = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            tail.push_str(&line);
            tail.push('\n');
        }
        tail
    };
    let (output, tail) = tokio::time::timeout(Duration::from_secs(30), async {
        let tail = rest.await;
        (child.wait_with_output().await, tail)
    })
    .await
    .map_err(|_| anyhow::anyhow!("iotctl login did not finish after the sign-in"))?;
    let output = output?;
    said.push_str(&tail);
    anyhow::ensure!(output.status.success(), "iotctl login as {user} failed:\n{said}");
    let kubeconfig = dir.join(format!("kubeconfig-{user}"));
    std::fs::write(&kubeconfig, &output.stdout)?;
    let person = Person {
        user: user.to_owned(),
        config_home,
        kubeconfig,
        login_messages: said,
    };
    // kube-apiserver 1.20 fetches the issuer's discovery and keys in the
    // background after start, retrying every 10 s, and answers 401 until then
    // (seen on a loaded machine). Wait for it as a person would retry, but never
    // longer than a minute: a token it keeps refusing fails the test.
    iot_testkit::wait_until(
        Duration::from_secs(60),
        "the API server to accept OIDC tokens",
        || async {
            let (_, _, err) = person
                .kubectl(&["auth", "can-i", "list", "deployments.iot.nationtech.io"], None)
                .ok()?;
            (!err.contains("Unauthorized")).then_some(())
        },
    )
    .await?;
    Ok(person)
}

/// The chart installed with SSO bindings for the stand-in's demo groups.
pub fn install_chart_with_sso_groups(api: &KubeApiServer, ns: &str) -> anyhow::Result<()> {
    let kc = api.kubeconfig().display().to_string();
    crate::chart::helm_ok(&[
        "install",
        &crate::chart::chart_dir().display().to_string(),
        "--release",
        "iot",
        "--namespace",
        ns,
        "--kubeconfig",
        &kc,
        "--create-namespace",
        "--set",
        "nats.credentials.type=none",
        "--set",
        "sso.groups.viewers={fleet-viewers}",
        "--set",
        "sso.groups.deployers={fleet-deployers}",
        "--set",
        "sso.groups.admins={fleet-admins}",
    ])
    .map(drop)
}
