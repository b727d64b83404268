//! Credentials from an identity token: what devices and the operator present to a
//! NATS server guarded by the platform's auth callout.
//!
//! A fresh token is presented at every (re)connect: the NATS user the callout issues
//! ends no later than the token, so the server disconnects the client at expiry and
//! the reconnect carries a new one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{AuthError, ConnectOptions};
use futures::future::BoxFuture;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{ServiceRole, device_inbox_prefix, service_inbox_prefix};
use iot_bao::enroll::{Enrollment, Role};
use iot_bao::setup::TOKEN_ROLE;
use iot_bao::{Bao, BaoError};

use crate::connect::CredentialSource;
use crate::error::NatsError;

/// Where an identity token comes from.
#[derive(Debug)]
enum Origin {
    /// Log in to OpenBao with the enrollment's approle and ask for a token.
    OpenBao { bao: Box<Bao>, enrollment: Enrollment },
    /// A file kept fresh by something else (a sidecar, a Kubernetes projected token).
    File(PathBuf),
}

#[derive(Debug, Default)]
struct Cached {
    bao_token: Option<(String, Instant)>,
    /// The token, when to refresh it, and when it expires.
    jwt: Option<(String, Instant, Instant)>,
}

/// Identity-token credentials, for a device or a service. Each uses its own inbox
/// prefix, the only one its permissions allow.
#[derive(Debug, Clone)]
pub struct IdentityCredentials {
    origin: Arc<Origin>,
    device: Option<Id>,
    /// A service's role and name (from its enrollment).
    service: Option<(ServiceRole, Id)>,
    cached: Arc<tokio::sync::Mutex<Cached>>,
}

impl IdentityCredentials {
    /// From an enrollment (the file `iotctl device enroll` writes). `bao_ca`: the
    /// CA bundle that verifies OpenBao's certificate (the system's roots if `None`).
    /// An `http://` OpenBao is refused unless `allow_plain`: the login sends the
    /// enrollment's secret, a permanent credential.
    pub fn from_enrollment(
        enrollment: Enrollment,
        bao_ca: Option<&std::path::Path>,
        allow_plain: bool,
    ) -> Result<Self, NatsError> {
        if enrollment.bao_addr.starts_with("http://") && !allow_plain {
            return Err(NatsError::Credentials(format!(
                "the enrollment's OpenBao address {} is not TLS: its secret would cross the network in the clear \
                 (use https://, or --nats-insecure / NATS_INSECURE=true on a debugging stack)",
                enrollment.bao_addr
            )));
        }
        let name = || {
            Id::new(enrollment.name.clone())
                .map_err(|e| NatsError::Credentials(format!("the enrollment's name is not a valid id: {e}")))
        };
        let (device, service) = match enrollment.role {
            Role::Device => (Some(name()?), None),
            Role::Operator => (None, Some((ServiceRole::Operator, name()?))),
            Role::Viewer => (None, Some((ServiceRole::Viewer, name()?))),
            Role::Callout => (None, None),
        };
        let bao = Bao::with_ca(&enrollment.bao_addr, bao_ca).map_err(|e| NatsError::Credentials(e.to_string()))?;
        Ok(Self {
            origin: Arc::new(Origin::OpenBao {
                bao: Box::new(bao),
                enrollment,
            }),
            device,
            service,
            cached: Arc::default(),
        })
    }

