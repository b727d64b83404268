//! `iot-operator run`: wires NATS, the two bucket indexes, the controller, the
//! status writer, the aggregator, the orphan collector and the HTTP endpoints; and
//! supervises them.
//!
//! Order matters for an operator restart to change nothing: the controller, the
//! aggregator and the status writer start only after the desired-state index and
//! the device index have caught up with their buckets. Before that, a reconcile
//! would see no keys and an aggregate would see no devices. Every task is essential:
//! if one ends, the operator logs which and exits non-zero.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt;
use iot_nats::{CredentialSource, connect_with};
use iot_observe::Readiness;

use crate::controller::{Ctx, controller, error_policy, reconcile};
use crate::desired_index::DesiredIndex;
use crate::device_index::DeviceIndex;
use crate::metrics::OperatorMetrics;
use crate::status_aggregator::{AggregatorConfig, run_aggregator};
use crate::status_writer::{StatusInbox, StatusWriter};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub nats_url: Vec<String>,
    /// TLS, ping interval and client name of the NATS connection.
    pub nats: iot_nats::ClientOptions,
    pub resync: Duration,
    pub status_min_interval: Duration,
    pub aggregator: AggregatorConfig,
    pub device_status: crate::device_status::DeviceStatusConfig,
    /// How often an unfinished rollout is stepped.
    pub rollout_tick: Duration,
    /// Replicas of each KV bucket: 3 on a JetStream cluster of three or more
    /// servers, 1 on a single server. Existing buckets are moved to this count.
    pub kv_replicas: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: nowhere).
    pub http_addr: Option<SocketAddr>,
    /// Hold this Lease before writing anything (`None`: this is the only replica).
    pub leader_election: Option<crate::leader::LeaderElection>,
    /// Signs registry pull grants for devices (`None`: no registry is managed).
    pub registry: Option<Arc<crate::device_services::registry_grant::GrantSigner>>,
    /// Resolves the managed registries' tags to digests (set with `registry`).
    pub pinner: crate::images::SharedPinner,
}

use iot_observe::supervise::{Tasks, next_ending};

