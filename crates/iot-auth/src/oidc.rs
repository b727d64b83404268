//! Verifying OIDC identity tokens against the issuer's published keys (JWKS).
//!
//! The keys are found through discovery (`<issuer>/.well-known/openid-configuration`
//! → `jwks_uri`), cached, and fetched again when a token names a key id the cache
//! does not have (key rotation), at most every [`REFRESH_MIN_INTERVAL`]. OpenBao signs
//! with EdDSA, Zitadel with RS256; ES256 is accepted too.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use iot_bao::Bao;
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;

use crate::nats_jwt;

/// A token naming an unknown key triggers a refetch at most this often, so garbage
/// tokens cannot make us hammer the issuer.
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Clock skew tolerated on `exp` and `nbf`, by default.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signed with unsupported algorithm {0}")]
    Algorithm(String),
    #[error("token signed by an unknown key (kid {0:?})")]
    UnknownKey(Option<String>),
    #[error("token signature does not verify")]
    Signature,
    #[error("token issuer {found:?} is not the trusted issuer")]
    Issuer { found: String },
    #[error("token audience does not include {expected:?}")]
    Audience { expected: String },
    #[error("token expired {ago}s ago")]
    Expired { ago: i64 },
    #[error("token not valid yet")]
    NotYetValid,
    #[error("issuer keys unavailable: {0}")]
    KeysUnavailable(String),
}

#[derive(Debug, Clone, Deserialize)]
struct Jwk {
    #[serde(default)]
    kid: Option<String>,
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

#[derive(Debug, Default)]
struct KeyCache {
    keys: Vec<Jwk>,
    fetched_at: Option<Instant>,
}

/// The trusted issuer, its keys, and the audience tokens must be for.
#[derive(Debug)]
pub struct Verifier {
    issuer: String,
    audience: String,
    leeway_secs: i64,
    http: Bao,
    cache: Mutex<KeyCache>,
    /// One fetch at a time; the others wait for its result.
    fetching: tokio::sync::Mutex<()>,
}

/// A verified token's claims.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Value,
    pub expires_unix: i64,
}

impl Verifier {
    /// `ca`: the CA bundle that verifies the issuer's certificate (the system's
    /// roots if `None`).
    pub fn new(issuer: &str, audience: &str, ca: Option<&std::path::Path>) -> Result<Self, TokenError> {
        Ok(Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            audience: audience.to_owned(),
            leeway_secs: DEFAULT_LEEWAY.as_secs() as i64,
            http: Bao::with_ca(issuer, ca)
                .map_err(|e| TokenError::KeysUnavailable(e.to_string()))?
                .with_timeout(Duration::from_secs(2)),
            cache: Mutex::new(KeyCache::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// Tolerated clock skew between the issuer and us.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway_secs = leeway.as_secs() as i64;
        self
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Fetches the issuer's keys now (at startup; later fetches happen on demand).
    /// The attempt counts against [`REFRESH_MIN_INTERVAL`] whether it succeeds or
    /// not, so garbage tokens cannot make us hammer an issuer that is down.
    pub async fn refresh(&self) -> Result<usize, TokenError> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fetched_at = Some(Instant::now());
        let unavailable = |e: iot_bao::BaoError| TokenError::KeysUnavailable(e.to_string());
        let discovery = self
            .http
            .get_url(&format!("{}/.well-known/openid-configuration", self.issuer))
            .await
            .map_err(unavailable)?;
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| TokenError::KeysUnavailable("discovery has no jwks_uri".into()))?;
        let jwks = self.http.get_url(jwks_uri).await.map_err(unavailable)?;
        let keys: Vec<Jwk> = serde_json::from_value(jwks.get("keys").cloned().unwrap_or(Value::Null))
            .map_err(|e| TokenError::KeysUnavailable(format!("bad JWKS: {e}")))?;
        let n = keys.len();
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
        Ok(n)
    }

    /// Verifies `token` at `now_unix`.
    pub async fn verify(&self, token: &str, now_unix: i64) -> Result<Verified, TokenError> {
        let header = nats_jwt::header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or_default().to_owned();
        let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
        let (signed, claims, sig) = nats_jwt::split(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let key = match self.key(kid.as_deref()) {
            Some(k) => k,
            None => {
                let _one_at_a_time = self.fetching.lock().await;
                let stale = {
                    let cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    cache.fetched_at.is_none_or(|t| t.elapsed() >= REFRESH_MIN_INTERVAL)
                };
                if stale && self.key(kid.as_deref()).is_none() {
                    self.refresh().await?;
                }
                self.key(kid.as_deref()).ok_or(TokenError::UnknownKey(kid.clone()))?
            }
        };
        check_signature(&alg, &key, signed.as_bytes(), &sig)?;
        check_claims(&claims, &self.issuer, &self.audience, now_unix, self.leeway_secs)
    }

    fn key(&self, kid: Option<&str>) -> Option<Jwk> {
        let cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match kid {
            Some(kid) => cache.keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
            None if cache.keys.len() == 1 => cache.keys.first().cloned(),
            None => None,
        }
    }
}

fn b64(field: &Option<String>) -> Result<Vec<u8>, TokenError> {
    let s = field.as_deref().ok_or(TokenError::Signature)?;
    URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Signature)
}

fn check_signature(alg: &str, key: &Jwk, signed: &[u8], sig: &[u8]) -> Result<(), TokenError> {
    let ok = match (alg, key.kty.as_str(), key.crv.as_deref()) {
        ("EdDSA", "OKP", Some("Ed25519")) => {
            UnparsedPublicKey::new(&signature::ED25519, b64(&key.x)?).verify(signed, sig)
        }
        ("ES256", "EC", Some("P-256")) => {
            let mut point = vec![4u8];
            point.extend(b64(&key.x)?);
            point.extend(b64(&key.y)?);
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(signed, sig)
        }
        ("RS256", "RSA", _) => signature::RsaPublicKeyComponents {
            n: b64(&key.n)?,
            e: b64(&key.e)?,
        }
        .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig),
        _ => return Err(TokenError::Algorithm(alg.to_owned())),
    };
    ok.map_err(|_| TokenError::Signature)
}

