//! The platform's NATS client: what the agent, the operator, the dashboard, the
//! callout and the CLI need to talk to NATS. Connections and their credentials
//! (static, or a token from an OpenBao identity: [`token_credentials`]), the shared clap
//! flags ([`cli`]), bucket setup, the bucket follower, consumer-free reads,
//! pipelined writes, and the clients of the operator's device services (the
//! services themselves are in `iot_operator::device_services`). No Kubernetes.
//!
//! The design constraint behind this crate: the number of JetStream consumers must
//! not grow with the number of devices (nats-server 2.15 caps a stream at 1000
//! consumers by default, and each consumer costs tens of KB of server memory). So:
//! - reads of current KV values use batched *direct get* (`multi_last`), which
//!   creates no consumer ([`direct`]);
//! - a device follows its own keys with a *core* subscription on its subject prefix
//!   plus full re-reads at start, reconnect and on a timer ([`follow`]);
//! - the operator follows a whole bucket with one ordered consumer
//!   ([`bucket_follower`]), whatever the fleet size;
//! - writes are plain JetStream publishes, acknowledged by the stream.

pub mod bucket_follower;
pub mod buckets;
pub mod cli;
pub mod connect;
pub mod desired_read;
pub mod direct;
pub mod error;
pub mod follow;
pub mod registry_grant;
pub mod status_relay;
pub mod status_snapshot;
pub mod token_credentials;
pub mod write;

pub use bucket_follower::{BucketEntry, BucketFollower, BucketIndex};
pub use cli::NatsArgs;
pub use connect::{
    Anonymous, ClientOptions, CredentialSource, CredsFile, NatsConnection, NatsTls, ServerSummary, TokenAuth,
    UserPassword, connect, connect_with,
};
pub use direct::{KvRecord, last_values_for};
pub use error::NatsError;
pub use follow::{DesiredView, follow_desired_state};
pub use write::{KvOp, write_batch, write_batch_with};
