//! NATS JWTs: decoding the server's authorization request, encoding the user JWT and
//! the authorization response. NATS JWTs are ordinary compact JWTs signed with an
//! nkey (ed25519) under the algorithm name `ed25519-nkey`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a compact JWT")]
    Malformed,
    #[error("bad base64 in a JWT part")]
    Base64,
    #[error("bad JSON in a JWT part: {0}")]
    Json(String),
    #[error("signature does not verify against issuer {0}")]
    Signature(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Splits a compact JWT into (signed part, claims, signature).
pub fn split(jwt: &str) -> Result<(&str, Value, Vec<u8>), JwtError> {
    let (signed, sig) = jwt.rsplit_once('.').ok_or(JwtError::Malformed)?;
    let (_, claims) = signed.split_once('.').ok_or(JwtError::Malformed)?;
    let claims = URL_SAFE_NO_PAD.decode(claims).map_err(|_| JwtError::Base64)?;
    let claims = serde_json::from_slice(&claims).map_err(|e| JwtError::Json(e.to_string()))?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| JwtError::Base64)?;
    Ok((signed, claims, sig))
}

/// The header of a compact JWT.
pub fn header(jwt: &str) -> Result<Value, JwtError> {
    let (h, _) = jwt.split_once('.').ok_or(JwtError::Malformed)?;
    let h = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Base64)?;
    serde_json::from_slice(&h).map_err(|e| JwtError::Json(e.to_string()))
}

/// Signs `claims` (after adding `jti`, `iat` and `iss`) with `issuer`.
pub fn encode(mut claims: Value, issuer: &KeyPair, now_unix: i64) -> Result<String, JwtError> {
    claims["iss"] = json!(issuer.public_key());
    claims["iat"] = json!(now_unix);
    // The id is a hash of the claims, as NATS tooling makes it.
    claims["jti"] = json!("");
    let hash = Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = json!(data_encoding::BASE32_NOPAD.encode(&hash));
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let sig = issuer
        .sign(signed.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// What this service reads from the server's authorization request. Everything
/// else in it (client info, TLS, tags) is ignored, and every field is optional so a
/// newer server does not break the decode.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthRequest {
    #[serde(default)]
    pub server_id: ServerId,
    #[serde(default)]
    pub user_nkey: String,
    #[serde(default)]
    pub client_info: ClientInfo,
    #[serde(default)]
    pub connect_opts: ConnectOpts,
    /// When the server issued the request (its `iat`, whole seconds).
    #[serde(skip)]
    pub issued_at: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServerId {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub id: u64,
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Default, Deserialize)]
pub struct ConnectOpts {
    #[serde(default)]
    pub auth_token: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

impl std::fmt::Debug for ConnectOpts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOpts")
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<redacted>"))
            .field("user", &self.user)
            .field("name", &self.name)
            .finish()
    }
}

/// Decodes an authorization request and checks it is signed by the server it names.
pub fn decode_request(jwt: &str) -> Result<AuthRequest, JwtError> {
    let (signed, claims, sig) = split(jwt)?;
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or_default();
    let key = KeyPair::from_public_key(iss).map_err(|_| JwtError::Signature(iss.to_owned()))?;
    key.verify(signed.as_bytes(), &sig)
        .map_err(|_| JwtError::Signature(iss.to_owned()))?;
    let nats = claims.get("nats").cloned().unwrap_or(Value::Null);
    let mut request: AuthRequest = serde_json::from_value(nats).map_err(|e| JwtError::Json(e.to_string()))?;
    request.issued_at = claims.get("iat").and_then(Value::as_i64).unwrap_or(0);
    Ok(request)
}

/// Subject permissions and limits of a NATS user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May reply once to each request it receives (without a publish permission on
    /// the requester's inbox).
    pub respond: bool,
    pub limits: Limits,
}

