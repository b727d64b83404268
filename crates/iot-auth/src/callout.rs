//! The callout service: answers nats-server's authorization requests.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use nkeys::{KeyPair, XKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::claims::{ClaimMapping, identity_from_claims};
use crate::enrollment::{Decision, Enrollments};
use crate::nats_jwt::{self, AuthRequest};
use crate::oidc::Verifier;
use crate::permissions::permissions_for;

/// Where nats-server sends authorization requests.
pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// Replicas share the requests through this queue group.
pub const QUEUE_GROUP: &str = "iot-auth-callout";
const XKEY_HEADER: &str = "Nats-Server-Xkey";
/// Longest life of a user admitted from the cache (OpenBao did not answer).
pub const CACHED_USER_TTL: Duration = Duration::from_secs(120);
/// Decisions in flight at most; more wait for a turn (and the stale ones are then
/// dropped by age). High enough not to bind in a 10,000-device reconnect storm
/// (BENCHMARKS.md), low enough to bound memory under a flood.
const CONCURRENT_DECISIONS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct CalloutMetrics {
    /// Decisions by result: `admitted`, `admitted_cached`, `refused`, `unavailable`,
    /// `bad_request`, `expired` (dropped: the server stopped waiting).
    pub decisions: Family<DecisionLabels, Counter>,
    pub duration: Histogram,
    /// Loads of the enrollment list by result (`ok`, `failed`). A replica that has
    /// never loaded it admits nobody from its cache while OpenBao is away.
    pub list_loads: Family<DecisionLabels, Counter>,
    /// Identities in the enrollment list as last loaded.
    pub enrolled_identities: Gauge,
}

impl Default for CalloutMetrics {
    fn default() -> Self {
        Self {
            decisions: Family::default(),
            duration: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            list_loads: Family::default(),
            enrolled_identities: Gauge::default(),
        }
    }
}

impl CalloutMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("iot_auth");
        r.register("decisions", "Connect decisions by result", self.decisions.clone());
        r.register("decision_seconds", "Time from request to answer", self.duration.clone());
        r.register(
            "enrollment_list_loads",
            "Loads of the enrollment list from OpenBao by result",
            self.list_loads.clone(),
        );
        r.register(
            "enrolled_identities",
            "Identities in the enrollment list as last loaded",
            self.enrolled_identities.clone(),
        );
    }

    /// Counts one load of the enrollment list.
    pub fn list_loaded(&self, loaded: Option<usize>) {
        let result = if loaded.is_some() { "ok" } else { "failed" };
        self.list_loads.get_or_create(&DecisionLabels { result }).inc();
        if let Some(n) = loaded {
            self.enrolled_identities.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    pub fn count(&self, result: &'static str) -> u64 {
        self.decisions.get_or_create(&DecisionLabels { result }).get()
    }
}

/// Fixed settings of the callout.
pub struct CalloutConfig {
    /// Signs user JWTs and responses: the issuer key configured in nats-server's
    /// `auth_callout.issuer`.
    pub issuer: KeyPair,
    /// Opens requests and seals responses when nats-server has an `xkey` configured.
    pub xkey: Option<XKey>,
    /// The account clients are placed in.
    pub account: String,
    /// Longest life of a NATS user; never longer than the presented token.
    pub user_ttl: Duration,
    pub mapping: ClaimMapping,
    /// Requests older than this are dropped unanswered: nats-server has given up
    /// on them (its `authorization.timeout`), and in a reconnect storm answering
    /// them would only delay the requests that can still succeed.
    pub request_max_age: Duration,
}

impl std::fmt::Debug for CalloutConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CalloutConfig")
            .field("issuer", &self.issuer.public_key())
            .field("xkey", &self.xkey.as_ref().map(XKey::public_key))
            .field("account", &self.account)
            .field("user_ttl", &self.user_ttl)
            .finish()
    }
}

#[derive(Debug)]
pub struct Callout {
    pub config: CalloutConfig,
    pub verifier: Verifier,
    pub enrollments: Enrollments,
    pub metrics: Arc<CalloutMetrics>,
}

/// A refusal: what the client's server logs, and the metric result.
struct Refusal {
    result: &'static str,
    reason: String,
}

