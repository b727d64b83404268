//! The Kubernetes side of iotctl: a client with short timeouts, and errors that say
//! what to do.

use std::time::Duration;

use anyhow::Context as _;

/// How long a connection to the API server may take before iotctl says it cannot
/// reach it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for the API server KUBECONFIG names (or `~/.kube/config`, or the
/// in-cluster account); `None` when nothing names one.
pub async fn configured() -> anyhow::Result<Option<kube::Client>> {
    let config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(_) if !is_configured() => return Ok(None),
        Err(e) => {
            let kubeconfig = std::env::var("KUBECONFIG").unwrap_or_default();
            return Err(anyhow::Error::new(e).context(format!(
                "cannot reach a Kubernetes API server: KUBECONFIG={kubeconfig:?} is not a usable kubeconfig"
            )));
        }
    };
    let mut config = config;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    let url = config.cluster_url.to_string();
    kube::Client::try_from(config)
        .map(Some)
        .with_context(|| format!("cannot reach a Kubernetes API server at {url}"))
}

/// [`configured`], where a missing configuration is an error.
pub async fn client() -> anyhow::Result<kube::Client> {
    configured()
        .await?
        .context("cannot reach a Kubernetes API server (set KUBECONFIG)")
}

/// Whether anything names an API server: KUBECONFIG, `~/.kube/config`, or the
/// in-cluster service account's environment.
fn is_configured() -> bool {
    std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("HOME").is_some_and(|h| std::path::Path::new(&h).join(".kube/config").exists())
}

/// Whether the API server said the object does not exist (its kind does).
pub fn is_missing_object(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found() && s.details.as_ref().is_some_and(|d| !d.name.is_empty()))
}

/// Whether the API server said the resource type does not exist: its CRD is not
/// installed.
pub fn is_missing_kind(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found()) && !is_missing_object(e)
}

/// An API server error in one line: its message when it answered, the chain of
/// causes when it could not be reached.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        other => {
            let mut text = other.to_string();
            let mut cause = std::error::Error::source(other);
            while let Some(c) = cause {
                let next = c.to_string();
                if !text.contains(&next) {
                    text.push_str(": ");
                    text.push_str(&next);
                }
                cause = c.source();
            }
            text
        }
    }
}

/// When the API server refused a request (403): "permission denied: USER cannot
/// VERB RESOURCE in namespace NS", with the user as the API server named it (the
/// identity KUBECONFIG authenticates as). `None` for any other error.
pub fn permission_denied(e: &kube::Error, verb: &str, resource: &str, ns: &str) -> Option<String> {
    let kube::Error::Api(s) = e else {
        return None;
    };
    if s.code != 403 {
        return None;
    }
    // `... is forbidden: User "system:serviceaccount:ns:sa" cannot patch resource ...`
    let user = s
        .message
        .split_once("User \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(user, _)| user.to_owned())
        .unwrap_or_else(|| "the user KUBECONFIG names".to_owned());
    Some(format!(
        "permission denied: {user} cannot {verb} {resource} in namespace {ns}"
    ))
}
