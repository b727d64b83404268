//! Publishes this device's `AgentStatus` to `agent-status/status.<device>`.
//!
//! A plain JetStream publish acknowledged by the stream: no consumer. A device with
//! scoped permissions writes through the platform's status relay instead. It publishes on
//! every heartbeat tick and right after the reconciler's report changes, within a
//! budget: a burst of [`CHANGE_BURST`] publishes goes out at once, after that one per
//! `min_gap` (a crash-looping container changes the report many times a second; its
//! changes coalesce instead of flooding the bucket).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use harmony_reconciler_contracts::keys::kv_subject;
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, AgentStatus, Id, InventorySnapshot, agent_status_key};
use tokio::sync::watch;

use crate::decode::AGENT_VERSION;
use crate::inventory;
use crate::metrics::{AgentMetrics, result};
use crate::reconciler::Report;

pub struct StatusReporter {
    pub js: jetstream::Context,
    /// Write through the platform's status relay instead of publishing to
    /// JetStream (what a device with scoped permissions must do).
    pub via_relay: bool,
    pub device: Id,
    pub heartbeat: Duration,
    pub inventory_refresh: Duration,
    pub publish_timeout: Duration,
    /// Spacing of change-triggered publishes once the burst is used up.
    pub min_gap: Duration,
    /// The report revision of the last acknowledged publish.
    pub published: watch::Sender<u64>,
    pub metrics: Arc<AgentMetrics>,
}

/// Publishes allowed at once before spacing sets in.
pub const CHANGE_BURST: u32 = 3;

/// A token bucket: [`CHANGE_BURST`] tokens, one more every `gap`.
#[derive(Debug)]
struct PublishBudget {
    gap: Duration,
    tokens: f64,
    at: tokio::time::Instant,
}

impl PublishBudget {
    fn new(gap: Duration) -> Self {
        Self {
            gap,
            tokens: f64::from(CHANGE_BURST),
            at: tokio::time::Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = tokio::time::Instant::now();
        if !self.gap.is_zero() {
            let earned = now.duration_since(self.at).as_secs_f64() / self.gap.as_secs_f64();
            self.tokens = (self.tokens + earned).min(f64::from(CHANGE_BURST));
        } else {
            self.tokens = f64::from(CHANGE_BURST);
        }
        self.at = now;
    }

    fn next_allowed(&mut self) -> tokio::time::Instant {
        self.refill();
        if self.tokens >= 1.0 {
            self.at
        } else {
            self.at + self.gap.mul_f64(1.0 - self.tokens)
        }
    }

    fn spend(&mut self) {
        self.refill();
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
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
        let mut budget = PublishBudget::new(self.min_gap);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {}
                changed = report.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep_until(budget.next_allowed()).await;
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
            budget.spend();
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
        if self.via_relay {
            return iot_nats::status_relay::write_via_relay(
                &self.js.client(),
                &self.device,
                Bytes::from(bytes),
                self.publish_timeout,
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_out_at_once_then_changes_are_spaced() {
        let gap = Duration::from_millis(500);
        let mut b = PublishBudget::new(gap);
        let start = tokio::time::Instant::now();
        for _ in 0..CHANGE_BURST {
            assert_eq!(b.next_allowed(), start);
            b.spend();
        }
        assert_eq!(b.next_allowed(), start + gap);
        tokio::time::advance(gap).await;
        assert_eq!(b.next_allowed(), start + gap);
        b.spend();
        // A quiet period refills the burst.
        tokio::time::advance(gap * 10).await;
        let now = tokio::time::Instant::now();
        for _ in 0..CHANGE_BURST {
            assert_eq!(b.next_allowed(), now);
            b.spend();
        }
    }
}
