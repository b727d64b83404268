//! Single sign-on for the people who run the fleet. They log in once with their
//! company identity (Zitadel in production, the stand-in in `hack/oidc` here); the
//! ID token goes to the Kubernetes API server, which maps its `groups` claim to RBAC.
//! Nothing here decides permissions.
//!
//! - [`Provider`]: discovery, verification, refresh, revocation.
//! - [`Provider::login_with_browser`] / [`Provider::login_with_device_code`].
//! - [`TokenCache`]: a 0600 file per issuer and client, refreshed under a lock.
//! - [`kube`]: kubectl's ExecCredential and a kubeconfig user that runs the plugin.

pub mod cache;
pub mod kube;
mod login;
mod provider;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cache::{Session, TokenCache, default_dir};
pub use login::{DEFAULT_SCOPES, PendingLogin, PendingLoginParts, Prompt};
pub use provider::{Identity, IssuerConfig, Provider};

#[derive(Debug, thiserror::Error)]
pub enum SsoError {
    #[error("not logged in to {issuer}")]
    NotLoggedIn { issuer: String },
    #[error("the login session with {issuer} has ended: {reason}")]
    SessionEnded { issuer: String, reason: String },
    #[error("cannot use the OpenID provider at {issuer}: {reason}")]
    Discovery { issuer: String, reason: String },
    #[error("reading the CA file {}: {source}", path.display())]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the login was refused: {0}")]
    Denied(String),
    #[error("nobody completed the login within {}s", .0.as_secs())]
    TimedOut(Duration),
    #[error("OIDC protocol error: {0}")]
    Protocol(String),
    #[error("talking to the provider: {0}")]
    Http(String),
    #[error("{0}")]
    Config(String),
}

impl SsoError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        SsoError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Whether only a new interactive login can fix this.
    pub fn needs_login(&self) -> bool {
        matches!(self, SsoError::NotLoggedIn { .. } | SsoError::SessionEnded { .. })
    }
}

/// An error and its causes on one line: reqwest and openidconnect put the useful
/// part (a refused connection, an unknown CA) a few sources down.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A random secret for session ids and CSRF tokens: 32 bytes from the OS's CSPRNG
/// (through `openidconnect`'s generator), base64url.
pub fn random_secret() -> String {
    openidconnect::CsrfToken::new_random_len(32).secret().clone()
}
