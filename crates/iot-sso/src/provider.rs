//! One OpenID provider as a public client sees it: discovery, the HTTP client that
//! trusts the provider's CA, ID token verification, refresh and revocation. The
//! protocol itself is `openidconnect`'s; this module only decides what to accept.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod, CoreGrantType, CoreIdToken,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreRevocableToken, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AdditionalProviderMetadata, ClientId, DeviceAuthorizationUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    IssuerUrl, Nonce, OAuth2TokenResponse, ProviderMetadata, RefreshToken, RevocationUrl, TokenResponse,
};
use serde::{Deserialize, Serialize};

use crate::SsoError;
use crate::cache::Session;

/// Endpoints the core discovery document type leaves out.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ExtraEndpoints {
    #[serde(default)]
    pub device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
    #[serde(default)]
    pub revocation_endpoint: Option<RevocationUrl>,
}
impl AdditionalProviderMetadata for ExtraEndpoints {}

pub type Metadata = ProviderMetadata<
    ExtraEndpoints,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

pub(crate) type Client =
    CoreClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointMaybeSet, EndpointMaybeSet>;

/// Where to log in: the issuer, our client id there, and the CA that signs the
/// issuer's certificate when it is not a public one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    pub issuer_url: String,
    pub client_id: String,
    pub ca_file: Option<PathBuf>,
}

/// A discovered provider, ready for flows.
pub struct Provider {
    pub(crate) config: IssuerConfig,
    pub(crate) metadata: Metadata,
    pub(crate) http: reqwest::Client,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a verified ID token says about its user, for display and for the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub subject: String,
    #[serde(default)]
    pub email: Option<String>,
    /// The flat `groups` claim: what kube-apiserver's `--oidc-groups-claim` reads.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Role names from Zitadel's nested `urn:zitadel:iam:org:project:roles` claim.
    #[serde(default)]
    pub zitadel_roles: Vec<String>,
}

impl Identity {
    /// Roles that the API server will not see: in Zitadel's nested claim but not in
    /// `groups`. Non-empty means the Zitadel Action is missing.
    pub fn roles_invisible_to_kubernetes(&self) -> Vec<&str> {
        self.zitadel_roles
            .iter()
            .filter(|r| !self.groups.contains(r))
            .map(String::as_str)
            .collect()
    }
}

fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, SsoError> {
    let mut builder = reqwest::Client::builder()
        // Following redirects would let a token endpoint bounce credentials elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| SsoError::CaFile {
            path: path.to_owned(),
            source: e,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| SsoError::Config(format!("{}: not a PEM certificate bundle: {e}", path.display())))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| SsoError::Config(format!("building the HTTP client: {e}")))
}

