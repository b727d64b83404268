//! Wiring: NATS connection, desired-state follower, runtime event watcher, reconcile
//! loop, status reporter, metrics endpoint; and their supervision.
//!
//! Every task the agent spawns is essential. If one ends, the agent logs which and
//! why and exits non-zero, so a supervisor (systemd `Restart=on-failure`) restarts
//! it; running on with a dead follower would leave the device deaf to its desired
//! state while its heartbeat says all is well.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use iot_nats::follow::{FollowConfig, ReadPath};
use iot_nats::{DesiredView, connect_with, follow_desired_state};
use iot_observe::Readiness;
use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::podman::PodmanClient;
use crate::reconciler::{Reconciler, ReconcilerConfig, Report};
use crate::report::StatusReporter;
use crate::runtime::{ContainerRuntime, PodmanRuntime, RuntimeEvent};

/// How long shutdown may take, whatever the network does.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Runtime events within this window trigger one pass, not one each.
const EVENT_COALESCE: Duration = Duration::from_millis(250);

pub use iot_observe::supervise::Tasks;

/// Runs the agent until `shutdown` completes. Containers keep running after the
/// agent exits: they belong to the device, not to the agent process.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let creds = config.nats.credentials_for(Some(&config.device_id))?;
    tracing::info!(
        device = %config.device_id,
        nats = %config.nats.nats_url.join(","),
        credentials = %creds.describe(),
        podman = %config.podman_socket.display(),
        runtime_call_timeout = %humantime::format_duration(config.runtime_call_timeout),
        "starting iot-agent {}", crate::decode::AGENT_VERSION
    );
    let metrics = Arc::new(AgentMetrics::default());
    let readiness = Readiness::default();
    let mut tasks = Tasks::new();

    if let Some(addr) = config.metrics_addr {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let server = iot_observe::serve(addr, Arc::new(Mutex::new(registry)), readiness.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tasks.spawn(async move {
            (
                "metrics server",
                server.await.context("metrics server stopped").map_err(Into::into),
            )
        });
    }

    let runtime = PodmanRuntime::new(
        PodmanClient::new(&config.podman_socket).with_call_timeout(config.runtime_call_timeout),
        config.stop_timeout,
        config.pull_timeout,
    );

    // Do not wait for NATS: the device keeps running its containers while offline.
    let conn = connect_with(
        &config.nats.nats_url,
        creds.as_ref(),
        &config
            .nats
            .client_options(&format!("iot-agent-{}", config.device_id))
            .background(),
    )
    .await?;
    let js = jetstream::new(conn.client.clone());
    // Pulls from the platform's registry carry a grant the operator signs for
    // this device, asked for at each pull.
    let runtime = runtime.with_registry_credentials(crate::registry_grants::NatsGrants::new(
        conn.client.clone(),
        config.device_id.clone(),
    ));
    {
        let mut connects = conn.connects.clone();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            while connects.changed().await.is_ok() {
                metrics.nats_connects.inc();
            }
            ("NATS connection watcher", Err("the NATS client went away".into()))
        });
    }

    let (desired_tx, desired_rx) = watch::channel(DesiredView::default());
    let follow_cfg = FollowConfig {
        resync: config.resync_interval,
        // Scoped permissions do not allow the batched direct get.
        read_path: if config.nats.uses_identity() {
            ReadPath::Responder
        } else {
            ReadPath::Direct
        },
        ..Default::default()
    };
    let follower = follow_desired_state(conn.clone(), config.device_id.clone(), follow_cfg, desired_tx);
    tasks.spawn(async move {
        let why = match follower.await {
            Ok(()) => "stopped".into(),
            Err(e) => e.into(),
        };
        ("desired-state follower", Err(why))
    });

    let (report_tx, report_rx) = watch::channel(Report::default());
    let (published_tx, published_rx) = watch::channel(0u64);
    let reporter = StatusReporter {
        js,
        via_relay: config.nats.uses_identity(),
        device: config.device_id.clone(),
        heartbeat: config.heartbeat_interval,
        inventory_refresh: Duration::from_secs(300),
        publish_timeout: Duration::from_secs(5),
        min_gap: Duration::from_millis(500),
        published: published_tx,
        metrics: metrics.clone(),
    };
    tasks.spawn(async move {
        reporter.run(report_rx).await;
        ("status reporter", Err("stopped".into()))
    });

    let (events_tx, events_rx) = mpsc::channel(1024);
    {
        let runtime = runtime.clone();
        let device = config.device_id.clone();
        tasks.spawn(async move {
            watch_runtime_events(runtime, device, events_tx).await;
            ("runtime event watcher", Err("stopped".into()))
        });
    }

    let reconciler = Reconciler::new(
        runtime,
        ReconcilerConfig {
            device: config.device_id.clone(),
            event_capacity: harmony_reconciler_contracts::status::DEFAULT_EVENT_RING_CAPACITY,
            settle: config.upgrade_settle,
            runtime_name: format!("podman socket {}", config.podman_socket.display()),
        },
        report_tx,
    )
    .with_published(published_rx)
    .with_metrics(metrics.clone());

    let work = reconcile_loop(
        reconciler,
        desired_rx,
        events_rx,
        config.resync_interval,
        Some(readiness),
    );
    let outcome = supervise(&mut tasks, work, shutdown).await;
    if let Err(e) = &outcome {
        tracing::error!(
            error = format!("{e:#}"),
            "a part of the agent stopped; exiting so a supervisor can restart it"
        );
    }
    tasks.abort_all();
    if tokio::time::timeout(SHUTDOWN_GRACE, conn.client.flush()).await.is_err() {
        tracing::debug!("NATS flush did not finish before shutdown");
    }
    outcome
}

