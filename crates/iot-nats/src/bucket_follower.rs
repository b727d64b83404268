//! Follows a whole KV bucket into an in-memory index: the one way the operator
//! follows the fleet's state (its desired-state index and its device index).
//!
//! One ordered consumer per bucket, whatever the fleet size. The follower:
//! - replays the bucket (last value per key), then says it has *caught up*. An
//!   index that is not caught up must not be acted on: a restarted operator would
//!   see no keys and no devices, and write a false outage or delete everything.
//! - knows that a bucket's counted messages can expire (purge markers have a TTL)
//!   before the watch delivers them, so while it waits it checks the bucket again:
//!   an empty bucket is caught up even if the watch never says so.
//! - rebuilds after a watch error and after every reconnect: it replays again, and
//!   keys the index holds that the replay no longer has (deleted, and the marker
//!   gone, while we were away) are removed when the replay is done. After a
//!   reconnect the index stays caught up meanwhile (it serves what it had, as a
//!   resumed watch would: reconnects are routine, every credential expiry brings
//!   one); after a watch error it is not caught up until the replay is done.
//! - stamps each entry with the time the server stored it, never our clock.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::watch;

use crate::error::NatsError;

/// One change of a key, as the follower hands it to the index.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketEntry {
    pub key: String,
    /// `None`: the key was deleted or purged.
    pub value: Option<Bytes>,
    /// When the server stored the change (for a key swept after a rebuild: when
    /// the follower noticed it was gone).
    pub stored_at: DateTime<Utc>,
    /// The change's stream sequence (the key's revision); 0 for a key swept after a
    /// rebuild. Readers that must never go back to an older value compare these.
    pub sequence: u64,
}

/// What a follower feeds. Called from one task, in stream order.
pub trait BucketIndex: Send + Sync {
    fn apply(&self, entry: BucketEntry);
    /// The replay is done: the index now matches the bucket.
    fn caught_up(&self) {}
}

/// How long to wait for the watch before looking at the bucket again, while
/// replaying.
const RECHECK_WHILE_REPLAYING: Duration = Duration::from_secs(2);
/// Pause before rebuilding after an error.
const REBUILD_AFTER: Duration = Duration::from_secs(1);

/// The follower of one bucket, and its caught-up signal.
#[derive(Debug)]
pub struct BucketFollower {
    bucket: String,
    caught_up: watch::Sender<bool>,
}

