use thiserror::Error;

/// Failures talking to NATS. Variants are coarse on purpose: callers either retry
/// (everything transient) or report (bad configuration).
#[derive(Debug, Error)]
pub enum NatsError {
    #[error("NATS credentials: {0}")]
    Credentials(String),
    #[error("cannot connect to NATS at {servers}: {source}{hint}")]
    Connect {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
        /// What to check, when the error is one configuration causes.
        hint: String,
    },
    #[error("KV bucket {bucket:?} does not exist yet (the operator creates it)")]
    BucketMissing { bucket: String },
    #[error("NATS request on {subject} failed: {message}")]
    Request { subject: String, message: String },
    #[error("timed out after {0:?} waiting for NATS")]
    Timeout(std::time::Duration),
    #[error("JetStream: {0}")]
    JetStream(String),
}

impl NatsError {
    pub(crate) fn js(e: impl std::fmt::Display) -> Self {
        NatsError::JetStream(e.to_string())
    }
}
