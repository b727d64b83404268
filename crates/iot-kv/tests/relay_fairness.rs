//! The status relay against a real nats-server, with one device that floods it.
//! Before, the relay took a permit of a shared pool of 256 inside its receive loop,
//! so a flood of 250 KB writes queued every other device's status behind it. Now a
//! device has one write running and one waiting, the latest wins, and every
//! request gets an answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{StatusWriteAnswer, device_inbox_prefix, status_write_subject};
use iot_kv::buckets::ensure_buckets;
use iot_kv::{Anonymous, ClientOptions, NatsTls, connect, connect_with};
use iot_testkit::NatsServer;

async fn device(nats: &NatsServer, id: &Id) -> anyhow::Result<async_nats::Client> {
    let opts = ClientOptions::new(id.as_str())
        .tls(NatsTls {
            ca_file: nats.ca_file().map(Into::into),
            required: true,
        })
        .inbox_prefix(device_inbox_prefix(id));
    Ok(connect_with(&[nats.url()], &Anonymous, &opts).await?.client)
}

#[tokio::test]
async fn a_flooding_device_gets_one_write_at_a_time_and_the_others_get_theirs() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let admin = connect(&[nats.url()], &Anonymous, "admin", nats.ca_file()).await?;
    let js = async_nats::jetstream::new(admin.client.clone());
    let (_, status) = ensure_buckets(&js).await?;
    let relay = connect(&[nats.url()], &Anonymous, "relay", nats.ca_file()).await?;
    let service = tokio::spawn(iot_kv::status_relay::serve_status_writes(
        relay.client.clone(),
        Duration::from_secs(5),
        iot_kv::device_service::no_counts(),
    ));

    let flood_id = Id::new("flood")?;
    let calm_id = Id::new("calm")?;
    let flooder = device(&nats, &flood_id).await?;
    let calm = device(&nats, &calm_id).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The flood: 400 statuses of 200 KB each, sent without waiting for answers.
    let inbox = format!("{}.flood", device_inbox_prefix(&flood_id));
    let mut answers = flooder.subscribe(format!("{inbox}.*")).await?;
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let counter = {
        let counts = counts.clone();
        tokio::spawn(async move {
            while let Some(m) = answers.next().await {
                let a: StatusWriteAnswer = serde_json::from_slice(&m.payload).unwrap_or_default();
                let slot = match a.error.as_deref() {
                    None => 0,
                    Some(e) if e.contains("superseded") => 1,
                    Some(_) => 2,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    const FLOOD: u64 = 400;
    for n in 0..FLOOD {
        let mut body = vec![b' '; 200 * 1024];
        let tag = format!("{{\"n\":{n}}}");
        body[..tag.len()].copy_from_slice(tag.as_bytes());
        flooder
            .publish_with_reply(
                status_write_subject(&flood_id),
                format!("{inbox}.{n}"),
                Bytes::from(body),
            )
            .await?;
    }
    flooder.flush().await?;
    // Meanwhile a calm device writes, and every write is stored.
    for n in 0..10 {
        let seq = iot_kv::status_relay::write_via_relay(
            &calm,
            &calm_id,
            Bytes::from(format!("{{\"calm\":{n}}}")),
            Duration::from_secs(10),
        )
        .await?;
        assert!(seq > 0);
    }

    // Every flood request is answered: stored, superseded, or refused.
    iot_testkit::wait_until(Duration::from_secs(60), "an answer to every flood request", || async {
        let total: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        (total == FLOOD).then_some(())
    })
    .await?;
    let (stored, superseded, refused) = (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed),
    );
    eprintln!("flood: {stored} stored, {superseded} superseded, {refused} refused");
    assert!(superseded > 0, "the latest write replaced waiting ones");
    // The latest wins: what is stored is the last status the flooder sent.
    let latest = status.get("status.flood").await?.unwrap_or_default();
    assert!(
        latest.starts_with(format!("{{\"n\":{}}}", FLOOD - 1).as_bytes()),
        "stored: {}",
        String::from_utf8_lossy(&latest[..20.min(latest.len())])
    );
    let calm_latest = status.get("status.calm").await?.unwrap_or_default();
    assert_eq!(&calm_latest[..], b"{\"calm\":9}");
    counter.abort();
    service.abort();
    Ok(())
}
