//! Creation of the platform's KV buckets. Only the operator (and test/dev tooling)
//! calls this; agents never create buckets.

use async_nats::jetstream::{self, kv};
use harmony_reconciler_contracts::keys::kv_stream_name;
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};

use crate::error::NatsError;

/// Both buckets with one replica: [`ensure_buckets_replicated`] on a single server.
pub async fn ensure_buckets(js: &jetstream::Context) -> Result<(kv::Store, kv::Store), NatsError> {
    ensure_buckets_replicated(js, 1).await
}

/// Both buckets, created if missing, each stored on `replicas` servers of a
/// JetStream cluster (3 survives the loss of one server: a write needs a quorum of
/// two). A bucket that exists with another replica count is changed to this one:
/// the server moves a live stream between R1 and R3 without losing a message.
///
/// File storage so state survives a NATS restart; history 1 because only the latest
/// value of a key matters; direct get enabled (async-nats sets `allow_direct`) so
/// devices can read without consumers; per-message TTLs allowed so purge markers
/// expire (see [`crate::write::PURGE_MARKER_TTL`]).
pub async fn ensure_buckets_replicated(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(kv::Store, kv::Store), NatsError> {
    let desired = ensure(
        js,
        DESIRED_STATE_BUCKET,
        "Per-device desired state, written by the operator",
        replicas,
    )
    .await?;
    let status = ensure(
        js,
        AGENT_STATUS_BUCKET,
        "Per-device status, each key written by its own agent",
        replicas,
    )
    .await?;
    Ok((desired, status))
}

async fn ensure(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    replicas: usize,
) -> Result<kv::Store, NatsError> {
    let store = match js.get_key_value(bucket).await {
        Ok(store) => store,
        Err(_) => match js
            .create_key_value(kv::Config {
                bucket: bucket.to_owned(),
                description: description.to_owned(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
        {
            Ok(store) => store,
            // Another writer may have created it between our get and create.
            Err(create_err) => js.get_key_value(bucket).await.map_err(|_| NatsError::js(create_err))?,
        },
    };
    update_stream_config(js, bucket, replicas.max(1)).await?;
    Ok(store)
}

/// Turns on per-message TTLs (on buckets created by older operators too) and sets
/// the replica count. The server accepts both changes on a live stream.
async fn update_stream_config(js: &jetstream::Context, bucket: &str, replicas: usize) -> Result<(), NatsError> {
    let mut stream = js.get_stream(kv_stream_name(bucket)).await.map_err(NatsError::js)?;
    let config = stream.info().await.map_err(NatsError::js)?.config.clone();
    if config.allow_message_ttl && config.num_replicas == replicas {
        return Ok(());
    }
    tracing::info!(
        bucket,
        replicas,
        was = config.num_replicas,
        "updating the bucket's stream: per-message TTLs (expiring purge markers) and replicas"
    );
    js.update_stream(jetstream::stream::Config {
        allow_message_ttl: true,
        num_replicas: replicas,
        ..config
    })
    .await
    .map_err(NatsError::js)?;
    Ok(())
}
