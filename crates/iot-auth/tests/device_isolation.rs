//! With device A's identity, every way to touch device B (or the JetStream API at
//! all) is denied by nats-server itself, while A still reads its own desired state,
//! follows its changes and writes its own status. Real OpenBao, real nats-server
//! 2.15 with the auth callout, the real callout binary.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use common::{Probe, Secured};
use futures::StreamExt;
use harmony_reconciler_contracts::Id;
use iot_nats::desired_read::read_via_responder;
use iot_nats::status_relay::write_via_relay;

#[tokio::test]
async fn a_device_reaches_its_own_keys_and_nothing_else() -> anyhow::Result<()> {
    let s = Secured::start(1).await?;
    let a = s.credentials(s.enroll_device("dev-a").await?)?;
    s.enroll_device("dev-b").await?;
    let admin = s.admin().await?;
    let admin_js = jetstream::new(admin.clone());
    let desired = admin_js.get_key_value("desired-state").await?;
    desired
        .put("dev-a.default_web", Bytes::from_static(b"{\"a\":1}"))
        .await?;
    desired
        .put("dev-b.default_web", Bytes::from_static(b"{\"b\":1}"))
        .await?;

    // The read responder and the status relay run in the fixture with the
    // operator's identity (so its permissions are exercised too).
    let probe = Probe::connect(&s.nats, &a).await?;
    let dev_a = Id::new("dev-a")?;

    // Allowed: its own desired state, in full...
    let mut records = Vec::new();
    for _ in 0..50 {
        match read_via_responder(&probe.client, &dev_a, Duration::from_secs(2)).await {
            Ok(r) => {
                records = r;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["dev-a.default_web"]);
    // ...its changes as they happen...
    let mut changes = probe.client.subscribe("$KV.desired-state.dev-a.>").await?;
    // A round trip on the same connection: the server handles a client's protocol
    // in order, so after the answer the subscription is surely in place (a flush
    // only empties our write buffer, and the put comes on another connection).
    read_via_responder(&probe.client, &dev_a, Duration::from_secs(5)).await?;
    desired
        .put("dev-a.default_web", Bytes::from_static(b"{\"a\":2}"))
        .await?;
    let change = tokio::time::timeout(Duration::from_secs(5), changes.next()).await?;
    assert_eq!(change.map(|m| m.payload), Some(Bytes::from_static(b"{\"a\":2}")));
    // ...and its own status, through the relay.
    let seq = write_via_relay(
        &probe.client,
        &dev_a,
        Bytes::from_static(b"{\"mine\":1}"),
        Duration::from_secs(5),
    )
    .await?;
    assert!(seq > 0);
    let js = jetstream::new(probe.client.clone());

    // Denied subscriptions: nothing of B's, no wildcard, no one else's inbox.
    for subject in [
        "$KV.desired-state.dev-b.>",
        "$KV.desired-state.>",
        "$KV.agent-status.>",
        ">",
        "_INBOX.>",
        "_INBOX_dev-b.>",
    ] {
        let _sub = probe.client.subscribe(subject).await?;
        probe.wait_violation(subject).await?;
    }
    // Denied publishes: every JetStream API form that could read B (subject-form and
    // batched direct gets, consumers by subject or by body filter, history), stream
    // admin, writes anywhere but its own status, and B's read requests.
    let denied: &[(&str, &str)] = &[
        (
            "$JS.API.DIRECT.GET.KV_desired-state.$KV.desired-state.dev-b.default_web",
            "",
        ),
        (
            "$JS.API.DIRECT.GET.KV_desired-state.$KV.desired-state.dev-a.default_web",
            "",
        ),
        (
            "$JS.API.DIRECT.GET.KV_desired-state",
            r#"{"multi_last":["$KV.desired-state.dev-b.>"],"batch":10}"#,
        ),
        (
            "$JS.API.CONSUMER.CREATE.KV_desired-state.c1.$KV.desired-state.dev-b.>",
            "{}",
        ),
        (
            "$JS.API.CONSUMER.CREATE.KV_desired-state",
            r#"{"stream_name":"KV_desired-state","config":{"filter_subject":"$KV.desired-state.dev-b.>"}}"#,
        ),
        (
            "$JS.API.STREAM.MSG.GET.KV_desired-state",
            r#"{"last_by_subj":"$KV.desired-state.dev-b.default_web"}"#,
        ),
        ("$JS.API.STREAM.INFO.KV_desired-state", ""),
        ("$JS.API.STREAM.PURGE.KV_desired-state", ""),
        ("$JS.API.STREAM.DELETE.KV_desired-state", ""),
        ("$JS.API.STREAM.DELETE.KV_agent-status", ""),
        ("$JS.API.INFO", ""),
        ("$KV.agent-status.status.dev-b", "{}"),
        // Not even its own status by JetStream: the acknowledgement would go to a
        // reply subject of its choosing (see below).
        ("$KV.agent-status.status.dev-a", "{}"),
        ("$KV.desired-state.dev-a.default_web", "{}"),
        ("$KV.desired-state.dev-b.default_other", "{}"),
        ("iot.desired.read.dev-b", "{}"),
    ];
    for (subject, body) in denied {
        probe
            .client
            .publish(subject.to_string(), Bytes::from(body.to_string()))
            .await?;
        probe.wait_violation(subject).await?;
    }
    // Reply subjects are the sender's choice and no permission checks them: the
    // relay and the responder answer only to the asking device's own inbox, so
    // nothing lands in another device's keys.
    for (subject, forged) in [
        ("iot.desired.read.dev-a", "$KV.desired-state.dev-b.default_forged1"),
        ("iot.status.write.dev-a", "$KV.desired-state.dev-b.default_forged2"),
        ("iot.status.write.dev-a", "_INBOX_dev-b.x"),
    ] {
        probe
            .client
            .publish_with_reply(subject, forged, Bytes::from_static(b"{}"))
            .await?;
    }
    // Processed in order: once this answer is back, the forged requests reached the
    // services; give them a moment to (not) act.
    read_via_responder(&probe.client, &dev_a, Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(desired.get("dev-b.default_forged1").await?.is_none());
    assert!(desired.get("dev-b.default_forged2").await?.is_none());

    // A KV handle needs stream info, which is denied: no watch, no history.
    let mut js = js;
    js.set_timeout(Duration::from_secs(1));
    let kv = tokio::time::timeout(Duration::from_secs(10), js.get_key_value("desired-state")).await;
    assert!(!matches!(kv, Ok(Ok(_))), "a device opened the desired-state bucket");

    // And nothing of the above had an effect.
    let status = admin_js.get_key_value("agent-status").await?;
    assert!(status.get("status.dev-b").await?.is_none());
    assert_eq!(
        status.get("status.dev-a").await?,
        Some(Bytes::from_static(b"{\"mine\":1}")),
        "the relay stored exactly what the device sent, and nothing else did"
    );
    assert!(desired.get("dev-b.default_other").await?.is_none());
    assert_eq!(
        desired.get("dev-a.default_web").await?,
        Some(Bytes::from_static(b"{\"a\":2}"))
    );
    let info = admin_js.get_stream("KV_desired-state").await?.info().await?.clone();
    assert_eq!(info.state.consumer_count, 0, "no consumer was created");
    // The connection survived all of it (violations are refused, not fatal).
    assert_eq!(
        read_via_responder(&probe.client, &dev_a, Duration::from_secs(2))
            .await?
            .len(),
        1
    );
    Ok(())
}
