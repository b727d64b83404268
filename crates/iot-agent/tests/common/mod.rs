//! Shared fixtures for the agent's integration tests: a real nats-server, a real
//! podman API socket, and the real `iot-agent` binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use harmony_reconciler_contracts::*;
use iot_nats::{Anonymous, connect};
use iot_testkit::{DeviceContainers, NatsServer, PodmanService, free_port, unique_id, wait_until};

pub const WAIT: Duration = Duration::from_secs(60);

pub struct Stack {
    pub nats: NatsServer,
    pub podman: PodmanService,
    pub desired: kv::Store,
    pub status: kv::Store,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
}

impl Stack {
    pub async fn start() -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let podman = PodmanService::start().await?;
        let (client, js, desired, status) = admin(&nats).await?;
        Ok(Self {
            nats,
            podman,
            desired,
            status,
            js,
            client,
        })
    }

    /// Reconnects the admin handles (after a server restart).
    pub async fn reconnect(&mut self) -> anyhow::Result<()> {
        let (client, js, desired, status) = admin(&self.nats).await?;
        (self.client, self.js, self.desired, self.status) = (client, js, desired, status);
        Ok(())
    }

    pub async fn put(&self, device: &str, dep: &DeploymentRef, score: &IotScore) -> anyhow::Result<SpecHash> {
        let ds = DesiredState::new(dep.clone(), score.clone());
        self.put_raw(device, dep, ds.to_bytes()).await?;
        Ok(score.spec_hash())
    }

    /// Puts `score` as revision `revision` of the deployment.
    pub async fn put_revision(
        &self,
        device: &str,
        dep: &DeploymentRef,
        score: &IotScore,
        revision: u64,
    ) -> anyhow::Result<SpecHash> {
        let ds = DesiredState::new(dep.clone(), score.clone()).with_revision(revision);
        self.put_raw(device, dep, ds.to_bytes()).await?;
        Ok(score.spec_hash())
    }

    pub async fn put_raw(&self, device: &str, dep: &DeploymentRef, bytes: Vec<u8>) -> anyhow::Result<()> {
        let key = desired_state_key(&Id::new(device)?, dep);
        self.desired.put(key, Bytes::from(bytes)).await?;
        Ok(())
    }

    pub async fn delete(&self, device: &str, dep: &DeploymentRef) -> anyhow::Result<()> {
        self.desired.delete(desired_state_key(&Id::new(device)?, dep)).await?;
        Ok(())
    }

    pub async fn status_of(&self, device: &str) -> Option<AgentStatus> {
        let key = agent_status_key(&Id::new(device).ok()?);
        let bytes = self.status.get(key).await.ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Waits until the device's status satisfies `pred`.
    pub async fn wait_status(
        &self,
        device: &str,
        what: &str,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> anyhow::Result<AgentStatus> {
        let res = wait_until(WAIT, what, || async {
            self.status_of(device).await.filter(|s| pred(s))
        })
        .await;
        if res.is_err() {
            eprintln!("last status of {device}: {:#?}", self.status_of(device).await);
        }
        res
    }

    pub async fn wait_phase(
        &self,
        device: &str,
        dep: &DeploymentRef,
        phase: Phase,
        hash: Option<&SpecHash>,
    ) -> anyhow::Result<AgentStatus> {
        self.wait_status(device, &format!("{dep} {phase:?} on {device}"), |s| {
            s.deployments
                .get(dep)
                .is_some_and(|p| p.phase == phase && (hash.is_none() || p.spec_hash.as_ref() == hash))
        })
        .await
    }
}

async fn admin(nats: &NatsServer) -> anyhow::Result<(async_nats::Client, jetstream::Context, kv::Store, kv::Store)> {
    let conn = connect(&[nats.url()], &Anonymous, "test-admin", nats.ca_file()).await?;
    let js = jetstream::new(conn.client.clone());
    let (desired, status) = iot_nats::buckets::ensure_buckets(&js).await?;
    Ok((conn.client, js, desired, status))
}

/// The real agent binary, killed on drop.
pub struct Agent {
    pub device: String,
    child: Option<Child>,
    /// Runs the agent inside this network namespace (see `spawn_in`).
    netns: Option<String>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn spawn(stack: &Stack, device: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let mut me = Self {
            device: device.into(),
            child: None,
            netns: None,
            log,
            _dir: dir,
        };
        me.start(stack)?;
        Ok(me)
    }

    /// An agent on a "machine" of its own: inside `netns`, reaching NATS at `nats_url`.
    pub fn spawn_in(
        stack: &Stack,
        device: &str,
        netns: &iot_testkit::NetNs,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let mut me = Self {
            device: device.into(),
            child: None,
            netns: Some(netns.path()),
            log,
            _dir: dir,
        };
        me.start_with(stack, env)?;
        Ok(me)
    }

    /// An agent with extra environment (flags), e.g. a different podman socket.
    pub fn spawn_with(stack: &Stack, device: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let mut me = Self {
            device: device.into(),
            child: None,
            netns: None,
            log,
            _dir: dir,
        };
        me.start_with(stack, env)?;
        Ok(me)
    }

    pub fn start(&mut self, stack: &Stack) -> anyhow::Result<()> {
        self.start_with(stack, &[])
    }

    pub fn start_with(&mut self, stack: &Stack, env: &[(&str, String)]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = match &self.netns {
            Some(path) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={path}")).arg(env!("CARGO_BIN_EXE_iot-agent"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_iot-agent")),
        };
        if let Some(ca) = stack.nats.ca_file() {
            cmd.env("NATS_CA_FILE", ca);
        }
        cmd.env("IOT_DEVICE_ID", &self.device)
            .env("NATS_URL", stack.nats.url())
            .env("PODMAN_SOCKET", stack.podman.socket())
            .env("IOT_HEARTBEAT_INTERVAL", "1s")
            .env("IOT_RESYNC_INTERVAL", "2s")
            .env("IOT_STOP_TIMEOUT", "1s")
            .env("IOT_UPGRADE_SETTLE", "2s")
            .env("RUST_LOG", "info,iot_agent=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn()?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits up to `within` for the exit; returns the exit status
    /// and how long it took, or None if it did not exit.
    pub fn terminate(&mut self, within: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let child = self.child.as_mut()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).ok()?;
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, like a crash or power loss of the agent process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.device, self.log_text());
        }
    }
}

