//! The platform on a 3-member JetStream cluster (issue 24): real nats-servers with
//! routes in mutual TLS, the auth callout configured on each, both buckets with 3
//! replicas, the operator and four real agents (podman) each with its own identity
//! and all three URLs. One cluster serves every case, one after another:
//!
//! 1. `kill -9` the leader of the desired-state stream as an apply to every device
//!    is accepted: every device ends on the new revision, `.status` says so, each
//!    surviving member serves every key's final value, and no device ever reported
//!    an older revision after a newer one, or dropped the deployment (each device's
//!    reports are recorded from the status bucket and printed).
//! 2. `kill -9` the member the auth callout is on (or, if no device is on it, the
//!    one most devices are on): the devices reconnect to the others (the time is
//!    measured and printed), keep their containers, report again; a new device
//!    enrolled while it is down connects through the callout.
//! 3. Restart two members one after the other: a new apply still reaches every
//!    device (nats-server #8519 reported writes stopping after this on 2.12/2.14).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use harmony_reconciler_contracts::keys::kv_stream_name;
use harmony_reconciler_contracts::{AgentStatus, DESIRED_STATE_BUCKET, DeploymentRef, Id, Phase, desired_state_key};
use iot_api::{Deployment, DeploymentSpec, DeviceSelector};
use iot_e2e::stack::*;
use iot_testkit::{DeviceContainers, wait_until};
use kube::api::{Patch, PatchParams};
use serde_json::Value;

const NS: &str = "default";
const NAME: &str = "web";

/// Server-side apply of the Deployment over every device labelled `fleet=cluster`.
async fn apply(stack: &Stack, mode: &str) -> anyhow::Result<i64> {
    let selector = DeviceSelector {
        match_labels: [("fleet".to_owned(), "cluster".to_owned())].into(),
        ..Default::default()
    };
    let dep = Deployment::new(
        NAME,
        DeploymentSpec::for_selector(selector, web_score("localhost/iot-web:v1", mode)),
    );
    let applied = stack
        .deployments(NS)
        .patch(NAME, &PatchParams::apply("cluster-test").force(), &Patch::Apply(&dep))
        .await?;
    applied
        .metadata
        .generation
        .ok_or_else(|| anyhow::anyhow!("no generation"))
}

/// What the device reports for the deployment: phase and revision.
async fn reported(stack: &Stack, device: &str) -> Option<(Phase, Option<u64>)> {
    let st = stack.agent_status(device).await?;
    let p = st.deployments.get(&DeploymentRef::new(NS, NAME).ok()?)?;
    Some((p.phase, p.revision))
}

