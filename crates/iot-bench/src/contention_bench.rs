//! Concurrent pipelined KV writes on one JetStream context, as the operator makes
//! them when many Deployments reconcile at once: `batches` calls of
//! `iot_nats::write_batch` (window 512) with `ops` puts each, all at once. async-nats
//! lends 5,000 publish-ack permits per context; a batch that holds some and waits
//! for more does not drain its own acks, so past that total the batches can wait on
//! each other forever. Prints one row: done (with the time) or wedged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::DESIRED_STATE_BUCKET;
use iot_nats::{KvOp, write_batch};

pub async fn run(batches: usize, ops: usize, timeout: Duration) -> anyhow::Result<()> {
    let nats = iot_testkit::NatsServer::start().await?;
    let conn = iot_nats::connect(&[nats.url()], &iot_nats::Anonymous, "bench", nats.ca_file()).await?;
    let js = async_nats::jetstream::new(conn.client.clone());
    iot_nats::buckets::ensure_buckets(&js).await?;
    let done = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let all = futures::stream::iter((0..batches).map(|b| {
        let (js, done) = (js.clone(), done.clone());
        async move {
            let ops: Vec<KvOp> = (0..ops)
                .map(|i| KvOp::Put {
                    key: format!("dev{i}.default_b{b}"),
                    value: Bytes::from(vec![b'x'; 200]),
                })
                .collect();
            let result = write_batch(&js, DESIRED_STATE_BUCKET, &ops, iot_nats::write::DEFAULT_WINDOW).await;
            done.fetch_add(1, Ordering::Relaxed);
            result
        }
    }))
    .buffer_unordered(batches.max(1))
    .collect::<Vec<_>>();
    match tokio::time::timeout(timeout, all).await {
        Ok(results) => println!(
            "| {batches} concurrent write_batch x {ops} puts ({} in all) | done in {} ({} failed) |",
            batches * ops,
            crate::util::ms(t.elapsed()),
            results.iter().filter(|(_, e)| e.is_some()).count()
        ),
        Err(_) => println!(
            "| {batches} concurrent write_batch x {ops} puts ({} in all) | **wedged**: {} of {batches} finished in {:.0} s |",
            batches * ops,
            done.load(Ordering::Relaxed),
            timeout.as_secs_f64()
        ),
    }
    Ok(())
}