/// One small read of `DeploymentRevision`s before the operator says it is ready.
/// An API server whose CRD was just created answers the first such list with `429
/// Retry-After: 1`; paid here, that second does not delay the first Deployment
/// (BENCHMARKS.md, fan-out). Failures are only logged: the write path retries
/// its own reads.
async fn warm_revisions(client: &kube::Client) {
    let api: kube::Api<iot_api::DeploymentRevision> = kube::Api::all(client.clone());
    for attempt in 1..=5u32 {
        match api.list_metadata(&kube::api::ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, attempt, "listing DeploymentRevisions at start");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Keeps `/readyz`'s detail and `iot_operator_nats_server` on the server the
/// connection is on, through every reconnect (on a cluster, to another member).
async fn track_nats_server(conn: iot_nats::NatsConnection, metrics: Arc<OperatorMetrics>, readiness: Readiness) {
    let mut connects = conn.connects.clone();
    let mut shown: Option<iot_nats::ServerSummary> = None;
    loop {
        let now = iot_nats::ServerSummary::of(&conn.client);
        if shown.as_ref() != Some(&now) {
            metrics.nats_server.clear();
            metrics
                .nats_server
                .get_or_create(&crate::metrics::ServerLabels {
                    server: now.name.clone(),
                    cluster: now.cluster.clone().unwrap_or_default(),
                })
                .set(1);
            readiness.set_detail(format!("connected to {now}"));
            if let Some(before) = &shown {
                tracing::info!(server = %now.name, was = %before.name, "now on another NATS server");
            }
            shown = Some(now);
        }
        if connects.changed().await.is_err() {
            return;
        }
    }
}

/// Tasks started during startup, handed to the supervisor once it is done.
type Started = Vec<(&'static str, tokio::task::JoinHandle<()>)>;

/// Spawns a task the operator cannot do without: the supervisor ends the
/// process when it ends.
fn spawn_essential<F>(started: &mut Started, name: &'static str, f: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    started.push((name, tokio::spawn(f)));
}

pub async fn run(
    client: kube::Client,
    creds: Box<dyn CredentialSource>,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tracing::info!(nats = %opts.nats_url.join(","), credentials = %creds.describe(), "starting iot-operator {}", env!("CARGO_PKG_VERSION"));
    let metrics = Arc::new(OperatorMetrics::default());
    let readiness = Readiness::default();
    let mut tasks = Tasks::new();
    if let Some(addr) = opts.http_addr {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let server = iot_observe::serve(addr, Arc::new(Mutex::new(registry)), readiness.clone())
            .await
            .with_context(|| format!("cannot serve /metrics and probes on {addr}"))?;
        tasks.spawn(async move { ("HTTP endpoints", server.await.context("stopped").map_err(Into::into)) });
    }

    tokio::pin!(shutdown);
    // A standby that can take the lease is ready (a rollout must not wait on it)
    // but writes nothing until it holds it; `iot_operator_leader` tells them apart.
    // One that cannot (RBAC, namespace) is not ready, with the reason.
    let leadership = match &opts.leader_election {
        None => None,
        Some(election) => {
            readiness.set_not_ready("setting up the leader lease");
            let report = |state: crate::leader::Standby| match state {
                crate::leader::Standby::Waiting => readiness.set_ready(),
                crate::leader::Standby::Broken(why) => readiness.set_not_ready(why),
            };
            let acquired = tokio::select! {
                l = crate::leader::acquire(client.clone(), election.clone(), report) => l?,
                () = &mut shutdown => return Ok(()),
                e = next_ending(&mut tasks) => return Err(e.into()),
            };
            readiness.set_not_ready("elected leader; starting");
            let leadership = Arc::new(acquired);
            let watched = leadership.clone();
            tasks.spawn(async move { exit_now(watched.lost().await) });
            Some(leadership)
        }
    };
    metrics.leader.set(1);

    let mut started: Started = Vec::new();
    let startup = start(client, creds.as_ref(), &opts, metrics.clone(), &readiness, &mut started);
    // None: interrupted by the shutdown signal.
    let ctrl: Option<anyhow::Result<Ready>> = tokio::select! {
        r = startup => Some(r),
        () = &mut shutdown => None,
        e = next_ending(&mut tasks) => Some(Err(e.into())),
    };
    let ctrl = match ctrl {
        Some(Ok(c)) => c,
        other => {
            for (_, h) in &started {
                h.abort();
            }
            if let Some(l) = &leadership {
                l.release().await;
            }
            return match other {
                Some(Err(e)) => Err(e),
                _ => {
                    tracing::info!("shutting down before startup finished");
                    Ok(())
                }
            };
        }
    };
    // Aborting the supervisor's wrappers would only detach these; a clean stop
    // aborts the writers themselves before the lease is released.
    let writers: Vec<tokio::task::AbortHandle> = started.iter().map(|(_, h)| h.abort_handle()).collect();
    for (name, handle) in started {
        tasks.spawn(async move {
            let why: iot_observe::supervise::TaskError = match handle.await {
                Ok(()) => "stopped".into(),
                Err(e) => format!("failed: {e}").into(),
            };
            (name, Err(why))
        });
    }
    readiness.set_ready();
    tracing::info!("ready");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (controller, ctx) = ctrl;
    let mut controller_task = tokio::spawn(async move {
        controller
            .graceful_shutdown_on(async {
                if stop_rx.await.is_err() {
                    tracing::debug!("shutdown trigger dropped");
                }
            })
            .run(reconcile, error_policy, ctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "controller event");
                }
            })
            .await;
    });
    let outcome = tokio::select! {
        () = &mut shutdown => {
            tracing::info!("shutting down: finishing reconciles in flight");
            if stop_tx.send(()).is_err() {
                tracing::debug!("controller already stopped");
            }
            if tokio::time::timeout(Duration::from_secs(10), &mut controller_task).await.is_err() {
                tracing::warn!("reconciles did not finish within 10 s");
            }
            Ok(())
        }
        r = &mut controller_task => Err(match r {
            Ok(()) => anyhow::anyhow!("the controller stopped"),
            Err(e) => anyhow::anyhow!("the controller task failed: {e}"),
        }),
        e = next_ending(&mut tasks) => Err(e.into()),
    };
    if let Err(e) = &outcome {
        tracing::error!(
            error = format!("{e:#}"),
            "a part of the operator stopped; exiting so it is restarted"
        );
    }
    controller_task.abort();
    for w in &writers {
        w.abort();
    }
    tasks.abort_all();
    metrics.leader.set(0);
    if let Some(l) = &leadership {
        l.release().await;
    }
    outcome
}

type Ready = (kube::runtime::Controller<iot_api::Deployment>, Arc<Ctx>);

/// A lost lease stops every writer at once by ending the process, without a
/// release (the lease may be someone else's now). Waiting for tasks to wind down
/// would let them write past the point where a standby may take over.
fn exit_now(lost: crate::leader::LeaderError) -> (&'static str, Result<(), iot_observe::supervise::TaskError>) {
    tracing::error!(
        error = %lost,
        "lost the leader lease; exiting at once so that nothing writes without it"
    );
    std::process::exit(1)
}

