//! Image pulls, off the serial action loop.
//!
//! A pull can take minutes on a slow link; one slow pull must not hold up the other
//! deployments of the device. The reconciler starts each pull on its own task and
//! goes on; the pull reports back through a channel, which wakes the reconcile loop.
//! Failed pulls are retried with a backoff per image, whose schedule depends on
//! why the pull failed ([`PullError::retry_after`]). While it runs, a pull reports
//! its progress through the same channel.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::{PullProgress, PullState};
use tokio::time::Instant;

use crate::plan::ImageState;
pub use crate::podman::PullCounts;

/// Cap of the retry backoff of a failing pull.
pub const PULL_RETRY_CAP: Duration = Duration::from_secs(300);
/// First retry of a pull the registry refused or does not know: waiting does not
/// help until someone changes something, so the device does not ask every second.
pub const LONG_RETRY_START: Duration = Duration::from_secs(60);
/// Cap of that backoff.
pub const LONG_RETRY_CAP: Duration = Duration::from_secs(1800);
/// First retry after the disk filled up.
pub const NO_SPACE_RETRY_START: Duration = Duration::from_secs(30);

/// Why a pull failed, worded for a deployment's `last_error`. `detail` is
/// podman's own message without its `initializing source docker://IMAGE: ` prefix.
/// Which variant is decided from podman's wording ([`PullError::classify`]): the
/// API answers 200 for every failed pull and carries only text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    #[error("no space left on device while pulling {image}: {detail}")]
    NoSpace { image: String, detail: String },
    #[error("registry {registry} refused the credentials for {image}: {detail}")]
    Unauthorized {
        registry: String,
        image: String,
        detail: String,
    },
    #[error("registry {registry} unreachable while pulling {image}: {detail}")]
    Unreachable {
        registry: String,
        image: String,
        detail: String,
    },
    #[error("image {image} not found in registry {registry}: {detail}")]
    NotFound {
        registry: String,
        image: String,
        detail: String,
    },
    #[error("pulling image {image} failed: {detail}")]
    Other { image: String, detail: String },
}

impl PullError {
    /// Sorts podman's message of a failed pull of `image`. The texts are podman
    /// 4.3.1's (containers/image 5.23), provoked against docker-registry 2.8.2:
    /// - `... reading manifest v1 in localhost:5113/pulltest: unauthorized: authentication required`
    ///   (no or wrong password; a token registry also says `denied: ...`);
    /// - `... reading manifest nosuch in 127.0.0.1:5111/pulltest: manifest unknown: manifest unknown`;
    /// - `... pinging container registry 127.0.0.1:5119: Get "https://127.0.0.1:5119/v2/": dial tcp 127.0.0.1:5119: connect: connection refused`,
    ///   `... x509: certificate signed by unknown authority ...`, `... lookup ... no such host`;
    /// - `writing blob: storing blob to file "...": write ...: no space left on device`
    ///   (libpod) and `writing blob: adding layer with blob "sha256:...": ApplyLayer stdout:  stderr: write /bin/busybox: no space left on device exit status 1`
    ///   (compatible API), from a 12 MB tmpfs as storage.
    pub fn classify(image: &str, message: &str) -> Self {
        let detail = without_source_prefix(message).to_owned();
        let image = image.to_owned();
        let registry = registry_named(&image, message);
        let m = message.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
        // `localhost/...` names a local image: podman tries https://localhost/ for
        // it, and "registry localhost unreachable" would send a person looking for a
        // registry that was never meant to exist.
        if image.starts_with("localhost/") && !has(&["no space left on device"]) {
            return PullError::NotFound {
                registry,
                image,
                detail: format!(
                    "it is not in the device's image store, and localhost/ images are never pulled ({detail})"
                ),
            };
        }
        if has(&["no space left on device"]) {
            PullError::NoSpace { image, detail }
        } else if has(&[
            "unauthorized",
            "authentication required",
            "denied:",
            "access to the resource is denied",
            "invalid username/password",
            "forbidden",
        ]) {
            PullError::Unauthorized {
                registry,
                image,
                detail,
            }
        } else if has(&[
            "manifest unknown",
            "name unknown",
            "repository name not known",
            "(not found)",
        ]) {
            PullError::NotFound {
                registry,
                image,
                detail,
            }
        } else if has(&[
            "connection refused",
            "no route to host",
            "network is unreachable",
            "no such host",
            "name resolution",
            "server misbehaving",
            "i/o timeout",
            "timeout",
            "deadline exceeded",
            "connection reset",
            "x509:",
            "tls:",
            "certificate",
            "server gave http response to https client",
            "service unavailable",
            "bad gateway",
            "toomanyrequests",
            "pinging container registry",
        ]) {
            PullError::Unreachable {
                registry,
                image,
                detail,
            }
        } else {
            PullError::Other { image, detail }
        }
    }

