//! A small client for podman's libpod REST API over its unix socket.
//!
//! Only what the agent needs: list, inspect, create, start, stop, unpause, remove,
//! image exists, pull, and the event stream. One HTTP/1.1 connection per request
//! keeps it simple and robust across podman service restarts; the cost (a
//! unix-socket connect) is negligible next to what podman itself does per call.
//!
//! Every call has a deadline, so a podman service that accepts connections but
//! never answers (frozen, deadlocked) is noticed instead of holding the agent:
//! reads (ping, info, list, inspect, image exists, the event stream's connect) get
//! the short call timeout, calls that change containers get
//! [`CHANGE_TIMEOUT_FACTOR`] times as long (stop and remove also the container's
//! stop timeout), and pulls get their own, long, timeout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

const API: &str = "/v4.0.0/libpod";

/// Deadline of reads when none is set ([`PodmanClient::with_call_timeout`]).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls that change containers (create, start, unpause, and stop and remove on top
/// of the stop timeout) may take this many times the call timeout: podman does real
/// work for them (storage, the OCI runtime, networking), on a slow SD card too.
pub const CHANGE_TIMEOUT_FACTOR: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("podman socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("podman API {what}: {message}")]
    Api { what: String, status: u16, message: String },
    #[error("podman API {what}: {message}")]
    Transport { what: String, message: String },
    #[error("podman API {what}: no answer within {}", humantime::format_duration(*after))]
    Timeout { what: String, after: Duration },
}

impl PodmanError {
    /// HTTP status of an API error (0 for transport problems).
    pub fn status(&self) -> u16 {
        match self {
            PodmanError::Api { status, .. } => *status,
            _ => 0,
        }
    }
}

/// A container as listed by `GET /libpod/containers/json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListedContainer {
    pub id: String,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// The subset of libpod's SpecGenerator the agent sets.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CreateSpec {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub portmappings: Vec<PortMappingSpec>,
    pub restart_policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_limits: Option<serde_json::Value>,
    pub stop_timeout: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PortMappingSpec {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
}

/// What `GET /libpod/containers/{id}/json` says about a container's health.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InspectedContainer {
    #[serde(default)]
    pub restart_count: u32,
    pub state: InspectedState,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InspectedState {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub running: bool,
    #[serde(default)]
    pub exit_code: i32,
}

/// One line of `GET /libpod/events?stream=true`.
#[derive(Debug, Clone, Deserialize)]
pub struct PodmanEvent {
    #[serde(rename = "Type", default)]
    pub type_: String,
    #[serde(rename = "Action", default)]
    pub action: String,
    #[serde(rename = "Actor", default)]
    pub actor: EventActor,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventActor {
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Container labels, plus podman's own attributes (`name`, `image`,
    /// `containerExitCode`).
    #[serde(rename = "Attributes", default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateResponse {
    id: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
}

#[derive(Debug, Clone)]
pub struct PodmanClient {
    socket: PathBuf,
    /// Deadline of reads; changes get [`CHANGE_TIMEOUT_FACTOR`] times as long.
    timeout: Duration,
}

impl PodmanClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// Sets the deadline of reads (and with it that of changes).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The deadline of reads.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    /// The deadline of calls that change containers.
    pub fn change_timeout(&self) -> Duration {
        self.timeout.saturating_mul(CHANGE_TIMEOUT_FACTOR)
    }

    /// Checks that the service answers.
    pub async fn ping(&self) -> Result<(), PodmanError> {
        self.call(Method::GET, &format!("{API}/_ping"), None, "ping")
            .await
            .map(drop)
    }

