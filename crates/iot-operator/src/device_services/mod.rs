//! The one way the operator serves requests that identities send on their own
//! subjects (`<prefix>.<id>`): the status relay, the desired-state read responder
//! and the status snapshot for viewers.
//!
//! - **The subject proves who asks.** Only identity `<id>` may publish on
//!   `<prefix>.<id>`, so the id comes from the subject, never from the body.
//! - **Answers go only to the asker's own inbox.** A reply subject is chosen by the
//!   sender and not checked by permissions, and the operator may publish to the
//!   buckets: answering a reply subject that points into a bucket would store the
//!   answer there. Requests with any other reply are dropped.
//! - **Fair shares** ([`fair`]): at most one request per identity runs and
//!   one waits, the latest replaces an older waiting one, and a full line is
//!   answered with an error at once.
//!
//! The services: [`status_relay`], [`desired_read`] (for devices) and
//! [`status_snapshot`] (for viewers). Their clients are in `iot_nats`.

pub mod desired_read;
pub mod fair;
pub mod registry_grant;
pub mod status_relay;
pub mod status_snapshot;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::id_under;

use iot_nats::NatsError;

use self::fair::{FairLimits, FairQueue, Offer};

/// One request, as a handler sees it.
#[derive(Debug, Clone)]
pub struct DeviceRequest {
    /// Who asks (from the subject).
    pub id: Id,
    pub payload: Bytes,
}

/// Where a service listens and how much it takes on.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Subjects `<prefix>.<id>`.
    pub prefix: &'static str,
    pub queue_group: &'static str,
    /// Requests handled at once.
    pub workers: usize,
    pub limits: FairLimits,
    /// Whether `reply` is an inbox of identity `id`.
    pub is_own_inbox: fn(&Id, &str) -> bool,
}

/// Told the outcome of every request: (service prefix, result), where result is
/// `answered`, `superseded`, `busy` or `foreign_reply`. For `/metrics`.
pub type ServiceCounts = Arc<dyn Fn(&'static str, &'static str) + Send + Sync>;

/// Counts nothing.
pub fn no_counts() -> ServiceCounts {
    Arc::new(|_, _| {})
}

/// The JSON every answer type of these services reads as an error (each has an
/// optional `error` and defaults for everything else).
pub fn error_answer(message: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": message }).to_string())
}

struct Job {
    payload: Bytes,
    reply: async_nats::Subject,
}

/// Serves `spec` until the subscription ends, answering each request with what
/// `handle` returns.
pub async fn serve<H, F>(
    client: async_nats::Client,
    spec: ServiceSpec,
    counts: ServiceCounts,
    handle: H,
) -> Result<(), NatsError>
where
    H: Fn(DeviceRequest) -> F + Send + Sync + 'static,
    F: Future<Output = Bytes> + Send + 'static,
{
    let subject = format!("{}.*", spec.prefix);
    let mut sub = client
        .queue_subscribe(subject.clone(), spec.queue_group.to_owned())
        .await
        .map_err(|e| NatsError::Request {
            subject: subject.clone(),
            message: e.to_string(),
        })?;
    let queue: FairQueue<Job> = FairQueue::new(spec.limits);
    let handle = Arc::new(handle);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..spec.workers.max(1) {
        let (client, queue, handle, counts) = (client.clone(), queue.clone(), handle.clone(), counts.clone());
        let prefix = spec.prefix;
        workers.spawn(async move {
            while let Some((id, job)) = queue.next().await {
                // A handler that panics must neither take this worker down nor keep
                // the device's turn for ever (`done` below would never run).
                let request = DeviceRequest {
                    id: id.clone(),
                    payload: job.payload,
                };
                let answer = AssertUnwindSafe(async { handle(request).await })
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(service = prefix, %id, "the request handler panicked");
                        error_answer("the service failed on this request")
                    });
                if let Err(e) = client.publish(job.reply.clone(), answer).await {
                    // Most likely an answer over the server's max payload: say so to
                    // the asker, who keeps what it had and logs the error.
                    tracing::warn!(error = %e, service = prefix, %id, "could not answer a request");
                    let why = error_answer(&format!("the answer could not be sent: {e}"));
                    if let Err(e) = client.publish(job.reply, why).await {
                        tracing::debug!(error = %e, "could not send the error either");
                    }
                }
                counts(prefix, "answered");
                queue.done(&id);
            }
        });
    }
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else { continue };
        let Some(id) = id_under(spec.prefix, &msg.subject) else {
            continue;
        };
        if !(spec.is_own_inbox)(&id, &reply) {
            tracing::warn!(service = spec.prefix, %id, reply = %reply, "request with a reply subject outside the asker's inbox; dropped");
            counts(spec.prefix, "foreign_reply");
            continue;
        }
        let bytes = msg.payload.len() + reply.len();
        let job = Job {
            payload: msg.payload,
            reply,
        };
        match queue.offer(&id, job, bytes) {
            Offer::Queued => {}
            Offer::Replaced(old) => {
                counts(spec.prefix, "superseded");
                let answer = error_answer("superseded by a newer request from the same identity");
                if let Err(e) = client.publish(old.reply, answer).await {
                    tracing::debug!(error = %e, "could not answer a superseded request");
                }
            }
            Offer::Full(job) => {
                counts(spec.prefix, "busy");
                let answer = error_answer(&format!(
                    "the operator is busy: {} requests are waiting; try again shortly",
                    queue.waiting()
                ));
                if let Err(e) = client.publish(job.reply, answer).await {
                    tracing::debug!(error = %e, "could not answer a refused request");
                }
            }
        }
    }
    queue.close();
    workers.shutdown().await;
    Err(NatsError::Request {
        subject,
        message: "subscription closed".into(),
    })
}