/// Runs `work` (which should never end) until `shutdown`, or until `work` or any of
/// `tasks` ends; those endings are errors naming what stopped.
pub async fn supervise(
    tasks: &mut Tasks,
    work: impl Future<Output = ()>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::select! {
        () = work => Err(anyhow::anyhow!("the reconcile loop stopped")),
        e = iot_observe::supervise::next_ending(tasks) => Err(e.into()),
        () = shutdown => {
            tracing::info!("shutting down; containers keep running");
            Ok(())
        }
    }
}

/// Follows the runtime's event stream forever, reconnecting with backoff (podman's
/// service may restart, or not be up yet).
async fn watch_runtime_events<R: ContainerRuntime>(
    runtime: R,
    device: harmony_reconciler_contracts::Id,
    tx: mpsc::Sender<RuntimeEvent>,
) {
    let mut failures = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        match runtime.watch_events(&device, tx.clone()).await {
            Ok(()) if tx.is_closed() => return,
            Ok(()) => tracing::debug!("runtime event stream ended; reconnecting"),
            Err(e) => tracing::debug!(error = %e, "runtime event stream failed; reconnecting"),
        }
        failures = if started.elapsed() > Duration::from_secs(30) {
            1
        } else {
            failures + 1
        };
        tokio::time::sleep(iot_timing::backoff(failures, Duration::from_secs(10))).await;
    }
}

/// Level-triggered loop: any desired-state change, a finished pull, a burst of
/// runtime events or the resync timer causes a full pass over everything. The watch
/// channel keeps only the latest view, so changes arriving while a pass runs are
/// coalesced into the next pass, and a lone change is acted on at once.
pub async fn reconcile_loop<R: ContainerRuntime>(
    mut reconciler: Reconciler<R>,
    mut desired: watch::Receiver<DesiredView>,
    mut events: mpsc::Receiver<RuntimeEvent>,
    resync: Duration,
    readiness: Option<Readiness>,
) {
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events_open = true;
    loop {
        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    tracing::error!("desired-state follower stopped");
                    return;
                }
            }
            _ = tick.tick() => {}
            Some(outcome) = reconciler.next_pull() => reconciler.pull_finished(outcome),
            ev = events.recv(), if events_open => match ev {
                Some(ev) => {
                    reconciler.runtime_event(&ev);
                    if !ev.kind.needs_pass() {
                        continue;
                    }
                    let until = tokio::time::Instant::now() + EVENT_COALESCE;
                    while let Ok(Some(ev)) = tokio::time::timeout_at(until, events.recv()).await {
                        reconciler.runtime_event(&ev);
                    }
                }
                None => events_open = false,
            },
        }
        let view = desired.borrow_and_update().clone();
        let summary = reconciler.reconcile(&view).await;
        if summary.executed > 0 || summary.pulls_started > 0 {
            tracing::debug!(?summary, "reconcile pass");
        }
        if let Some(r) = &readiness {
            match reconciler.readiness(&view) {
                Ok(()) => r.set_ready(),
                Err(why) => r.set_not_ready(why),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Which task ended and why is reported by iot_observe::supervise (tested there);
    // here: the reconcile loop ending is fatal too, and shutdown is not an error.

    #[tokio::test]
    async fn a_finished_reconcile_loop_stops_the_agent() {
        let mut tasks = Tasks::new();
        let err = supervise(&mut tasks, async {}, std::future::pending())
            .await
            .expect_err("must fail");
        assert!(err.to_string().contains("reconcile loop stopped"), "{err}");
    }

    #[tokio::test]
    async fn a_task_ending_stops_the_agent() {
        let mut tasks = Tasks::new();
        tasks.spawn(async { ("status reporter", Err("gone".into())) });
        let err = supervise(&mut tasks, std::future::pending(), std::future::pending())
            .await
            .expect_err("must fail");
        assert!(format!("{err:#}").contains("status reporter ended: gone"), "{err:#}");
    }

    #[tokio::test]
    async fn shutdown_is_not_an_error() {
        let mut tasks = Tasks::new();
        tasks.spawn(async {
            std::future::pending::<()>().await;
            ("x", Ok(()))
        });
        supervise(&mut tasks, std::future::pending(), async {})
            .await
            .expect("clean shutdown");
    }
}
