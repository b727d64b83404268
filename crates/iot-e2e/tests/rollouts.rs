//! Progressive rollouts (issue 23) on the real stack: the API server, NATS, podman,
//! the operator binary and six real agents, one of them on a link of its own (a
//! network namespace) and one with a clock an hour ahead.
//!
//! One stack serves every case, one after another, each on a Deployment of its own
//! over the same six devices (created with v1 and no rollout, so every case starts
//! from a revision 1 that is the last good one; the case then sets `spec.rollout`
//! and the new score together, which plans revision 2's batches):
//!
//! 1. a canary (batch selector `ring: canary`) crash-loops on the new image: with
//!    `onFailure: Pause` the rollout is suspended and then aborted; with
//!    `onFailure: Rollback` it rolls back by itself. No other device ever gets it.
//! 2. a good image: batches in order, `bakeTime` and `pause: {}` hold, a wrong
//!    promote value does nothing, the right one releases, Complete.
//! 3. agents stopped with SIGSTOP: never acknowledged and silent, failed after
//!    `silenceTimeout`, long before `updateTimeout`; the skewed clock changes nothing.
//! 4. a device whose link is down at its batch's start: skipped, pending, the
//!    rollout completes, and the device gets the new revision when the link returns.
//! 5. the operator SIGKILLed in the middle of batch 2 and restarted.
//!
//! Throughout, the test watches the desired-state bucket (every write, in order,
//! with the server's time) and the Deployments (every status written): dispatch
//! order and timing are judged on those server-side records. At the end it checks
//! that no key was ever written twice in a row with the same bytes.
//!
//! The cases do not stop at the first failure: each one's error is collected, and
//! the test fails at the end naming every case that failed. `IOT_ROLLOUT_CASES=2,4`
//! runs only those cases; `IOT_E2E_LOGS=1` prints the operator's and agents' logs.
//!
//! The operator resyncs every 60 s here (the stack's default is 5 s; the
//! operator's own, 5 minutes): rollouts step on their own 1 s tick, and a quick
//! resync would hide what only a resync does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Operation;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use harmony_reconciler_contracts::{DeploymentRef, Id, Phase, desired_state_key};
use iot_api::conditions::{DEGRADED, DESIRED_STATE_WRITTEN, PROGRESSING, READY, ROLLED_BACK};
use iot_api::rollout::{REASON_ABORTED, REASON_BATCH_FAILED};
use iot_api::{
    ABORT_ANNOTATION, Deployment, DeploymentRevision, DeploymentSpec, DeploymentStatus, DeviceSelector, IotScore,
    PROMOTE_ANNOTATION, PodmanService, PodmanV0Score, RestartPolicy, RolloutPhase, RolloutStatus, revision_name,
};
use iot_e2e::stack::*;
use iot_testkit::{NetNs, podman_cli, wait_until};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

const NS: &str = "default";
const V1: &str = "localhost/iot-web:v1";
const V2: &str = "localhost/iot-web:v2";
/// The operator's staleness window: a device silent this long is offline when its
/// batch starts (agents here report every second).
const STALE_AFTER: &str = "5s";
/// The operator's periodic resync of every Deployment.
const RESYNC: &str = "60s";

// ---------------------------------------------------------------------------
// The fleet

/// The six devices. Labels: every one `fleet=rollouts`; the canary `ring=canary`
/// and `hw=rpi3` (no other device has `hw=rpi3`); `early` and `skewed`
/// `ring=early`.
struct Fleet {
    canary: String,
    early: [String; 2],
    /// Its clock runs an hour ahead (libfaketime).
    skewed: String,
    late: String,
    /// Inside a network namespace whose link the test cuts.
    remote: String,
}

impl Fleet {
    fn all(&self) -> Vec<&str> {
        vec![
            &self.canary,
            &self.early[0],
            &self.early[1],
            &self.skewed,
            &self.late,
            &self.remote,
        ]
    }

    fn others(&self) -> Vec<&str> {
        self.all().into_iter().filter(|d| *d != self.canary).collect()
    }
}

fn fleet_selector() -> DeviceSelector {
    DeviceSelector {
        match_labels: [("fleet".to_owned(), "rollouts".to_owned())].into(),
        ..Default::default()
    }
}

fn score(image: &str, mode: &str, command: Option<&[&str]>) -> IotScore {
    IotScore::PodmanV0(PodmanV0Score {
        services: vec![PodmanService {
            name: "web".into(),
            image: image.into(),
            ports: vec![],
            env: [("MODE".to_owned(), mode.to_owned())].into(),
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            args: None,
            restart_policy: RestartPolicy::Always,
            resources: None,
        }],
    })
}

fn v1() -> IotScore {
    score(V1, "one", None)
}

fn v2() -> IotScore {
    score(V2, "two", None)
}

/// The image starts, and its container exits at once (code 3); podman's restart
/// policy brings it back, again and again.
fn crash_loop() -> IotScore {
    score(V2, "crash", Some(&["/bin/sh", "-c", "echo starting; exit 3"]))
}

fn canary_batch(extra: Value) -> Value {
    let mut b = json!({"limit": 1, "selector": {"matchLabels": {"ring": "canary"}}});
    if let (Some(b), Some(extra)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(extra.clone());
    }
    b
}

/// Server-side apply of the whole Deployment; returns its generation.
async fn apply(stack: &Stack, name: &str, score: IotScore, rollout: Option<Value>) -> anyhow::Result<i64> {
    let mut spec = DeploymentSpec::for_selector(fleet_selector(), score);
    spec.rollout = rollout.map(serde_json::from_value).transpose()?;
    let dep = Deployment::new(name, spec);
    let applied = stack
        .deployments(NS)
        .patch(name, &PatchParams::apply("rollouts-test").force(), &Patch::Apply(&dep))
        .await?;
    applied
        .metadata
        .generation
        .ok_or_else(|| anyhow::anyhow!("{name} has no generation"))
}

