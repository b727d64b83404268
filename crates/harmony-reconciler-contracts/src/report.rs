//! How every reader of the fleet takes a device's report: the operator's
//! aggregate and the dashboard both decode with [`decode_report`] and judge
//! silence with [`Staleness`], so they can never disagree on which device is
//! heard from.
//!
//! - One writer per key: a report whose `device_id` is not the device its key
//!   names is refused, however well-formed.
//! - Silence is judged by when the report *reached NATS* (the server's clock),
//!   never by the device's own clock: a Pi without a real-time clock reads
//!   neither as always silent nor as never silent.

use chrono::{DateTime, Duration, Utc};
use thiserror::Error;

use crate::{AgentStatus, Id, parse_agent_status_key};

/// Why a report is not taken.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("{key:?} is not a device report key (status.<device>)")]
    NotAReportKey { key: String },
    #[error("the report of {device} cannot be decoded: {source}")]
    Undecodable {
        device: Id,
        #[source]
        source: serde_json::Error,
    },
    #[error("the report under {device}'s key names {claimed}")]
    ForeignDevice { device: Id, claimed: Id },
}

/// The device an agent-status key names.
pub fn report_device(key: &str) -> Result<Id, ReportError> {
    parse_agent_status_key(key).map_err(|_| ReportError::NotAReportKey { key: key.to_owned() })
}

/// Decodes the report stored under `device`'s key, refusing one that names
/// another device.
pub fn decode_report(device: &Id, bytes: &[u8]) -> Result<AgentStatus, ReportError> {
    let status: AgentStatus = serde_json::from_slice(bytes).map_err(|source| ReportError::Undecodable {
        device: device.clone(),
        source,
    })?;
    check_report_owner(device, &status)?;
    Ok(status)
}

/// A report already decoded (say, from a snapshot) must still be its device's own.
pub fn check_report_owner(device: &Id, status: &AgentStatus) -> Result<(), ReportError> {
    if &status.device_id == device {
        Ok(())
    } else {
        Err(ReportError::ForeignDevice {
            device: device.clone(),
            claimed: status.device_id.clone(),
        })
    }
}

/// When a device whose last report reached NATS a while ago stops counting as
/// heard from: the operator calls it `unreported`, the dashboard `stale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    after: Duration,
}

impl Staleness {
    /// 3x the agents' default 10 s heartbeat.
    pub const DEFAULT_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

    /// A report older than `after` is stale (a span too long for the clock's
    /// range means "never").
    pub fn after(after: std::time::Duration) -> Self {
        Self {
            after: Duration::from_std(after).unwrap_or(Duration::MAX),
        }
    }

    /// How long a report counts as fresh.
    pub fn window(&self) -> std::time::Duration {
        self.after.to_std().unwrap_or(std::time::Duration::MAX)
    }

    /// Whether a report that reached NATS at `received_at` is stale at `now`.
    pub fn is_stale(&self, received_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        now.signed_duration_since(received_at) > self.after
    }
}

impl Default for Staleness {
    fn default() -> Self {
        Self::after(Self::DEFAULT_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn report(device: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "device_id": device, "agent_version": "1", "heartbeat_at": "2026-12-01T00:00:00Z"
        }))
        .unwrap_or_default()
    }

    #[test]
    fn a_report_is_taken_only_under_its_own_devices_key() {
        let device = report_device("status.pi-1").unwrap_or_else(|e| panic!("{e}"));
        assert!(decode_report(&device, &report("pi-1")).is_ok());
        let forged = decode_report(&device, &report("pi-2"));
        assert!(
            matches!(&forged, Err(ReportError::ForeignDevice { claimed, .. }) if *claimed == id("pi-2")),
            "{forged:?}"
        );
        assert!(matches!(
            decode_report(&device, b"{not json"),
            Err(ReportError::Undecodable { .. })
        ));
        assert!(matches!(
            report_device("desired.pi-1"),
            Err(ReportError::NotAReportKey { .. })
        ));
    }

    #[test]
    fn staleness_is_strictly_past_the_threshold_by_the_servers_clock() {
        let s = Staleness::after(std::time::Duration::from_secs(30));
        let at: DateTime<Utc> = "2026-12-01T00:00:00Z".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(!s.is_stale(at, at + Duration::seconds(30)));
        assert!(s.is_stale(at, at + Duration::milliseconds(30_001)));
        // A report stamped in the future (clock skew between replicas) is fresh.
        assert!(!s.is_stale(at + Duration::seconds(5), at));
        assert!(!Staleness::after(std::time::Duration::MAX).is_stale(at, at + Duration::days(365_000)));
    }
}
