//! Connecting to NATS with credentials from a [`CredentialSource`].

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::error::NatsError;

/// Where NATS credentials come from. The agent, operator and CLI take one of these
/// instead of hard-coding any; Chapter 4 adds a source that mints short-lived
/// per-device credentials. Async because such sources fetch over the network.
pub trait CredentialSource: Send + Sync + Debug {
    /// Short description for logs, never containing a secret.
    fn describe(&self) -> String;
    /// Connect options carrying the credentials.
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, NatsError>>;
}

/// A NATS `.creds` file (user JWT + nkey seed), as issued by `nsc` or an account server.
#[derive(Debug, Clone)]
pub struct CredsFile(pub PathBuf);

impl CredentialSource for CredsFile {
    fn describe(&self) -> String {
        format!("creds file {}", self.0.display())
    }
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, NatsError>> {
        Box::pin(async move {
            ConnectOptions::with_credentials_file(&self.0)
                .await
                .map_err(|e| NatsError::Credentials(format!("reading {}: {e}", self.0.display())))
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
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, NatsError>> {
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
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, NatsError>> {
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
    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, NatsError>> {
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

/// Which server a client is on, as that server introduced itself (its INFO, which
/// the client refreshes on every reconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSummary {
    pub name: String,
    pub id: String,
    /// The cluster's name; `None` for a server alone.
    pub cluster: Option<String>,
    pub version: String,
}

impl ServerSummary {
    pub fn of(client: &async_nats::Client) -> Self {
        let info = client.server_info();
        Self {
            name: info.server_name,
            id: info.server_id,
            cluster: info.cluster.filter(|c| !c.is_empty()),
            version: info.version,
        }
    }
}

impl std::fmt::Display for ServerSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nats server {} (version {}", self.name, self.version)?;
        match &self.cluster {
            Some(cluster) => write!(f, ", cluster {cluster})"),
            None => write!(f, ", no cluster)"),
        }
    }
}

/// How often a client pings the server. async-nats drops a connection once more than
/// two pings are unanswered, so a dead link (a cut cable, a NAT that forgot us) is
/// noticed within two to three intervals, instead of waiting minutes for TCP
/// retransmits to give up.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(3);

/// How a client trusts the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM bundle of the CA(s) that may sign the server's certificate. Only these are
    /// trusted when set; the system's roots otherwise.
    pub ca_file: Option<PathBuf>,
    /// Refuse to talk without TLS, whatever the URL's scheme (`tls://` always
    /// requires it).
    pub required: bool,
}

/// Everything about a connection besides the credentials.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The client name the server shows (`connz`).
    pub name: String,
    /// Fail if the first connect fails; otherwise keep trying in the background.
    pub wait_for_first: bool,
    pub ping_interval: Duration,
    pub tls: NatsTls,
    /// Prefix of reply subjects, when the credentials do not choose one (a viewer
    /// or operator connecting without an identity still answers only on its own
    /// inbox, which the operator's services check).
    pub inbox_prefix: Option<String>,
}

impl ClientOptions {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            wait_for_first: true,
            ping_interval: DEFAULT_PING_INTERVAL,
            tls: NatsTls::default(),
            inbox_prefix: None,
        }
    }

    pub fn background(mut self) -> Self {
        self.wait_for_first = false;
        self
    }

    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    pub fn tls(mut self, tls: NatsTls) -> Self {
        self.tls = tls;
        self
    }

    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.inbox_prefix = Some(prefix.into());
        self
    }
}