impl Provider {
    /// Fetches the discovery document and the signing keys.
    pub async fn discover(config: &IssuerConfig) -> Result<Self, SsoError> {
        let http = http_client(config.ca_file.as_deref())?;
        let issuer = IssuerUrl::new(config.issuer_url.clone())
            .map_err(|e| SsoError::Config(format!("issuer URL {:?}: {e}", config.issuer_url)))?;
        let metadata = Metadata::discover_async(issuer, &http)
            .await
            .map_err(|e| SsoError::Discovery {
                issuer: config.issuer_url.clone(),
                reason: crate::error_chain(&e),
            })?;
        Ok(Self {
            config: config.clone(),
            metadata,
            http,
        })
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    pub(crate) fn client(&self) -> Client {
        CoreClient::from_provider_metadata(
            self.metadata.clone(),
            ClientId::new(self.config.client_id.clone()),
            None,
        )
    }

    pub fn supports_device_code(&self) -> bool {
        self.metadata
            .additional_metadata()
            .device_authorization_endpoint
            .is_some()
    }

    /// Verifies the ID token in a token response (signature, issuer, audience, expiry,
    /// and the nonce when one was sent) and turns the response into a session.
    pub(crate) fn session_from(
        &self,
        response: &CoreTokenResponse,
        nonce: Option<&Nonce>,
        previous_refresh: Option<&str>,
    ) -> Result<Session, SsoError> {
        let id_token = response.id_token().ok_or_else(|| {
            SsoError::Protocol("the token response has no ID token (was the openid scope granted?)".into())
        })?;
        let (identity, expiry) = self.verify(id_token, nonce)?;
        Ok(Session {
            issuer_url: self.config.issuer_url.clone(),
            client_id: self.config.client_id.clone(),
            id_token: id_token.to_string(),
            id_token_expiry: expiry,
            // A provider that does not rotate refresh tokens returns none on refresh:
            // the one we had stays valid.
            refresh_token: response
                .refresh_token()
                .map(|t| t.secret().clone())
                .or_else(|| previous_refresh.map(str::to_owned)),
            identity,
            saved_at: Utc::now(),
        })
    }

    fn verify(&self, id_token: &CoreIdToken, nonce: Option<&Nonce>) -> Result<(Identity, DateTime<Utc>), SsoError> {
        let client = self.client();
        // Zitadel adds its project id to `aud`; our client id must still be in it.
        let verifier = client.id_token_verifier().set_other_audience_verifier_fn(|_| true);
        let claims = match nonce {
            Some(n) => id_token.claims(&verifier, n),
            // A refreshed ID token carries no nonce of ours to compare.
            None => id_token.claims(&verifier, |_: Option<&Nonce>| Ok(())),
        }
        .map_err(|e| SsoError::Protocol(format!("the ID token does not verify: {e}")))?;
        let raw = payload_json(&id_token.to_string())?;
        let identity = Identity {
            subject: claims.subject().to_string(),
            email: claims.email().map(|e| e.to_string()),
            groups: string_list(raw.get("groups")),
            zitadel_roles: raw
                .get("urn:zitadel:iam:org:project:roles")
                .and_then(|v| v.as_object())
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default(),
        };
        Ok((identity, claims.expiration()))
    }

    /// Trades the refresh token for a new ID token. `SessionEnded` when the provider
    /// refuses the refresh token: only a new login helps then.
    pub async fn refresh(&self, session: &Session) -> Result<Session, SsoError> {
        let Some(refresh) = session.refresh_token.as_deref() else {
            return Err(SsoError::SessionEnded {
                issuer: self.config.issuer_url.clone(),
                reason: "the ID token expired and the session has no refresh token".into(),
            });
        };
        let token = RefreshToken::new(refresh.to_owned());
        let client = self.client();
        let response = client
            .exchange_refresh_token(&token)
            .map_err(|e| SsoError::Protocol(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                // Only invalid_grant means the refresh token is dead; anything else
                // (server_error, temporarily_unavailable) may pass, so the session stays.
                openidconnect::RequestTokenError::ServerResponse(r)
                    if matches!(r.error(), openidconnect::core::CoreErrorResponseType::InvalidGrant) =>
                {
                    SsoError::SessionEnded {
                        issuer: self.config.issuer_url.clone(),
                        reason: format!(
                            "the provider refused the refresh token: {}{}",
                            r.error(),
                            r.error_description().map(|d| format!(" ({d})")).unwrap_or_default()
                        ),
                    }
                }
                openidconnect::RequestTokenError::ServerResponse(r) => SsoError::Http(format!(
                    "the provider could not refresh the token now: {}{}",
                    r.error(),
                    r.error_description().map(|d| format!(" ({d})")).unwrap_or_default()
                )),
                other => SsoError::Http(crate::error_chain(&other)),
            })?;
        self.session_from(&response, None, Some(refresh))
    }

    /// Revokes the refresh token at the provider, when it has a revocation endpoint.
    /// Returns whether it did.
    pub async fn revoke(&self, session: &Session) -> Result<bool, SsoError> {
        let (Some(url), Some(refresh)) = (
            self.metadata.additional_metadata().revocation_endpoint.clone(),
            session.refresh_token.clone(),
        ) else {
            return Ok(false);
        };
        self.client()
            .set_revocation_url(url)
            .revoke_token(CoreRevocableToken::from(RefreshToken::new(refresh)))
            .map_err(|e| SsoError::Protocol(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(|e| SsoError::Http(crate::error_chain(&e)))?;
        Ok(true)
    }
}

/// The claims of a JWT, decoded without verifying: only called on tokens that
/// `openidconnect` has just verified, to read claims its types do not model.
fn payload_json(jwt: &str) -> Result<serde_json::Map<String, serde_json::Value>, SsoError> {
    use base64::Engine as _;
    let payload = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| SsoError::Protocol("the ID token is not a JWS".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| SsoError::Protocol(format!("the ID token payload is not base64url: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| SsoError::Protocol(format!("the ID token payload is not JSON: {e}")))
}

fn string_list(v: Option<&serde_json::Value>) -> Vec<String> {
    match v {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_claim_takes_a_list_or_a_single_string_like_the_api_server() {
        assert_eq!(string_list(Some(&serde_json::json!(["a", "b", 3]))), vec!["a", "b"]);
        assert_eq!(string_list(Some(&serde_json::json!("a"))), vec!["a"]);
        assert!(string_list(Some(&serde_json::json!({"a": 1}))).is_empty());
        assert!(string_list(None).is_empty());
    }

    #[test]
    fn roles_only_in_the_nested_claim_are_flagged() {
        let id = Identity {
            subject: "nora".into(),
            email: None,
            groups: vec!["fleet-viewers".into()],
            zitadel_roles: vec!["fleet-viewers".into(), "fleet-deployers".into()],
        };
        assert_eq!(id.roles_invisible_to_kubernetes(), vec!["fleet-deployers"]);
    }

    #[test]
    fn payload_decodes_unpadded_base64url() {
        let jwt = "e30.eyJncm91cHMiOlsiZmxlZXQtYWRtaW5zIl19.sig";
        let claims = payload_json(jwt).expect("decodes");
        assert_eq!(string_list(claims.get("groups")), vec!["fleet-admins"]);
        assert!(payload_json("nodots").is_err());
    }
}
