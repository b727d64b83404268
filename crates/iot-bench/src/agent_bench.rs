//! Agent footprint and reconcile overhead, with the real agent binary, real
//! nats-server and real podman.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::keys::kv_subject;
use harmony_reconciler_contracts::*;
use iot_agent::podman::{CreateSpec, PodmanClient};
use iot_nats::{Anonymous, connect};
use iot_testkit::podman::podman_cli;
use iot_testkit::{DeviceContainers, NatsServer, PodmanService, unique_id};

use crate::util::{median, ms, rss_kib, sibling_binary};

const IMAGE: &str = "localhost/iot-web:v1";

struct Env {
    _nats: NatsServer,
    podman: PodmanService,
    client: async_nats::Client,
    desired: jetstream::kv::Store,
    device: String,
    guard: DeviceContainers,
    agent: Child,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.agent.kill().ok();
        self.agent.wait().ok();
        self.guard.remove_all();
    }
}

async fn env() -> anyhow::Result<Env> {
    let nats = NatsServer::start().await?;
    let podman = PodmanService::start().await?;
    let conn = connect(&[nats.url()], &Anonymous, "bench", nats.ca_file()).await?;
    let js = jetstream::new(conn.client.clone());
    let (desired, _) = iot_nats::buckets::ensure_buckets(&js).await?;
    let device = unique_id("bench").replace('-', "_");
    let guard = DeviceContainers::new(&device);
    let mut agent = Command::new(sibling_binary("iot-agent")?);
    nats.configure_client(&mut agent);
    let agent = agent
        .env("IOT_DEVICE_ID", &device)
        .env("PODMAN_SOCKET", podman.socket())
        .env("IOT_STOP_TIMEOUT", "0s")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Env {
        _nats: nats,
        podman,
        client: conn.client,
        desired,
        device,
        guard,
        agent,
    })
}

fn score(name: &str) -> IotScore {
    serde_json::from_value(serde_json::json!({"PodmanV0": {"services": [{"name": name, "image": IMAGE}]}}))
        .unwrap_or_else(|e| panic!("bench score: {e}"))
}

impl Env {
    async fn put(&self, dep: &DeploymentRef, score: &IotScore) -> anyhow::Result<()> {
        let key = desired_state_key(&Id::new(&self.device)?, dep);
        self.desired
            .put(
                key,
                Bytes::from(DesiredState::new(dep.clone(), score.clone()).to_bytes()),
            )
            .await?;
        Ok(())
    }

    /// Waits on the status subject (core subscription, no polling) until `pred`.
    async fn wait_status(
        &self,
        sub: &mut async_nats::Subscriber,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, sub.next())
                .await
                .map_err(|_| anyhow::anyhow!("status did not arrive in time"))?
                .ok_or_else(|| anyhow::anyhow!("status subscription closed"))?;
            if let Ok(s) = serde_json::from_slice::<AgentStatus>(&msg.payload)
                && pred(&s)
            {
                return Ok(());
            }
        }
    }

    async fn status_sub(&self) -> anyhow::Result<async_nats::Subscriber> {
        let subject = kv_subject(AGENT_STATUS_BUCKET, &agent_status_key(&Id::new(&self.device)?));
        Ok(self.client.subscribe(subject).await?)
    }
}

/// RSS of an idle agent running 10 deployments, and the stripped binary size.
pub async fn footprint() -> anyhow::Result<()> {
    let env = env().await?;
    let mut sub = env.status_sub().await?;
    let deps: Vec<DeploymentRef> = (0..10)
        .map(|i| DeploymentRef::new("default", format!("d{i}")))
        .collect::<Result<_, _>>()?;
    for d in &deps {
        env.put(d, &score("svc")).await?;
    }
    env.wait_status(&mut sub, |s| {
        deps.iter()
            .all(|d| s.deployments.get(d).is_some_and(|p| p.phase == Phase::Running))
    })
    .await?;
    println!("10 deployments running; idling 20 s (two heartbeats and resyncs)...");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let rss = rss_kib(env.agent.id())?;
    let bin = sibling_binary("iot-agent")?;
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "| agent RSS, idle, 10 deployments running | {:.1} MiB |",
        rss as f64 / 1024.0
    );
    println!(
        "| agent release binary (stripped) | {:.1} MiB |",
        size as f64 / 1024.0 / 1024.0
    );
    Ok(())
}

/// Median time from KV put to `Running` in status, against raw podman
/// create+start of the same image (libpod API, and the podman CLI).
pub async fn overhead(runs: usize) -> anyhow::Result<()> {
    let env = env().await?;
    let mut sub = env.status_sub().await?;
    let api = PodmanClient::new(env.podman.socket());
    let labels = std::collections::BTreeMap::from([("iot.nationtech.io/device".to_owned(), env.device.clone())]);
    // Warm-up: one of each, not measured.
    let warm = DeploymentRef::new("default", "warm")?;
    env.put(&warm, &score("svc")).await?;
    env.wait_status(&mut sub, |s| {
        s.deployments.get(&warm).is_some_and(|p| p.phase == Phase::Running)
    })
    .await?;
    env.desired
        .delete(desired_state_key(&Id::new(&env.device)?, &warm))
        .await?;
    env.wait_status(&mut sub, |s| !s.deployments.contains_key(&warm))
        .await?;

    let (mut ours, mut raw_api, mut raw_cli) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        // Raw libpod API create + start.
        let name = format!("{}-raw{i}", env.device);
        let spec = CreateSpec {
            name: name.clone(),
            image: IMAGE.into(),
            labels: labels.clone(),
            restart_policy: "always".into(),
            ..Default::default()
        };
        let t = Instant::now();
        let id = api.create(&spec).await?;
        api.start(&id).await?;
        raw_api.push(t.elapsed());
        api.remove(&id, Duration::ZERO).await?;

        // Raw podman CLI create + start.
        let name = format!("{}-cli{i}", env.device);
        let label = format!("iot.nationtech.io/device={}", env.device);
        let t = Instant::now();
        let id = podman_cli(&["create", "--name", &name, "--label", &label, IMAGE])?;
        podman_cli(&["start", id.trim()])?;
        raw_cli.push(t.elapsed());
        podman_cli(&["rm", "-f", "-t", "0", id.trim()])?;

        // Our path: KV put -> agent -> podman -> status Running.
        let dep = DeploymentRef::new("default", format!("run{i}"))?;
        let sc = score("svc");
        let hash = sc.spec_hash();
        let t = Instant::now();
        env.put(&dep, &sc).await?;
        env.wait_status(&mut sub, |s| {
            s.deployments
                .get(&dep)
                .is_some_and(|p| p.phase == Phase::Running && p.spec_hash.as_ref() == Some(&hash))
        })
        .await?;
        ours.push(t.elapsed());
        env.desired
            .delete(desired_state_key(&Id::new(&env.device)?, &dep))
            .await?;
        env.wait_status(&mut sub, |s| !s.deployments.contains_key(&dep)).await?;
    }
    let (o, a, c) = (median(&mut ours), median(&mut raw_api), median(&mut raw_cli));
    println!("| KV put -> Running in status (ours) | {} | |", ms(o));
    println!(
        "| raw libpod API create+start | {} | ours/raw = {:.2}x |",
        ms(a),
        o.as_secs_f64() / a.as_secs_f64()
    );
    println!(
        "| raw podman CLI create+start | {} | ours/raw = {:.2}x |",
        ms(c),
        o.as_secs_f64() / c.as_secs_f64()
    );
    Ok(())
}
