//! The viewers' status snapshot against a real nats-server: every device's latest
//! report, paged, read from the stream; nothing that fails the checks a report
//! must pass (it decodes, and it names the device of its key).

use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{ServiceRole, service_inbox_prefix};
use iot_nats::{Anonymous, ClientOptions, NatsTls, connect, connect_with};
use iot_testkit::NatsServer;

fn report(device: &str, version: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({"device_id": device, "agent_version": version, "heartbeat_at": "2026-12-01T00:00:00Z"})
            .to_string(),
    )
}

#[tokio::test]
async fn a_snapshot_pages_through_every_good_report_once_at_its_latest() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let admin = connect(&[nats.url()], &Anonymous, "admin", nats.ca_file()).await?;
    let js = async_nats::jetstream::new(admin.client.clone());
    let (_, status) = iot_nats::buckets::ensure_buckets(&js).await?;
    for i in 0..30 {
        status
            .put(format!("status.d{i:02}"), report(&format!("d{i:02}"), "1"))
            .await?;
    }
    // A newer report of d05: the snapshot has only that one.
    status.put("status.d05", report("d05", "2")).await?;
    // What a viewer must never get: a report under another device's key, one that
    // does not decode, and a deleted one.
    status.put("status.x", report("d01", "forged")).await?;
    status.put("status.y", Bytes::from_static(b"{not json")).await?;
    status.delete("status.d29").await?;

    let operator = connect(&[nats.url()], &Anonymous, "operator", nats.ca_file()).await?;
    // A budget of a few reports per page, so the snapshot takes many pages.
    let service = tokio::spawn(iot_operator::device_services::status_snapshot::serve_status_reads(
        operator.client.clone(),
        400,
        iot_operator::device_services::no_counts(),
    ));
    let viewer = Id::new("dash")?;
    let options = ClientOptions::new("dash")
        .tls(NatsTls {
            ca_file: nats.ca_file().map(Into::into),
            required: true,
        })
        .inbox_prefix(service_inbox_prefix(ServiceRole::Viewer, &viewer));
    let client = connect_with(&[nats.url()], &Anonymous, &options).await?.client;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let records = iot_nats::status_snapshot::read_status_snapshot(&client, &viewer, Duration::from_secs(10)).await?;
    let got: Vec<(String, String)> = records
        .iter()
        .map(|r| (r.device.to_string(), r.status.agent_version.clone()))
        .collect();
    let want: Vec<(String, String)> = (0..29)
        .map(|i| (format!("d{i:02}"), if i == 5 { "2" } else { "1" }.to_owned()))
        .collect();
    assert_eq!(got, want);
    assert!(records.iter().all(|r| r.stored_at <= chrono::Utc::now()));
    service.abort();
    Ok(())
}
