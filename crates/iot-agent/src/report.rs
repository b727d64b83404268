//! Publishes this device's `AgentStatus` to `agent-status/status.<device>`.
//!
//! A plain JetStream publish acknowledged by the stream: no consumer. It publishes on
//! every heartbeat tick and soon after the reconciler's report changes: at once if
//! the last publish is older than `min_gap`, else when it is (bursts, such as a
//! crash-looping container, coalesce into one publish per `min_gap`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use harmony_reconciler_contracts::keys::kv_subject;
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, AgentStatus, Id, InventorySnapshot, agent_status_key};
use tokio::sync::watch;

use crate::interpret::AGENT_VERSION;
use crate::inventory;
use crate::metrics::{AgentMetrics, result};
use crate::reconciler::Report;

pub struct StatusReporter {
    pub js: jetstream::Context,
    pub device: Id,
    pub heartbeat: Duration,
    pub inventory_refresh: Duration,
    pub publish_timeout: Duration,
    pub min_gap: Duration,
    /// The report revision of the last acknowledged publish.
    pub published: watch::Sender<u64>,
    pub metrics: Arc<AgentMetrics>,
}

impl StatusReporter {
    /// Runs until the report channel closes.
    pub async fn run(self, mut report: watch::Receiver<Report>) {
        let subject = kv_subject(AGENT_STATUS_BUCKET, &agent_status_key(&self.device));
        let mut inventory = inventory::collect();
        tracing::info!(?inventory, "inventory collected");
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inventory_tick = tokio::time::interval(self.inventory_refresh);
        inventory_tick.tick().await;
        let mut failing = false;
        let mut last_publish: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {}
                changed = report.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if let Some(at) = last_publish {
                        tokio::time::sleep_until(at + self.min_gap).await;
                    }
                }
                _ = inventory_tick.tick() => {
                    let fresh = inventory::collect();
                    if fresh == inventory {
                        continue;
                    }
                    if inventory::materially_changed(&inventory, &fresh) {
                        tracing::info!(inventory = ?fresh, "inventory changed");
                    }
                    inventory = fresh;
                }
            }
            let (status, revision) = {
                let current = report.borrow_and_update();
                (self.build(&current, &inventory), current.revision)
            };
            last_publish = Some(tokio::time::Instant::now());
            match self.publish(&subject, &status).await {
                Ok(()) => {
                    self.metrics.status_publishes.get_or_create(&result("ok")).inc();
                    self.published.send_replace(revision);
                    if failing {
                        tracing::info!("status publishing works again");
                        failing = false;
                    }
                }
                Err(e) => {
                    self.metrics.status_publishes.get_or_create(&result("error")).inc();
                    // Logged once per outage; the next tick retries.
                    if !failing {
                        tracing::warn!(error = %e, "cannot publish status; retrying every heartbeat");
                        failing = true;
                    }
                }
            }
        }
    }

    fn build(&self, report: &Report, inventory: &InventorySnapshot) -> AgentStatus {
        AgentStatus {
            format: harmony_reconciler_contracts::status::AGENT_STATUS_FORMAT,
            device_id: self.device.clone(),
            agent_version: AGENT_VERSION.to_owned(),
            heartbeat_at: Utc::now(),
            deployments: report.deployments.clone(),
            recent_events: report.events.clone(),
            inventory: Some(inventory.clone()),
            last_reconcile_at: report.last_reconcile_at,
            runtime: report.runtime.clone(),
        }
    }

    async fn publish(&self, subject: &str, status: &AgentStatus) -> Result<(), String> {
        let bytes = serde_json::to_vec(status).map_err(|e| e.to_string())?;
        let send = async {
            let ack = self
                .js
                .publish(subject.to_owned(), Bytes::from(bytes))
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map_err(|e| e.to_string()).map(drop)
        };
        tokio::time::timeout(self.publish_timeout, send)
            .await
            .map_err(|_| format!("no ack within {:?}", self.publish_timeout))?
    }
}