async fn wait_all_running(stack: &Stack, devices: &[String], rev: u64, within: Duration) -> anyhow::Result<()> {
    for d in devices {
        wait_until(within, &format!("{d} reports revision {rev} Running"), || async {
            (reported(stack, d).await == Some((Phase::Running, Some(rev)))).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// The revision in a desired-state payload.
fn payload_revision(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(bytes).ok()?.get("revision")?.as_u64()
}

/// Every revision each device reported for the deployment, in the order the status
/// bucket stored the reports (a watch of every update, from the test's own client).
#[derive(Clone, Default)]
struct Reports(Arc<Mutex<BTreeMap<String, Vec<u64>>>>);

impl Reports {
    /// Follows the bucket from the test's own client; a watch that ends (its
    /// consumer lived on a member that was killed) is made again, and replays the
    /// latest report of every device, which the dedup below absorbs.
    fn follow(stack: &Stack) -> (Self, tokio::task::JoinHandle<()>) {
        let me = Self::default();
        let (store, sink) = (stack.status.clone(), me.clone());
        let task = tokio::spawn(async move {
            let Ok(dep) = DeploymentRef::new(NS, NAME) else { return };
            loop {
                if let Ok(mut watch) = store.watch_all().await {
                    while let Some(Ok(entry)) = watch.next().await {
                        let Ok(st) = serde_json::from_slice::<AgentStatus>(&entry.value) else {
                            continue;
                        };
                        let mut map = sink.0.lock().unwrap_or_else(PoisonError::into_inner);
                        let revs = map.entry(st.device_id.to_string()).or_default();
                        // A report without the deployment, after one with it, is
                        // recorded as revision 0: the device removed it (it read
                        // an empty desired state), which the order check catches.
                        let rev = match st.deployments.get(&dep) {
                            Some(p) => p.revision.unwrap_or(0),
                            None if revs.is_empty() => continue,
                            None => 0,
                        };
                        if revs.last() != Some(&rev) {
                            revs.push(rev);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        (me, task)
    }

    fn snapshot(&self) -> BTreeMap<String, Vec<u64>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Which member each device's agent is connected to (the members' `/connz`).
async fn servers_of(stack: &Stack, devices: &[String]) -> BTreeMap<String, usize> {
    connections_named(stack, |name| {
        devices.iter().find(|d| name == format!("iot-agent-{d}")).cloned()
    })
    .await
}

/// The member the auth callout is connected to.
async fn callout_member(stack: &Stack) -> Option<usize> {
    connections_named(stack, |name| (name == "iot-auth-callout").then(|| name.to_owned()))
        .await
        .into_values()
        .next()
}

/// Every connection whose name `pick` maps to a key, with the member it is on.
async fn connections_named(stack: &Stack, pick: impl Fn(&str) -> Option<String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (member, port) in stack.nats_monitors.iter().enumerate() {
        let Ok(text) = iot_testkit::http::get_text("127.0.0.1", *port, "/connz?limit=10000").await else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        for c in json["connections"].as_array().into_iter().flatten() {
            if let Some(key) = pick(c["name"].as_str().unwrap_or_default()) {
                out.insert(key, member);
            }
        }
    }
    out
}

async fn desired_leader(stack: &Stack) -> anyhow::Result<usize> {
    let mut stream = stack.js.get_stream(kv_stream_name(DESIRED_STATE_BUCKET)).await?;
    let info = stream.info().await?;
    let name = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .ok_or_else(|| anyhow::anyhow!("no leader: {:?}", info.cluster))?;
    iot_testkit::nats_cluster::member_index(&name).ok_or_else(|| anyhow::anyhow!("leader {name} is not a member"))
}

/// A client of member `i` alone, as the development `admin` user.
async fn member_client(stack: &Stack, i: usize) -> anyhow::Result<async_nats::Client> {
    let sec = stack.security.as_ref().ok_or_else(|| anyhow::anyhow!("not secured"))?;
    let ca = stack.ca.as_ref().ok_or_else(|| anyhow::anyhow!("no CA"))?;
    let url = if i == 0 {
        stack.nats.url()
    } else {
        stack.nats_peers[i - 1].url()
    };
    Ok(
        async_nats::ConnectOptions::with_user_and_password("admin".into(), sec.keys.admin_password.clone())
            .add_root_certificates(ca.cert_file())
            .require_tls(true)
            .connect(url)
            .await?,
    )
}

/// Restarts member `i` (same port and store) and waits until its JetStream is current.
async fn bring_back(stack: &mut Stack, i: usize) -> anyhow::Result<()> {
    stack.nats_member_mut(i).restart().await?;
    iot_testkit::nats_cluster::wait_healthy(stack.nats_monitors[i], i).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_survives_losing_cluster_members() -> anyhow::Result<()> {
    let t_all = Instant::now();
    let mut stack = Stack::start_secured_cluster(3).await?;
    eprintln!("cluster, OpenBao, callout and API server up in {:?}", t_all.elapsed());
    let (reports, watch) = Reports::follow(&stack);
    stack.start_operator()?;
    let mut devices = Vec::new();
    let mut observers: Vec<DeviceContainers> = Vec::new();
    for _ in 0..4 {
        let (d, obs) = stack.start_enrolled_agent().await?;
        stack.register_device(&d, &[("fleet", "cluster")]).await?;
        devices.push(d);
        observers.push(obs);
    }
    stack.wait_operator_ready().await?;
    eprintln!("operator ready, 4 agents started, in {:?}", t_all.elapsed());
    let metrics = stack.operator_metrics().await?;
    assert!(
        metrics.contains("iot_operator_nats_server{") && metrics.contains("cluster=\"iot\""),
        "the operator's metrics say which member it is on"
    );
    apply(&stack, "one").await?;
    wait_all_running(&stack, &devices, 1, WAIT).await?;
    eprintln!("stack up, 4 devices on revision 1, in {:?}", t_all.elapsed());

    // 1. Kill the desired-state stream's leader as the apply is accepted.
    let t = Instant::now();
    let leader = desired_leader(&stack).await?;
    let generation = apply(&stack, "two").await?;
    stack.nats_member_mut(leader).stop();
    eprintln!("killed nats-{leader} (the desired-state leader) as generation {generation} was applied");
    wait_all_running(&stack, &devices, 2, Duration::from_secs(90)).await?;
    stack
        .wait_resource_status(NS, NAME, "every device succeeded on the new generation", |s| {
            s.aggregate
                .as_ref()
                .is_some_and(|a| a.observed_generation == Some(generation) && a.succeeded == 4 && a.targets == 4)
        })
        .await?;
    let new_leader = desired_leader(&stack).await?;
    assert_ne!(new_leader, leader, "a surviving member leads the stream");
    let keys: Vec<String> = devices
        .iter()
        .map(|d| Ok(desired_state_key(&Id::new(d)?, &DeploymentRef::new(NS, NAME)?)))
        .collect::<anyhow::Result<_>>()?;
    for member in (0..3).filter(|m| *m != leader) {
        let client = member_client(&stack, member).await?;
        wait_until(WAIT, &format!("nats-{member} serves every key at revision 2"), || {
            let (client, keys) = (client.clone(), keys.clone());
            async move {
                let records = iot_nats::last_values_for(&client, DESIRED_STATE_BUCKET, ">", Duration::from_secs(5))
                    .await
                    .ok()?;
                keys.iter()
                    .all(|key| {
                        records
                            .iter()
                            .find(|r| &r.key == key)
                            .and_then(|r| r.value.as_deref())
                            .and_then(payload_revision)
                            == Some(2)
                    })
                    .then_some(())
            }
        })
        .await?;
    }
    // Reconciles whose writes NATS did not acknowledge (each retried with backoff):
    // printed, not asserted, as the kill may land after the writes were acked.
    let failed = metric(
        &stack.operator_metrics().await?,
        "iot_operator_reconciles_total{result=\"nats\"}",
    );
    eprintln!(
        "== 1. leader killed mid-apply: all 4 devices on revision 2 in {:?}; reconciles that failed on NATS and were retried: {failed}",
        t.elapsed()
    );
    bring_back(&mut stack, leader).await?;

    // 2. Kill the member most devices are on.
    let t = Instant::now();
    let before = servers_of(&stack, &devices).await;
    anyhow::ensure!(before.len() == devices.len(), "every device is on a member: {before:?}");
    let mut per_member = [0usize; 3];
    for m in before.values() {
        per_member[*m] += 1;
    }
    // The callout's member if devices are on it too (so the connects that follow
    // find the callout moved as well), else the one most devices are on.
    let callout_on = callout_member(&stack).await;
    let victim = callout_on
        .filter(|m| per_member[*m] > 0)
        .unwrap_or_else(|| (0..3).max_by_key(|m| per_member[*m]).unwrap_or(0));
    let moved: Vec<String> = before
        .iter()
        .filter(|(_, m)| **m == victim)
        .map(|(d, _)| d.clone())
        .collect();
    let containers_before: Vec<Vec<String>> = observers.iter().map(DeviceContainers::running_ids).collect();
    let reports_before: BTreeMap<String, Option<chrono::DateTime<chrono::Utc>>> = {
        let mut m = BTreeMap::new();
        for d in &moved {
            m.insert(d.clone(), stack.agent_status(d).await.map(|s| s.heartbeat_at));
        }
        m
    };
    stack.nats_member_mut(victim).stop();
    let killed_at = Instant::now();
    let mut reconnect_secs = Vec::new();
    for d in &moved {
        let on = wait_until(Duration::from_secs(30), &format!("{d} on another member"), || async {
            let now = servers_of(&stack, std::slice::from_ref(d)).await;
            now.get(d).copied().filter(|m| *m != victim)
        })
        .await?;
        reconnect_secs.push((d.clone(), on, killed_at.elapsed().as_secs_f64()));
    }
    for d in &moved {
        let was = reports_before.get(d).copied().flatten();
        wait_until(Duration::from_secs(30), &format!("{d} reports again"), || async {
            let now = stack.agent_status(d).await?.heartbeat_at;
            (Some(now) > was).then_some(())
        })
        .await?;
    }
    // A device enrolled while the member is down connects through the callout
    // (on a surviving member; its URL list still names the dead one).
    let (late, late_obs) = stack.start_enrolled_agent().await?;
    stack.register_device(&late, &[("fleet", "cluster")]).await?;
    wait_all_running(&stack, std::slice::from_ref(&late), 2, WAIT).await?;
    devices.push(late);
    observers.push(late_obs);
    let containers_after: Vec<Vec<String>> = observers[..4].iter().map(DeviceContainers::running_ids).collect();
    assert_eq!(containers_before, containers_after, "no container was replaced");
    eprintln!(
        "== 2. nats-{victim} killed with {} of 4 devices on it (the callout was on nats-{callout_on:?}): reconnected (device, new member, seconds after the kill) {reconnect_secs:?}; a new device enrolled and ran meanwhile; {:?} in all",
        moved.len(),
        t.elapsed()
    );
    bring_back(&mut stack, victim).await?;

    // 3. Two members restarted one after the other, then a new apply.
    let t = Instant::now();
    for member in [1usize, 2] {
        stack.nats_member_mut(member).stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        bring_back(&mut stack, member).await?;
    }
    let generation = apply(&stack, "three").await?;
    wait_all_running(&stack, &devices, 3, Duration::from_secs(90)).await?;
    stack
        .wait_resource_status(NS, NAME, "five devices on generation 3", |s| {
            s.aggregate
                .as_ref()
                .is_some_and(|a| a.observed_generation == Some(generation) && a.succeeded == 5 && a.targets == 5)
        })
        .await?;
    eprintln!(
        "== 3. two members restarted, then an apply reached every device in {:?}",
        t.elapsed()
    );

    // Throughout: no device reported an older revision after a newer one, and the
    // record reaches each device's last report (the watch survived the kills).
    let seen = wait_until(WAIT, "the report watch to have every device's revision 3", || async {
        let seen = reports.snapshot();
        (seen.len() == 5 && seen.values().all(|r| r.last() == Some(&3))).then_some(seen)
    })
    .await;
    watch.abort();
    let seen = seen.map_err(|e| anyhow::anyhow!("{e}: {:?}", reports.snapshot()))?;
    for (device, revs) in &seen {
        eprintln!("{device} reported revisions {revs:?}");
        assert!(revs.windows(2).all(|w| w[0] < w[1]), "{device} went back: {revs:?}");
    }
    eprintln!("all cases in {:?}", t_all.elapsed());
    Ok(())
}