    /// From an enrollment file (see [`Self::from_enrollment`]).
    pub fn from_enrollment_file(
        path: &std::path::Path,
        bao_ca: Option<&std::path::Path>,
        allow_plain: bool,
    ) -> Result<Self, NatsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NatsError::Credentials(format!("reading {}: {e}", path.display())))?;
        let enrollment: Enrollment = serde_json::from_str(&text)
            .map_err(|e| NatsError::Credentials(format!("parsing {}: {e}", path.display())))?;
        Self::from_enrollment(enrollment, bao_ca, allow_plain)
    }

    /// From a token file that something else refreshes; `device` selects the inbox.
    pub fn from_token_file(path: PathBuf, device: Option<Id>) -> Self {
        Self {
            origin: Arc::new(Origin::File(path)),
            device,
            service: None,
            cached: Arc::default(),
        }
    }

    pub fn device(&self) -> Option<&Id> {
        self.device.as_ref()
    }

    /// A service's role and name, from its enrollment.
    pub fn service(&self) -> Option<&(ServiceRole, Id)> {
        self.service.as_ref()
    }

    /// A token with at least a third of its life left, fetching one if needed.
    pub async fn token(&self) -> Result<String, NatsError> {
        match self.origin.as_ref() {
            Origin::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| NatsError::Credentials(format!("reading {}: {e}", path.display()))),
            Origin::OpenBao { bao, enrollment } => {
                let mut cached = self.cached.lock().await;
                let now = Instant::now();
                if let Some((jwt, refresh_at, _)) = &cached.jwt
                    && now < *refresh_at
                {
                    return Ok(jwt.clone());
                }
                match self.fetch(bao, enrollment, &mut cached, now).await {
                    Ok(jwt) => Ok(jwt),
                    // OpenBao is out of reach: a token that has not expired still
                    // gets us in (the callout decides how long for).
                    Err(e) => match &cached.jwt {
                        Some((jwt, _, expires)) if now < *expires => {
                            tracing::warn!(error = %e, "cannot renew the identity token; presenting the current one");
                            Ok(jwt.clone())
                        }
                        _ => Err(e),
                    },
                }
            }
        }
    }

    /// Logs in (when our OpenBao token is due) and fetches a new identity token.
    async fn fetch(
        &self,
        bao: &Bao,
        enrollment: &Enrollment,
        cached: &mut Cached,
        now: Instant,
    ) -> Result<String, NatsError> {
        let cred = |e: BaoError| NatsError::Credentials(e.to_string());
        let bao_token = match &cached.bao_token {
            Some((t, until)) if now < *until => t.clone(),
            _ => {
                let login = bao
                    .approle_login(&enrollment.role_id, &enrollment.secret_id)
                    .await
                    .map_err(cred)?;
                cached.bao_token = Some((login.token.clone(), now + login.ttl.mul_f64(0.5)));
                login.token
            }
        };
        let token = match bao.clone().with_token(bao_token).identity_token(TOKEN_ROLE).await {
            Ok(t) => t,
            Err(e) => {
                // Our OpenBao token may have been revoked; log in afresh next time.
                cached.bao_token = None;
                return Err(cred(e));
            }
        };
        let refresh_at = now + token.ttl.mul_f64(2.0 / 3.0).max(Duration::from_secs(1));
        cached.jwt = Some((token.jwt.clone(), refresh_at, now + token.ttl));
        Ok(token.jwt)
    }
}

impl CredentialSource for IdentityCredentials {
    fn describe(&self) -> String {
        match (self.origin.as_ref(), &self.device) {
            (Origin::OpenBao { enrollment, .. }, _) => {
                format!(
                    "identity {} ({}) from OpenBao {}",
                    enrollment.name,
                    enrollment.role.as_str(),
                    enrollment.bao_addr
                )
            }
            (Origin::File(p), Some(d)) => format!("device {d} identity token file {}", p.display()),
            (Origin::File(p), None) => format!("identity token file {}", p.display()),
        }
    }

    fn connect_options(&self) -> BoxFuture<'_, Result<ConnectOptions, NatsError>> {
        let this = self.clone();
        Box::pin(async move {
            let source = this.clone();
            let mut opts = ConnectOptions::with_auth_callback(move |_nonce| {
                let source = source.clone();
                // Spawned so the future handed to async-nats is `Sync`.
                let fetch = tokio::spawn(async move { source.token().await });
                async move {
                    match fetch.await {
                        Ok(Ok(jwt)) => {
                            let mut auth = async_nats::Auth::new();
                            auth.token = Some(jwt);
                            Ok(auth)
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "no identity token for the NATS connect");
                            Err(AuthError::new(e))
                        }
                        Err(e) => Err(AuthError::new(e)),
                    }
                }
            });
            if let Some(device) = &this.device {
                opts = opts.custom_inbox_prefix(device_inbox_prefix(device));
            } else if let Some((role, name)) = &this.service {
                opts = opts.custom_inbox_prefix(service_inbox_prefix(*role, name));
            }
            Ok(opts)
        })
    }
}