    /// A metric and log label.
    pub fn kind(&self) -> &'static str {
        match self {
            PullError::NoSpace { .. } => "no_space",
            PullError::Unauthorized { .. } => "unauthorized",
            PullError::Unreachable { .. } => "unreachable",
            PullError::NotFound { .. } => "not_found",
            PullError::Other { .. } => "other",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            PullError::NoSpace { detail, .. }
            | PullError::Unauthorized { detail, .. }
            | PullError::Unreachable { detail, .. }
            | PullError::NotFound { detail, .. }
            | PullError::Other { detail, .. } => detail,
        }
    }

    /// The same error with `f` applied to its detail.
    pub fn map_detail(mut self, f: impl FnOnce(&str) -> String) -> Self {
        let d = match &mut self {
            PullError::NoSpace { detail, .. }
            | PullError::Unauthorized { detail, .. }
            | PullError::Unreachable { detail, .. }
            | PullError::NotFound { detail, .. }
            | PullError::Other { detail, .. } => detail,
        };
        *d = f(d);
        self
    }

    /// How long to wait before pull attempt `failures + 1`. A refused or unknown
    /// image waits a minute at first and up to half an hour (someone has to change
    /// the credentials or push the image; a fleet must not hammer the registry); a
    /// full disk waits at least 30 s; a registry that cannot be reached, and
    /// anything else, follow the normal schedule (1 s doubling to 5 min).
    pub fn retry_after(&self, failures: u32) -> Duration {
        let doubling = |start: Duration, cap: Duration| {
            start
                .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
                .min(cap)
        };
        match self {
            PullError::Unauthorized { .. } | PullError::NotFound { .. } => doubling(LONG_RETRY_START, LONG_RETRY_CAP),
            PullError::NoSpace { .. } => doubling(NO_SPACE_RETRY_START, PULL_RETRY_CAP),
            PullError::Unreachable { .. } | PullError::Other { .. } => iot_timing::backoff(failures, PULL_RETRY_CAP),
        }
    }
}

/// Podman's message without `initializing source docker://IMAGE: `, which only
/// repeats the image.
fn without_source_prefix(message: &str) -> &str {
    message
        .strip_prefix("initializing source docker://")
        .and_then(|rest| rest.split_once(": ").map(|(_, tail)| tail))
        .unwrap_or(message)
}

/// The registry to name in a message: the image's own, else the one podman says
/// it tried (a bare name is resolved with registries.conf).
fn registry_named(image: &str, message: &str) -> String {
    if let Some(host) = crate::podman::registry_host(image) {
        return host.to_owned();
    }
    message
        .split_once("docker://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(host, _)| host.to_owned())
        .unwrap_or_else(|| "(from registries.conf)".to_owned())
}

/// What a background pull tells the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullMessage {
    Progress { image: String, counts: PullCounts },
    Finished(PullOutcome),
}

/// How a background pull ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullOutcome {
    pub image: String,
    pub result: Result<Duration, PullError>,
}

