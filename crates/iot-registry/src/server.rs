//! The token service's HTTPS endpoint: `GET /token?service=S&scope=A&scope=B` with
//! basic credentials, answered as docker-registry's token protocol expects.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::realm::{self, Publisher, RealmConfig, Refusal};
use crate::token::{self, Access, SigningKey};

/// Everything the endpoint needs.
#[derive(Debug)]
pub struct TokenService {
    pub key: SigningKey,
    pub config: RealmConfig,
    pub publishers: Vec<Publisher>,
}

/// TLS from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds and serves until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    service: Arc<TokenService>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((
        bound,
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "token service accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, service) = (tls.clone(), service.clone());
                tokio::spawn(async move {
                    let stream =
                        match tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let svc = hyper::service::service_fn(move |req| {
                        let service = service.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&req, &service, peer)) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(error = %e, "token connection ended with an error");
                    }
                });
            }
        }),
    ))
}

fn respond(req: &Request<Incoming>, service: &TokenService, peer: SocketAddr) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"ok": true})),
        (&Method::GET, "/token") => token_answer(req, service, peer),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"errors": [{"message": "only GET /token"}]}),
        ),
    }
}

fn token_answer(req: &Request<Incoming>, service: &TokenService, peer: SocketAddr) -> Response<Full<Bytes>> {
    let mut asked_service = None;
    let mut scopes = Vec::new();
    for (k, v) in req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        let v = urlencoding::decode(v).map(|c| c.into_owned()).unwrap_or_default();
        match k {
            "service" => asked_service = Some(v),
            // One parameter may hold several scopes separated by spaces.
            "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(str::to_owned)),
            _ => {}
        }
    }
    let refuse = |status: StatusCode, why: &str| {
        tracing::info!(%peer, reason = why, "registry token refused");
        let mut r = json(
            status,
            serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": why}]}),
        );
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Basic realm=\"iot-registry-token\""),
            );
        }
        r
    };
    if let Some(s) = &asked_service
        && *s != service.config.service
    {
        let why = Refusal::WrongService {
            asked: s.clone(),
            ours: service.config.service.clone(),
        };
        return refuse(StatusCode::BAD_REQUEST, &why.to_string());
    }
    let Some((user, password)) = basic_credentials(req) else {
        return refuse(StatusCode::UNAUTHORIZED, &Refusal::NoCredentials.to_string());
    };
    let requested: Vec<Access> = match scopes.iter().map(|s| Access::parse_scope(s)).collect() {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let now = token::now_unix();
    let caller = match realm::authenticate(&user, &password, &service.publishers, &service.config, now) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, &e.to_string()),
    };
    let (access, ttl) = realm::grant(&caller, &requested, now);
    let granted: Vec<String> = access.iter().map(Access::scope).collect();
    match service
        .key
        .mint(&service.config.issuer, &service.config.service, &user, access, now, ttl)
    {
        Ok((t, claims)) => {
            tracing::info!(%peer, user, granted = ?granted, expires = claims.exp, "registry token issued");
            json(
                StatusCode::OK,
                serde_json::json!({
                    "token": t,
                    "access_token": t,
                    "expires_in": ttl.as_secs(),
                    "issued_at": chrono::DateTime::from_timestamp(now, 0).map(|d| d.to_rfc3339()),
                }),
            )
        }
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"errors": [{"message": e.to_string()}]}),
        ),
    }
}

fn basic_credentials(req: &Request<Incoming>) -> Option<(String, String)> {
    let value = req.headers().get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
