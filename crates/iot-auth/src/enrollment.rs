//! Is this identity enrolled? Asked of OpenBao at every connect, remembered for
//! when OpenBao cannot answer.
//!
//! - OpenBao says "enrolled": admitted, and the answer is cached.
//! - OpenBao says "no such record" (never enrolled, or revoked): refused at once, and
//!   any cached answer is dropped. So revocation takes effect at the next connect.
//! - OpenBao cannot answer (down, sealed, frozen, slow): a cached "enrolled" younger
//!   than `max_stale` admits (with a short NATS user, so the question is asked again
//!   soon); anything else, and anything OpenBao refused since, is refused. An outage
//!   never admits an identity OpenBao has not vouched for.
//!
//! Replicas share requests at random, so each one also loads the whole list of
//! enrolled identities at start and every few minutes ([`Enrollments::refresh_all`]):
//! during an outage a replica admits a known device even if it never saw it connect.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use iot_bao::enroll::{device_record_path, list_devices, list_services, service_record_path};
use iot_bao::setup::KV_MOUNT;
use iot_bao::{Bao, BaoError};
use serde_json::Value;

use crate::claims::Identity;

/// How the callout logs in to OpenBao.
#[derive(Clone)]
pub enum BaoCredentials {
    Token(String),
    AppRole { role_id: String, secret_id: String },
}

impl std::fmt::Debug for BaoCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BaoCredentials::Token(_) => f.write_str("Token(<redacted>)"),
            BaoCredentials::AppRole { role_id, .. } => write!(f, "AppRole({role_id}, <redacted>)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Enrolled {
        from_cache: bool,
    },
    NotEnrolled,
    /// Enrolled, but with another subject: the token comes from an entity the
    /// record does not name (credentials from before a re-enrollment, or an issuer
    /// that let someone claim this identity's name).
    OtherSubject,
}

/// What the cache knows of an enrolled identity.
#[derive(Debug, Clone)]
struct Known {
    /// When OpenBao last vouched for it (a read or a listing).
    at: Instant,
    /// The subject its record names; `None` until the record was read.
    subject: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("enrollment unknown: OpenBao cannot answer ({0}) and nothing is cached")]
pub struct Unavailable(pub String);

#[derive(Debug)]
pub struct Enrollments {
    bao: Bao,
    credentials: BaoCredentials,
    /// The current OpenBao token and when to log in again.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    cache: Mutex<HashMap<String, Known>>,
    /// Identities OpenBao said are not enrolled, and when. A list loaded earlier,
    /// or a concurrent refresh, must not bring them back into the cache.
    refused: Mutex<HashMap<String, Instant>>,
    max_stale: Duration,
    /// Bounds the lookups in flight: in a reconnect storm of thousands of devices,
    /// an unbounded fan-out would bury OpenBao and make every decision late. A
    /// lookup that cannot start within `queue_wait` is decided from the cache.
    permits: tokio::sync::Semaphore,
    queue_wait: Duration,
    fallbacks: Mutex<FallbackLog>,
    /// Refreshes so far; every [`FULL_READ_EVERY`]th reads every record.
    refreshes: std::sync::atomic::AtomicU64,
}

/// Every this many list refreshes, every record is read again for its subject.
pub const FULL_READ_EVERY: u64 = 10;

/// Cache fallbacks are logged at most every few seconds, with a count.
#[derive(Debug, Default)]
struct FallbackLog {
    last: Option<Instant>,
    unlogged: u64,
}

const FALLBACK_LOG_EVERY: Duration = Duration::from_secs(10);