/// Connects with default settings, trusting the CA in `ca_file` (the system's
/// roots without): see [`connect_with`]. Fails if the first connect fails.
pub async fn connect(
    servers: &[String],
    creds: &dyn CredentialSource,
    client_name: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<NatsConnection, NatsError> {
    let opts = ClientOptions::new(client_name).tls(NatsTls {
        ca_file: ca_file.map(Into::into),
        required: false,
    });
    connect_with(servers, creds, &opts).await
}

/// Connects, then reconnects forever with jittered backoff. With
/// `wait_for_first` false a first connect that fails is logged with its reason (a
/// certificate the CA does not vouch for, a refused identity) and retried in the
/// background.
pub async fn connect_with(
    servers: &[String],
    creds: &dyn CredentialSource,
    options: &ClientOptions,
) -> Result<NatsConnection, NatsError> {
    let (tx, rx) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let count = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let build = || async {
        let (tx, count, failures) = (tx.clone(), count.clone(), failures.clone());
        let name = options.name.clone();
        let opts = creds
            .connect_options()
            .await?
            .name(&options.name)
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(options.ping_interval)
            .reconnect_delay_callback(iot_timing::reconnect_delay)
            .event_callback(move |event| {
                let (tx, count, failures, name) = (tx.clone(), count.clone(), failures.clone(), name.clone());
                async move { on_event(event, &name, &tx, &count, &failures) }
            });
        Ok::<_, NatsError>(apply_tls(opts, options))
    };
    let joined = servers.join(",");
    let failed = |source: async_nats::ConnectError| NatsError::Connect {
        hint: connect_hint(&source, &options.tls),
        servers: joined.clone(),
        source,
    };
    let client = match build().await?.connect(servers.to_vec()).await {
        Ok(client) => client,
        Err(e) if options.wait_for_first => return Err(failed(e)),
        Err(e) => {
            // Said once in full: the retrying client reports only the kind of error
            // ("TLS error"), not the certificate problem behind it.
            tracing::error!(error = %failed(e), "retrying in the background");
            build()
                .await?
                .retry_on_initial_connect()
                .connect(servers.to_vec())
                .await
                .map_err(failed)?
        }
    };
    Ok(NatsConnection { client, connects: rx })
}

fn on_event(event: Event, name: &str, tx: &watch::Sender<u64>, count: &AtomicU64, failures: &AtomicU64) {
    match event {
        Event::Connected => {
            failures.store(0, Ordering::SeqCst);
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            tracing::info!(client = %name, connects = n, "NATS connected");
            tx.send_replace(n);
        }
        Event::Disconnected => {
            tracing::warn!(client = %name, "NATS disconnected; retrying with backoff")
        }
        Event::ClientError(e) => {
            // A failed (re)connect: every tenth is logged, so a lasting problem stays
            // visible without flooding the log.
            let n = failures.fetch_add(1, Ordering::SeqCst);
            if n.is_multiple_of(10) {
                tracing::warn!(client = %name, error = %e, failed_connects = n + 1, "NATS connect failed; retrying with backoff");
            }
        }
        other => tracing::debug!(client = %name, event = %other, "NATS event"),
    }
}

fn apply_tls(mut opts: ConnectOptions, options: &ClientOptions) -> ConnectOptions {
    if let Some(ca) = &options.tls.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if options.tls.required {
        opts = opts.require_tls(true);
    }
    if let Some(prefix) = &options.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    opts
}

/// What to check, for the errors people cause by configuration.
pub(crate) fn connect_hint(e: &async_nats::ConnectError, tls: &NatsTls) -> String {
    let text = e.to_string();
    if tls.required && (text.contains("InvalidContentType") || text.contains("corrupt message")) {
        // What rustls says when the other side answers a handshake in plain text.
        " (the server does not speak TLS, and this client requires it so that no token crosses the network in the clear: use the platform's TLS port, or --nats-insecure (NATS_INSECURE=true) for a debugging server)".to_owned()
    } else if e.kind() == async_nats::ConnectErrorKind::Tls || text.contains("certificate") {
        match &tls.ca_file {
            Some(ca) => format!(
                " (the server's certificate does not verify against the CA in {}: is it the CA that signed the server's certificate, and does the certificate name the host in the URL?)",
                ca.display()
            ),
            None => " (no CA file given, so the system's roots were used: pass the platform's CA with --nats-ca-file / NATS_CA_FILE)".to_owned(),
        }
    } else if text.contains("TLS") || text.contains("tls") {
        " (the server and the client disagree about TLS: the platform's servers require it, so use a tls:// URL and pass the CA)".to_owned()
    } else {
        String::new()
    }
}
