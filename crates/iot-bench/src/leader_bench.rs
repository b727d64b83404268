//! Leader failover on the full kube-apiserver: two release operators share a Lease.
//! Each round either kills the leader (SIGKILL: the standby must wait out the
//! lease) or stops it (SIGTERM: it releases the lease), and times how long until the
//! standby reports `iot_operator_leader 1`. The baseline is the lease duration
//! itself: a kill can cost at most that (plus one retry step); a stop should cost
//! about the standby's 1 s release poll.

use std::process::Command;
use std::time::{Duration, Instant};

use iot_testkit::{KubeApiServer, LoggedProcess, NatsServer, free_port};

use crate::util::{median, ms, sibling_binary};

struct Replica {
    process: LoggedProcess,
    http: u16,
}

fn spawn(
    name: &str,
    api: &KubeApiServer,
    nats: &NatsServer,
    lease_secs: u64,
    dir: &std::path::Path,
) -> anyhow::Result<Replica> {
    let http = free_port()?;
    let mut cmd = Command::new(sibling_binary("iot-operator")?);
    nats.configure_client(&mut cmd);
    cmd.env("KUBECONFIG", api.kubeconfig())
        .env("IOT_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("IOT_LEADER_ELECT", "true")
        .env("POD_NAMESPACE", "default")
        .env("POD_NAME", name)
        .env("IOT_LEADER_LEASE_DURATION", format!("{lease_secs}s"))
        .env("IOT_LEADER_RENEW_GRACE", format!("{}s", (lease_secs / 3).max(1)))
        .env("RUST_LOG", "warn")
        .arg("run");
    let process = LoggedProcess::spawn(name, cmd, dir.join(format!("{name}.log")))?;
    Ok(Replica { process, http })
}

async fn leader_gauge(r: &Replica) -> Option<f64> {
    let text = iot_testkit::http::get_text("127.0.0.1", r.http, "/metrics")
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("iot_operator_leader "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn wait_leader(r: &Replica, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while leader_gauge(r).await != Some(1.0) {
        anyhow::ensure!(start.elapsed() < timeout, "no takeover within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A standby: ready (it has read the Lease and waits for it) and not leading.
async fn wait_standby(r: &Replica) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let ready = iot_testkit::http::get_status("127.0.0.1", r.http, "/readyz").await.ok() == Some(200);
        if ready && leader_gauge(r).await == Some(0.0) {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "replica never became a standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(rounds: usize, lease_secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start_in(dir.path(), None).await?;
    let out = Command::new(sibling_binary("iot-operator")?)
        .env("KUBECONFIG", api.kubeconfig())
        .arg("install")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nats = NatsServer::start().await?;
    let mut a = spawn("replica-a", &api, &nats, lease_secs, dir.path())?;
    wait_leader(&a, Duration::from_secs(60)).await?;
    let mut b = spawn("replica-b", &api, &nats, lease_secs, dir.path())?;
    wait_standby(&b).await?;
    let limit = Duration::from_secs(lease_secs * 3);
    let (mut killed, mut stopped) = (Vec::new(), Vec::new());
    for round in 0..rounds * 2 {
        let kill = round % 2 == 0;
        // Mid-way through a renewal period, as a crash would land anywhere.
        tokio::time::sleep(Duration::from_millis(500 + (round as u64 * 397) % 2000)).await;
        let t = Instant::now();
        if kill {
            a.process.kill();
        } else {
            a.process.stop(Duration::from_secs(10));
        }
        wait_leader(&b, limit).await?;
        let took = t.elapsed();
        if kill { &mut killed } else { &mut stopped }.push(took);
        // The old leader comes back as the standby; roles swap.
        let name = if round % 2 == 0 { "replica-c" } else { "replica-d" };
        a = spawn(&format!("{name}-{round}"), &api, &nats, lease_secs, dir.path())?;
        wait_standby(&a).await?;
        std::mem::swap(&mut a, &mut b);
    }
    let (km, kmax) = (median(&mut killed), killed.iter().max().copied().unwrap_or_default());
    let (sm, smax) = (median(&mut stopped), stopped.iter().max().copied().unwrap_or_default());
    let lease = Duration::from_secs(lease_secs);
    println!("leader failover, lease {lease_secs} s, {rounds} rounds each");
    println!(
        "  kill -9 -> standby leads: median {} (max {}), {:.2}x the lease",
        ms(km),
        ms(kmax),
        km.as_secs_f64() / lease.as_secs_f64()
    );
    println!(
        "  SIGTERM -> standby leads: median {} (max {}), {:.2}x the lease, {:.2}x the kill",
        ms(sm),
        ms(smax),
        sm.as_secs_f64() / lease.as_secs_f64(),
        sm.as_secs_f64() / km.as_secs_f64().max(f64::EPSILON)
    );
    Ok(())
}
