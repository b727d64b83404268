//! Which digest a tag names now: the operator asks the registry once per revision.
//!
//! The operator holds the registry's signing key, so it signs its own short pull
//! token for the one repository instead of going through the token service.

use std::sync::Arc;
use std::time::Duration;

use crate::reference::{ImageRef, check_digest};
use crate::token::{Access, SigningKey, now_unix};

/// Manifest types a pull may meet, multi-platform first: the digest of an index is
/// what every device pulls, each then taking its own platform from it.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// Subject of the operator's own tokens, as the registry's log shows it.
pub const OPERATOR_SUBJECT: &str = "iot-operator";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("registry {registry} is unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("{image}: the registry has no such tag (404)")]
    NotFound { image: String },
    #[error("registry {registry} refused the operator's token ({status}): {detail}")]
    Refused {
        registry: String,
        status: u16,
        detail: String,
    },
    #[error("{image}: the registry answered {status}: {detail}")]
    Other { image: String, status: u16, detail: String },
}

impl ResolveError {
    /// Whether trying again later may help (the registry is down, not the name wrong).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Other { status, .. } => *status >= 500,
            Self::NotFound { .. } | Self::Refused { .. } => false,
        }
    }
}

/// Resolves tags on registries whose tokens this key signs.
#[derive(Debug, Clone)]
pub struct Resolver {
    http: reqwest::Client,
    key: Arc<SigningKey>,
    issuer: String,
    service: String,
}

impl Resolver {
    /// `ca_pem`: the CA of the registry's TLS certificate (the system's roots
    /// without it).
    pub fn new(ca_pem: Option<&[u8]>, key: Arc<SigningKey>, issuer: &str, service: &str) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15));
        if let Some(pem) = ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)? {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: b.build()?,
            key,
            issuer: issuer.to_owned(),
            service: service.to_owned(),
        })
    }

    /// The digest `image`'s tag names now. An image that names a digest already is
    /// answered without asking.
    pub async fn resolve(&self, image: &ImageRef) -> Result<String, ResolveError> {
        if let Some(d) = &image.digest {
            return Ok(d.clone());
        }
        let registry = image.registry.clone().unwrap_or_else(|| "docker.io".into());
        let unreachable = |detail: String| ResolveError::Unreachable {
            registry: registry.clone(),
            detail,
        };
        let (token, _) = self
            .key
            .mint(
                &self.issuer,
                &self.service,
                OPERATOR_SUBJECT,
                vec![Access::repository(&image.repository, &["pull"])],
                now_unix(),
                Duration::from_secs(60),
            )
            .map_err(|e| unreachable(e.to_string()))?;
        let url = format!(
            "https://{registry}/v2/{}/manifests/{}",
            image.repository,
            image.tag_or_latest()
        );
        let resp = self
            .http
            .head(&url)
            .header(reqwest::header::ACCEPT, ACCEPT)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = resp.status().as_u16();
        match status {
            200 => {
                let digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                check_digest(&digest).map_err(|detail| ResolveError::Other {
                    image: image.to_string(),
                    status,
                    detail,
                })?;
                Ok(digest)
            }
            404 => Err(ResolveError::NotFound {
                image: image.to_string(),
            }),
            401 | 403 => Err(ResolveError::Refused {
                registry,
                status,
                detail: header_text(&resp, "www-authenticate"),
            }),
            _ => Err(ResolveError::Other {
                image: image.to_string(),
                status,
                detail: "unexpected answer to a manifest HEAD".into(),
            }),
        }
    }
}

fn header_text(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// reqwest's error with its causes: "error sending request" alone says nothing.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
