//! The two ways a person logs in from a terminal.
//! - Authorization code + PKCE with a loopback redirect (RFC 8252): a one-shot HTTP
//!   listener on 127.0.0.1 receives the code; state and nonce are checked.
//! - Device code (RFC 8628), for a shell with no browser on the same machine.

use std::time::Duration;

use openidconnect::core::{CoreAuthenticationFlow, CoreDeviceAuthorizationResponse};
use openidconnect::{AuthorizationCode, CsrfToken, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::SsoError;
use crate::cache::Session;
use crate::provider::Provider;

/// Scopes every login asks for: identity, email for the user name, groups for RBAC,
/// and offline_access so the session outlives one ID token.
pub const DEFAULT_SCOPES: &[&str] = &["email", "profile", "groups", "offline_access"];

/// What to show the person while a login waits on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Open this URL in a browser on this machine.
    OpenUrl(String),
    /// Visit `uri` anywhere and enter `user_code`; `complete` has the code filled in.
    EnterCode {
        uri: String,
        user_code: String,
        complete: Option<String>,
    },
}

/// A started authorization-code login: where to send the person, and what the
/// callback must be checked against. Holds secrets (the PKCE verifier): keep it
/// server-side and never log it.
pub struct PendingLogin {
    pub url: String,
    pub state: String,
    nonce: Nonce,
    verifier: PkceCodeVerifier,
    redirect: RedirectUrl,
}

impl std::fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLogin")
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

/// What a started login must remember until its callback, as plain data: for a
/// server that keeps no table of pending logins and hands this, sealed, to the
/// browser instead (the dashboard). Secrets: never log it.
#[derive(Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PendingLoginParts {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    pub redirect: String,
}

impl std::fmt::Debug for PendingLoginParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLoginParts")
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

impl PendingLogin {
    /// The parts [`PendingLogin::from_parts`] needs to finish this login.
    pub fn into_parts(self) -> PendingLoginParts {
        PendingLoginParts {
            state: self.state,
            nonce: self.nonce.secret().clone(),
            verifier: self.verifier.secret().clone(),
            redirect: self.redirect.as_str().to_owned(),
        }
    }

    pub fn from_parts(parts: PendingLoginParts) -> Result<Self, SsoError> {
        Ok(Self {
            url: String::new(),
            state: parts.state,
            nonce: Nonce::new(parts.nonce),
            verifier: PkceCodeVerifier::new(parts.verifier),
            redirect: RedirectUrl::new(parts.redirect).map_err(|e| SsoError::Config(e.to_string()))?,
        })
    }
}

impl Provider {
    /// Starts an authorization-code login with PKCE (S256), a random state and a
    /// nonce, returning to `redirect`. Used by `iotctl login` (loopback redirect)
    /// and by the dashboard (its own /callback).
    pub fn start_login(&self, redirect: &str, scopes: &[String]) -> Result<PendingLogin, SsoError> {
        let redirect = RedirectUrl::new(redirect.to_owned()).map_err(|e| SsoError::Config(e.to_string()))?;
        let client = self.client().set_redirect_uri(redirect.clone());
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.url();
        Ok(PendingLogin {
            url: url.to_string(),
            state: state.secret().clone(),
            nonce,
            verifier,
            redirect,
        })
    }

    /// Finishes a login: trades the code (with the PKCE verifier) for tokens and
    /// verifies the ID token against the nonce. The caller has checked the state.
    pub async fn finish_login(&self, pending: PendingLogin, code: &str) -> Result<Session, SsoError> {
        let client = self.client().set_redirect_uri(pending.redirect);
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| SsoError::Protocol(e.to_string()))?
            .set_pkce_verifier(pending.verifier)
            .request_async(&self.http)
            .await
            .map_err(|e| {
                SsoError::Protocol(format!("exchanging the authorization code: {}", crate::error_chain(&e)))
            })?;
        self.session_from(&response, Some(&pending.nonce), None)
    }

    /// Logs in through the browser. `listen_port` 0 picks a free port, which
    /// providers accept for native clients' loopback redirects; some require a
    /// registered one.
    pub async fn login_with_browser(
        &self,
        scopes: &[String],
        listen_port: u16,
        timeout: Duration,
        prompt: impl FnOnce(Prompt),
    ) -> Result<Session, SsoError> {
        let listener = TcpListener::bind(("127.0.0.1", listen_port)).await.map_err(|e| {
            SsoError::Config(format!(
                "cannot listen on 127.0.0.1:{listen_port} for the login redirect: {e}"
            ))
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| SsoError::Config(e.to_string()))?
            .port();
        let pending = self.start_login(&format!("http://127.0.0.1:{port}/callback"), scopes)?;
        prompt(Prompt::OpenUrl(pending.url.clone()));
        let code = tokio::time::timeout(timeout, wait_for_callback(&listener, &pending.state))
            .await
            .map_err(|_| SsoError::TimedOut(timeout))??;
        self.finish_login(pending, &code).await
    }

    /// Logs in with the device-code flow.
    pub async fn login_with_device_code(
        &self,
        scopes: &[String],
        timeout: Duration,
        prompt: impl FnOnce(Prompt),
    ) -> Result<Session, SsoError> {
        let Some(device_url) = self
            .metadata
            .additional_metadata()
            .device_authorization_endpoint
            .clone()
        else {
            return Err(SsoError::Config(format!(
                "{} does not offer the device-code flow; log in with the browser instead",
                self.config.issuer_url
            )));
        };
        let client = self.client().set_device_authorization_url(device_url);
        let mut request = client.exchange_device_code().add_scope(Scope::new("openid".into()));
        for scope in scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let details: CoreDeviceAuthorizationResponse = request
            .request_async(&self.http)
            .await
            .map_err(|e| SsoError::Protocol(format!("starting the device-code flow: {}", crate::error_chain(&e))))?;
        prompt(Prompt::EnterCode {
            uri: details.verification_uri().to_string(),
            user_code: details.user_code().secret().clone(),
            complete: details.verification_uri_complete().map(|u| u.secret().clone()),
        });
        let response = client
            .exchange_device_access_token(&details)
            .map_err(|e| SsoError::Protocol(e.to_string()))?
            .request_async(&self.http, tokio::time::sleep, Some(timeout))
            .await
            .map_err(|e| {
                SsoError::Protocol(format!("waiting for the device-code login: {}", crate::error_chain(&e)))
            })?;
        self.session_from(&response, None, None)
    }
}