async fn annotate(stack: &Stack, name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    stack
        .deployments(NS)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Creates the Deployment with v1 and no rollout, and waits until all six devices
/// run revision 1 and it is the last good revision.
async fn prepare(stack: &Stack, name: &str) -> anyhow::Result<()> {
    apply(stack, name, v1(), None).await?;
    stack
        .wait_resource_status(NS, name, "revision 1 on all six devices, last good", |s| {
            s.current_revision == Some(1)
                && s.aggregate
                    .as_ref()
                    .is_some_and(|a| a.succeeded == 6 && a.last_good_revision == Some(1))
        })
        .await?;
    Ok(())
}

async fn remove(stack: &Stack, name: &str) {
    if let Err(e) = stack.deployments(NS).delete(name, &Default::default()).await {
        eprintln!("deleting {name}: {e}");
    }
}

// ---------------------------------------------------------------------------
// What the test records: every desired-state write and every Deployment version

#[derive(Clone, Debug)]
struct KvWrite {
    /// The stream sequence: the order the server stored writes in.
    seq: u64,
    key: String,
    device: String,
    /// `<namespace>_<name>` of the deployment.
    token: String,
    /// When the server stored it (its clock).
    at: DateTime<Utc>,
    /// When the test saw it.
    seen: Instant,
    put: bool,
    value: Bytes,
}

impl KvWrite {
    fn revision(&self) -> Option<u64> {
        if !self.put {
            return None;
        }
        serde_json::from_slice::<Value>(&self.value)
            .ok()?
            .get("revision")?
            .as_u64()
    }
}

#[derive(Clone, Debug)]
struct Snapshot {
    seen: Instant,
    name: String,
    status: Option<DeploymentStatus>,
}

impl Snapshot {
    fn rollout(&self) -> Option<&RolloutStatus> {
        self.status.as_ref()?.rollout.as_ref()
    }
}

#[derive(Clone, Default)]
struct Record {
    kv: Arc<Mutex<Vec<KvWrite>>>,
    deployments: Arc<Mutex<Vec<Snapshot>>>,
}

fn token(name: &str) -> String {
    DeploymentRef::new(NS, name).map(|d| d.to_token()).unwrap_or_default()
}

impl Record {
    /// Starts watching the desired-state bucket and the Deployments.
    async fn start(stack: &Stack) -> anyhow::Result<(Self, Vec<tokio::task::JoinHandle<()>>)> {
        let me = Self::default();
        let mut watch = stack.desired.watch_all().await?;
        let kv = me.kv.clone();
        let kv_task = tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                let e = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("desired-state watch: {e}");
                        continue;
                    }
                };
                let (device, token) = e
                    .key
                    .split_once('.')
                    .map(|(d, t)| (d.to_owned(), t.to_owned()))
                    .unwrap_or_default();
                kv.lock().unwrap_or_else(PoisonError::into_inner).push(KvWrite {
                    seq: e.revision,
                    key: e.key.clone(),
                    device,
                    token,
                    at: e.created,
                    seen: Instant::now(),
                    put: e.operation == Operation::Put,
                    value: e.value,
                });
            }
        });
        let api = stack.deployments(NS);
        let deployments = me.deployments.clone();
        let dep_task = tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(obj) = stream.next().await {
                let Ok(obj) = obj else { continue };
                deployments
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Snapshot {
                        seen: Instant::now(),
                        name: obj.metadata.name.clone().unwrap_or_default(),
                        status: obj.status.clone(),
                    });
            }
        });
        Ok((me, vec![kv_task, dep_task]))
    }

    fn writes(&self, name: &str) -> Vec<KvWrite> {
        let t = token(name);
        let mut v: Vec<KvWrite> = self
            .kv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|w| w.token == t)
            .cloned()
            .collect();
        v.sort_by_key(|w| w.seq);
        v
    }

    /// Each device's first write of revision `rev` of `name`: when it was dispatched.
    fn dispatches(&self, name: &str, rev: u64) -> BTreeMap<String, KvWrite> {
        let mut out = BTreeMap::new();
        for w in self.writes(name) {
            if w.revision() == Some(rev) {
                out.entry(w.device.clone()).or_insert(w);
            }
        }
        out
    }

    fn snapshots(&self, name: &str) -> Vec<Snapshot> {
        self.deployments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// Keys written twice in a row with the same bytes (no purge in between).
    fn identical_rewrites(&self) -> Vec<String> {
        let mut all = self.kv.lock().unwrap_or_else(PoisonError::into_inner).clone();
        all.sort_by_key(|w| w.seq);
        let mut last: BTreeMap<&str, &KvWrite> = BTreeMap::new();
        let mut found = Vec::new();
        for w in &all {
            if let Some(prev) = last.get(w.key.as_str())
                && prev.put
                && w.put
                && prev.value == w.value
            {
                found.push(format!(
                    "{} at seq {} and {} (revision {:?})",
                    w.key,
                    prev.seq,
                    w.seq,
                    w.revision()
                ));
            }
            last.insert(&w.key, w);
        }
        found
    }
}

/// For each condition type, the statuses it took in order (consecutive repeats
/// collapsed) over the snapshots that observed `generation` or later; a type
/// that comes back to a status it left has flapped. Returns the flapped ones.
fn flaps(snapshots: &[Snapshot], generation: i64, types: &[&str]) -> Vec<String> {
    let observed = snapshots
        .iter()
        .filter(|s| s.status.as_ref().and_then(|st| st.observed_generation) >= Some(generation))
        .count();
    let mut out = Vec::new();
    for t in types {
        let mut seq: Vec<String> = Vec::new();
        for s in snapshots {
            let Some(st) = &s.status else { continue };
            if st.observed_generation.is_none_or(|g| g < generation) {
                continue;
            }
            let value = cond(st, t).map_or("absent".to_owned(), |c| c.status.clone());
            if seq.last() != Some(&value) {
                seq.push(value);
            }
        }
        eprintln!("{t} over {observed} status versions: {}", seq.join(" -> "));
        let distinct: BTreeSet<&String> = seq.iter().collect();
        if distinct.len() < seq.len() {
            out.push(format!("{t}: {}", seq.join(" -> ")));
        }
    }
    out
}

fn cond<'a>(s: &'a DeploymentStatus, t: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == t)
}

// ---------------------------------------------------------------------------
// Looking at devices: KV, reports, podman

async fn kv_revision(stack: &Stack, device: &str, name: &str) -> anyhow::Result<Option<u64>> {
    let key = desired_state_key(&Id::new(device)?, &DeploymentRef::new(NS, name)?);
    Ok(stack
        .desired
        .get(key)
        .await?
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("revision")?.as_u64()))
}

