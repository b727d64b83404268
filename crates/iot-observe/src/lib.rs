//! The HTTP side of the platform's daemons: `/metrics` in the Prometheus text format
//! (rendered by `prometheus-client`), `/healthz` (the process serves) and `/readyz`
//! (the daemon says it can do its job). Tools and tests wait on these endpoints,
//! never on log lines. And what every daemon does alike: [`supervise`], how the
//! daemons treat their tasks, and [`process`], logging and the stop signal.

pub mod process;
pub mod supervise;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Whether the daemon is ready, and if not, why. Cheap to clone and to update.
#[derive(Debug, Clone)]
pub struct Readiness {
    tx: Arc<watch::Sender<Result<(), String>>>,
    /// Lines `/readyz` shows after its verdict (e.g. which NATS server the daemon
    /// is on): for people, never parsed.
    detail: Arc<Mutex<String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::channel(Err("starting".to_owned())).0),
            detail: Arc::default(),
        }
    }
}

impl Readiness {
    pub fn set_ready(&self) {
        self.tx.send_if_modified(|r| {
            let changed = r.is_err();
            *r = Ok(());
            changed
        });
    }

    pub fn set_not_ready(&self, why: impl Into<String>) {
        let why = why.into();
        self.tx.send_if_modified(|r| {
            let changed = r.as_ref().err() != Some(&why);
            *r = Err(why);
            changed
        });
    }

    /// Replaces the lines shown after the verdict.
    pub fn set_detail(&self, detail: impl Into<String>) {
        *self.detail.lock().unwrap_or_else(PoisonError::into_inner) = detail.into();
    }

    fn detail(&self) -> String {
        let detail = self.detail.lock().unwrap_or_else(PoisonError::into_inner);
        if detail.is_empty() {
            String::new()
        } else {
            format!("{}\n", detail.trim_end())
        }
    }

    pub fn is_ready(&self) -> bool {
        self.tx.borrow().is_ok()
    }

    /// Waits until ready.
    pub async fn wait_ready(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in self, so the channel cannot close while we wait.
        if rx.wait_for(Result::is_ok).await.is_err() {
            tracing::debug!("readiness channel closed");
        }
    }

    fn state(&self) -> Result<(), String> {
        self.tx.borrow().clone()
    }
}

/// Binds `addr` and serves the endpoints until the returned task is aborted. Binding
/// happens before this returns, so a taken port is an error at startup.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Mutex<Registry>>,
    readiness: Readiness,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let registry = registry.clone();
                    let readiness = readiness.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&req, &registry, &readiness)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    }))
}

fn respond(req: &Request<Incoming>, registry: &Mutex<Registry>, readiness: &Readiness) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            let registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                Ok(()) => {
                    let mut resp = text(StatusCode::OK, body);
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    resp
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
            }
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness.state() {
            Ok(()) => text(StatusCode::OK, format!("ready\n{}", readiness.detail())),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n{}", readiness.detail()),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