impl BucketFollower {
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            caught_up: watch::channel(false).0,
        }
    }

    /// Whether the index matches the bucket (up to what is in flight).
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Waits until the follower has caught up.
    pub async fn wait_caught_up(&self) {
        let mut rx = self.caught_up.subscribe();
        if rx.wait_for(|c| *c).await.is_err() {
            tracing::debug!(bucket = %self.bucket, "follower dropped while waiting");
        }
    }

    /// Follows `store` into `index` forever. `connects` (from
    /// [`crate::NatsConnection`]) triggers a rebuild after every reconnect.
    pub async fn run(&self, store: kv::Store, mut connects: Option<watch::Receiver<u64>>, index: &dyn BucketIndex) {
        if let Some(rx) = connects.as_mut() {
            rx.borrow_and_update();
        }
        let mut replay = Replay::default();
        loop {
            match self.follow_once(&store, connects.as_mut(), index, &mut replay).await {
                Ok(Rebuild::Reconnected) => {
                    tracing::info!(bucket = %self.bucket, "reconnected to NATS; replaying the bucket");
                }
                Ok(Rebuild::WatchEnded) => {
                    self.caught_up.send_replace(false);
                    tracing::warn!(bucket = %self.bucket, "bucket watch ended; replaying in 1 s");
                    tokio::time::sleep(REBUILD_AFTER).await;
                }
                Err(e) => {
                    self.caught_up.send_replace(false);
                    tracing::warn!(bucket = %self.bucket, error = %e, "bucket watch failed; replaying in 1 s");
                    tokio::time::sleep(REBUILD_AFTER).await;
                }
            }
        }
    }

    async fn follow_once(
        &self,
        store: &kv::Store,
        mut connects: Option<&mut watch::Receiver<u64>>,
        index: &dyn BucketIndex,
        replay: &mut Replay,
    ) -> Result<Rebuild, NatsError> {
        replay.start();
        let empty_at_start = is_empty(store).await?;
        let mut watch = store.watch_with_history(">").await.map_err(NatsError::js)?;
        // A rebuild sweeps what the replay does not mention, so an index that holds
        // keys takes "empty" only from a second look, after the watch had time to
        // deliver: one wrong answer would otherwise empty it, and the read responder
        // would tell every device it should run nothing.
        if empty_at_start && replay.live.is_empty() {
            self.finish(replay, index);
        }
        loop {
            let reconnected = async {
                match connects.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let replaying = replay.is_replaying();
            let recheck = async {
                if !replaying {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(RECHECK_WHILE_REPLAYING).await;
            };
            let next = tokio::select! {
                next = watch.next() => next,
                () = reconnected => return Ok(Rebuild::Reconnected),
                () = recheck => {
                    // A failed look is no reason to start over: the watch goes on.
                    if is_empty(store).await.unwrap_or(false) {
                        self.finish(replay, index);
                    }
                    continue;
                }
            };
            let Some(entry) = next else {
                return Ok(Rebuild::WatchEnded);
            };
            let entry = entry.map_err(NatsError::js)?;
            let value = match entry.operation {
                Operation::Put => Some(entry.value),
                Operation::Delete | Operation::Purge => None,
            };
            replay.saw(&entry.key, value.is_some());
            index.apply(BucketEntry {
                key: entry.key,
                value,
                stored_at: entry.created,
                sequence: entry.revision,
            });
            if entry.delta == 0 && replay.is_replaying() {
                self.finish(replay, index);
            }
        }
    }

    fn finish(&self, replay: &mut Replay, index: &dyn BucketIndex) {
        if !replay.is_replaying() {
            return;
        }
        let now = Utc::now();
        for key in replay.finish() {
            index.apply(BucketEntry {
                key,
                value: None,
                stored_at: now,
                sequence: 0,
            });
        }
        tracing::info!(bucket = %self.bucket, keys = replay.live.len(), "caught up with the bucket");
        index.caught_up();
        self.caught_up.send_replace(true);
    }
}

/// Whether the bucket holds no message, by an answer that can be trusted: on a
/// replicated stream only one that names a leader. Seen once on 2.15.1, in the
/// cluster e2e test: right after `kill -9` of the stream's leader, a rebuild took
/// the bucket for empty ("caught up with the bucket keys=0") while it held four
/// keys, and swept them from the index. A stream that is electing a leader has
/// no authoritative state to report, so such an answer is not taken as empty.
async fn is_empty(store: &kv::Store) -> Result<bool, NatsError> {
    let status = store.status().await.map_err(NatsError::js)?;
    let replicated = status.info.config.num_replicas > 1;
    let led = status.info.cluster.as_ref().is_some_and(|c| c.leader.is_some());
    Ok(status.values() == 0 && (led || !replicated))
}

enum Rebuild {
    Reconnected,
    WatchEnded,
}

/// The keys a follower has handed to its index, and the ones the current replay
/// has mentioned: what a rebuild must sweep. Pure bookkeeping.
#[derive(Debug, Default)]
struct Replay {
    /// Keys the index holds a value for.
    live: HashSet<String>,
    /// Keys the current replay mentioned (a value or a marker); `None` once the
    /// replay is done.
    seen: Option<HashSet<String>>,
}

impl Replay {
    fn start(&mut self) {
        self.seen = Some(HashSet::new());
    }

    fn is_replaying(&self) -> bool {
        self.seen.is_some()
    }

    /// Runs for every entry, also long after the replay (every device report of
    /// the fleet): a key already held costs one lookup and no allocation.
    fn saw(&mut self, key: &str, has_value: bool) {
        if let Some(seen) = self.seen.as_mut() {
            seen.insert(key.to_owned());
        }
        if !has_value {
            self.live.remove(key);
        } else if !self.live.contains(key) {
            self.live.insert(key.to_owned());
        }
    }

    /// Ends the replay; returns the keys it no longer has.
    fn finish(&mut self) -> Vec<String> {
        let Some(seen) = self.seen.take() else {
            return Vec::new();
        };
        let gone: Vec<String> = self.live.difference(&seen).cloned().collect();
        for key in &gone {
            self.live.remove(key);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuild_sweeps_only_keys_the_replay_no_longer_has() {
        let mut r = Replay::default();
        r.start();
        r.saw("a", true);
        r.saw("b", true);
        r.saw("c", true);
        assert!(r.finish().is_empty(), "the first replay has nothing to sweep");
        // Live, after the replay: d is new, c is deleted.
        r.saw("d", true);
        r.saw("c", false);
        // The next replay: a is still there, b's marker is delivered, d is gone
        // without a trace (deleted, marker expired).
        r.start();
        r.saw("a", true);
        r.saw("b", false);
        let mut gone = r.finish();
        gone.sort();
        assert_eq!(gone, vec!["d".to_owned()]);
        assert_eq!(r.live, HashSet::from(["a".to_owned()]));
        assert!(r.finish().is_empty(), "finishing twice sweeps nothing");
    }
}