/// Issuer, audience and time checks on verified claims (pure, for tests).
pub fn check_claims(
    claims: &Value,
    issuer: &str,
    audience: &str,
    now_unix: i64,
    leeway_secs: i64,
) -> Result<Verified, TokenError> {
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or_default();
    if iss.trim_end_matches('/') != issuer {
        return Err(TokenError::Issuer { found: iss.to_owned() });
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(audience)),
        _ => false,
    };
    if !aud_ok {
        return Err(TokenError::Audience {
            expected: audience.to_owned(),
        });
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| TokenError::Malformed("no exp".into()))?;
    if exp + leeway_secs <= now_unix {
        return Err(TokenError::Expired { ago: now_unix - exp });
    }
    if claims
        .get("nbf")
        .and_then(Value::as_i64)
        .is_some_and(|nbf| nbf > now_unix + leeway_secs)
    {
        return Err(TokenError::NotYetValid);
    }
    Ok(Verified {
        claims: claims.clone(),
        expires_unix: exp,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ISS: &str = "https://id.example/v1/identity/oidc";

    #[test]
    fn claims_are_checked_for_issuer_audience_and_time() {
        let good = json!({"iss": ISS, "aud": "iot-nats", "exp": 1_000});
        assert!(check_claims(&good, ISS, "iot-nats", 900, 30).is_ok());
        // Zitadel puts several audiences in an array.
        let array = json!({"iss": ISS, "aud": ["x", "iot-nats"], "exp": 1_000});
        assert!(check_claims(&array, ISS, "iot-nats", 900, 30).is_ok());
        assert!(matches!(
            check_claims(&good, "https://other", "iot-nats", 900, 30),
            Err(TokenError::Issuer { .. })
        ));
        assert!(matches!(
            check_claims(&good, ISS, "else", 900, 30),
            Err(TokenError::Audience { .. })
        ));
        assert_eq!(
            check_claims(&good, ISS, "iot-nats", 1_100, 30).err(),
            Some(TokenError::Expired { ago: 100 })
        );
        // Within the leeway still counts.
        assert!(check_claims(&good, ISS, "iot-nats", 1_010, 30).is_ok());
        let early = json!({"iss": ISS, "aud": "iot-nats", "exp": 2_000, "nbf": 1_500});
        assert_eq!(
            check_claims(&early, ISS, "iot-nats", 900, 30).err(),
            Some(TokenError::NotYetValid)
        );
    }

    #[test]
    fn an_ed25519_signature_verifies_only_with_its_key() -> Result<(), Box<dyn std::error::Error>> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| e.to_string())?;
        use ring::signature::KeyPair as _;
        let jwk = Jwk {
            kid: Some("k".into()),
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: Some(URL_SAFE_NO_PAD.encode(kp.public_key().as_ref())),
            y: None,
            n: None,
            e: None,
        };
        let sig = kp.sign(b"signed part");
        assert!(check_signature("EdDSA", &jwk, b"signed part", sig.as_ref()).is_ok());
        assert_eq!(
            check_signature("EdDSA", &jwk, b"other part", sig.as_ref()),
            Err(TokenError::Signature)
        );
        assert!(matches!(
            check_signature("HS256", &jwk, b"signed part", sig.as_ref()),
            Err(TokenError::Algorithm(_))
        ));
        Ok(())
    }
}
