//! Two operator replicas on the full kube-apiserver share one Lease: one writes, the
//! other waits. Killing the leader hands over within the lease time; stopping it
//! (SIGTERM) hands over at once. Nothing is ever written twice: the desired-state
//! stream's sequence shows exactly one message per change.

use std::time::{Duration, Instant};

use iot_e2e::chart::*;
use iot_e2e::stack::*;
use iot_testkit::{KubeApiServer, PartitionProxy, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

const LEASE: &str = "iot-operator";
const NS: &str = "default";
/// Short, so the test is quick; the chart's default is 15 s and 5 s.
const LEASE_SECS: u64 = 6;
const GRACE_SECS: u64 = 2;

/// Which replica leads, once exactly one reports it (and the other is a standby).
async fn the_leader(replicas: &[&Replica]) -> anyhow::Result<String> {
    wait_until(WAIT, "exactly one leader", || async {
        let mut leaders = Vec::new();
        for r in replicas {
            match r.leader_gauge().await? {
                1.0 => leaders.push(r.identity.clone()),
                0.0 => {}
                _ => return None,
            }
        }
        (leaders.len() == 1).then(|| leaders.remove(0))
    })
    .await
    .map_err(|e| {
        // What each replica said, so a failure under load can be read afterwards.
        let tails: Vec<String> = replicas
            .iter()
            .map(|r| {
                let log = r.process.log_text();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                format!("--- {} (last 30 lines):\n{tail}", r.identity)
            })
            .collect();
        e.context(tails.join("\n"))
    })
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get(LEASE).await.ok()?.spec?.holder_identity
}

fn apply(stack: &Stack, devices: &[&str], image: &str) -> anyhow::Result<()> {
    let mut cmd = stack.applier()?;
    cmd.args(["--name", "web", "--namespace", "default", "--image", image]);
    for d in devices {
        cmd.args(["--target-device", d]);
    }
    run_ok(cmd).map(drop)
}

#[tokio::test]
async fn a_standby_takes_over_within_the_lease_time_and_nothing_is_written_twice() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start_in(dir.path(), None).await?;
    let stack = Stack::start_on(Cluster::Full(api), true).await?;
    let kube = stack.kube.clone();
    let leases: Api<Lease> = Api::namespaced(kube, NS);
    let env = [("IOT_LEADER_LEASE_DURATION", "6s"), ("IOT_LEADER_RENEW_GRACE", "2s")];
    let kubeconfig = stack.api.kubeconfig();
    let nats = &stack.nats;
    let logs = stack.dir.path().to_owned();
    let mut a = spawn_replica("replica-a", &kubeconfig, nats, NS, LEASE, &env, &logs)?;
    let mut b = spawn_replica("replica-b", &kubeconfig, nats, NS, LEASE, &env, &logs)?;
    let first = the_leader(&[&a, &b]).await?;
    assert_eq!(holder(&leases).await.as_deref(), Some(first.as_str()));
    let (leader, standby) = if first == a.identity {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    // The standby is ready (a rollout waits on it) but writes nothing.
    assert_eq!(
        iot_testkit::http::get_status("127.0.0.1", standby.http, "/readyz").await?,
        200
    );

    let devices = ["dev-le-1", "dev-le-2", "dev-le-3"];
    let before = stack.desired_last_sequence().await?;
    apply(&stack, &devices, "localhost/iot-web:v1")?;
    let dep = harmony_reconciler_contracts::DeploymentRef::new("default", "web")?;
    wait_until(WAIT, "3 desired-state keys", || async {
        (stack.keys_of(&dep).await.ok()?.len() == 3).then_some(())
    })
    .await?;
    // Give a second writer every chance to show itself: two of its 5 s resyncs.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let after_apply = stack.desired_last_sequence().await?;
    assert_eq!(after_apply - before, 3, "one write per device, by one writer");
    let leader_metrics = leader.metrics().await?;
    assert!(
        metric(&leader_metrics, "iot_operator_kv_writes_total") >= 3.0,
        "{leader_metrics}"
    );
    let standby_metrics = standby.metrics().await?;
    assert_eq!(
        metric(&standby_metrics, "iot_operator_kv_writes_total"),
        0.0,
        "{standby_metrics}"
    );
    assert_eq!(metric(&standby_metrics, "iot_operator_status_writes_total"), 0.0);

    // Kill -9: no release; the standby waits out the lease.
    let killed_at = Instant::now();
    leader.process.kill();
    let new_leader = the_leader(&[standby]).await?;
    let takeover = killed_at.elapsed();
    assert_eq!(new_leader, standby.identity);
    assert_eq!(holder(&leases).await.as_deref(), Some(standby.identity.as_str()));
    eprintln!("takeover after kill -9: {takeover:?} (lease {LEASE_SECS} s)");
    // Within the lease time, plus the standby's retry step and the metrics poll.
    assert!(
        takeover <= Duration::from_secs(LEASE_SECS + 4),
        "takeover took {takeover:?}"
    );

    // The new leader reconciles everything it now owns and finds nothing to write.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        stack.desired_last_sequence().await?,
        after_apply,
        "no rewrite after takeover"
    );
    apply(&stack, &devices, "localhost/iot-web:v2")?;
    wait_until(WAIT, "3 more writes", || async {
        (stack.desired_last_sequence().await.ok()? >= after_apply + 3).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        stack.desired_last_sequence().await?,
        after_apply + 3,
        "one write per device"
    );

    // A restarted replica comes back as a standby: the lease is taken.
    let old_identity = leader.identity.clone();
    *leader = spawn_replica(&old_identity, &kubeconfig, nats, NS, LEASE, &env, &logs)?;
    let still = the_leader(&[leader, standby]).await?;
    assert_eq!(still, standby.identity);

    // SIGTERM: the leader releases the lease, and the standby takes it well before
    // it would have expired. Stop just after the standby has read the renewed
    // lease and gone back to sleep until its expiry (renewals come `grace` before
    // expiry, so that is `grace` after a renewal): without the release and the
    // standby's watch for it, the takeover would come only at expiry.
    let renewed = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone()).map(|t| t.0);
    let seen = renewed(&leases.get(LEASE).await?);
    let last_renewal = wait_until(WAIT, "a lease renewal", || async {
        let now = renewed(&leases.get(LEASE).await.ok()?);
        (now != seen).then_some(now).flatten()
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(GRACE_SECS * 1000 + 500)).await;
    let stopped_at = Instant::now();
    standby.process.stop(Duration::from_secs(10));
    let next = the_leader(&[leader]).await?;
    let handover = stopped_at.elapsed();
    assert_eq!(next, old_identity);
    eprintln!("handover after SIGTERM: {handover:?}");
    let acquired = leases
        .get(LEASE)
        .await?
        .spec
        .and_then(|s| s.acquire_time)
        .map(|t| t.0)
        .ok_or_else(|| anyhow::anyhow!("no acquireTime"))?;
    // A second of margin below the expiry, for a loaded machine.
    let would_expire = last_renewal + k8s_openapi::jiff::SignedDuration::from_secs(LEASE_SECS as i64);
    let bound = would_expire - k8s_openapi::jiff::SignedDuration::from_secs(1);
    assert!(
        acquired < bound,
        "taken at {acquired}: not well before the released lease would have expired at {would_expire}"
    );

    // A leader that finds the lease held by someone else stops writing at once: it
    // exits (non-zero), to come back as a standby.
    let now = k8s_openapi::jiff::Timestamp::now();
    let stolen = serde_json::json!({"spec": {
        "holderIdentity": "intruder",
        "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
        "leaseDurationSeconds": 60,
    }});
    leases
        .patch(
            LEASE,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&stolen),
        )
        .await?;
    let deadline = Instant::now() + WAIT;
    while leader.process.is_running() {
        anyhow::ensure!(Instant::now() < deadline, "the deposed leader kept running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = leader.process.log_text();
    assert!(
        log.contains("no longer ours") || log.contains("another replica"),
        "{log}"
    );
    Ok(())
}

/// The admin kubeconfig, pointed at another port on 127.0.0.1 (a proxy).
fn kubeconfig_via(
    api_kubeconfig: &std::path::Path,
    api_port: u16,
    proxy_port: u16,
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(api_kubeconfig)?;
    let from = format!("https://127.0.0.1:{api_port}");
    anyhow::ensure!(text.contains(&from), "kubeconfig does not name {from}");
    let path = dir.join(format!("kubeconfig-{name}"));
    std::fs::write(&path, text.replace(&from, &format!("https://127.0.0.1:{proxy_port}")))?;
    Ok(path)
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_before_the_standby_takes_over() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start_in(dir.path(), None).await?;
    let api_port = api.port();
    let stack = Stack::start_on(Cluster::Full(api), true).await?;
    let target: std::net::SocketAddr = ([127, 0, 0, 1], api_port).into();
    let (link_a, link_b) = (
        PartitionProxy::start(target).await?,
        PartitionProxy::start(target).await?,
    );
    let admin = stack.api.kubeconfig();
    let logs = stack.dir.path().to_owned();
    let kc_a = kubeconfig_via(&admin, api_port, link_a.port(), &logs, "a")?;
    let kc_b = kubeconfig_via(&admin, api_port, link_b.port(), &logs, "b")?;
    let (duration, grace) = (format!("{LEASE_SECS}s"), format!("{GRACE_SECS}s"));
    let env = [
        ("IOT_LEADER_LEASE_DURATION", duration.as_str()),
        ("IOT_LEADER_RENEW_GRACE", grace.as_str()),
    ];
    let nats = &stack.nats;
    let mut a = spawn_replica("replica-a", &kc_a, nats, NS, LEASE, &env, &logs)?;
    the_leader(&[&a]).await?;
    let b = spawn_replica("replica-b", &kc_b, nats, NS, LEASE, &env, &logs)?;
    assert_eq!(the_leader(&[&a, &b]).await?, "replica-a");

    // The leader's link to the API server goes silent; NATS still works for it, so
    // only its own step-down keeps it from writing beside the new leader.
    link_a.partition();
    let cut_at = Instant::now();
    let mut exited_at = None;
    let mut took_over_at = None;
    while exited_at.is_none() || took_over_at.is_none() {
        anyhow::ensure!(
            cut_at.elapsed() < WAIT,
            "a: exited {exited_at:?}, b: leads {took_over_at:?}"
        );
        if exited_at.is_none() && !a.process.is_running() {
            exited_at = Some(cut_at.elapsed());
        }
        if took_over_at.is_none() && b.leader_gauge().await == Some(1.0) {
            took_over_at = Some(cut_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (exited, took_over) = (exited_at.unwrap_or_default(), took_over_at.unwrap_or_default());
    eprintln!("partitioned leader exited after {exited:?}; the standby led after {took_over:?}");
    assert!(
        exited < took_over,
        "the old leader was still running when the new one led"
    );
    let log = a.process.log_text();
    assert!(log.contains("could not confirm the leader lease"), "{log}");
    Ok(())
}
