//! Image pulls, off the serial action loop.
//!
//! A pull can take minutes on a slow link; one slow pull must not hold up the other
//! deployments of the device. The reconciler starts each pull on its own task and
//! goes on; the pull reports back through a channel, which wakes the reconcile loop.
//! Failed pulls are retried with a backoff per image.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::plan::ImageState;

/// Cap of the retry backoff of a failing pull.
pub const PULL_RETRY_CAP: Duration = Duration::from_secs(300);

/// How a background pull ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullOutcome {
    pub image: String,
    pub result: Result<Duration, String>,
}

#[derive(Debug, Clone, Default)]
struct ImageEntry {
    in_flight: bool,
    /// When a pull last succeeded: an image still missing right after that would be
    /// pulled again and again (a name podman stores differently, say).
    pulled_at: Option<Instant>,
    /// Consecutive failed pulls, the last error, and when the next pull is due.
    failures: u32,
    last_error: Option<String>,
    retry_at: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct ImageTracker {
    entries: BTreeMap<String, ImageEntry>,
}

impl ImageTracker {
    /// What the planner should assume about each image: `present` are the images
    /// found on the device during this pass; a failed pull whose retry is due is left
    /// out, so the planner asks for it again.
    pub fn planner_view(&self, present: &BTreeSet<String>, now: Instant) -> BTreeMap<String, ImageState> {
        let mut view: BTreeMap<String, ImageState> = BTreeMap::new();
        for (image, e) in &self.entries {
            if e.in_flight {
                view.insert(image.clone(), ImageState::Pulling);
            } else if let (Some(error), Some(retry_at)) = (&e.last_error, e.retry_at)
                && retry_at > now
            {
                view.insert(image.clone(), ImageState::Failed(error.clone()));
            }
        }
        for image in present {
            view.insert(image.clone(), ImageState::Present);
        }
        view
    }

    pub fn in_flight(&self, image: &str) -> bool {
        self.entries.get(image).is_some_and(|e| e.in_flight)
    }

    pub fn started(&mut self, image: &str) {
        self.entries.entry(image.to_owned()).or_default().in_flight = true;
    }

    pub fn finished(&mut self, outcome: &PullOutcome, now: Instant) {
        match &outcome.result {
            Ok(_) => {
                self.entries.insert(
                    outcome.image.clone(),
                    ImageEntry {
                        pulled_at: Some(now),
                        ..Default::default()
                    },
                );
            }
            Err(error) => {
                let e = self.entries.entry(outcome.image.clone()).or_default();
                e.in_flight = false;
                e.failures += 1;
                e.last_error = Some(error.clone());
                e.retry_at = Some(now + iot_timing::backoff(e.failures, PULL_RETRY_CAP));
            }
        }
    }

    /// Whether a pull of `image` succeeded within the last minute.
    pub fn just_pulled(&self, image: &str, now: Instant) -> bool {
        self.entries
            .get(image)
            .and_then(|e| e.pulled_at)
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
    }

    /// Records a failure without a pull (the pulled image cannot be found).
    pub fn failed(&mut self, image: &str, error: String, now: Instant) {
        self.finished(
            &PullOutcome {
                image: image.to_owned(),
                result: Err(error),
            },
            now,
        );
    }

    /// Forgets images no desired service uses any more (a pull in flight finishes
    /// and reports first).
    pub fn retain(&mut self, wanted: &BTreeSet<&str>) {
        self.entries
            .retain(|image, e| e.in_flight || wanted.contains(image.as_str()));
    }
}