/// What nats-server enforces of a user JWT's limits (checked in its
/// `applyAccountLimits`, 2.15): the largest message the user may publish and how
/// many subscriptions it may hold. The JWT's `data` limit is not enforced for
/// clients, so it is left unlimited. -1 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub subs: i64,
    pub payload: i64,
}

impl Limits {
    pub const NONE: Limits = Limits { subs: -1, payload: -1 };
}

impl Default for Limits {
    fn default() -> Self {
        Self::NONE
    }
}

/// The user JWT for `user_nkey` in `account`.
pub fn user_jwt(
    issuer: &KeyPair,
    user_nkey: &str,
    name: &str,
    account: &str,
    permissions: &Permissions,
    expires_unix: i64,
    now_unix: i64,
) -> Result<String, JwtError> {
    let mut nats = json!({
        "pub": {"allow": permissions.publish},
        "sub": {"allow": permissions.subscribe},
        "subs": permissions.limits.subs, "data": -1, "payload": permissions.limits.payload,
        "type": "user", "version": 2,
    });
    if permissions.respond {
        nats["resp"] = json!({"max": 1, "ttl": 0});
    }
    let claims = json!({
        "sub": user_nkey, "name": name, "aud": account, "exp": expires_unix, "nats": nats,
    });
    encode(claims, issuer, now_unix)
}

/// The authorization response: the user JWT, or an error the server logs.
pub fn response_jwt(
    issuer: &KeyPair,
    user_nkey: &str,
    server_id: &str,
    outcome: Result<&str, &str>,
    now_unix: i64,
) -> Result<String, JwtError> {
    let nats = match outcome {
        Ok(user) => json!({"jwt": user, "type": "authorization_response", "version": 2}),
        Err(error) => json!({"error": error, "type": "authorization_response", "version": 2}),
    };
    encode(
        json!({"sub": user_nkey, "aud": server_id, "nats": nats}),
        issuer,
        now_unix,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_jwts_verify_with_the_issuer_key() -> Result<(), JwtError> {
        let issuer = KeyPair::new_account();
        let user = KeyPair::new_user();
        let perms = Permissions {
            publish: vec!["a.b".into()],
            subscribe: vec!["c.>".into()],
            respond: false,
            limits: Limits { subs: 3, payload: 1000 },
        };
        let jwt = user_jwt(&issuer, &user.public_key(), "dev1", "IOT", &perms, 2_000, 1_000)?;
        let (signed, claims, sig) = split(&jwt)?;
        assert!(issuer.verify(signed.as_bytes(), &sig).is_ok());
        assert_eq!(header(&jwt)?["alg"], "ed25519-nkey");
        assert_eq!(claims["aud"], "IOT");
        assert_eq!(claims["exp"], 2_000);
        assert_eq!(claims["nats"]["pub"]["allow"], json!(["a.b"]));
        assert_eq!(
            (claims["nats"]["subs"].clone(), claims["nats"]["payload"].clone()),
            (json!(3), json!(1000))
        );
        assert!(claims["nats"].get("resp").is_none());
        assert_eq!(claims["iss"], json!(issuer.public_key()));
        // Tampering breaks the signature.
        let other = KeyPair::new_account();
        assert!(other.verify(signed.as_bytes(), &sig).is_err());
        Ok(())
    }

    #[test]
    fn a_request_signed_by_someone_else_is_refused() -> Result<(), JwtError> {
        let server = KeyPair::new_server();
        let jwt = encode(json!({"nats": {"user_nkey": "U1"}}), &server, 1)?;
        assert_eq!(decode_request(&jwt)?.user_nkey, "U1");
        // Re-sign the same claims with another key but keep the claimed issuer.
        let (signed, _, _) = split(&jwt)?;
        let forged = KeyPair::new_server()
            .sign(signed.as_bytes())
            .map_err(|e| JwtError::Sign(e.to_string()))?;
        let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(forged));
        assert!(matches!(decode_request(&forged), Err(JwtError::Signature(_))));
        Ok(())
    }
}
