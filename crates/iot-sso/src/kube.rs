//! The kubectl side: the ExecCredential the plugin prints, the locked refresh that
//! produces it, and the kubeconfig user that calls the plugin.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{IssuerConfig, Provider, Session, SsoError, TokenCache};

/// The ExecCredential API version written and read. v1beta1 works with kubectl and
/// client-go from 1.11 on and with kube-rs, unlike v1 (1.22+).
pub const EXEC_API_VERSION: &str = "client.authentication.k8s.io/v1beta1";

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ExecCredential<'a> {
    api_version: &'a str,
    kind: &'a str,
    status: ExecStatus<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ExecStatus<'a> {
    token: &'a str,
    expiration_timestamp: String,
}

/// The plugin's stdout for this session. The expiry handed to kubectl is
/// [`Session::renew_margin`] early, so kubectl calls the plugin again before the
/// token dies.
pub fn exec_credential(session: &Session) -> String {
    let expires: DateTime<Utc> = session.id_token_expiry - session.renew_margin();
    let cred = ExecCredential {
        api_version: EXEC_API_VERSION,
        kind: "ExecCredential",
        status: ExecStatus {
            token: &session.id_token,
            expiration_timestamp: expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    };
    serde_json::to_string(&cred).unwrap_or_default()
}

/// A session whose ID token is fresh ([`Session::is_fresh`]), refreshing it if
/// needed. The refresh runs under the cache lock and re-reads the cache inside it,
/// so concurrent callers refresh once and share the result.
pub async fn fresh_session(cache: &TokenCache, issuer: &IssuerConfig) -> Result<Session, SsoError> {
    let not_logged_in = || SsoError::NotLoggedIn {
        issuer: issuer.issuer_url.clone(),
    };
    if let Some(s) = cache.load()? {
        if s.is_fresh() {
            return Ok(s);
        }
    } else {
        return Err(not_logged_in());
    }
    let _guard = cache.lock().await?;
    let session = cache.load()?.ok_or_else(not_logged_in)?;
    if session.is_fresh() {
        // Another caller refreshed while we waited for the lock.
        return Ok(session);
    }
    let provider = Provider::discover(issuer).await?;
    match provider.refresh(&session).await {
        Ok(renewed) => {
            cache.save(&renewed)?;
            tracing::debug!(expiry = %renewed.id_token_expiry, "refreshed the ID token");
            Ok(renewed)
        }
        Err(e) if e.needs_login() => {
            // The refresh token is spent: keep nothing that looks like a session.
            cache.remove()?;
            Err(e)
        }
        // The provider is unreachable or failing for now, but the token we have
        // still works for a few seconds: better than failing the request.
        Err(e) if session.id_token_expiry > Utc::now() + chrono::Duration::seconds(5) => {
            tracing::warn!(error = %e, "refresh failed; using the current ID token until it expires");
            Ok(session)
        }
        Err(e) => Err(e),
    }
}

/// Names used in a generated kubeconfig.
#[derive(Debug, Clone)]
pub struct KubeconfigTarget {
    /// The API server URL; without it only the user entry is written.
    pub server: Option<String>,
    pub certificate_authority: Option<String>,
    pub cluster_name: String,
    pub user_name: String,
    pub context_name: String,
}

/// A kubeconfig (YAML) whose user runs `<program> credential ...` for this issuer.
/// Values are written as JSON strings, which YAML reads as double-quoted scalars.
pub fn kubeconfig(program: &str, issuer: &IssuerConfig, target: &KubeconfigTarget) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut args = vec![
        "credential".to_owned(),
        "--issuer".to_owned(),
        issuer.issuer_url.clone(),
        "--client-id".to_owned(),
        issuer.client_id.clone(),
    ];
    if let Some(ca) = &issuer.ca_file {
        args.push("--ca-file".to_owned());
        args.push(ca.display().to_string());
    }
    let mut out = String::from("apiVersion: v1\nkind: Config\npreferences: {}\n");
    if let Some(server) = &target.server {
        out += &format!(
            "clusters:\n- name: {}\n  cluster:\n    server: {}\n",
            q(&target.cluster_name),
            q(server)
        );
        if let Some(ca) = &target.certificate_authority {
            out += &format!("    certificate-authority: {}\n", q(ca));
        }
        out += &format!(
            "contexts:\n- name: {}\n  context:\n    cluster: {}\n    user: {}\ncurrent-context: {}\n",
            q(&target.context_name),
            q(&target.cluster_name),
            q(&target.user_name),
            q(&target.context_name)
        );
    }
    out += &format!(
        "users:\n- name: {}\n  user:\n    exec:\n      apiVersion: {}\n      command: {}\n      args:\n",
        q(&target.user_name),
        q(EXEC_API_VERSION),
        q(program)
    );
    for a in &args {
        out += &format!("      - {}\n", q(a));
    }
    // IfAvailable: kube-rs passes the plugin's stderr ("log in again with ...")
    // through to the person only in interactive mode; kubectl always does.
    out += "      interactiveMode: IfAvailable\n      provideClusterInfo: false\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn exec_credential_has_the_client_go_shape_and_expires_early() {
        let expiry = DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default();
        let s = Session {
            issuer_url: "https://i".into(),
            client_id: "c".into(),
            id_token: "a.b.c".into(),
            id_token_expiry: expiry,
            refresh_token: None,
            identity: Identity {
                subject: "s".into(),
                email: None,
                groups: vec![],
                zitadel_roles: vec![],
            },
            saved_at: expiry - chrono::Duration::seconds(300),
        };
        let v: serde_json::Value = serde_json::from_str(&exec_credential(&s)).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "kind": "ExecCredential",
                "status": {"token": "a.b.c", "expirationTimestamp": "2026-11-30T11:59:30Z"}
            })
        );
    }

    #[test]
    fn kubeconfig_runs_the_plugin_with_the_issuer() {
        let issuer = IssuerConfig {
            issuer_url: "https://127.0.0.1:9443".into(),
            client_id: "iot-fleet".into(),
            ca_file: Some("/etc/ca dir/ca.crt".into()),
        };
        let target = KubeconfigTarget {
            server: Some("https://127.0.0.1:6443".into()),
            certificate_authority: Some("/k/ca.crt".into()),
            cluster_name: "fleet".into(),
            user_name: "fleet-sso".into(),
            context_name: "fleet".into(),
        };
        let text = kubeconfig("/usr/bin/iotctl", &issuer, &target);
        for want in [
            "command: \"/usr/bin/iotctl\"",
            "- \"credential\"",
            "- \"https://127.0.0.1:9443\"",
            "- \"/etc/ca dir/ca.crt\"",
            "server: \"https://127.0.0.1:6443\"",
            "current-context: \"fleet\"",
            "interactiveMode: IfAvailable",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        let user_only = kubeconfig("iotctl", &issuer, &KubeconfigTarget { server: None, ..target });
        assert!(!user_only.contains("clusters:") && user_only.contains("users:"));
    }
}