    /// Where podman keeps images, layers and its container database
    /// (`store.graphRoot` of `podman info`).
    pub async fn graph_root(&self) -> Result<PathBuf, PodmanError> {
        #[derive(serde::Deserialize)]
        struct Info {
            store: Store,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Store {
            graph_root: PathBuf,
        }
        let body = self.call(Method::GET, &format!("{API}/info"), None, "info").await?;
        let info: Info = serde_json::from_slice(&body).map_err(|e| PodmanError::Transport {
            what: "info".into(),
            message: format!("unexpected response: {e}"),
        })?;
        Ok(info.store.graph_root)
    }

    /// Containers (any state) carrying `label=value`.
    pub async fn list_by_label(&self, label: &str, value: &str) -> Result<Vec<ListedContainer>, PodmanError> {
        let filters = serde_json::json!({"label": [format!("{label}={value}")]}).to_string();
        let path = format!(
            "{API}/containers/json?all=true&filters={}",
            urlencoding::encode(&filters)
        );
        let body = self.call(Method::GET, &path, None, "list containers").await?;
        serde_json::from_slice(&body).map_err(|e| PodmanError::Transport {
            what: "list containers".into(),
            message: format!("unexpected response: {e}"),
        })
    }

    pub async fn create(&self, spec: &CreateSpec) -> Result<String, PodmanError> {
        let what = format!("create {}", spec.name);
        let payload = serde_json::to_vec(spec).map_err(|e| PodmanError::Transport {
            what: what.clone(),
            message: e.to_string(),
        })?;
        let body = self
            .call_with(
                Method::POST,
                &format!("{API}/containers/create"),
                Some(payload),
                &what,
                self.change_timeout(),
            )
            .await?;
        let resp: CreateResponse = serde_json::from_slice(&body).map_err(|e| PodmanError::Transport {
            what,
            message: format!("unexpected response: {e}"),
        })?;
        Ok(resp.id)
    }

    pub async fn start(&self, id: &str) -> Result<(), PodmanError> {
        let what = format!("start {}", short_id(id));
        match self
            .call_with(
                Method::POST,
                &format!("{API}/containers/{id}/start"),
                None,
                &what,
                self.change_timeout(),
            )
            .await
        {
            // 304: already running, which is what we wanted.
            Err(e) if e.status() == 304 => Ok(()),
            other => other.map(drop),
        }
    }

    /// Stops a container, giving it `timeout` before it is killed. Stopping a stopped
    /// container succeeds.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), PodmanError> {
        let path = format!("{API}/containers/{id}/stop?timeout={}", timeout.as_secs());
        // Podman waits up to `timeout` for the process, then kills it.
        let limit = self.change_timeout().saturating_add(timeout);
        match self
            .call_with(Method::POST, &path, None, &format!("stop {}", short_id(id)), limit)
            .await
        {
            Err(e) if e.status() == 304 => Ok(()),
            other => other.map(drop),
        }
    }

    pub async fn unpause(&self, id: &str) -> Result<(), PodmanError> {
        self.call_with(
            Method::POST,
            &format!("{API}/containers/{id}/unpause"),
            None,
            &format!("unpause {}", short_id(id)),
            self.change_timeout(),
        )
        .await
        .map(drop)
    }

    pub async fn inspect(&self, id: &str) -> Result<InspectedContainer, PodmanError> {
        let what = format!("inspect {}", short_id(id));
        let body = self
            .call(Method::GET, &format!("{API}/containers/{id}/json"), None, &what)
            .await?;
        serde_json::from_slice(&body).map_err(|e| PodmanError::Transport {
            what,
            message: format!("unexpected response: {e}"),
        })
    }

