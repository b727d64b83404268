//! Connecting to NATS with credentials from a [`CredentialSource`].

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::error::KvError;

/// Where NATS credentials come from. The agent, operator and CLI take one of these
/// instead of hard-coding any; Chapter 4 adds a source that mints short-lived
/// per-device credentials. Async because such sources fetch over the network.
pub trait CredentialSource: Send + Sync + Debug {
    /// Short description for logs, never containing a secret.
    fn describe(&self) -> String;
    /// Connect options carrying the credentials.
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, KvError>>;
}

/// A NATS `.creds` file (user JWT + nkey seed), as issued by `nsc` or an account server.
#[derive(Debug, Clone)]
pub struct CredsFile(pub PathBuf);

impl CredentialSource for CredsFile {
    fn describe(&self) -> String {
        format!("creds file {}", self.0.display())
    }
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, KvError>> {
        Box::pin(async move {
            ConnectOptions::with_credentials_file(&self.0)
                .await
                .map_err(|e| KvError::Credentials(format!("reading {}: {e}", self.0.display())))
        })
    }
}

/// A bearer token.
#[derive(Clone)]
pub struct TokenAuth(pub String);

impl Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuth(<redacted>)")
    }
}

impl CredentialSource for TokenAuth {
    fn describe(&self) -> String {
        "token".into()
    }
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, KvError>> {
        Box::pin(async move { Ok(ConnectOptions::with_token(self.0.clone())) })
    }
}

/// User name and password.
#[derive(Clone)]
pub struct UserPassword {
    pub user: String,
    pub password: String,
}

impl Debug for UserPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserPassword({}, <redacted>)", self.user)
    }
}

impl CredentialSource for UserPassword {
    fn describe(&self) -> String {
        format!("user {}", self.user)
    }
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, KvError>> {
        Box::pin(async move {
            Ok(ConnectOptions::with_user_and_password(
                self.user.clone(),
                self.password.clone(),
            ))
        })
    }
}

/// No credentials: only for a NATS server without auth (local development).
#[derive(Debug, Clone, Copy)]
pub struct Anonymous;

impl CredentialSource for Anonymous {
    fn describe(&self) -> String {
        "no credentials".into()
    }
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, KvError>> {
        Box::pin(async { Ok(ConnectOptions::new()) })
    }
}

/// A live client plus a counter that increases on every (re)connect. Consumer-free
/// followers watch the counter to know when to re-read everything: core NATS
/// delivery is at-most-once across a disconnect.
#[derive(Debug, Clone)]
pub struct NatsConnection {
    pub client: async_nats::Client,
    pub connects: watch::Receiver<u64>,
}

/// How often a client pings the server. async-nats drops a connection once more than
/// two pings are unanswered, so a dead link (a cut cable, a NAT that forgot us) is
/// noticed within two to three intervals, instead of waiting minutes for TCP
/// retransmits to give up.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(3);

/// Connects (retrying forever in the background if the server is not up yet when
/// `wait_for_first` is false), pinging every [`DEFAULT_PING_INTERVAL`].
pub async fn connect(
    servers: &[String],
    creds: &dyn CredentialSource,
    client_name: &str,
    wait_for_first: bool,
) -> Result<NatsConnection, KvError> {
    connect_with(servers, creds, client_name, wait_for_first, DEFAULT_PING_INTERVAL).await
}

/// [`connect`] with an explicit ping interval.
pub async fn connect_with(
    servers: &[String],
    creds: &dyn CredentialSource,
    client_name: &str,
    wait_for_first: bool,
    ping_interval: Duration,
) -> Result<NatsConnection, KvError> {
    let (tx, rx) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let count = Arc::new(AtomicU64::new(0));
    let name = client_name.to_owned();
    let mut opts = creds
        .connect_options()
        .await?
        .name(client_name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(ping_interval)
        .reconnect_delay_callback(crate::timing::reconnect_delay)
        .event_callback(move |event| {
            let tx = tx.clone();
            let count = count.clone();
            let name = name.clone();
            async move {
                match event {
                    Event::Connected => {
                        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                        tracing::info!(client = %name, connects = n, "NATS connected");
                        tx.send_replace(n);
                    }
                    Event::Disconnected => {
                        tracing::warn!(client = %name, "NATS disconnected; retrying with backoff")
                    }
                    other => tracing::debug!(client = %name, event = %other, "NATS event"),
                }
            }
        });
    if !wait_for_first {
        opts = opts.retry_on_initial_connect();
    }
    let client = opts
        .connect(servers.to_vec())
        .await
        .map_err(|source| KvError::Connect {
            servers: servers.join(","),
            source,
        })?;
    Ok(NatsConnection { client, connects: rx })
}
