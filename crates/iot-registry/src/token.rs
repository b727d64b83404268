//! Registry tokens: the JWTs docker-registry's `auth.token` mode accepts.
//!
//! The registry trusts the certificates in its `rootcertbundle`. A token names its
//! key by `kid`, in the format of the libtrust library the registry uses: the
//! SHA-256 of the key's DER `SubjectPublicKeyInfo`, its first 30 bytes in base32
//! without padding, in twelve groups of four joined by `:`. Tokens are ES256 (P-256);
//! the registry checks `iss`, `aud` (its `service`), `exp`, `nbf` and the signature,
//! then grants what `access` lists and nothing else.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// DER prefix of a P-256 `SubjectPublicKeyInfo` in front of the 65-byte point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// Clock difference tolerated between the signer and whoever checks.
pub const LEEWAY_SECS: i64 = 60;

/// One grant: `actions` on the resource `kind`/`name` (`repository`/`iot/web`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    pub fn repository(name: &str, actions: &[&str]) -> Self {
        Self {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// The scope string a client asks for: `repository:iot/web:pull,push`.
    pub fn scope(&self) -> String {
        format!("{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }

    /// Parses one scope. Repository names never hold `:` (the registry's port is
    /// not part of them), so type, name and actions split cleanly.
    pub fn parse_scope(scope: &str) -> Result<Self, TokenError> {
        let bad = || TokenError::Scope(scope.to_owned());
        let (kind, rest) = scope.split_once(':').ok_or_else(bad)?;
        let (name, actions) = rest.rsplit_once(':').ok_or_else(bad)?;
        if kind.is_empty() || name.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            kind: kind.into(),
            name: name.into(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// A token's claims, as the registry reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// Who the token was issued to (a device id, a publisher's name).
    pub sub: String,
    /// The registry's `service`.
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub access: Vec<Access>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the registry signing key is not a PKCS#8 PEM P-256 key: {0}")]
    Key(String),
    #[error("scope {0:?} is not type:name:actions")]
    Scope(String),
    #[error("not a registry token: {0}")]
    Malformed(String),
    #[error("the registry token's signature does not verify")]
    Signature,
    #[error("the registry token {0}")]
    Claims(String),
}

/// The key that signs registry tokens. Whoever holds it can grant any right on the
/// registry: the token service and the operator, nothing on a device.
#[derive(Debug)]
pub struct SigningKey {
    pair: EcdsaKeyPair,
    kid: String,
}

impl SigningKey {
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, TokenError> {
        let body: String = pem
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(TokenError::Key("no BEGIN PRIVATE KEY block".into()));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|e| TokenError::Key(e.to_string()))?;
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
            .map_err(|e| TokenError::Key(e.to_string()))?;
        let kid = kid_of(pair.public_key().as_ref());
        Ok(Self { pair, kid })
    }

    pub fn from_pem_file(path: &std::path::Path) -> Result<Self, TokenError> {
        let pem = std::fs::read_to_string(path).map_err(|e| TokenError::Key(format!("{}: {e}", path.display())))?;
        Self::from_pkcs8_pem(&pem)
    }

    /// The libtrust key id the registry looks the key up by.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The uncompressed public point, for [`verify`].
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Signs a token for `sub` granting `access`, valid from now for `ttl`.
    pub fn mint(
        &self,
        issuer: &str,
        service: &str,
        sub: &str,
        access: Vec<Access>,
        now_unix: i64,
        ttl: Duration,
    ) -> Result<(String, Claims), TokenError> {
        let mut jti = [0u8; 16];
        SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| TokenError::Key("no randomness".into()))?;
        let claims = Claims {
            iss: issuer.into(),
            sub: sub.into(),
            aud: service.into(),
            exp: now_unix + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
            nbf: now_unix - 1,
            iat: now_unix,
            jti: data_encoding::HEXLOWER.encode(&jti),
            access,
        };
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).map_err(|e| TokenError::Malformed(e.to_string()))?)
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| TokenError::Key("signing failed".into()))?;
        Ok((
            format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())),
            claims,
        ))
    }
}

