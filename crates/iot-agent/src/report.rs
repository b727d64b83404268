//! Publishes this device's `AgentStatus` to `agent-status/status.<device>`.
//!
//! A plain JetStream publish acknowledged by the stream: no consumer. It publishes on
//! every heartbeat tick and immediately when the reconciler's report changes
//! (bursts coalesce: a change arriving during a publish is sent right after it).

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use harmony_reconciler_contracts::keys::kv_subject;
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, AgentStatus, Id, InventorySnapshot, agent_status_key};
use tokio::sync::watch;

use crate::interpret::AGENT_VERSION;
use crate::inventory;
use crate::reconciler::Report;

pub struct StatusReporter {
    pub js: jetstream::Context,
    pub device: Id,
    pub heartbeat: Duration,
    pub inventory_refresh: Duration,
    pub publish_timeout: Duration,
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
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {}
                changed = report.changed() => {
                    if changed.is_err() {
                        return;
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
            let status = self.build(&report.borrow_and_update(), &inventory);
            match self.publish(&subject, &status).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("status publishing works again");
                        failing = false;
                    }
                }
                Err(e) => {
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
