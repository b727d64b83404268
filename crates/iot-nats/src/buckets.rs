//! Creation of the platform's KV buckets. Only the operator (and test/dev tooling)
//! calls this; agents never create buckets.

use async_nats::jetstream::{self, kv};
use harmony_reconciler_contracts::keys::kv_stream_name;
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};

use crate::error::NatsError;

/// Both buckets, created if missing. File storage so state survives a NATS restart;
/// history 1 because only the latest value of a key matters; direct get enabled
/// (async-nats sets `allow_direct`) so devices can read without consumers; per-message
/// TTLs allowed so purge markers expire (see [`crate::write::PURGE_MARKER_TTL`]).
pub async fn ensure_buckets(js: &jetstream::Context) -> Result<(kv::Store, kv::Store), NatsError> {
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

async fn ensure(js: &jetstream::Context, bucket: &str, description: &str) -> Result<kv::Store, NatsError> {
    let store = match js.get_key_value(bucket).await {
        Ok(store) => store,
        Err(_) => match js
            .create_key_value(kv::Config {
                bucket: bucket.to_owned(),
                description: description.to_owned(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(store) => store,
            // Another writer may have created it between our get and create.
            Err(create_err) => js.get_key_value(bucket).await.map_err(|_| NatsError::js(create_err))?,
        },
    };
    allow_message_ttl(js, bucket).await?;
    Ok(store)
}

/// Turns on per-message TTLs, on new buckets and on buckets created by older
/// operators alike. The server accepts this change on a live stream.
async fn allow_message_ttl(js: &jetstream::Context, bucket: &str) -> Result<(), NatsError> {
    let mut stream = js.get_stream(kv_stream_name(bucket)).await.map_err(NatsError::js)?;
    let config = stream.info().await.map_err(NatsError::js)?.config.clone();
    if config.allow_message_ttl {
        return Ok(());
    }
    tracing::info!(
        bucket,
        "enabling per-message TTLs on the bucket (expiring purge markers)"
    );
    js.update_stream(jetstream::stream::Config {
        allow_message_ttl: true,
        ..config
    })
    .await
    .map_err(NatsError::js)?;
    Ok(())
}
