//! HTTP plumbing and the generic calls.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Per-request timeout: OpenBao answers in milliseconds when it is healthy.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BaoError {
    #[error("OpenBao at {addr} unreachable: {message}")]
    Unreachable { addr: String, message: String },
    #[error("OpenBao {method} {path}: HTTP {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("OpenBao {path}: unexpected answer: {message}")]
    Shape { path: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl BaoError {
    /// OpenBao answered, and the answer was "no such thing" (or "not allowed to see
    /// it", which OpenBao does not distinguish for a revoked identity).
    pub fn is_not_found(&self) -> bool {
        matches!(self, BaoError::Status { status: 404, .. })
    }
    /// OpenBao could not be asked (down, frozen, or sealed).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            BaoError::Unreachable { .. } | BaoError::Status { status: 503, .. }
        )
    }
}

/// An error and its causes on one line: hyper's "client error (Connect)" hides
/// the part people need (a refused connection, a certificate the CA does not sign).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A TLS client configuration that trusts exactly the certificates in `ca` (PEM).
pub fn tls_config_for(ca: &std::path::Path) -> Result<rustls::ClientConfig, BaoError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let unreadable = |e: &dyn std::fmt::Display| BaoError::Tls(format!("CA file {}: {e}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| unreadable(&e))? {
        roots
            .add(cert.map_err(|e| unreadable(&e))?)
            .map_err(|e| unreadable(&e))?;
    }
    if roots.is_empty() {
        return Err(unreadable(&"no certificate in it"));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BaoError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An OpenBao address plus, once logged in, a token.
#[derive(Clone)]
pub struct Bao {
    addr: String,
    token: Option<String>,
    http: Client<Https, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for Bao {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bao")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The result of a login.
#[derive(Debug, Clone)]
pub struct Login {
    pub token: String,
    pub ttl: Duration,
}

/// A signed identity token (OIDC JWT) and how long it is valid.
#[derive(Clone)]
pub struct IdentityToken {
    pub jwt: String,
    pub ttl: Duration,
}

impl std::fmt::Debug for IdentityToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityToken(<redacted>, ttl {:?})", self.ttl)
    }
}

impl Bao {
    /// A client for `addr` (`http://` or `https://`, trusting the system's roots).
    pub fn new(addr: &str) -> Result<Self, BaoError> {
        Self::with_ca(addr, None)
    }

    /// A client for `addr` that trusts only the CA(s) in the PEM file `ca`, when
    /// given (the platform's own CA), and the system's roots otherwise.
    pub fn with_ca(addr: &str, ca: Option<&std::path::Path>) -> Result<Self, BaoError> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca {
            None => builder.with_native_roots().map_err(|e| BaoError::Tls(e.to_string()))?,
            Some(path) => builder.with_tls_config(tls_config_for(path)?),
        };
        let https = builder.https_or_http().enable_http1().build();
        Ok(Self {
            addr: addr.trim_end_matches('/').to_owned(),
            token: None,
            http: Client::builder(TokioExecutor::new()).build(https),
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// Bounds each request (default 10 s). A caller with a fallback, like the auth
    /// callout's cache, wants to give up sooner.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// One call: `path` is below `/v1/`. 204 comes back as `Value::Null`.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, BaoError> {
        let uri = format!("{}/v1/{}", self.addr, path.trim_start_matches('/'));
        self.request(method, &uri, path, body).await
    }

    /// A GET of a full URL, without this client's token (discovery documents, JWKS).
    pub async fn get_url(&self, url: &str) -> Result<Value, BaoError> {
        let anonymous = Self {
            token: None,
            ..self.clone()
        };
        anonymous.request(Method::GET, url, url, None).await
    }

    async fn request(&self, method: Method, uri: &str, path: &str, body: Option<&Value>) -> Result<Value, BaoError> {
        let mut req = Request::builder().method(method.clone()).uri(uri);
        if let Some(t) = &self.token {
            req = req.header("X-Vault-Token", t);
        }
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req
            .header("content-type", "application/json")
            .body(Full::new(payload))
            .map_err(|e| BaoError::Shape {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let unreachable = |message: String| BaoError::Unreachable {
            addr: self.addr.clone(),
            message,
        };
        let resp = tokio::time::timeout(self.timeout, self.http.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = resp.status();
        let bytes = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| unreachable(format!("no body within {:?}", self.timeout)))?
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(BaoError::Status {
                method: method.to_string(),
                path: path.to_owned(),
                status: status.as_u16(),
                message: error_text(&bytes),
            });
        }
        if status == StatusCode::NO_CONTENT || bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| BaoError::Shape {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, BaoError> {
        self.call(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, BaoError> {
        self.call(Method::POST, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Result<Value, BaoError> {
        self.call(Method::DELETE, path, None).await
    }

    /// Approle login.
    pub async fn approle_login(&self, role_id: &str, secret_id: &str) -> Result<Login, BaoError> {
        let path = "auth/approle/login";
        let v = self
            .post(path, &serde_json::json!({"role_id": role_id, "secret_id": secret_id}))
            .await?;
        let token = str_at(&v, "/auth/client_token", path)?;
        let ttl = v.pointer("/auth/lease_duration").and_then(Value::as_u64).unwrap_or(0);
        Ok(Login {
            token,
            ttl: Duration::from_secs(ttl),
        })
    }

    /// A signed identity token from `identity/oidc/token/<role>` for this client's
    /// token.
    pub async fn identity_token(&self, role: &str) -> Result<IdentityToken, BaoError> {
        let path = format!("identity/oidc/token/{role}");
        let v = self.get(&path).await?;
        let jwt = str_at(&v, "/data/token", &path)?;
        let ttl = v.pointer("/data/ttl").and_then(Value::as_u64).unwrap_or(0);
        Ok(IdentityToken {
            jwt,
            ttl: Duration::from_secs(ttl),
        })
    }

    /// The data of a KV v2 secret, `None` if there is none (never written, or
    /// deleted).
    pub async fn kv_read(&self, mount: &str, path: &str) -> Result<Option<Value>, BaoError> {
        match self.get(&format!("{mount}/data/{path}")).await {
            Ok(v) => Ok(v.pointer("/data/data").cloned().filter(|d| !d.is_null())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn kv_write(&self, mount: &str, path: &str, data: &Value) -> Result<(), BaoError> {
        self.post(&format!("{mount}/data/{path}"), &serde_json::json!({"data": data}))
            .await
            .map(|_| ())
    }

    /// Deletes a KV v2 secret with all its versions.
    pub async fn kv_destroy(&self, mount: &str, path: &str) -> Result<(), BaoError> {
        match self.delete(&format!("{mount}/metadata/{path}")).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

pub(crate) fn str_at(v: &Value, pointer: &str, path: &str) -> Result<String, BaoError> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| BaoError::Shape {
            path: path.to_owned(),
            message: format!("no string at {pointer}"),
        })
}

fn error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("errors").and_then(Value::as_array) {
            Some(errors) if !errors.is_empty() => errors
                .iter()
                .map(|e| e.as_str().map(str::to_owned).unwrap_or_else(|| e.to_string()))
                .collect::<Vec<_>>()
                .join("; "),
            _ => "no error message".into(),
        },
        Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}
