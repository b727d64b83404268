//! `iotctl login`, `logout` and `credential`: single sign-on for people. The ID
//! token goes to the Kubernetes API server, whose RBAC decides what its groups may
//! do; iotctl only obtains, caches and refreshes it. Tokens are never printed,
//! except to kubectl through the credential plugin's stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use iot_sso::kube::{KubeconfigTarget, exec_credential, fresh_session, kubeconfig};
use iot_sso::{IssuerConfig, Prompt, Provider, Session, SsoError, TokenCache};

use crate::out;

#[derive(Args, Debug, Clone)]
pub struct IssuerArgs {
    /// OIDC issuer URL (Zitadel: https://<instance>.zitadel.cloud).
    #[arg(long = "issuer", env = "IOT_OIDC_ISSUER")]
    issuer: String,
    /// Our client id at the issuer; the API server's --oidc-client-id must match.
    #[arg(long, env = "IOT_OIDC_CLIENT_ID", default_value = "iot-fleet")]
    client_id: String,
    /// CA bundle for the issuer's certificate, when it is not publicly trusted.
    #[arg(long, env = "IOT_OIDC_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl IssuerArgs {
    fn config(&self) -> anyhow::Result<IssuerConfig> {
        let ca_file = match &self.ca_file {
            // Absolute, because a kubeconfig that names it runs from anywhere.
            Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("CA file {}", p.display()))?),
            None => None,
        };
        Ok(IssuerConfig {
            // As given: the issuer is compared byte for byte with the tokens' `iss`.
            issuer_url: self.issuer.clone(),
            client_id: self.client_id.clone(),
            ca_file,
        })
    }

    fn login_hint(&self) -> String {
        let mut hint = format!("iotctl login --issuer {}", self.issuer);
        if self.client_id != "iot-fleet" {
            hint += &format!(" --client-id {}", self.client_id);
        }
        if let Some(ca) = &self.ca_file {
            let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
            hint += &format!(" --ca-file '{}'", ca.display());
        }
        hint
    }
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    #[command(flatten)]
    issuer: IssuerArgs,
    /// Use the device-code flow: enter a code on any device's browser.
    #[arg(long)]
    device_code: bool,
    /// Print the login URL but do not try to open a browser.
    #[arg(long)]
    no_browser: bool,
    /// Loopback port for the browser's redirect (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// How long to wait for the login to be completed.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Extra scopes to ask for, on top of openid email profile groups offline_access
    /// (Zitadel: urn:zitadel:iam:org:project:id:<project>:aud).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// After logging in, print a kubeconfig whose user runs `iotctl credential`.
    #[arg(long)]
    print_kubeconfig: bool,
    /// API server URL for the printed kubeconfig (without it, only the user entry).
    #[arg(long, requires = "print_kubeconfig")]
    server: Option<String>,
    /// CA file of the API server, for the printed kubeconfig.
    #[arg(long, requires = "server")]
    certificate_authority: Option<PathBuf>,
    /// Name of the cluster, user and context in the printed kubeconfig.
    #[arg(long, default_value = "iot-fleet")]
    context: String,
}

fn cache_for(issuer: &IssuerConfig) -> anyhow::Result<TokenCache> {
    Ok(TokenCache::new(&iot_sso::default_dir()?, issuer))
}

