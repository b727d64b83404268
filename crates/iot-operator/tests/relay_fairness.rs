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
use iot_nats::buckets::ensure_buckets;
use iot_nats::{Anonymous, ClientOptions, NatsTls, connect, connect_with};
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
    let service = tokio::spawn(iot_operator::device_services::status_relay::serve_status_writes(
        relay.client.clone(),
        Duration::from_secs(5),
        iot_operator::device_services::no_counts(),
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
        let seq = iot_nats::status_relay::write_via_relay(
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

/// A handler that panics on one device's request (a bug in a service, found by
/// whatever that device sends): the device gets an error answer, and neither it nor
/// anyone else is left without answers later. Before, the panic ended the worker
/// and left the device's turn taken for good: its every later request waited
/// forever, and with one worker every device's did.
#[tokio::test]
async fn a_handler_that_panics_answers_an_error_and_serves_on() -> anyhow::Result<()> {
    use iot_operator::device_services::fair::FairLimits;
    use iot_operator::device_services::{DeviceRequest, ServiceSpec, no_counts, serve};

    let nats = NatsServer::start().await?;
    let host = connect(&[nats.url()], &Anonymous, "service", nats.ca_file())
        .await?
        .client;
    let spec = ServiceSpec {
        prefix: "test.svc",
        queue_group: "test-svc",
        workers: 1,
        limits: FairLimits {
            max_waiting: 16,
            max_waiting_bytes: 1 << 20,
            min_gap: Duration::ZERO,
        },
        is_own_inbox: |_, _| true,
    };
    let service = tokio::spawn(serve(host, spec, no_counts(), |req: DeviceRequest| async move {
        if &req.payload[..] == b"boom" {
            panic!("handler bug on {}", req.id);
        }
        Bytes::from(format!("ok {}", req.id))
    }));
    let asker = connect(&[nats.url()], &Anonymous, "asker", nats.ca_file())
        .await?
        .client;
    // The service has subscribed once a request gets any answer.
    let ask = |device: &'static str, body: &'static [u8]| {
        let asker = asker.clone();
        async move {
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                asker.request(format!("test.svc.{device}"), Bytes::from_static(body)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no answer to {device} within 5 s"))??;
            anyhow::Ok(String::from_utf8_lossy(&answer.payload).into_owned())
        }
    };
    iot_testkit::wait_until(Duration::from_secs(10), "service up", || async {
        ask("d2", b"hi").await.ok()
    })
    .await?;

    let first = ask("d1", b"boom").await?;
    assert!(first.contains("\"error\""), "{first}");
    let again = ask("d1", b"boom").await?;
    assert!(
        again.contains("\"error\""),
        "the panicking device is answered again: {again}"
    );
    assert_eq!(ask("d1", b"hi").await?, "ok d1");
    assert_eq!(ask("d2", b"hi").await?, "ok d2", "the only worker still serves");
    assert!(!service.is_finished());
    service.abort();
    Ok(())
}
