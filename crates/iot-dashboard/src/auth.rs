//! Sign-in for changes. The dashboard reads the fleet with its own read-only
//! identity, but every change is made *as the signed-in person*: their ID token
//! goes to the API server as a bearer token, so Kubernetes RBAC (the chart's
//! iot-fleet-* roles bound to OIDC groups) decides. The dashboard has no
//! permission model of its own; it only asks the API server what the person may do
//! (SelfSubjectAccessReview) to hide forms that would be refused anyway.
//!
//! Sessions live in memory: a restart signs everyone out, which is safe. Every
//! form carries the session's CSRF token, checked on every write, and the session
//! cookie is HttpOnly and SameSite=Lax.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use iot_sso::{IssuerConfig, Provider, Session, SsoError};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;

use crate::sealed::{SealError, Sealer};

pub const SESSION_COOKIE: &str = "iot_session";
pub const LOGIN_COOKIE: &str = "iot_login";
/// Sessions end after this, refresh token or not.
const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// A login not finished within this is forgotten.
const PENDING_MAX_AGE: Duration = Duration::from_secs(600);
/// Bounds memory whatever arrives: the oldest entries go first.
const MAX_SESSIONS: usize = 10_000;
/// How long an answer to "may I change Deployments here?" is reused.
const PERMISSION_TTL: Duration = Duration::from_secs(30);

/// A message shown once, after a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

/// What the person may do with Deployments in one namespace, as the API server said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct May {
    pub update: bool,
    pub delete: bool,
}

pub struct UserSession {
    pub sso: Session,
    pub csrf: String,
    pub flash: Option<Flash>,
    created: Instant,
    may: HashMap<String, (May, Instant)>,
}

impl UserSession {
    pub fn display_name(&self) -> String {
        let id = &self.sso.identity;
        id.email.clone().unwrap_or_else(|| id.subject.clone())
    }

    pub fn groups(&self) -> &[String] {
        &self.sso.identity.groups
    }
}

pub type SharedSession = Arc<tokio::sync::Mutex<UserSession>>;

pub struct AuthConfig {
    pub issuer: IssuerConfig,
    /// The dashboard's address as browsers reach it, without a trailing slash;
    /// the redirect URI is `<public_url>/callback`.
    pub public_url: String,
    /// The API server (URL, CA) without the dashboard's own credentials.
    pub kube: kube::Config,
}

pub struct Auth {
    config: AuthConfig,
    provider: tokio::sync::OnceCell<Provider>,
    /// Seals started sign-ins into the browser's binding cookie.
    sealer: Sealer,
    sessions: Mutex<HashMap<String, SharedSession>>,
}

/// A started sign-in, sealed into the binding cookie.
#[derive(serde::Serialize, serde::Deserialize)]
struct StartedLogin {
    login: iot_sso::PendingLoginParts,
    next: String,
    started_unix: i64,
}