/// The phase and revision the device reports for the deployment.
async fn reported(stack: &Stack, device: &str, name: &str) -> Option<(Phase, Option<u64>)> {
    let dep = DeploymentRef::new(NS, name).ok()?;
    let st = stack.agent_status(device).await?;
    let p = st.deployments.get(&dep)?;
    Some((p.phase, p.revision))
}

async fn wait_reported(stack: &Stack, device: &str, name: &str, rev: u64) -> anyhow::Result<()> {
    wait_reported_within(stack, device, name, rev, WAIT).await
}

async fn wait_reported_within(
    stack: &Stack,
    device: &str,
    name: &str,
    rev: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let what = format!("{device} reports {name} revision {rev} Running");
    let r = wait_until(within, &what, || async {
        (reported(stack, device, name).await == Some((Phase::Running, Some(rev)))).then_some(())
    })
    .await;
    if r.is_err() {
        let dep = DeploymentRef::new(NS, name)?;
        let last = stack.agent_status(device).await;
        let phase = last.as_ref().and_then(|s| s.deployments.get(&dep));
        anyhow::bail!("timed out waiting for {what}; it reports {phase:#?}");
    }
    r
}

#[derive(Debug, Clone)]
struct Ctr {
    id: String,
    image: String,
    state: String,
    revision: Option<String>,
}

/// The device's containers of the deployment, as podman lists them.
fn containers(device: &str, name: &str) -> anyhow::Result<Vec<Ctr>> {
    let out = podman_cli(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("label=iot.nationtech.io/device={device}"),
        "--format",
        "json",
    ])?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<Value> = serde_json::from_str(&out)?;
    let dep = format!("{NS}/{name}");
    Ok(list
        .iter()
        .filter(|c| c["Labels"]["iot.nationtech.io/deployment"].as_str() == Some(dep.as_str()))
        .map(|c| Ctr {
            id: c["Id"].as_str().unwrap_or_default().to_owned(),
            image: c["Image"].as_str().unwrap_or_default().to_owned(),
            state: c["State"].as_str().unwrap_or_default().to_owned(),
            revision: c["Labels"]["iot.nationtech.io/revision"].as_str().map(str::to_owned),
        })
        .collect())
}