/// Everything up to a controller that is ready to run.
async fn start(
    client: kube::Client,
    creds: &dyn CredentialSource,
    opts: &RunOptions,
    metrics: Arc<OperatorMetrics>,
    readiness: &Readiness,
    tasks: &mut Started,
) -> anyhow::Result<Ready> {
    readiness.set_not_ready("connecting to NATS");
    let conn = connect_with(&opts.nats_url, creds, &opts.nats).await?;
    let js = jetstream::new(conn.client.clone());
    readiness.set_not_ready("creating the KV buckets");
    let mut attempt = 0u32;
    let (desired, status) = loop {
        match iot_nats::buckets::ensure_buckets_replicated(&js, opts.kv_replicas).await {
            Ok(stores) => break stores,
            Err(e) => {
                attempt += 1;
                let delay = crate::controller::error_backoff(attempt);
                tracing::warn!(error = %e, retry_in = ?delay, "KV buckets not ready");
                tokio::time::sleep(delay).await;
            }
        }
    };
    tracing::info!(buckets = ?[harmony_reconciler_contracts::DESIRED_STATE_BUCKET, harmony_reconciler_contracts::AGENT_STATUS_BUCKET], replicas = opts.kv_replicas, "KV bucket ready");
    spawn_essential(
        tasks,
        "NATS server tracker",
        track_nats_server(conn.clone(), metrics.clone(), readiness.clone()),
    );

    {
        // Devices with scoped permissions write their status through this.
        let client = conn.client.clone();
        let counts = metrics.device_request_counts();
        spawn_essential(tasks, "status relay", async move {
            if let Err(e) = crate::device_services::status_relay::serve_status_writes(
                client,
                std::time::Duration::from_secs(5),
                counts,
            )
            .await
            {
                tracing::error!(error = %e, "status relay stopped");
            }
        });
    }
    let index = Arc::new(DesiredIndex::default());
    {
        // Devices with scoped permissions read their desired state through this:
        // from the index once it has caught up, from the stream before.
        let client = conn.client.clone();
        let counts = metrics.device_request_counts();
        let source: Arc<dyn crate::device_services::desired_read::DesiredSource> = index.clone();
        spawn_essential(tasks, "desired-state read responder", async move {
            if let Err(e) = crate::device_services::desired_read::serve_desired_reads(
                client,
                std::time::Duration::from_secs(5),
                Some(source),
                counts,
            )
            .await
            {
                tracing::error!(error = %e, "desired-state read responder stopped");
            }
        });
    }

    if let Some(signer) = opts.registry.clone() {
        // Grants read the same index as the read responder: a device's
        // repositories are whatever its desired state names right now.
        let client = conn.client.clone();
        let counts = metrics.device_request_counts();
        let source: Arc<dyn crate::device_services::desired_read::DesiredSource> = index.clone();
        spawn_essential(tasks, "registry grant responder", async move {
            if let Err(e) =
                crate::device_services::registry_grant::serve_registry_grants(client, signer, source, counts).await
            {
                tracing::error!(error = %e, "registry grant responder stopped");
            }
        });
    }
    readiness.set_not_ready("loading the desired-state and device indexes");
    let devices = Arc::new(DeviceIndex::default());
    {
        let index = index.clone();
        let connects = Some(conn.connects.clone());
        spawn_essential(tasks, "desired-state index", async move {
            index.run(desired, connects).await
        });
        let (devices, connects) = (devices.clone(), Some(conn.connects.clone()));
        spawn_essential(
            tasks,
            "device index",
            async move { devices.follow(status, connects).await },
        );
    }
    index.wait_ready().await;
    devices.wait_caught_up().await;
    warm_revisions(&client).await;
    {
        // Viewers (the dashboard) read the fleet's reports through this.
        let (client, counts) = (conn.client.clone(), metrics.device_request_counts());
        spawn_essential(tasks, "status snapshot responder", async move {
            let budget = crate::device_services::status_snapshot::PAGE_BUDGET;
            if let Err(e) = crate::device_services::status_snapshot::serve_status_reads(client, budget, counts).await {
                tracing::error!(error = %e, "status snapshot responder stopped");
            }
        });
    }

    let (controller, store, fleet) = controller(client.clone());
    let rollout_reports = devices.clone();
    let inbox = StatusInbox::new(store.clone());
    let writer = StatusWriter::new(client.clone(), inbox.clone(), opts.status_min_interval, metrics.clone());
    spawn_essential(tasks, "status writer", writer.run());
    spawn_essential(
        tasks,
        "aggregator",
        run_aggregator(
            devices.clone(),
            store,
            inbox.clone(),
            opts.aggregator.clone(),
            metrics.clone(),
            fleet.clone(),
        ),
    );
    spawn_essential(
        tasks,
        "Device status writer",
        crate::device_status::run_device_status(
            client.clone(),
            fleet.devices.clone(),
            devices.clone(),
            opts.device_status,
            metrics.clone(),
        ),
    );
    spawn_essential(
        tasks,
        "orphan collector",
        crate::gc::run_gc(index.clone(), client.clone(), js.clone(), opts.resync, metrics.clone()),
    );
    let rollouts = crate::rollout_write::Rollouts::new(
        rollout_reports,
        crate::rollout_write::RolloutConfig {
            tick: opts.rollout_tick,
            staleness: harmony_reconciler_contracts::report::Staleness::after(opts.aggregator.stale_after),
        },
    );
    let mut ctx = Ctx::new(client, js, index, inbox, opts.resync, metrics, fleet, rollouts);
    ctx.pinner = opts.pinner.clone();
    Ok((controller, Arc::new(ctx)))
}