impl Enrollments {
    pub fn new(bao: Bao, credentials: BaoCredentials, max_stale: Duration) -> Self {
        Self {
            bao,
            credentials,
            token: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            max_stale,
            permits: tokio::sync::Semaphore::new(32),
            queue_wait: Duration::from_millis(100),
            fallbacks: Mutex::new(FallbackLog::default()),
            refreshes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// At most `concurrency` OpenBao lookups at once; a lookup waits at most
    /// `queue_wait` for its turn before the cache decides.
    pub fn with_limits(mut self, concurrency: usize, queue_wait: Duration) -> Self {
        self.permits = tokio::sync::Semaphore::new(concurrency.max(1));
        self.queue_wait = queue_wait;
        self
    }

    /// Whether `identity`, presenting a token whose `sub` is `subject`, is enrolled.
    pub async fn check(&self, identity: &Identity, subject: &str) -> Result<Decision, Unavailable> {
        let path = record_path(identity);
        let answer = match tokio::time::timeout(self.queue_wait, self.permits.acquire()).await {
            Ok(Ok(permit)) => {
                let answer = self.read(&path).await.map_err(|e| e.to_string());
                drop(permit);
                answer
            }
            _ => Err("OpenBao busy: too many lookups in flight".to_owned()),
        };
        match answer {
            Ok(Some(record)) if record_matches(identity, &record) => {
                let enrolled_as = record.get("subject").and_then(Value::as_str).map(str::to_owned);
                self.refused().remove(&path);
                let matches = enrolled_as.as_deref() == Some(subject);
                self.cache().insert(
                    path,
                    Known {
                        at: Instant::now(),
                        subject: enrolled_as,
                    },
                );
                Ok(if matches {
                    Decision::Enrolled { from_cache: false }
                } else {
                    Decision::OtherSubject
                })
            }
            Ok(_) => {
                self.cache().remove(&path);
                self.refused().insert(path, Instant::now());
                Ok(Decision::NotEnrolled)
            }
            Err(e) => {
                if self.refused().contains_key(&path) {
                    return Ok(Decision::NotEnrolled);
                }
                let known = self
                    .cache()
                    .get(&path)
                    .filter(|k| k.at.elapsed() < self.max_stale)
                    .cloned();
                match known {
                    Some(k) if k.subject.as_deref() == Some(subject) => {
                        self.log_fallback(identity, &e);
                        Ok(Decision::Enrolled { from_cache: true })
                    }
                    Some(Known { subject: Some(_), .. }) => Ok(Decision::OtherSubject),
                    // Listed, but its record was never read: whose tokens it vouches
                    // for is unknown, so nobody is admitted on its strength.
                    _ => Err(Unavailable(e)),
                }
            }
        }
    }

    /// Loads the list of enrolled identities; returns how many. Identities no longer
    /// listed are forgotten. The records of newly listed ones are read for their
    /// subject, and every [`FULL_READ_EVERY`]th refresh reads all of them again: a
    /// device enrolled again through another replica changes its subject, and the
    /// listing alone would not show it.
    pub async fn refresh_all(&self) -> Result<usize, BaoError> {
        let started = Instant::now();
        let full = self
            .refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(FULL_READ_EVERY);
        let client = self.client(false).await?;
        let (devices, services) = match tokio::try_join!(list_devices(&client), list_services(&client)) {
            Err(BaoError::Status { status: 403, .. }) => {
                let client = self.client(true).await?;
                tokio::try_join!(list_devices(&client), list_services(&client))?
            }
            other => other?,
        };
        let now = Instant::now();
        let mut listed: HashMap<String, Known> = {
            let cache = self.cache();
            devices
                .iter()
                .map(|d| device_record_path(d))
                .chain(services.iter().map(|s| service_record_path(s)))
                .map(|path| {
                    let subject = cache.get(&path).and_then(|k| k.subject.clone());
                    (path, Known { at: now, subject })
                })
                .collect()
        };
        {
            // A refusal newer than this list wins over it; an older one is settled
            // by the list (a device re-enrolled since).
            let mut refused = self.refused();
            refused.retain(|path, at| {
                let newer = at.elapsed() < started.elapsed();
                if newer {
                    listed.remove(path);
                }
                newer || !listed.contains_key(path)
            });
            refused.retain(|_, at| at.elapsed() < self.max_stale);
        }
        let unknown: Vec<String> = listed
            .iter()
            .filter(|(_, k)| full || k.subject.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        // A few reads at a time: a cold start with a large fleet must not bury
        // OpenBao.
        let reads: Vec<(String, Result<Option<Value>, BaoError>)> = futures::stream::iter(unknown)
            .map(|path| async move {
                let r = self.read(&path).await;
                (path, r)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (path, read) in reads {
            match read {
                Ok(Some(record)) => {
                    if let Some(k) = listed.get_mut(&path) {
                        k.subject = record.get("subject").and_then(Value::as_str).map(str::to_owned);
                    }
                }
                Ok(None) => {
                    listed.remove(&path);
                }
                // OpenBao went away mid-way: what was known stays (an unknown
                // subject admits nobody from the cache).
                Err(e) => tracing::debug!(record = %path, error = %e, "enrollment record not read"),
            }
        }
        let n = listed.len();
        let mut cache = self.cache();
        // What a connect learned from OpenBao while this refresh ran is newer.
        for (path, known) in cache.drain() {
            if known.at > now {
                listed.insert(path, known);
            }
        }
        *cache = listed;
        Ok(n)
    }

    /// Runs [`Self::refresh_all`] every `period`, forever, counting each load in
    /// `metrics`.
    pub async fn keep_refreshed(&self, period: Duration, metrics: &crate::callout::CalloutMetrics) {
        loop {
            match self.refresh_all().await {
                Ok(n) => {
                    metrics.list_loaded(Some(n));
                    tracing::debug!(identities = n, "enrollment list refreshed");
                }
                Err(e) => {
                    metrics.list_loaded(None);
                    tracing::warn!(error = %e, "could not refresh the enrollment list; keeping the last one");
                }
            }
            tokio::time::sleep(period).await;
        }
    }

    fn log_fallback(&self, identity: &Identity, error: &str) {
        let mut log = self.fallbacks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if log.last.is_none_or(|t| t.elapsed() >= FALLBACK_LOG_EVERY) {
            tracing::warn!(identity = %identity.name(), error, others = log.unlogged, "OpenBao unavailable; admitting from cache");
            log.last = Some(Instant::now());
            log.unlogged = 0;
        } else {
            log.unlogged += 1;
        }
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn read(&self, path: &str) -> Result<Option<Value>, BaoError> {
        let client = self.client(false).await?;
        match client.kv_read(KV_MOUNT, path).await {
            // An expired or revoked token of our own: log in again once.
            Err(BaoError::Status { status: 403, .. }) => self.client(true).await?.kv_read(KV_MOUNT, path).await,
            other => other,
        }
    }

    async fn client(&self, relogin: bool) -> Result<Bao, BaoError> {
        let mut token = self.token.lock().await;
        let valid = token.as_ref().filter(|(_, until)| Instant::now() < *until);
        if let (false, Some((t, _))) = (relogin, valid) {
            return Ok(self.bao.clone().with_token(t.clone()));
        }
        let (t, until) = match &self.credentials {
            BaoCredentials::Token(t) => (t.clone(), Instant::now() + Duration::from_secs(3600 * 24 * 365)),
            BaoCredentials::AppRole { role_id, secret_id } => {
                let login = self.bao.approle_login(role_id, secret_id).await?;
                // Log in again well before the token expires.
                (login.token, Instant::now() + login.ttl.mul_f64(0.5))
            }
        };
        *token = Some((t.clone(), until));
        Ok(self.bao.clone().with_token(t))
    }
}

fn record_path(identity: &Identity) -> String {
    match identity {
        Identity::Device(id) => device_record_path(id.as_str()),
        Identity::Operator(name) | Identity::Viewer(name) => service_record_path(name.as_str()),
    }
}

/// The record is for this identity (a record moved or edited by hand is not).
fn record_matches(identity: &Identity, record: &Value) -> bool {
    match identity {
        Identity::Device(id) => record.get("deviceId").and_then(Value::as_str) == Some(id.as_str()),
        Identity::Operator(name) => {
            record.get("name").and_then(Value::as_str) == Some(name.as_str())
                && record.get("role").and_then(Value::as_str) == Some("operator")
        }
        Identity::Viewer(name) => {
            record.get("name").and_then(Value::as_str) == Some(name.as_str())
                && record.get("role").and_then(Value::as_str) == Some("viewer")
        }
    }
}