    /// Force-removes a container, giving it `stop_timeout` to stop. A container that
    /// is already gone counts as removed.
    pub async fn remove(&self, id: &str, stop_timeout: Duration) -> Result<(), PodmanError> {
        let path = format!("{API}/containers/{id}?force=true&timeout={}", stop_timeout.as_secs());
        // A running container is stopped first, which may take `stop_timeout`.
        let limit = self.change_timeout().saturating_add(stop_timeout);
        match self
            .call_with(Method::DELETE, &path, None, &format!("remove {}", short_id(id)), limit)
            .await
        {
            Err(e) if e.status() == 404 => Ok(()),
            other => other.map(drop),
        }
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, PodmanError> {
        let path = format!("{API}/images/{}/exists", urlencoding::encode(image));
        match self.call(Method::GET, &path, None, "image exists").await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Pulls an image, allowing it `timeout` (pulls of large images over a slow link
    /// take far longer than any other call). Libpod answers 200 and streams JSON
    /// lines; failures arrive as a line with an `error` field.
    pub async fn pull(&self, image: &str, timeout: Duration) -> Result<(), PodmanError> {
        let what = format!("pull {image}");
        let path = format!("{API}/images/pull?reference={}&quiet=true", urlencoding::encode(image));
        let body = self.call_with(Method::POST, &path, None, &what, timeout).await?;
        for line in body.split(|b| *b == b'\n') {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line)
                && let Some(err) = v.get("error").and_then(|e| e.as_str())
            {
                return Err(PodmanError::Api {
                    what,
                    status: 500,
                    message: err.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Follows podman's event stream for containers carrying `label=value`, sending
    /// each event to `tx`. Returns when the stream ends (podman restarted) or `tx` is
    /// closed; the caller reconnects.
    pub async fn stream_events(
        &self,
        label: &str,
        value: &str,
        tx: &tokio::sync::mpsc::Sender<PodmanEvent>,
    ) -> Result<(), PodmanError> {
        let what = "events";
        let filters = serde_json::json!({"label": [format!("{label}={value}")], "type": ["container"]}).to_string();
        let path = format!("{API}/events?stream=true&filters={}", urlencoding::encode(&filters));
        // Only the answer's head has a deadline: the stream itself is quiet for as
        // long as nothing happens to the device's containers.
        let (resp, _conn) = tokio::time::timeout(self.timeout, self.send(Method::GET, &path, None, what))
            .await
            .map_err(|_| PodmanError::Timeout {
                what: what.to_owned(),
                after: self.timeout,
            })??;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(api_error(what, status, &bytes));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| PodmanError::Transport {
                what: what.to_owned(),
                message: e.to_string(),
            })?;
            let Ok(data) = frame.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                match serde_json::from_slice::<PodmanEvent>(&line) {
                    Ok(ev) => {
                        if tx.send(ev).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if !line.iter().all(u8::is_ascii_whitespace) => {
                        tracing::debug!(error = %e, "skipping an event line that does not parse");
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }

    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>, what: &str) -> Result<Bytes, PodmanError> {
        self.call_with(method, path, body, what, self.timeout).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
        timeout: Duration,
    ) -> Result<Bytes, PodmanError> {
        let call = async {
            let (resp, _conn) = self.send(method, path, body, what).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| PodmanError::Transport {
                    what: what.to_owned(),
                    message: e.to_string(),
                })?
                .to_bytes();
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(api_error(what, status, &bytes))
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(PodmanError::Timeout {
                what: what.to_owned(),
                after: timeout,
            }),
        }
    }

    /// Sends one request on a fresh connection; the response body streams from it
    /// for as long as the returned guard lives. Dropping the guard closes the
    /// connection, so a call given up on (a frozen podman) leaves no task or socket
    /// behind.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, ConnGuard), PodmanError> {
        let transport = |e: &dyn std::fmt::Display| PodmanError::Transport {
            what: what.to_owned(),
            message: e.to_string(),
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| PodmanError::Connect {
                path: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(&e))?;
        let conn_task = ConnGuard(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "podman connection ended with error");
            }
        }));
        let mut req = Request::builder().method(method).uri(path).header("host", "podman");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| transport(&e))?;
        Ok((resp, conn_task))
    }
}

/// The task driving one connection; aborted (and the socket closed) on drop.
struct ConnGuard(tokio::task::JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn api_error(what: &str, status: StatusCode, bytes: &[u8]) -> PodmanError {
    let message = serde_json::from_slice::<ErrorBody>(bytes)
        .map(|b| b.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).trim().to_owned());
    let message = if message.is_empty() && status == StatusCode::NOT_MODIFIED {
        "not modified".to_owned()
    } else {
        message
    };
    PodmanError::Api {
        what: what.to_owned(),
        status: status.as_u16(),
        message,
    }
}

/// The first 12 characters of a container id, as podman shows them.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    use super::*;

    /// A socket like a frozen podman's (`kill -STOP`): connections are accepted
    /// (here by the test, there by the kernel's backlog) and nothing is answered.
    /// Sends each accepted connection to the test.
    fn frozen_podman(dir: &std::path::Path) -> (PathBuf, tokio::sync::mpsc::UnboundedReceiver<UnixStream>) {
        let socket = dir.join("podman.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                if tx.send(conn).is_err() {
                    return;
                }
            }
        });
        (socket, rx)
    }

    #[tokio::test]
    async fn a_podman_that_does_not_answer_times_out_at_the_call_deadline_and_the_connection_is_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, mut accepted) = frozen_podman(dir.path());
        let client = PodmanClient::new(&socket).with_call_timeout(Duration::from_millis(300));
        assert_eq!(client.change_timeout(), Duration::from_millis(1200));

        let started = Instant::now();
        let err = client.list_by_label("k", "v").await.expect_err("no answer");
        let took = started.elapsed();
        assert!(
            matches!(&err, PodmanError::Timeout { after, .. } if *after == Duration::from_millis(300)),
            "{err:?}"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert_eq!(err.to_string(), "podman API list containers: no answer within 300ms");

        // The call that was given up on leaves no connection open behind it.
        let mut conn = accepted.recv().await.expect("connection");
        let mut request = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut request)).await;
        assert!(read.is_ok(), "the client kept the connection open");
        assert!(String::from_utf8_lossy(&request).starts_with("GET /v4.0.0/libpod/containers/json"));

        // The event stream's connect has the same deadline: the watcher reconnects
        // instead of waiting forever for an answer.
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let started = Instant::now();
        let err = client.stream_events("k", "v", &tx).await.expect_err("no answer");
        assert!(matches!(err, PodmanError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn changes_get_longer_than_reads_and_pulls_their_own_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, _accepted) = frozen_podman(dir.path());
        let client = PodmanClient::new(&socket).with_call_timeout(Duration::from_millis(100));
        let err = client.start("abc").await.expect_err("no answer");
        assert!(
            matches!(err, PodmanError::Timeout { after, .. } if after == Duration::from_millis(400)),
            "{err:?}"
        );
        let err = client
            .remove("abc", Duration::from_millis(200))
            .await
            .expect_err("no answer");
        assert!(
            matches!(err, PodmanError::Timeout { after, .. } if after == Duration::from_millis(600)),
            "{err:?}"
        );
        let err = client
            .pull("img:1", Duration::from_millis(700))
            .await
            .expect_err("no answer");
        assert!(
            matches!(err, PodmanError::Timeout { after, .. } if after == Duration::from_millis(700)),
            "{err:?}"
        );
    }
}