/// Every status a device publishes, in order, captured with a core subscription on
/// its KV subject (so short-lived states are seen even if the KV value moves on).
pub struct StatusRecorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<AgentStatus>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusRecorder {
    pub async fn start(stack: &Stack, device: &str) -> anyhow::Result<Self> {
        use futures::StreamExt;
        let subject = keys::kv_subject(AGENT_STATUS_BUCKET, &agent_status_key(&Id::new(device)?));
        let mut sub = stack.client.subscribe(subject).await?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(s) = serde_json::from_slice::<AgentStatus>(&msg.payload) {
                    sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(s);
                }
            }
        });
        Ok(Self { seen, task })
    }

    pub fn all(&self) -> Vec<AgentStatus> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for StatusRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn device() -> (String, DeviceContainers) {
    let id = unique_id("t");
    let guard = DeviceContainers::new(&id);
    (id, guard)
}

pub fn dep(ns: &str, name: &str) -> DeploymentRef {
    DeploymentRef::new(ns, name).expect("valid")
}

/// A one-service score from a service's JSON.
pub fn service_score(service: serde_json::Value) -> IotScore {
    score_from(serde_json::json!({"PodmanV0": {"services": [service]}}))
}

/// A one-service score publishing `host_port` to the image's port 80.
pub fn web_score(image: &str, host_port: u16) -> IotScore {
    score_from(serde_json::json!({"PodmanV0": {"services": [
        {"name": "web", "image": image, "ports": [{"host_port": host_port, "container_port": 80}]}
    ]}}))
}

pub fn score_from(v: serde_json::Value) -> IotScore {
    serde_json::from_value(v).expect("test score")
}

/// Puts `default/web` (v1 of the test image on a free host port) for `device` and
/// waits until the device reports it Running. Returns the deployment, the port and
/// the spec's hash.
pub async fn web_v1_running(stack: &Stack, device: &str) -> anyhow::Result<(DeploymentRef, u16, SpecHash)> {
    let web = dep("default", "web");
    let port = free_port()?;
    let h1 = stack
        .put(device, &web, &web_score("localhost/iot-web:v1", port))
        .await?;
    stack.wait_phase(device, &web, Phase::Running, Some(&h1)).await?;
    Ok((web, port, h1))
}

/// Waits for HTTP 200 with `body` on 127.0.0.1:port.
pub async fn wait_http(port: u16, body: &str) -> anyhow::Result<()> {
    iot_testkit::http::wait_http("127.0.0.1", port, body, WAIT).await
}