pub async fn login(args: &LoginArgs) -> anyhow::Result<()> {
    let issuer = args.issuer.config()?;
    let provider = Provider::discover(&issuer).await?;
    let mut scopes: Vec<String> = iot_sso::DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect();
    scopes.extend(args.scopes.iter().cloned());
    let open_browser = !args.no_browser && has_display();
    let show = |prompt: Prompt| match prompt {
        Prompt::OpenUrl(url) => {
            out::warn(&format!("Log in at:\n\n  {url}\n"));
            // The browser must not write to our stdout: it may carry a kubeconfig.
            let opened = open_browser
                && std::process::Command::new("xdg-open")
                    .arg(&url)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .is_ok();
            if opened {
                out::warn("(opened in your browser)");
            } else if !args.no_browser {
                out::warn("(no browser here? run again with --device-code and log in from any device)");
            }
            out::warn("Waiting for the login to finish...");
        }
        Prompt::EnterCode {
            uri,
            user_code,
            complete,
        } => {
            out::warn(&format!(
                "On any device, open\n\n  {uri}\n\nand enter the code  {user_code}\n"
            ));
            if let Some(c) = complete {
                out::warn(&format!("(or open {c} directly)"));
            }
            out::warn("Waiting for the login to finish...");
        }
    };
    let session = if args.device_code {
        provider.login_with_device_code(&scopes, args.timeout, show).await?
    } else {
        provider
            .login_with_browser(&scopes, args.port, args.timeout, show)
            .await?
    };
    let cache = cache_for(&issuer)?;
    {
        // Under the refresh lock, so a plugin run refreshing the old session
        // cannot overwrite the new one.
        let _guard = cache.lock().await?;
        cache.save(&session)?;
    }
    report_login(&session, &cache);
    if args.print_kubeconfig {
        let program = std::env::current_exe().context("locating the iotctl binary for the kubeconfig")?;
        let certificate_authority = match &args.certificate_authority {
            Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("CA file {}", p.display()))?),
            None => None,
        };
        let target = KubeconfigTarget {
            server: args.server.clone(),
            certificate_authority: certificate_authority.map(|p| p.display().to_string()),
            cluster_name: args.context.clone(),
            user_name: format!("{}-sso", args.context),
            context_name: args.context.clone(),
        };
        out::text(&kubeconfig(&program.display().to_string(), &issuer, &target));
    }
    Ok(())
}

fn has_display() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

fn report_login(session: &Session, cache: &TokenCache) {
    let id = &session.identity;
    let who = id.email.clone().unwrap_or_else(|| id.subject.clone());
    let groups = if id.groups.is_empty() {
        "none".to_owned()
    } else {
        id.groups.join(", ")
    };
    out::warn(&format!(
        "Logged in to {} as {who} (groups: {groups}).",
        session.issuer_url
    ));
    let refresh = if session.refresh_token.is_some() {
        "renewed automatically"
    } else {
        "not renewable (no refresh token was granted): log in again then"
    };
    out::warn(&format!(
        "The ID token is valid until {} and is {refresh}. Session cached in {}.",
        session.id_token_expiry.format("%Y-%m-%d %H:%M:%S UTC"),
        cache.path().display()
    ));
    let invisible = id.roles_invisible_to_kubernetes();
    if !invisible.is_empty() {
        out::warn(&format!(
            "warning: the roles {} are only in Zitadel's nested roles claim, which the Kubernetes API server \
             does not read. Install the flatGroups Action (deploy/zitadel/flat-groups.js; README, Single sign-on) \
             so they appear in `groups`.",
            invisible.join(", ")
        ));
    }
}

pub async fn logout(args: &IssuerArgs) -> anyhow::Result<()> {
    let issuer = args.config()?;
    let cache = cache_for(&issuer)?;
    // Under the refresh lock, so a refresh in flight cannot bring the session back.
    let _guard = cache.lock().await?;
    let Some(session) = cache.load()? else {
        out::warn(&format!("Not logged in to {}.", issuer.issuer_url));
        return Ok(());
    };
    // Revocation is best effort: the local session goes either way.
    let revoked = match Provider::discover(&issuer).await {
        Ok(p) => p.revoke(&session).await,
        Err(e) => Err(e),
    };
    cache.remove()?;
    match revoked {
        Ok(true) => out::warn(&format!(
            "Logged out of {}; the refresh token is revoked.",
            issuer.issuer_url
        )),
        Ok(false) => out::warn(&format!(
            "Logged out of {} (the provider offers no revocation; the refresh token lives until it expires).",
            issuer.issuer_url
        )),
        Err(e) => out::warn(&format!(
            "Logged out of {} locally; revoking the refresh token failed: {e}",
            issuer.issuer_url
        )),
    }
    Ok(())
}

/// kubectl's exec credential plugin: prints an ExecCredential with a fresh ID token.
pub async fn credential(args: &IssuerArgs) -> anyhow::Result<()> {
    let issuer = args.config()?;
    let cache = cache_for(&issuer)?;
    match fresh_session(&cache, &issuer).await {
        Ok(session) => {
            out::line(&exec_credential(&session));
            Ok(())
        }
        Err(e @ (SsoError::NotLoggedIn { .. } | SsoError::SessionEnded { .. })) => {
            anyhow::bail!("{e}. Log in again with: {}", args.login_hint())
        }
        Err(e) => Err(e.into()),
    }
}