impl Callout {
    /// Serves requests until the subscription ends; `ready` is called once requests
    /// can arrive.
    pub async fn run(self: Arc<Self>, client: async_nats::Client, ready: impl FnOnce()) -> anyhow::Result<()> {
        let mut sub = client
            .queue_subscribe(AUTH_SUBJECT, QUEUE_GROUP.to_owned())
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to {AUTH_SUBJECT}: {e}"))?;
        // Ready only once the server has the subscription: it handles a client's
        // protocol in order, so a message we send ourselves after it and receive
        // back proves it (a flush only empties our write buffer).
        let echo = client.new_inbox();
        let mut echoes = client
            .subscribe(echo.clone())
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to {echo}: {e}"))?;
        client
            .publish(echo, Bytes::new())
            .await
            .map_err(|e| anyhow::anyhow!("checking the subscription: {e}"))?;
        echoes.next().await;
        drop(echoes);
        ready();
        tracing::info!(account = %self.config.account, issuer = %self.config.issuer.public_key(), "answering NATS authorization requests");
        let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_DECISIONS));
        while let Some(msg) = sub.next().await {
            let this = self.clone();
            let client = client.clone();
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            tokio::spawn(async move {
                let _permit = permit;
                let Some(reply) = msg.reply.clone() else { return };
                let server_xkey = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(XKEY_HEADER))
                    .map(|v| v.as_str().to_owned());
                match this.answer(&msg.payload, server_xkey.as_deref()).await {
                    Some(body) => {
                        if let Err(e) = client.publish(reply, body).await {
                            tracing::warn!(error = %e, "could not send an authorization response");
                        }
                    }
                    None => {
                        tracing::debug!("authorization request dropped (unreadable, or the server stopped waiting)")
                    }
                }
            });
        }
        anyhow::bail!("the {AUTH_SUBJECT} subscription ended")
    }

    /// The sealed (or plain) response to one request; `None` if the request itself
    /// is unreadable, as then there is nobody to address an answer to.
    pub async fn answer(&self, payload: &[u8], server_xkey: Option<&str>) -> Option<Bytes> {
        let started = Instant::now();
        let (request_jwt, sealed_to) = match (&self.config.xkey, server_xkey) {
            (Some(ours), Some(theirs)) => {
                let theirs = XKey::from_public_key(theirs).ok()?;
                (ours.open(payload, &theirs).ok()?, Some(theirs))
            }
            _ => (payload.to_vec(), None),
        };
        let request = match std::str::from_utf8(&request_jwt).ok().map(nats_jwt::decode_request) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "authorization request does not verify");
                self.metrics.count_result("bad_request");
                return None;
            }
            None => return None,
        };
        let now = unix_now();
        // `iat` has whole seconds: a request is at most one second younger than it looks.
        if request.issued_at > 0 && now - request.issued_at > self.config.request_max_age.as_secs() as i64 {
            self.metrics.count_result("expired");
            return None;
        }
        let outcome = self.decide(&request, now).await;
        let (user, result) = match &outcome {
            Ok((jwt, result)) => (Ok(jwt.as_str()), *result),
            Err(r) => {
                tracing::warn!(
                    client_host = %request.client_info.host,
                    client_name = %request.connect_opts.name.as_deref().unwrap_or(""),
                    reason = %r.reason,
                    "NATS connect refused"
                );
                (Err(r.reason.as_str()), r.result)
            }
        };
        self.metrics.count_result(result);
        let response = nats_jwt::response_jwt(
            &self.config.issuer,
            &request.user_nkey,
            &request.server_id.id,
            user,
            now,
        )
        .map_err(|e| tracing::error!(error = %e, "signing the response failed"))
        .ok()?;
        let body = match (&self.config.xkey, sealed_to) {
            (Some(ours), Some(theirs)) => ours.seal(response.as_bytes(), &theirs).ok()?,
            _ => response.into_bytes(),
        };
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        Some(Bytes::from(body))
    }

    async fn decide(&self, request: &AuthRequest, now: i64) -> Result<(String, &'static str), Refusal> {
        let refuse = |reason: String| Refusal {
            result: "refused",
            reason,
        };
        let token = request
            .connect_opts
            .auth_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse("no identity token presented".into()))?;
        let verified = self
            .verifier
            .verify(token, now)
            .await
            .map_err(|e| refuse(e.to_string()))?;
        let identity =
            identity_from_claims(&verified.claims, &self.config.mapping).map_err(|e| refuse(e.to_string()))?;
        // The subject binds the token to the enrolled entity: a token that merely
        // claims this identity's name (an issuer whose users can set that claim, or
        // credentials from before a re-enrollment) is not it.
        let subject = verified
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| refuse("token without a subject (sub)".into()))?;
        let result = match self.enrollments.check(&identity, subject).await {
            Ok(Decision::Enrolled { from_cache: false }) => "admitted",
            Ok(Decision::Enrolled { from_cache: true }) => "admitted_cached",
            Ok(Decision::NotEnrolled) => {
                return Err(refuse(format!("{} is not enrolled (or was revoked)", identity.name())));
            }
            Ok(Decision::OtherSubject) => {
                return Err(refuse(format!(
                    "{} is enrolled for another subject than this token's ({subject}): credentials from before a re-enrollment, or a token that only claims the name",
                    identity.name()
                )));
            }
            Err(e) => {
                return Err(Refusal {
                    result: "unavailable",
                    reason: format!("{}: {e}", identity.name()),
                });
            }
        };
        let ttl = if result == "admitted_cached" {
            // Admitted without asking OpenBao: a short user, so the decision is
            // taken again soon (a revocation OpenBao could not report is caught then).
            self.config.user_ttl.min(CACHED_USER_TTL)
        } else {
            self.config.user_ttl
        };
        let expires = verified.expires_unix.min(now + ttl.as_secs() as i64);
        if expires <= now {
            // Accepted within the clock leeway, but a user that is born expired is
            // of no use to anyone.
            return Err(refuse("token expires within the clock leeway".into()));
        }
        let jwt = nats_jwt::user_jwt(
            &self.config.issuer,
            &request.user_nkey,
            &identity.name(),
            &self.config.account,
            &permissions_for(&identity),
            expires,
            now,
        )
        .map_err(|e| refuse(format!("signing the user failed: {e}")))?;
        tracing::debug!(identity = %identity.name(), expires, result, "NATS connect admitted");
        Ok((jwt, result))
    }
}

impl CalloutMetrics {
    fn count_result(&self, result: &'static str) {
        self.decisions.get_or_create(&DecisionLabels { result }).inc();
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