/// Why a sign-in did not complete.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("this sign-in was not started from this browser, or took longer than 10 minutes; start again")]
    UnknownState,
    #[error(transparent)]
    Sso(#[from] SsoError),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps leaves them consistent (single inserts and
    // removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Auth {
    pub fn new(config: AuthConfig) -> Result<Self, SealError> {
        Ok(Self {
            config,
            provider: tokio::sync::OnceCell::new(),
            sealer: Sealer::new()?,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// Discovery happens on first use and is retried until it works, so the
    /// dashboard starts (and serves its read-only pages) while the issuer is down.
    async fn provider(&self) -> Result<&Provider, SsoError> {
        self.provider
            .get_or_try_init(|| Provider::discover(&self.config.issuer))
            .await
    }

    pub fn secure_cookies(&self) -> bool {
        self.config.public_url.starts_with("https://")
    }

    pub fn public_url(&self) -> &str {
        &self.config.public_url
    }

    pub fn cookie(&self, name: &str, value: &str, path: &str, max_age: Option<Duration>) -> String {
        let mut c = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Lax");
        if let Some(age) = max_age {
            c.push_str(&format!("; Max-Age={}", age.as_secs()));
        }
        if self.secure_cookies() {
            c.push_str("; Secure");
        }
        c
    }

    /// Starts a sign-in; returns the provider URL and the sealed cookie value
    /// that binds the sign-in to this browser. Nothing is kept here: however many
    /// sign-ins anyone starts, nobody else's is pushed out.
    pub async fn begin(&self, next: &str) -> Result<(String, String), SsoError> {
        let provider = self.provider().await?;
        let scopes: Vec<String> = iot_sso::DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect();
        let pending = provider.start_login(&format!("{}/callback", self.config.public_url), &scopes)?;
        let url = pending.url.clone();
        let started = StartedLogin {
            login: pending.into_parts(),
            next: safe_next(next, &self.config.public_url),
            started_unix: chrono::Utc::now().timestamp(),
        };
        let json = serde_json::to_vec(&started).map_err(|e| SsoError::Config(e.to_string()))?;
        let cookie = self
            .sealer
            .seal(LOGIN_COOKIE, &json)
            .map_err(|e| SsoError::Config(e.to_string()))?;
        Ok((url, cookie))
    }

    /// Finishes a sign-in. The state must match the one sealed in this browser's
    /// binding cookie, which stops a login CSRF: an attacker's code pasted into
    /// someone else's browser.
    pub async fn complete(&self, bound: Option<&str>, state: &str, code: &str) -> Result<(String, String), LoginError> {
        let started: StartedLogin = bound
            .and_then(|b| self.sealer.open(LOGIN_COOKIE, b).ok())
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(LoginError::UnknownState)?;
        let age = chrono::Utc::now().timestamp() - started.started_unix;
        if !same_secret(&started.login.state, state) || !(0..PENDING_MAX_AGE.as_secs() as i64).contains(&age) {
            return Err(LoginError::UnknownState);
        }
        let provider = self.provider().await?;
        let pending = iot_sso::PendingLogin::from_parts(started.login)?;
        let sso = provider.finish_login(pending, code).await?;
        let next = started.next;
        let sid = iot_sso::random_secret();
        let session = UserSession {
            sso,
            csrf: iot_sso::random_secret(),
            flash: None,
            created: Instant::now(),
            may: HashMap::new(),
        };
        let mut sessions = lock(&self.sessions);
        if sessions.len() >= MAX_SESSIONS {
            // Without a cheap age index, dropping an arbitrary one is the bound;
            // this only happens under a flood of completed sign-ins, which takes
            // real accounts at the provider.
            if let Some(k) = sessions.keys().next().cloned() {
                sessions.remove(&k);
            }
        }
        sessions.insert(sid.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        Ok((sid, next))
    }

    /// The session named by the request's cookie, if it exists and is not too old.
    pub async fn session(&self, headers: &HeaderMap) -> Option<(String, SharedSession)> {
        let sid = cookie_value(headers, SESSION_COOKIE)?;
        let shared = lock(&self.sessions).get(&sid).cloned()?;
        if shared.lock().await.created.elapsed() >= SESSION_MAX_AGE {
            self.end(&sid);
            return None;
        }
        Some((sid, shared))
    }

    pub fn end(&self, sid: &str) {
        lock(&self.sessions).remove(sid);
    }

    /// The person's current ID token, refreshed when it is about to expire.
    pub async fn token(&self, session: &mut UserSession) -> Result<String, SsoError> {
        if !session.sso.is_fresh() {
            let provider = self.provider().await?;
            session.sso = provider.refresh(&session.sso).await?;
        }
        Ok(session.sso.id_token.clone())
    }

    /// A Kubernetes client that authenticates as the person, with none of the
    /// dashboard's own credentials.
    pub fn client_as(&self, token: &str) -> Result<kube::Client, kube::Error> {
        let mut config = self.config.kube.clone();
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.to_owned().into()),
            ..Default::default()
        };
        kube::Client::try_from(config)
    }

    /// What the person may do with Deployments in `namespace`, asked of the API
    /// server as them and cached briefly. Any failure reads as "nothing": the
    /// forms are hidden, and a write would be decided by the API server anyway.
    pub async fn may(&self, session: &mut UserSession, namespace: &str) -> May {
        if let Some((may, at)) = session.may.get(namespace)
            && at.elapsed() < PERMISSION_TTL
        {
            return *may;
        }
        let Ok(token) = self.token(session).await else {
            return May::default();
        };
        let Ok(client) = self.client_as(&token) else {
            return May::default();
        };
        let ask = |verb: &'static str| {
            let client = client.clone();
            let namespace = namespace.to_owned();
            async move {
                let api: Api<SelfSubjectAccessReview> = Api::all(client);
                let review = SelfSubjectAccessReview {
                    spec: SelfSubjectAccessReviewSpec {
                        resource_attributes: Some(ResourceAttributes {
                            group: Some(<iot_api::Deployment as kube::Resource>::group(&()).into_owned()),
                            resource: Some("deployments".to_owned()),
                            verb: Some(verb.to_owned()),
                            namespace: Some(namespace),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &review).await {
                    Ok(r) => Some(r.status.is_some_and(|s| s.allowed)),
                    Err(e) => {
                        tracing::warn!(error = %e, verb, "access review as the signed-in user failed");
                        None
                    }
                }
            }
        };
        let (update, delete) = tokio::join!(ask("update"), ask("delete"));
        let may = May {
            update: update.unwrap_or(false),
            delete: delete.unwrap_or(false),
        };
        // A failed review (the API server briefly unreachable, or not yet able to
        // verify tokens) is asked again on the next page load, not remembered.
        if update.is_some() && delete.is_some() {
            session.may.insert(namespace.to_owned(), (may, Instant::now()));
        }
        may
    }
}

/// Where to go after signing in: only a place on the dashboard itself (no open
/// redirect). `next` is resolved against `public_url` as a browser would resolve
/// it; anything that leaves the dashboard's origin, or holds a control character
/// or a backslash (browsers drop tabs and newlines and read `\\` as `/`, so
/// `/\t/evil.example` and `/\\evil.example` are other sites), becomes `/`.
pub fn safe_next(next: &str, public_url: &str) -> String {
    let fallback = "/".to_owned();
    if !next.starts_with('/') || next.chars().any(|c| c.is_control() || c == '\\') {
        return fallback;
    }
    let Ok(base) = url::Url::parse(public_url) else {
        return fallback;
    };
    match base.join(next) {
        Ok(target) if target.origin() == base.origin() => {
            let mut path = target.path().to_owned();
            if let Some(q) = target.query() {
                path.push('?');
                path.push_str(q);
            }
            // A path that still starts with two slashes would be read as a host.
            if path.starts_with("//") { fallback } else { path }
        }
        _ => fallback,
    }
}

pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Compares secrets without an early exit on the first differing byte.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn next_is_a_local_path_only() {
        let base = "http://127.0.0.1:8090";
        assert_eq!(safe_next("/deployments/default/web", base), "/deployments/default/web");
        assert_eq!(
            safe_next("/devices?q=a%26b&state=stale", base),
            "/devices?q=a%26b&state=stale"
        );
        for evil in [
            "https://evil.example/",
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r//evil.example",
            "/\u{0}/x",
            "\t//evil.example",
            "javascript:alert(1)",
            "",
            "/%2F/evil.example/..",
        ] {
            let got = safe_next(evil, base);
            assert!(
                got == "/" || got.starts_with('/') && !got.starts_with("//"),
                "{evil:?} -> {got}"
            );
            let url = url::Url::parse(base).and_then(|b| b.join(&got));
            assert_eq!(
                url.map(|u| u.origin()),
                url::Url::parse(base).map(|b| b.origin()),
                "{evil:?}"
            );
        }
        for evil in ["https://evil.example/", "//evil.example", "/\t/evil.example", "/\\evil"] {
            assert_eq!(safe_next(evil, base), "/", "{evil:?}");
        }
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            HeaderValue::from_static("a=1; iot_session=abc"),
        );
        h.append(axum::http::header::COOKIE, HeaderValue::from_static("iot_login=st"));
        assert_eq!(cookie_value(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie_value(&h, LOGIN_COOKIE).as_deref(), Some("st"));
        assert_eq!(cookie_value(&h, "iot"), None);
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