/// libtrust's key id of a P-256 public point (see the module docs).
pub fn kid_of(public_point: &[u8]) -> String {
    let mut spki = P256_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(public_point);
    let sum = Sha256::digest(&spki);
    let b32 = data_encoding::BASE32_NOPAD.encode(&sum[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// Checks a token signed by the key with `public_point`: signature, issuer,
/// audience and validity at `now_unix`.
pub fn verify(
    token: &str,
    public_point: &[u8],
    issuer: &str,
    service: &str,
    now_unix: i64,
) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed("not three dot-separated parts".into()));
    };
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| TokenError::Malformed(e.to_string()))?;
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| TokenError::Malformed("unreadable header".into()))?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
        return Err(TokenError::Malformed("alg is not ES256".into()));
    }
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, public_point)
        .verify(format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| TokenError::Signature)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| TokenError::Malformed("unreadable claims".into()))?;
    if claims.iss != issuer {
        return Err(TokenError::Claims(format!(
            "was issued by {:?}, not {issuer:?}",
            claims.iss
        )));
    }
    if claims.aud != service {
        return Err(TokenError::Claims(format!(
            "is for service {:?}, not {service:?}",
            claims.aud
        )));
    }
    if now_unix > claims.exp + LEEWAY_SECS {
        return Err(TokenError::Claims("has expired".into()));
    }
    if now_unix + LEEWAY_SECS < claims.nbf {
        return Err(TokenError::Claims("is not valid yet".into()));
    }
    Ok(claims)
}

/// Seconds since the epoch, for minting and checking.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh key, for tests here and in `realm`.
    pub(crate) fn key() -> SigningKey {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(doc.as_ref())
        );
        SigningKey::from_pkcs8_pem(&pem).expect("key")
    }

    #[test]
    fn kid_is_twelve_groups_of_four_base32() {
        let k = key();
        let groups: Vec<&str> = k.kid().split(':').collect();
        assert_eq!(groups.len(), 12, "{}", k.kid());
        assert!(
            groups
                .iter()
                .all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)))
        );
    }

    #[test]
    fn a_minted_token_verifies_and_grants_what_it_lists() {
        let k = key();
        let (t, claims) = k
            .mint(
                "iss",
                "svc",
                "pi-1",
                vec![Access::repository("iot/web", &["pull"])],
                1_000,
                Duration::from_secs(600),
            )
            .expect("mint");
        let back = verify(&t, k.public_key(), "iss", "svc", 1_100).expect("verify");
        assert_eq!(back, claims);
        assert_eq!(back.access[0].scope(), "repository:iot/web:pull");
        assert_eq!(back.exp, 1_600);
    }

    #[test]
    fn wrong_key_issuer_audience_or_time_is_refused() {
        let (k, other) = (key(), key());
        let (t, _) = k
            .mint("iss", "svc", "pi-1", vec![], 1_000, Duration::from_secs(600))
            .expect("mint");
        assert!(matches!(
            verify(&t, other.public_key(), "iss", "svc", 1_000),
            Err(TokenError::Signature)
        ));
        assert!(verify(&t, k.public_key(), "other", "svc", 1_000).is_err());
        assert!(verify(&t, k.public_key(), "iss", "other", 1_000).is_err());
        assert!(verify(&t, k.public_key(), "iss", "svc", 1_600 + LEEWAY_SECS + 1).is_err());
        let mut tampered = t.clone();
        tampered.insert(t.find('.').expect("dot") + 2, 'A');
        assert!(verify(&tampered, k.public_key(), "iss", "svc", 1_000).is_err());
    }

    #[test]
    fn scopes_parse_and_print() {
        let a = Access::parse_scope("repository:iot/web:pull,push").expect("scope");
        assert_eq!(a, Access::repository("iot/web", &["pull", "push"]));
        assert_eq!(a.scope(), "repository:iot/web:pull,push");
        assert!(Access::parse_scope("repository").is_err());
        assert!(Access::parse_scope(":x:pull").is_err());
    }
}