/// Waits until the device's only container of the deployment runs `image` for
/// revision `rev`.
async fn wait_only_container(device: &str, name: &str, image: &str, rev: u64) -> anyhow::Result<Ctr> {
    let want = rev.to_string();
    let what = format!("{device}: one container of {name}, {image} for revision {rev}, running");
    let start = Instant::now();
    loop {
        let list = containers(device, name)?;
        if let [c] = list.as_slice()
            && c.state == "running"
            && c.image == image
            && c.revision.as_deref() == Some(want.as_str())
        {
            return Ok(c.clone());
        }
        if start.elapsed() > WAIT {
            anyhow::bail!("timed out waiting for {what}; podman has {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Containers of the deployment that podman created on the device since `since`:
/// (id, revision label).
fn creations(device: &str, name: &str, since: DateTime<Utc>) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let out = podman_cli(&[
        "events",
        "--stream=false",
        "--since",
        &since.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "--filter",
        "event=create",
        "--filter",
        &format!("label=iot.nationtech.io/device={device}"),
        "--format",
        "json",
    ])?;
    let dep = format!("{NS}/{name}");
    let mut found = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let e: Value = serde_json::from_str(line)?;
        let a = &e["Attributes"];
        if a["iot.nationtech.io/deployment"].as_str() == Some(dep.as_str()) {
            found.push((
                e["ID"].as_str().unwrap_or_default().to_owned(),
                a["iot.nationtech.io/revision"].as_str().map(str::to_owned),
            ));
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// Rollout status

async fn wait_rollout(
    stack: &Stack,
    name: &str,
    what: &str,
    pred: impl Fn(&RolloutStatus) -> bool,
) -> anyhow::Result<DeploymentStatus> {
    stack
        .wait_resource_status(NS, name, what, |s| s.rollout.as_ref().is_some_and(&pred))
        .await
}

fn rollout_of(s: &DeploymentStatus) -> anyhow::Result<&RolloutStatus> {
    s.rollout
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no status.rollout in {s:#?}"))
}

/// The batches of revision `rev`, as planned into its DeploymentRevision (waits
/// for the operator to record it).
async fn planned(stack: &Stack, name: &str, rev: u64) -> anyhow::Result<Vec<Vec<String>>> {
    let api: Api<DeploymentRevision> = Api::namespaced(stack.kube.clone(), NS);
    let r = wait_until(WAIT, &format!("revision {rev} of {name} recorded"), || async {
        api.get(&revision_name(name, rev)).await.ok()
    })
    .await?;
    r.spec
        .rollout_plan
        .map(|p| p.batches)
        .ok_or_else(|| anyhow::anyhow!("revision {rev} of {name} has no rollout plan"))
}

/// Every device of batch k was dispatched (per the KV log) before any device of
/// batch k+1, and no device of batch k+1 before batch k passed. Devices in `skip`
/// (offline at their batch's start) are left out.
fn check_batch_order(
    dispatches: &BTreeMap<String, KvWrite>,
    plan: &[Vec<String>],
    st: &RolloutStatus,
    skip: &[&str],
) -> anyhow::Result<()> {
    let seqs = |batch: &Vec<String>| -> Vec<(u64, DateTime<Utc>)> {
        batch
            .iter()
            .filter(|d| !skip.contains(&d.as_str()))
            .filter_map(|d| dispatches.get(d).map(|w| (w.seq, w.at)))
            .collect()
    };
    for k in 0..plan.len().saturating_sub(1) {
        let this = seqs(&plan[k]);
        let next = seqs(&plan[k + 1]);
        let (Some(last), Some(first)) = (this.iter().map(|s| s.0).max(), next.iter().map(|s| s.0).min()) else {
            continue;
        };
        anyhow::ensure!(
            last < first,
            "batch {} was dispatched (KV seq {first}) before batch {} was done dispatching (seq {last})",
            k + 2,
            k + 1
        );
        let passed = st.batches[k]
            .passed_at
            .ok_or_else(|| anyhow::anyhow!("batch {} has no passedAt: {st:#?}", k + 1))?;
        let earliest = next.iter().map(|s| s.1).min().unwrap_or(passed);
        anyhow::ensure!(
            earliest >= passed,
            "batch {} dispatched at {earliest} (server time) before batch {} passed at {passed}",
            k + 2,
            k + 1
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The test

// Several threads: the recorders' timestamps must not wait for the podman CLI calls
// the test makes (they block their thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progressive_rollouts_on_a_real_fleet() -> anyhow::Result<()> {
    let t_all = Instant::now();
    // A device on a link of its own. NATS listens on the host end of that link: the
    // device reaches it over the link, everything else on the host reaches it
    // whatever the link's state.
    let net = NetNs::create()?;
    let mut stack = Stack::start_with_nats_on(&net.host_ip).await?;
    stack.operator_env.push(("IOT_STALE_AFTER".into(), STALE_AFTER.into()));
    // Rollouts step on their own tick (1 s); the periodic resync of every
    // Deployment is the stack's 5 s otherwise, which would hide what happens only
    // at a resync (the operator's default is 5 minutes).
    stack.operator_env.push(("IOT_RESYNC_INTERVAL".into(), RESYNC.into()));
    let (record, _tasks) = Record::start(&stack).await?;
    stack.start_operator()?;

    let (canary, _) = stack.start_agent()?;
    let (e1, _) = stack.start_agent()?;
    let (e2, _) = stack.start_agent()?;
    let skewed = stack.start_agent_with_clock("skew", "+1h")?;
    let (late, _) = stack.start_agent()?;
    let (remote, _) = stack.start_agent_in(&net)?;
    let fleet = Fleet {
        canary,
        early: [e1, e2],
        skewed,
        late,
        remote,
    };
    stack
        .register_device(
            &fleet.canary,
            &[("fleet", "rollouts"), ("ring", "canary"), ("hw", "rpi3")],
        )
        .await?;
    for d in [&fleet.early[0], &fleet.early[1], &fleet.skewed] {
        stack
            .register_device(d, &[("fleet", "rollouts"), ("ring", "early"), ("hw", "rpi4")])
            .await?;
    }
    for d in [&fleet.late, &fleet.remote] {
        stack
            .register_device(d, &[("fleet", "rollouts"), ("hw", "rpi4")])
            .await?;
    }
    stack.wait_operator_ready().await?;
    eprintln!("stack up in {:?}", t_all.elapsed());

    let mut failures: Vec<String> = Vec::new();
    let mut outcome = |case: &str, t: Instant, r: anyhow::Result<()>| match &r {
        Ok(()) => eprintln!("== {case}: passed in {:?}", t.elapsed()),
        Err(e) => {
            eprintln!("== {case}: FAILED after {:?}: {e:#}", t.elapsed());
            failures.push(format!("{case}: {e:#}"));
        }
    };

    // IOT_ROLLOUT_CASES=2,4 runs only those cases (when working on one).
    let only: Option<BTreeSet<u32>> = std::env::var("IOT_ROLLOUT_CASES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let run = |n: u32| only.as_ref().is_none_or(|o| o.contains(&n));

    // 1. A crash-looping image on the canary: suspended then aborted, and rolled
    //    back by itself. Both Deployments at once, on the same devices.
    if run(1) {
        let t = Instant::now();
        let (pause, rollback) = tokio::join!(prepare(&stack, "ro-pause"), prepare(&stack, "ro-rollback"));
        match pause.and(rollback) {
            Ok(()) => {
                let (a, b) = tokio::join!(
                    canary_crash(&stack, &record, &fleet, "ro-pause", "Pause"),
                    canary_crash(&stack, &record, &fleet, "ro-rollback", "Rollback"),
                );
                outcome("1. canary crash loop, onFailure: Pause, then abort", t, a);
                outcome("1. canary crash loop, onFailure: Rollback", t, b);
            }
            Err(e) => outcome("1. canary crash loop (preparing)", t, Err(e)),
        }
        remove(&stack, "ro-pause").await;
        remove(&stack, "ro-rollback").await;
    }

    // 2. A good image through bakeTime, pause and promote.
    if run(2) {
        let t = Instant::now();
        let r = good_rollout(&stack, &record, &fleet, "ro-good").await;
        outcome("2. good image: order, bakeTime, pause, promote", t, r);
        remove(&stack, "ro-good").await;
    }

    // 3. Agents stopped with SIGSTOP.
    if run(3) {
        let t = Instant::now();
        let r = silent_devices(&stack, &record, &fleet, "ro-silent").await;
        outcome("3. SIGSTOPped agents: silent, never acknowledged; skewed clock", t, r);
        remove(&stack, "ro-silent").await;
    }

    // 4. A device offline (link down) when its batch starts.
    if run(4) {
        let t = Instant::now();
        let r = offline_device(&stack, &record, &fleet, &net, "ro-offline").await;
        outcome("4. offline device (link down)", t, r);
        remove(&stack, "ro-offline").await;
    }

    // 5. The operator SIGKILLed in the middle of batch 2.
    if run(5) {
        let t = Instant::now();
        let r = operator_killed(&mut stack, &record, &fleet, "ro-kill").await;
        outcome("5. operator SIGKILLed in batch 2", t, r);
    }

    // Over the whole test: no key written twice in a row with the same bytes.
    let puts: usize = record
        .kv
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|w| w.put)
        .count();
    let rewrites = record.identical_rewrites();
    eprintln!(
        "desired-state writes over the test: {puts} puts, {} identical rewrites",
        rewrites.len()
    );
    if !rewrites.is_empty() {
        failures.push(format!(
            "identical rewrites of desired-state keys: {}",
            rewrites.join("; ")
        ));
    }
    eprintln!("all rollout cases took {:?}", t_all.elapsed());
    anyhow::ensure!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Canary crash loop

async fn canary_crash(
    stack: &Stack,
    record: &Record,
    fleet: &Fleet,
    name: &str,
    on_failure: &str,
) -> anyhow::Result<()> {
    let rev1 = record.dispatches(name, 1);
    let generation = apply(
        stack,
        name,
        crash_loop(),
        Some(json!({
            "batches": [canary_batch(json!({})), {"limit": "50%"}],
            "onFailure": on_failure,
        })),
    )
    .await?;
    let plan = planned(stack, name, 2).await?;
    anyhow::ensure!(
        plan.len() == 3 && plan[0] == [fleet.canary.clone()] && plan[1].len() == 2 && plan[2].len() == 3,
        "plan of revision 2: {plan:?}"
    );

    if on_failure == "Pause" {
        let st = wait_rollout(stack, name, "the rollout suspended", |r| {
            r.revision == 2 && r.phase == RolloutPhase::Suspended
        })
        .await?;
        let r = rollout_of(&st)?;
        anyhow::ensure!(r.reason.as_deref() == Some(REASON_BATCH_FAILED), "{r:#?}");
        anyhow::ensure!(r.stable_revision == Some(1) && r.current_batch == 1, "{r:#?}");
        anyhow::ensure!(
            r.batches[0].dispatched == 1 && r.batches[0].failed == 1,
            "{:?}",
            r.batches
        );
        anyhow::ensure!(r.batches[1..].iter().all(|b| b.dispatched == 0), "{:?}", r.batches);
        // The conditions follow (the status writer writes them separately).
        let st = stack
            .wait_resource_status(NS, name, "Progressing=False (suspended)", |s| {
                cond(s, PROGRESSING).is_some_and(|c| c.status == "False" && c.reason == "RolloutSuspended")
            })
            .await?;
        anyhow::ensure!(
            cond(&st, ROLLED_BACK).is_some_and(|c| c.status == "False"),
            "{:?}",
            st.conditions
        );
        anyhow::ensure!(
            cond(&st, DEGRADED).is_some_and(|c| c.status == "True"),
            "{:?}",
            st.conditions
        );
        // Suspended: the canary keeps what it was given, the others what they run.
        anyhow::ensure!(kv_revision(stack, &fleet.canary, name).await? == Some(2));
        outside_the_canary_untouched(stack, record, fleet, name).await?;
        // A person aborts: the canary gets revision 1 back.
        annotate(stack, name, ABORT_ANNOTATION, "2").await?;
    }

    let st = wait_rollout(stack, name, "the rollout rolled back", |r| {
        r.revision == 2 && r.phase == RolloutPhase::RolledBack
    })
    .await?;
    let r = rollout_of(&st)?.clone();
    let reason = if on_failure == "Pause" {
        REASON_ABORTED
    } else {
        REASON_BATCH_FAILED
    };
    anyhow::ensure!(r.reason.as_deref() == Some(reason), "{r:#?}");
    anyhow::ensure!(r.summary == "rolled back to rev 1", "{r:#?}");
    // The failure, clustered, with the label only the canary has.
    let [cluster] = r.failure_clusters.as_slice() else {
        anyhow::bail!("one failure cluster expected: {:#?}", r.failure_clusters);
    };
    anyhow::ensure!(
        cluster.devices == 1 && cluster.example_devices == [fleet.canary.clone()],
        "{cluster:#?}"
    );
    anyhow::ensure!(
        cluster.shared_labels.get("hw").map(String::as_str) == Some("rpi3"),
        "the cluster does not name hw=rpi3: {cluster:#?}"
    );
    anyhow::ensure!(
        !cluster.shared_labels.contains_key("fleet"),
        "a label every device has is not a clue: {cluster:#?}"
    );
    anyhow::ensure!(
        cluster.message.contains("exit"),
        "the cluster does not name the error: {cluster:#?}"
    );
    // RolledBack names the error; Degraded says the spec still names revision 2.
    let st = stack
        .wait_resource_status(NS, name, "RolledBack=True", |s| {
            cond(s, ROLLED_BACK).is_some_and(|c| c.status == "True")
        })
        .await?;
    let rolled_back = cond(&st, ROLLED_BACK).map(|c| c.message.clone()).unwrap_or_default();
    anyhow::ensure!(
        rolled_back.contains(&cluster.message) && rolled_back.contains("hw=rpi3"),
        "RolledBack does not name the error and the label: {rolled_back}"
    );
    anyhow::ensure!(
        cond(&st, DEGRADED).is_some_and(|c| c.status == "True" && c.reason == "RolledBack"),
        "{:?}",
        st.conditions
    );

    // The canary runs the old version again: KV, its report, podman.
    wait_until(WAIT, "the canary's key back on revision 1", || async {
        (kv_revision(stack, &fleet.canary, name).await.ok()? == Some(1)).then_some(())
    })
    .await?;
    let canary_writes: Vec<Option<u64>> = record
        .writes(name)
        .iter()
        .filter(|w| w.device == fleet.canary)
        .map(KvWrite::revision)
        .collect();
    anyhow::ensure!(
        canary_writes == [Some(1), Some(2), Some(1)],
        "the canary's key: {canary_writes:?}"
    );
    let back = record
        .writes(name)
        .into_iter()
        .rfind(|w| w.device == fleet.canary)
        .map(|w| w.value);
    anyhow::ensure!(
        back.as_ref() == rev1.get(&fleet.canary).map(|w| &w.value),
        "the rollback did not write revision 1's payload back"
    );
    wait_only_container(&fleet.canary, name, V1, 1).await?;

    // And nothing else was touched.
    outside_the_canary_untouched(stack, record, fleet, name).await?;
    let flapped = flaps(&record.snapshots(name), generation, &[ROLLED_BACK]);
    anyhow::ensure!(flapped.is_empty(), "flapping conditions: {flapped:?}");

    // The canary says it runs revision 1, healthy: its v1 container never stopped,
    // and the restarts of the new one it removed are not this one's.
    wait_reported_within(stack, &fleet.canary, name, 1, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("after the rollback: {e}"))?;
    Ok(())
}

/// Devices outside the canary were never given revision 2 (the whole KV log), hold
/// revision 1 now, and run only the v1 container of revision 1.
async fn outside_the_canary_untouched(stack: &Stack, record: &Record, fleet: &Fleet, name: &str) -> anyhow::Result<()> {
    for d in fleet.others() {
        let writes: Vec<Option<u64>> = record
            .writes(name)
            .iter()
            .filter(|w| w.device == d)
            .map(KvWrite::revision)
            .collect();
        anyhow::ensure!(
            writes == [Some(1)],
            "{d} outside the canary: its key was written {writes:?}"
        );
        anyhow::ensure!(kv_revision(stack, d, name).await? == Some(1), "{d}");
        let list = containers(d, name)?;
        anyhow::ensure!(
            list.len() == 1
                && list
                    .iter()
                    .all(|c| c.image == V1 && c.revision.as_deref() == Some("1") && c.state == "running"),
            "{d} outside the canary runs {list:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. A good image

async fn good_rollout(stack: &Stack, record: &Record, fleet: &Fleet, name: &str) -> anyhow::Result<()> {
    prepare(stack, name).await?;
    const BAKE: i64 = 5;
    apply(
        stack,
        name,
        v2(),
        Some(json!({
            "batches": [
                canary_batch(json!({"bakeTime": format!("{BAKE}s")})),
                {"limit": "50%", "pause": {}},
            ],
        })),
    )
    .await?;
    let st = wait_rollout(stack, name, "batch 2 passed, waiting for promotion", |r| {
        r.revision == 2 && r.phase == RolloutPhase::Paused && r.current_batch == 2 && r.batches[1].passed_at.is_some()
    })
    .await?;
    let r = rollout_of(&st)?.clone();
    anyhow::ensure!(r.message.contains("promote"), "{r:#?}");
    let plan = planned(stack, name, 2).await?;
    anyhow::ensure!(
        plan.len() == 3 && plan[0] == [fleet.canary.clone()] && plan[1].len() == 2 && plan[2].len() == 3,
        "{plan:?}"
    );
    // bakeTime held: batch 2 started no sooner than 5 s after batch 1 passed, both
    // by the operator's status and by when the server stored batch 2's writes.
    let passed1 = r.batches[0].passed_at.ok_or_else(|| anyhow::anyhow!("{r:#?}"))?;
    let started2 = r.batches[1].started_at.ok_or_else(|| anyhow::anyhow!("{r:#?}"))?;
    let bake = chrono::Duration::seconds(BAKE);
    anyhow::ensure!(
        started2 - passed1 >= bake,
        "batch 2 started {:?} after batch 1 passed (bake {BAKE}s)",
        started2 - passed1
    );
    let d = record.dispatches(name, 2);
    for dev in &plan[1] {
        let w = d
            .get(dev)
            .ok_or_else(|| anyhow::anyhow!("{dev} of batch 2 not dispatched"))?;
        anyhow::ensure!(
            w.at - passed1 >= bake,
            "{dev} of batch 2 dispatched {:?} after batch 1 passed (bake {BAKE}s)",
            w.at - passed1
        );
    }
    // pause: {} holds, and a promote for another batch does not release it.
    annotate(stack, name, PROMOTE_ANNOTATION, &format!("{}/9", r.revision)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = stack
        .status_of(NS, name)
        .await
        .and_then(|s| s.rollout)
        .ok_or_else(|| anyhow::anyhow!("no rollout"))?;
    anyhow::ensure!(
        now.phase == RolloutPhase::Paused && now.current_batch == 2,
        "a wrong promote value released the pause: {now:#?}"
    );
    let d = record.dispatches(name, 2);
    for dev in &plan[2] {
        anyhow::ensure!(!d.contains_key(dev), "{dev} of batch 3 dispatched while paused");
        anyhow::ensure!(kv_revision(stack, dev, name).await? == Some(1), "{dev}");
    }
    // The right value releases it.
    let promoted = Instant::now();
    annotate(
        stack,
        name,
        PROMOTE_ANNOTATION,
        &iot_api::rollout::promote_value(r.revision, 2),
    )
    .await?;
    let st = wait_rollout(stack, name, "the rollout complete", |r| {
        r.revision == 2 && r.phase == RolloutPhase::Complete
    })
    .await?;
    let r = rollout_of(&st)?.clone();
    anyhow::ensure!(r.summary == "complete, 6/6", "{r:#?}");
    anyhow::ensure!(
        r.batches.iter().map(|b| b.succeeded).collect::<Vec<_>>() == [1, 2, 3],
        "{:?}",
        r.batches
    );
    let d = record.dispatches(name, 2);
    check_batch_order(&d, &plan, &r, &[])?;
    for dev in &plan[2] {
        let w = d
            .get(dev)
            .ok_or_else(|| anyhow::anyhow!("{dev} of batch 3 never dispatched"))?;
        anyhow::ensure!(w.seen >= promoted, "{dev} of batch 3 dispatched before the promote");
    }
    // Every device runs revision 2: KV, its report, podman.
    for dev in fleet.all() {
        anyhow::ensure!(kv_revision(stack, dev, name).await? == Some(2), "{dev}");
        wait_reported(stack, dev, name, 2).await?;
        wait_only_container(dev, name, V2, 2).await?;
    }
    wait_settled(stack, name).await?;
    Ok(())
}

/// Waits for the conditions of a completed rollout: Ready, no longer Progressing.
async fn wait_settled(stack: &Stack, name: &str) -> anyhow::Result<()> {
    stack
        .wait_resource_status(NS, name, "Ready=True, Progressing=False (RolloutComplete)", |s| {
            cond(s, READY).is_some_and(|c| c.status == "True")
                && cond(s, PROGRESSING).is_some_and(|c| c.status == "False" && c.reason == "RolloutComplete")
        })
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Silent devices

/// SIGSTOP (or SIGCONT) a device's agent.
fn signal_agent(stack: &Stack, device: &str, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
    let pid = stack
        .agent_pid(device)
        .ok_or_else(|| anyhow::anyhow!("no agent process for {device}"))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)?;
    Ok(())
}

/// An agent stopped with SIGSTOP, continued when dropped (whatever happened).
struct Stopped<'a> {
    stack: &'a Stack,
    device: String,
}

impl<'a> Stopped<'a> {
    fn stop(stack: &'a Stack, device: &str) -> anyhow::Result<Self> {
        signal_agent(stack, device, nix::sys::signal::Signal::SIGSTOP)?;
        Ok(Self {
            stack,
            device: device.to_owned(),
        })
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if let Err(e) = signal_agent(self.stack, &self.device, nix::sys::signal::Signal::SIGCONT) {
            eprintln!("SIGCONT {}: {e}", self.device);
        }
    }
}

async fn silent_devices(stack: &Stack, record: &Record, fleet: &Fleet, name: &str) -> anyhow::Result<()> {
    prepare(stack, name).await?;
    const SILENCE: u64 = 6;
    apply(
        stack,
        name,
        v2(),
        Some(json!({
            "batches": [
                canary_batch(json!({"pause": {}})),
                // The ring=early devices: two that will be stopped, and the skewed one.
                {"limit": 4, "selector": {"matchLabels": {"ring": "early"}}, "bakeTime": "60s"},
            ],
            "silenceTimeout": format!("{SILENCE}s"),
            "updateTimeout": "10m",
        })),
    )
    .await?;
    let st = wait_rollout(stack, name, "the canary passed, waiting for promotion", |r| {
        r.revision == 2 && r.phase == RolloutPhase::Paused && r.current_batch == 1
    })
    .await?;
    let rev = rollout_of(&st)?.revision;
    let plan = planned(stack, name, rev).await?;
    let early: BTreeSet<&str> = [fleet.early[0].as_str(), fleet.early[1].as_str(), fleet.skewed.as_str()].into();
    anyhow::ensure!(
        plan.len() == 3 && plan[1].iter().map(String::as_str).collect::<BTreeSet<_>>() == early,
        "{plan:?}"
    );
    let (quiet, bricked) = (&fleet.early[0], &fleet.early[1]);
    // `quiet` stops a moment before its batch is dispatched: still online (it
    // reported within the last second; offline takes 5 s), it is given the new
    // revision and can never acknowledge it. Stopping it just before the promote
    // rather than just after the dispatch is what makes that certain.
    let quiet_stop = Stopped::stop(stack, quiet)?;
    annotate(stack, name, PROMOTE_ANNOTATION, &format!("{rev}/1")).await?;
    // `bricked` acknowledges and runs the new revision, then stops: the board that
    // bricked on it.
    wait_reported(stack, bricked, name, rev).await?;
    let bricked_stop = Stopped::stop(stack, bricked)?;
    let st = wait_rollout(stack, name, "one never acknowledged, one silent, suspended", |r| {
        r.revision == rev
            && r.phase == RolloutPhase::Suspended
            && r.batches[1].never_acknowledged == 1
            && r.batches[1].silent == 1
    })
    .await?;
    let r = rollout_of(&st)?.clone();
    let b = &r.batches[1];
    anyhow::ensure!(
        b.dispatched == 3 && b.succeeded == 1 && b.timed_out == 0 && b.failed == 0,
        "batch 2: {b:?}"
    );
    anyhow::ensure!(r.reason.as_deref() == Some(REASON_BATCH_FAILED), "{r:#?}");
    // The gate failed on the device that never acknowledged: the clusters say why
    // (they are taken when the gate fails; the silent one came later and shows in
    // the counts above).
    let [cluster] = r.failure_clusters.as_slice() else {
        anyhow::bail!("one failure cluster expected: {:#?}", r.failure_clusters);
    };
    anyhow::ensure!(
        cluster.message.contains("never acknowledged")
            && cluster.message.contains("silenceTimeout")
            && cluster.example_devices == [quiet.clone()],
        "{cluster:#?}"
    );
    // Failed after silenceTimeout, not updateTimeout (10 minutes): from the moment
    // the test saw `quiet`'s dispatch in KV to the first status that said Suspended.
    let d = record.dispatches(name, rev);
    let dispatched = d
        .get(quiet)
        .ok_or_else(|| anyhow::anyhow!("{quiet} never dispatched"))?;
    let suspended = record
        .snapshots(name)
        .into_iter()
        .find(|s| {
            s.rollout()
                .is_some_and(|r| r.revision == rev && r.phase == RolloutPhase::Suspended)
        })
        .ok_or_else(|| anyhow::anyhow!("no Suspended status recorded"))?;
    let took = suspended.seen.saturating_duration_since(dispatched.seen);
    eprintln!("the silent device failed the gate {took:?} after its dispatch (silenceTimeout {SILENCE}s)");
    anyhow::ensure!(
        took >= Duration::from_secs(SILENCE - 1) && took < Duration::from_secs(60),
        "failed {took:?} after dispatch; silenceTimeout is {SILENCE}s"
    );
    // The skewed device took part like any other and succeeded.
    wait_reported(stack, &fleet.skewed, name, rev).await?;
    wait_only_container(&fleet.skewed, name, V2, rev).await?;
    // Suspended: the last batch never got it.
    for dev in &plan[2] {
        anyhow::ensure!(!d.contains_key(dev), "{dev} of batch 3 dispatched");
        anyhow::ensure!(kv_revision(stack, dev, name).await? == Some(1), "{dev}");
    }
    // Continued, both agents catch up with what their keys hold.
    drop(quiet_stop);
    drop(bricked_stop);
    wait_reported(stack, quiet, name, rev).await?;
    wait_reported(stack, bricked, name, rev).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Offline device

/// The link cut, restored when dropped (whatever happened).
struct LinkDown<'a>(&'a NetNs);

impl Drop for LinkDown<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.link_up() {
            eprintln!("link up: {e}");
        }
    }
}

async fn offline_device(stack: &Stack, record: &Record, fleet: &Fleet, net: &NetNs, name: &str) -> anyhow::Result<()> {
    prepare(stack, name).await?;
    let remote = &fleet.remote;
    net.link_down()?;
    let link = LinkDown(net);
    wait_until(WAIT, "the remote device seen offline", || async {
        let d = stack.devices().get(remote).await.ok()?;
        d.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Online" && c.status == "False")
            .then_some(())
    })
    .await?;
    apply(
        stack,
        name,
        v2(),
        Some(json!({"batches": [canary_batch(json!({})), {"limit": "50%"}]})),
    )
    .await?;
    let st = wait_rollout(stack, name, "the rollout complete without the remote device", |r| {
        r.revision == 2 && r.phase == RolloutPhase::Complete
    })
    .await?;
    let r = rollout_of(&st)?.clone();
    let plan = planned(stack, name, 2).await?;
    let b = plan
        .iter()
        .position(|b| b.contains(remote))
        .ok_or_else(|| anyhow::anyhow!("{remote} in no batch: {plan:?}"))?;
    anyhow::ensure!(b > 0, "the remote device is not the canary: {plan:?}");
    // Reported pending while its batch ran.
    let pending_seen = record.snapshots(name).iter().any(|s| {
        s.rollout()
            .is_some_and(|r| r.revision == 2 && r.batches.get(b).is_some_and(|x| x.pending_offline == 1))
    });
    anyhow::ensure!(
        pending_seen,
        "status.rollout never showed the remote device pending in batch {}",
        b + 1
    );
    anyhow::ensure!(r.summary == "complete, 5/6", "{r:#?}");
    check_batch_order(&record.dispatches(name, 2), &plan, &r, &[remote.as_str()])?;
    for dev in fleet.all().into_iter().filter(|d| *d != remote) {
        wait_reported(stack, dev, name, 2).await?;
    }
    // The link returns: the device gets the new revision (the agent notices the
    // dead connection within a few seconds and reconnects).
    drop(link);
    let up = Instant::now();
    let back = wait_until(Duration::from_secs(30), "the remote device on revision 2", || async {
        (reported(stack, remote, name).await == Some((Phase::Running, Some(2)))).then_some(())
    })
    .await;
    if back.is_err() {
        let key = record
            .dispatches(name, 2)
            .get(remote)
            .map(|w| (w.at, w.seen.duration_since(up)));
        anyhow::bail!(
            "the device skipped while offline does not run revision 2 {:?} after its link returned (the \
             rollout completed at {:?}); its key got revision 2: {key:?} (server time, and relative to the \
             link's return); it reports {:?}",
            up.elapsed(),
            r.finished_at,
            reported(stack, remote, name).await
        );
    }
    eprintln!(
        "the remote device ran revision 2 {:?} after its link returned",
        up.elapsed()
    );
    // Skipped: not given the new revision before the rollout was complete.
    let finished = r.finished_at.ok_or_else(|| anyhow::anyhow!("{r:#?}"))?;
    let d = record.dispatches(name, 2);
    let w = d
        .get(remote)
        .ok_or_else(|| anyhow::anyhow!("the remote device's key never got revision 2"))?;
    anyhow::ensure!(
        w.at >= finished,
        "the offline device was dispatched at {} before the rollout completed at {finished}",
        w.at
    );
    wait_only_container(remote, name, V2, 2).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Operator killed mid-rollout

async fn operator_killed(stack: &mut Stack, record: &Record, fleet: &Fleet, name: &str) -> anyhow::Result<()> {
    prepare(stack, name).await?;
    let since = Utc::now() - chrono::Duration::seconds(2);
    let generation = apply(
        stack,
        name,
        v2(),
        Some(json!({
            "batches": [canary_batch(json!({})), {"limit": "50%"}],
            // One device updating at a time: batch 2 takes a while.
            "maxUnavailable": 1,
        })),
    )
    .await?;
    let plan = planned(stack, name, 2).await?;
    anyhow::ensure!(plan.len() == 3 && plan[1].len() == 2, "{plan:?}");
    // The first device of batch 2 is dispatched: kill the operator (SIGKILL).
    let first = wait_until(WAIT, "a device of batch 2 dispatched", || async {
        let d = record.dispatches(name, 2);
        plan[1].iter().find(|dev| d.contains_key(*dev)).cloned()
    })
    .await?;
    stack.stop_operator();
    let killed = Instant::now();
    // The status was written before the KV write: it says batch 2.
    let st = stack
        .status_of(NS, name)
        .await
        .ok_or_else(|| anyhow::anyhow!("no status"))?;
    let before = rollout_of(&st)?.clone();
    anyhow::ensure!(
        before.current_batch == 2 && before.phase == RolloutPhase::Progressing,
        "{before:#?}"
    );
    let second = plan[1].iter().find(|d| **d != first).cloned().unwrap_or_default();
    anyhow::ensure!(
        !record.dispatches(name, 2).contains_key(&second),
        "both batch-2 devices dispatched at once under maxUnavailable 1"
    );
    // While the operator is away, the first batch-2 device finishes its update.
    wait_reported(stack, &first, name, 2).await?;
    stack.start_operator()?;
    stack.wait_operator_ready().await?;
    let st = wait_rollout(stack, name, "the rollout complete after the restart", |r| {
        r.revision == 2 && r.phase == RolloutPhase::Complete
    })
    .await?;
    let r = rollout_of(&st)?.clone();
    // Batch 2 completed.
    anyhow::ensure!(
        r.batches[1].selected == 2 && r.batches[1].succeeded == 2 && r.batches[1].passed_at.is_some(),
        "{:?}",
        r.batches
    );
    // The same rollout, continued: it never started over.
    let starts: BTreeSet<DateTime<Utc>> = record
        .snapshots(name)
        .iter()
        .filter_map(|s| s.rollout().filter(|r| r.revision == 2).map(|r| r.started_at))
        .collect();
    anyhow::ensure!(starts.len() == 1, "the rollout started over: {starts:?}");
    // The second batch-2 device was dispatched by the restarted operator.
    let d = record.dispatches(name, 2);
    let second_at = d
        .get(&second)
        .ok_or_else(|| anyhow::anyhow!("{second} never dispatched"))?;
    anyhow::ensure!(second_at.seen > killed, "{second} was dispatched before the kill");
    // No device dispatched out of batch order.
    check_batch_order(&d, &plan, &r, &[])?;
    // No device given the revision twice, and exactly one new container each.
    let writes = record.writes(name);
    let mut per_key: BTreeMap<&str, Vec<Option<u64>>> = BTreeMap::new();
    for w in &writes {
        per_key.entry(&w.key).or_default().push(w.revision());
    }
    for (key, revs) in &per_key {
        eprintln!("{key}: {} write(s) {revs:?}", revs.len());
        anyhow::ensure!(revs == &[Some(1), Some(2)], "{key} was written {revs:?}");
    }
    anyhow::ensure!(per_key.len() == 6, "{per_key:?}");
    for dev in fleet.all() {
        let running = wait_only_container(dev, name, V2, 2).await?;
        let created: Vec<String> = creations(dev, name, since)?
            .into_iter()
            .filter(|(_, rev)| rev.as_deref() == Some("2"))
            .map(|(id, _)| id)
            .collect();
        anyhow::ensure!(
            created == [running.id.clone()],
            "{dev}: {} container(s) created for revision 2: {created:?}; running: {}",
            created.len(),
            running.id
        );
    }
    // No condition flapped from the change on, to the end (Ready, and Progressing
    // False as the rollout is complete).
    wait_settled(stack, name).await?;
    let flapped = flaps(
        &record.snapshots(name),
        generation,
        &[DESIRED_STATE_WRITTEN, READY, PROGRESSING, DEGRADED, ROLLED_BACK],
    );
    anyhow::ensure!(flapped.is_empty(), "flapping conditions: {flapped:?}");
    Ok(())
}
