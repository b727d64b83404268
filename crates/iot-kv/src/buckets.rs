//! Creation of the platform's KV buckets. Only the operator (and test/dev tooling)
//! calls this; agents never create buckets.

use async_nats::jetstream::{self, kv};
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};

use crate::error::KvError;

/// Both buckets, created if missing. File storage so state survives a NATS restart;
/// history 1 because only the latest value of a key matters; direct get enabled
/// (async-nats sets `allow_direct`) so devices can read without consumers.
pub async fn ensure_buckets(js: &jetstream::Context) -> Result<(kv::Store, kv::Store), KvError> {
    let desired = ensure(
        js,
        DESIRED_STATE_BUCKET,
        "Per-device desired state, written by the operator",
    )
    .await?;
    let status = ensure(
        js,
        AGENT_STATUS_BUCKET,
        "Per-device status, each key written by its own agent",
    )
    .await?;
    Ok((desired, status))
}

async fn ensure(js: &jetstream::Context, bucket: &str, description: &str) -> Result<kv::Store, KvError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    match js
        .create_key_value(kv::Config {
            bucket: bucket.to_owned(),
            description: description.to_owned(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
    {
        Ok(store) => Ok(store),
        // Another writer may have created it between our get and create.
        Err(create_err) => js.get_key_value(bucket).await.map_err(|_| KvError::js(create_err)),
    }
}