#[derive(Debug, Clone, Default)]
struct ImageEntry {
    in_flight: bool,
    /// When the current (or last failed) attempt started, on the wall clock, and
    /// how far it got.
    started_at: Option<DateTime<Utc>>,
    counts: PullCounts,
    /// When a pull last succeeded: an image still missing right after that would be
    /// pulled again and again (a name podman stores differently, say).
    pulled_at: Option<Instant>,
    /// Consecutive failed pulls, the last error, and when the next pull is due.
    failures: u32,
    last_error: Option<PullError>,
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
                view.insert(image.clone(), ImageState::Failed(error.to_string()));
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
        let e = self.entries.entry(image.to_owned()).or_default();
        e.in_flight = true;
        e.started_at = Some(Utc::now());
        e.counts = PullCounts::default();
    }

    /// Records how far a pull in flight got; `false` if no such pull runs.
    pub fn progress(&mut self, image: &str, counts: PullCounts) -> bool {
        match self.entries.get_mut(image) {
            Some(e) if e.in_flight => {
                e.counts = counts;
                true
            }
            _ => false,
        }
    }

    /// What a deployment waiting for `image` reports: the pull in flight, or the
    /// failed one while it waits for its retry.
    pub fn status(&self, image: &str, now: Instant) -> Option<PullProgress> {
        let e = self.entries.get(image)?;
        let state = if e.in_flight {
            PullState::Pulling
        } else if e.last_error.is_some() && e.retry_at.is_some_and(|t| t > now) {
            PullState::Failed
        } else {
            return None;
        };
        Some(PullProgress {
            image: image.to_owned(),
            state,
            bytes_done: e.counts.bytes_done,
            bytes_total: e.counts.bytes_total,
            layers_done: e.counts.layers_done,
            layers_total: e.counts.layers_total,
            started_at: e.started_at?,
        })
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
                e.retry_at = Some(now + error.retry_after(e.failures));
                e.last_error = Some(error.clone());
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
    pub fn failed(&mut self, image: &str, error: PullError, now: Instant) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Podman 4.3.1's messages, provoked against docker-registry 2.8.2 on this
    /// machine (see [`PullError::classify`]).
    const UNAUTHORIZED: &str = "initializing source docker://localhost:5113/pulltest:v1: reading manifest v1 in localhost:5113/pulltest: unauthorized: authentication required";
    const MANIFEST_UNKNOWN: &str = "initializing source docker://127.0.0.1:5111/pulltest:nosuch: reading manifest nosuch in 127.0.0.1:5111/pulltest: manifest unknown: manifest unknown";
    const REFUSED: &str = "initializing source docker://127.0.0.1:5119/pulltest:v1: pinging container registry 127.0.0.1:5119: Get \"https://127.0.0.1:5119/v2/\": dial tcp 127.0.0.1:5119: connect: connection refused";
    const UNKNOWN_CA: &str = "initializing source docker://127.0.0.1:5113/pulltest:v1: pinging container registry 127.0.0.1:5113: Get \"https://127.0.0.1:5113/v2/\": x509: certificate signed by unknown authority (possibly because of \"x509: invalid signature: parent certificate cannot sign this kind of certificate\" while trying to verify candidate authority certificate \"localhost\")";
    const NO_SUCH_HOST: &str = "initializing source docker://registry.nonexistent.invalid/pulltest:v1: pinging container registry registry.nonexistent.invalid: Get \"https://registry.nonexistent.invalid/v2/\": dial tcp: lookup registry.nonexistent.invalid on 10.255.255.53:53: no such host";
    const PLAIN_HTTP: &str = "initializing source docker://127.0.0.1:5111/pulltest:v1: pinging container registry 127.0.0.1:5111: Get \"https://127.0.0.1:5111/v2/\": http: server gave HTTP response to HTTPS client";
    const NO_SPACE_COMPAT: &str = "writing blob: adding layer with blob \"sha256:579ed9223de76edbc413e5a8367937b58296382b01b062ba9e58fc4e02d1d568\": ApplyLayer stdout:  stderr: write /bin/busybox: no space left on device exit status 1";
    const NO_SPACE_LIBPOD: &str = "writing blob: storing blob to file \"/tmp/pullexp/tiny/tmp/storage28013131/2\": write /tmp/pullexp/tiny/tmp/storage28013131/2: no space left on device";
    /// A registry with token auth refusing a repository (distribution's DENIED code).
    const DENIED: &str = "initializing source docker://registry.example:5000/other:1: reading manifest 1 in registry.example:5000/other: denied: requested access to the resource is denied";

    #[test]
    fn podman_messages_are_sorted_and_worded_for_people() {
        let e = PullError::classify("localhost:5113/pulltest:v1", UNAUTHORIZED);
        assert_eq!(
            e.to_string(),
            "registry localhost:5113 refused the credentials for localhost:5113/pulltest:v1: \
             reading manifest v1 in localhost:5113/pulltest: unauthorized: authentication required"
        );
        let e = PullError::classify("127.0.0.1:5111/pulltest:nosuch", MANIFEST_UNKNOWN);
        assert_eq!(
            e.to_string(),
            "image 127.0.0.1:5111/pulltest:nosuch not found in registry 127.0.0.1:5111: \
             reading manifest nosuch in 127.0.0.1:5111/pulltest: manifest unknown: manifest unknown"
        );
        let e = PullError::classify("127.0.0.1:5119/pulltest:v1", REFUSED);
        assert!(
            e.to_string().starts_with(
                "registry 127.0.0.1:5119 unreachable while pulling 127.0.0.1:5119/pulltest:v1: pinging container registry"
            ),
            "{e}"
        );
        let e = PullError::classify("web:1", NO_SPACE_COMPAT);
        assert!(
            e.to_string()
                .starts_with("no space left on device while pulling web:1: writing blob: adding layer"),
            "{e}"
        );
        for (message, kind) in [
            (UNAUTHORIZED, "unauthorized"),
            (DENIED, "unauthorized"),
            (MANIFEST_UNKNOWN, "not_found"),
            (REFUSED, "unreachable"),
            (UNKNOWN_CA, "unreachable"),
            (NO_SUCH_HOST, "unreachable"),
            (PLAIN_HTTP, "unreachable"),
            (NO_SPACE_COMPAT, "no_space"),
            (NO_SPACE_LIBPOD, "no_space"),
            ("something podman never said before", "other"),
        ] {
            assert_eq!(PullError::classify("r.example/x:1", message).kind(), kind, "{message}");
        }
        // A bare name: the registry podman tried is named.
        let e = PullError::classify(
            "nginx:1",
            "initializing source docker://docker.io/library/nginx:1: pinging container registry registry-1.docker.io: dial tcp: i/o timeout",
        );
        assert!(e.to_string().starts_with("registry docker.io unreachable"), "{e}");
    }

    #[test]
    fn refused_and_unknown_images_back_off_long_and_unreachable_ones_normally() {
        let secs = |e: &PullError| (1..=7).map(|n| e.retry_after(n).as_secs()).collect::<Vec<_>>();
        let refused = PullError::classify("r.example/x:1", UNAUTHORIZED);
        assert_eq!(secs(&refused), [60, 120, 240, 480, 960, 1800, 1800]);
        let unknown = PullError::classify("r.example/x:1", MANIFEST_UNKNOWN);
        assert_eq!(secs(&unknown), [60, 120, 240, 480, 960, 1800, 1800]);
        let full = PullError::classify("r.example/x:1", NO_SPACE_LIBPOD);
        assert_eq!(secs(&full), [30, 60, 120, 240, 300, 300, 300]);
        let unreachable = PullError::classify("r.example/x:1", REFUSED);
        assert_eq!(secs(&unreachable), [1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(unreachable.retry_after(20), PULL_RETRY_CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tracker_applies_the_backoff_of_the_failure_and_shows_the_pull() {
        let mut t = ImageTracker::default();
        let image = "r.example/x:1";
        t.started(image);
        let counts = PullCounts {
            bytes_done: 5,
            bytes_total: Some(10),
            layers_done: 0,
            layers_total: 1,
        };
        assert!(t.progress(image, counts));
        assert!(!t.progress("other:1", counts), "no such pull");
        let now = Instant::now();
        let pulling = t.status(image, now).expect("pulling");
        assert_eq!(
            (pulling.state, pulling.bytes_done, pulling.bytes_total),
            (PullState::Pulling, 5, Some(10))
        );
        t.finished(
            &PullOutcome {
                image: image.into(),
                result: Err(PullError::classify(image, UNAUTHORIZED)),
            },
            now,
        );
        let present = BTreeSet::new();
        assert!(matches!(
            t.planner_view(&present, now + Duration::from_secs(59)).get(image),
            Some(ImageState::Failed(e)) if e.starts_with("registry r.example refused the credentials for r.example/x:1")
        ));
        let failed = t.status(image, now + Duration::from_secs(59)).expect("failed");
        assert_eq!((failed.state, failed.bytes_done), (PullState::Failed, 5));
        // Due again after a minute: the planner asks for it, and nothing is shown.
        assert!(t.planner_view(&present, now + Duration::from_secs(60)).is_empty());
        assert_eq!(t.status(image, now + Duration::from_secs(60)), None);
    }
}