/// Serves the loopback listener until a request to /callback arrives carrying our
/// state. Each connection is handled in its own task, so a connection that sends
/// nothing (a browser's preconnect) cannot hold up the real redirect. Requests
/// without our state (a favicon, a port scan, a forged callback) get an error page
/// and the login keeps waiting; a provider error with our state ends it.
async fn wait_for_callback(listener: &TcpListener, state: &str) -> Result<String, SsoError> {
    let (found, mut results) = tokio::sync::mpsc::channel::<Result<String, SsoError>>(1);
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(|e| SsoError::Config(format!("login redirect listener: {e}")))?;
                let (found, state) = (found.clone(), state.to_owned());
                handlers.spawn(async move {
                    if let Some(outcome) = handle_callback(stream, &state).await {
                        let _ = found.send(outcome).await;
                    }
                });
            }
            Some(outcome) = results.recv() => return outcome,
        }
    }
}

/// One connection to the loopback listener: `Some` when it settles the login.
async fn handle_callback(mut stream: TcpStream, state: &str) -> Option<Result<String, SsoError>> {
    let target = read_request_target(&mut stream).await?;
    let Ok(url) = url::Url::parse(&format!("http://127.0.0.1{target}")) else {
        respond(&mut stream, 400, "Bad request.").await;
        return None;
    };
    if url.path() != "/callback" {
        respond(&mut stream, 404, "Not found.").await;
        return None;
    }
    let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
    // The state comes first, for errors too (RFC 6749 4.1.2.1): only the provider
    // we sent the person to knows it.
    if param("state").as_deref() != Some(state) {
        respond(
            &mut stream,
            400,
            "This response does not belong to the waiting login; it was ignored.",
        )
        .await;
        return None;
    }
    if let Some(error) = param("error") {
        let description = param("error_description").unwrap_or_default();
        respond(&mut stream, 400, "Login failed. Return to your terminal.").await;
        return Some(Err(SsoError::Denied(
            format!("{error} {description}").trim().to_owned(),
        )));
    }
    let Some(code) = param("code") else {
        respond(&mut stream, 400, "No authorization code in the response.").await;
        return Some(Err(SsoError::Protocol(
            "the redirect carries no authorization code".into(),
        )));
    };
    respond(
        &mut stream,
        200,
        "Logged in. You can close this tab and return to your terminal.",
    )
    .await;
    Some(Ok(code))
}

/// The request target of an HTTP/1 request line, read with a size and time limit.
async fn read_request_target(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.ok()??;
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next()?.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) if target.starts_with('/') => Some(target.to_owned()),
        _ => None,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, message: &str) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>iotctl login</title>\
         <body style=\"font:16px system-ui,sans-serif;margin:3rem\"><p>{message}</p></body>"
    );
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // The browser may already be gone; the login result does not depend on it.
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn send(port: u16, request: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
            return String::new();
        };
        let _ = s.write_all(request.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn stray_requests_are_ignored_and_the_right_callback_yields_the_code()
    -> Result<(), Box<dyn std::error::Error>> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let waiter = tokio::spawn(async move { wait_for_callback(&listener, "st8").await });
        let favicon = send(port, "GET /favicon.ico HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(favicon.starts_with("HTTP/1.1 404"), "{favicon}");
        let ok = send(port, "GET /callback?code=abc&state=st8 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert_eq!(waiter.await??, "abc");
        Ok(())
    }

    #[tokio::test]
    async fn a_forged_callback_is_ignored_and_a_provider_error_ends_the_login() -> Result<(), Box<dyn std::error::Error>>
    {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let waiter = tokio::spawn(async move { wait_for_callback(&listener, "st8").await });
        // A silent connection must not hold up the others.
        let _silent = TcpStream::connect(("127.0.0.1", port)).await?;
        for forged in ["code=abc&state=forged", "error=access_denied&state=forged", "code=abc"] {
            let reply = send(port, &format!("GET /callback?{forged} HTTP/1.1\r\n\r\n")).await;
            assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        }
        assert!(!waiter.is_finished(), "forged callbacks do not end the login");
        let reply = send(
            port,
            "GET /callback?error=access_denied&error_description=no+way&state=st8 HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        let err = waiter.await?.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("access_denied no way"), "{err}");
        Ok(())
    }
}
