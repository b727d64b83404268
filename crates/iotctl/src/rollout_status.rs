//! `iotctl rollout status`: where a Deployment's rollout stands, read once or
//! followed with a watch.
//!
//! Everything here is read from the Deployment alone: `spec.rollout` (is there a
//! progressive rollout, is it paused), `status.rollout` (the operator's record of
//! it, written before it acts) and `status.currentRevision` (which revision the
//! spec is now). A rollout is complete only when `status.rollout` is about the
//! current revision, says `Complete`, and the operator has seen the latest spec.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::{StreamExt as _, TryStreamExt as _};
use iot_api::conditions::REASON_AWAITING_PROMOTION;
use iot_api::rollout::promote_value;
use iot_api::{
    ABORT_ANNOTATION, AggregateStatus, BatchStatus, Deployment, FailureCluster, PROMOTE_ANNOTATION, PinnedImage,
    RolloutPhase, RolloutStatus,
};
use kube::Api;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde_json::Value;

use crate::table::{Table, age};
use crate::{k8s, out};

/// Width of a batch's progress bar, in cells.
const BAR_CELLS: usize = 20;
/// How long one watch request lasts before the server ends it and the watcher
/// starts the next (from the last resourceVersion): below iotctl's 30 s read
/// timeout, so a quiet Deployment never looks like a dead connection.
const WATCH_SECONDS: u32 = 25;

/// The parts of the fleet aggregate that `status` shows for a Deployment without
/// `spec.rollout`.
#[derive(Debug, Clone, PartialEq)]
struct Counts {
    observed_generation: Option<i64>,
    targets: u32,
    succeeded: u32,
    failed: u32,
    pending: u32,
    unreported: u32,
    revision: Option<u64>,
    revision_summary: Option<String>,
}

impl From<AggregateStatus> for Counts {
    fn from(a: AggregateStatus) -> Self {
        Self {
            observed_generation: a.observed_generation,
            targets: a.targets,
            succeeded: a.succeeded,
            failed: a.failed,
            pending: a.pending,
            unreported: a.unreported,
            revision: a.revision,
            revision_summary: a.revision_summary,
        }
    }
}

/// What `status` and the commands need to know about one Deployment's rollout,
/// decoded from the object as the API server holds it. Two equal views render the
/// same (a watch re-renders only when the view changes).
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub ns: String,
    pub name: String,
    generation: Option<i64>,
    observed_generation: Option<i64>,
    current_revision: Option<u64>,
    /// `spec.rollout` is set: the operator rolls new revisions out in batches.
    pub has_rollout_spec: bool,
    /// `spec.rollout.paused`.
    pub paused: bool,
    /// `spec.rollout.maxConcurrentPulls`: devices that may pull at once.
    max_concurrent_pulls: Option<u64>,
    /// `status.images`: the digest each image of the current revision is pinned to.
    images: Vec<PinnedImage>,
    /// For each batch of `spec.rollout.batches`: it has `pause: {}`.
    batch_pauses: Vec<bool>,
    /// A condition says the rollout waits for promotion.
    awaiting_condition: bool,
    pub rollout: Option<RolloutStatus>,
    aggregate: Option<Counts>,
    annotations: BTreeMap<String, String>,
}

/// Whether a rollout is done, failed for good, or still under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The current revision reached every batch.
    Complete,
    /// Rolled back or suspended: nothing more happens without a person.
    Failed(String),
    /// Anything else, with what it waits for.
    Waiting(String),
}

fn decode<T: serde::de::DeserializeOwned>(
    v: Option<&Value>,
    what: &str,
    ns: &str,
    name: &str,
) -> anyhow::Result<Option<T>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            anyhow::anyhow!("cannot read {what} of {ns}/{name} (written by a newer operator than this iotctl?): {e}")
        }),
    }
}

impl View {
    pub fn of(d: &DynamicObject, ns: &str, name: &str) -> anyhow::Result<Self> {
        let data = &d.data;
        let spec_rollout = data.pointer("/spec/rollout").filter(|v| !v.is_null());
        let batch_pauses = spec_rollout
            .and_then(|r| r.get("batches"))
            .and_then(Value::as_array)
            .map(|b| b.iter().map(|b| b.get("pause").is_some_and(|p| !p.is_null())).collect())
            .unwrap_or_default();
        let awaiting_condition = data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.get("reason").and_then(Value::as_str) == Some(REASON_AWAITING_PROMOTION))
            });
        let aggregate: Option<AggregateStatus> =
            decode(data.pointer("/status/aggregate"), "status.aggregate", ns, name)?;
        Ok(Self {
            ns: ns.to_owned(),
            name: name.to_owned(),
            generation: d.metadata.generation,
            observed_generation: data.pointer("/status/observedGeneration").and_then(Value::as_i64),
            current_revision: data.pointer("/status/currentRevision").and_then(Value::as_u64),
            has_rollout_spec: spec_rollout.is_some(),
            paused: spec_rollout
                .and_then(|r| r.get("paused"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_concurrent_pulls: spec_rollout
                .and_then(|r| r.get("maxConcurrentPulls"))
                .and_then(Value::as_u64),
            images: decode(data.pointer("/status/images"), "status.images", ns, name)?.unwrap_or_default(),
            batch_pauses,
            awaiting_condition,
            rollout: decode(data.pointer("/status/rollout"), "status.rollout", ns, name)?,
            aggregate: aggregate.map(Counts::from),
            annotations: d.metadata.annotations.clone().unwrap_or_default(),
        })
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }

    /// `status.currentRevision`: the revision the spec is now.
    pub fn current_revision(&self) -> Option<u64> {
        self.current_revision
    }

    fn reference(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    /// The operator has not yet acted on the latest spec (or never wrote status):
    /// what status says may be about an older one.
    pub fn spec_not_observed(&self) -> Option<String> {
        let generation = self.generation?;
        match self.observed_generation {
            Some(o) if o >= generation => None,
            Some(o) => Some(format!(
                "the operator has not acted on the latest spec yet (generation {generation}, status is about {o})"
            )),
            None => Some("the operator has written no status for this Deployment yet".to_owned()),
        }
    }

    /// `status.rollout`, if it is about the revision the spec is now.
    fn current_rollout(&self) -> Option<&RolloutStatus> {
        self.rollout
            .as_ref()
            .filter(|r| self.current_revision.is_none_or(|c| c == r.revision))
    }

    /// The rollout on display is of an older revision than the spec's.
    fn stale_rollout(&self) -> Option<(u64, u64)> {
        match (&self.rollout, self.current_revision) {
            (Some(r), Some(c)) if r.revision != c => Some((r.revision, c)),
            _ => None,
        }
    }

    /// Paused at a batch that waits to be promoted (rather than only by
    /// `spec.rollout.paused`, which `resume` undoes).
    pub fn awaiting_promotion(&self) -> bool {
        let Some(r) = self.current_rollout() else {
            return false;
        };
        if r.phase != RolloutPhase::Paused {
            return false;
        }
        // Paused has two causes: spec.rollout.paused, and a `pause: {}` batch that
        // passed. Without the first, it is the second.
        let index = r.current_batch.saturating_sub(1) as usize;
        let batch_passed = r.batches.get(index).is_some_and(|b| b.passed_at.is_some());
        !self.paused || self.awaiting_condition || (batch_passed && self.batch_pauses.get(index) == Some(&true))
    }

    pub fn verdict(&self) -> Verdict {
        if !self.has_rollout_spec {
            return self.verdict_at_once();
        }
        if let Some(why) = self.spec_not_observed() {
            return Verdict::Waiting(why);
        }
        let Some(r) = &self.rollout else {
            return Verdict::Waiting("the operator has not started a rollout yet (no status.rollout)".into());
        };
        if let Some((shown, current)) = self.stale_rollout() {
            return Verdict::Waiting(format!(
                "the spec is revision {current}, whose rollout has not started yet (status.rollout is about revision {shown})"
            ));
        }
        let what = describe(r);
        match r.phase {
            RolloutPhase::Complete => Verdict::Complete,
            RolloutPhase::RolledBack | RolloutPhase::Suspended => Verdict::Failed(what),
            _ => Verdict::Waiting(what),
        }
    }

    /// Without `spec.rollout`: complete when every target runs the current revision.
    fn verdict_at_once(&self) -> Verdict {
        let Some(a) = &self.aggregate else {
            return Verdict::Waiting("no device has reported yet (no status.aggregate)".into());
        };
        match (self.generation, a.observed_generation) {
            (Some(g), Some(o)) if o < g => {
                return Verdict::Waiting(format!(
                    "the device counts are about an older spec (generation {o}, the spec is {g})"
                ));
            }
            _ => {}
        }
        match (self.current_revision, a.revision) {
            (Some(c), Some(r)) if c != r => {
                return Verdict::Waiting(format!(
                    "the device counts are about revision {r}, the spec is revision {c}"
                ));
            }
            _ => {}
        }
        if a.targets == 0 {
            return Verdict::Waiting("the Deployment targets no device".into());
        }
        if a.succeeded == a.targets {
            return Verdict::Complete;
        }
        Verdict::Waiting(format!(
            "{}/{} devices run the current revision; {} failed, {} pending, {} unreported",
            a.succeeded, a.targets, a.failed, a.pending, a.unreported
        ))
    }

    /// The whole report, as `iotctl rollout status` prints it; `bars`: draw a
    /// progress bar per batch (on a terminal).
    pub fn render(&self, bars: bool, now: DateTime<Utc>) -> String {
        let mut s = String::new();
        let reference = self.reference();
        if !self.has_rollout_spec {
            s.push_str(&format!(
                "{reference}: no spec.rollout: every matched device gets a new revision at once\n"
            ));
            self.render_aggregate(&mut s);
            s.push_str("(add spec.rollout to roll new revisions out in batches, gated on what devices report)\n");
            return s;
        }
        let Some(r) = &self.rollout else {
            s.push_str(&format!(
                "{reference}: progressive rollout (spec.rollout); the operator has not started one yet (no status.rollout)\n"
            ));
            if let Some(c) = self.current_revision {
                s.push_str(&format!("revision: {c}\n"));
            }
            if self.paused {
                s.push_str("paused:   spec.rollout.paused is set: nothing is dispatched until it is resumed\n");
            }
            self.render_next(&mut s);
            return s;
        };
        let stable = r
            .stable_revision
            .map(|s| format!(" (stable revision {s})"))
            .unwrap_or_default();
        s.push_str(&format!(
            "{reference}: progressive rollout of revision {}{stable}\n",
            r.revision
        ));
        let summary = if r.summary.is_empty() {
            format!("batch {}/{}", r.current_batch, r.batches.len())
        } else {
            r.summary.clone()
        };
        let reason = r.reason.as_deref().map(|r| format!(", reason {r}")).unwrap_or_default();
        s.push_str(&format!("phase:    {:?} ({summary}){reason}\n", r.phase));
        if !r.message.is_empty() {
            s.push_str(&format!("message:  {}\n", r.message));
        }
        s.push_str(&format!(
            "started:  {} ({} ago), {} device(s) matched then\n",
            r.started_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            age((now - r.started_at).num_seconds()),
            r.matched_at_start
        ));
        if let (Some(w), RolloutPhase::Paused) = (r.waiting_since, r.phase) {
            s.push_str(&format!(
                "waiting:  for a person since {} ({}); not counted against the progress deadline\n",
                w.to_rfc3339_opts(SecondsFormat::Secs, true),
                age((now - w).num_seconds())
            ));
        }
        if let Some(f) = r.finished_at {
            s.push_str(&format!(
                "finished: {} ({} ago)\n",
                f.to_rfc3339_opts(SecondsFormat::Secs, true),
                age((now - f).num_seconds())
            ));
        }
        if let Some(n) = self.max_concurrent_pulls {
            s.push_str(&format!(
                "pulls:    at most {n} device(s) pull at once (spec.rollout.maxConcurrentPulls); the rest wait as PENDING-PULL\n"
            ));
        }
        self.render_images(&mut s);
        if self.paused {
            s.push_str("paused:   spec.rollout.paused is set: nothing more is dispatched until it is resumed\n");
        }
        if let Some(requested) = self.requested(r) {
            s.push_str(&format!("asked:    {requested}; waiting for the operator\n"));
        }
        if let Some((shown, current)) = self.stale_rollout() {
            s.push_str(&format!(
                "note:     the spec is now revision {current}; its rollout has not started yet (shown: revision {shown})\n"
            ));
        } else if let Some(why) = self.spec_not_observed() {
            s.push_str(&format!("note:     {why}\n"));
        }
        s.push('\n');
        s.push_str(&batch_table(r, bars));
        if !r.failure_clusters.is_empty() {
            s.push('\n');
            s.push_str(&render_clusters(&r.failure_clusters));
        }
        self.render_next(&mut s);
        s
    }

    /// A promote or abort of this rollout that was asked for and that the operator
    /// has not acted on yet.
    fn requested(&self, r: &RolloutStatus) -> Option<String> {
        if self.annotation(ABORT_ANNOTATION) == Some(r.revision.to_string().as_str())
            && !matches!(r.phase, RolloutPhase::RollingBack | RolloutPhase::RolledBack)
        {
            return Some(format!("abort of revision {} ({ABORT_ANNOTATION})", r.revision));
        }
        let promote = promote_value(r.revision, r.current_batch);
        if self.annotation(PROMOTE_ANNOTATION) == Some(promote.as_str()) && r.phase == RolloutPhase::Paused {
            return Some(format!(
                "promotion of batch {}/{} ({PROMOTE_ANNOTATION}={promote})",
                r.current_batch,
                r.batches.len()
            ));
        }
        None
    }

    /// `images:` lines, one per pinned image, with the whole digest.
    fn render_images(&self, s: &mut String) {
        for (i, line) in crate::table::pinned_images(&self.images, false).iter().enumerate() {
            let label = if i == 0 { "images:" } else { "" };
            s.push_str(&format!("{label:<10}{line}\n"));
        }
    }

    fn render_aggregate(&self, s: &mut String) {
        if let Some(c) = self.current_revision {
            s.push_str(&format!("revision: {c}\n"));
        }
        self.render_images(s);
        match &self.aggregate {
            None => s.push_str("devices:  none has reported yet\n"),
            Some(a) => s.push_str(&format!(
                "devices:  {}; {} succeeded, {} failed, {} pending, {} unreported of {} target(s)\n",
                a.revision_summary.as_deref().unwrap_or("-"),
                a.succeeded,
                a.failed,
                a.pending,
                a.unreported,
                a.targets
            )),
        }
    }

    fn render_next(&self, s: &mut String) {
        let next = self.next_steps();
        if next.is_empty() {
            return;
        }
        s.push('\n');
        for (i, (command, why)) in next.iter().enumerate() {
            let label = if i == 0 { "next:" } else { "  or:" };
            s.push_str(&format!("{label} {command}   # {why}\n"));
        }
    }

    /// The commands that move the rollout on from where it stands, with why.
    pub fn next_steps(&self) -> Vec<(String, String)> {
        let reference = self.reference();
        let cmd = |verb: &str| format!("iotctl rollout {verb} {reference}");
        let watch = || (format!("{} --watch", cmd("status")), "follow it".to_owned());
        if !self.has_rollout_spec {
            return Vec::new();
        }
        let mut steps = Vec::new();
        if self.paused {
            steps.push((cmd("resume"), "dispatch again (spec.rollout.paused is set)".to_owned()));
        }
        let Some(r) = self.current_rollout() else {
            if steps.is_empty() {
                steps.push(watch());
            }
            return steps;
        };
        let stable = r
            .stable_revision
            .map(|s| format!("revision {s}"))
            .unwrap_or_else(|| "the last good revision".to_owned());
        match r.phase {
            RolloutPhase::Paused if self.awaiting_promotion() => {
                steps.push((
                    cmd("promote"),
                    format!(
                        "batch {}/{} passed and waits for you: go on with the next",
                        r.current_batch,
                        r.batches.len()
                    ),
                ));
                steps.push((
                    cmd("abort"),
                    format!("roll the devices that got revision {} back to {stable}", r.revision),
                ));
            }
            RolloutPhase::Paused => {}
            RolloutPhase::Progressing => {
                steps.push(watch());
                steps.push((cmd("pause"), "stop dispatching, keep every device as it is".to_owned()));
            }
            RolloutPhase::Suspended => {
                steps.push((
                    cmd("abort"),
                    format!("roll the devices that got revision {} back to {stable}", r.revision),
                ));
                steps.push((
                    cmd("undo"),
                    "write the previous revision's score back into the spec (a new revision)".to_owned(),
                ));
            }
            RolloutPhase::RollingBack => steps.push(watch()),
            RolloutPhase::RolledBack => steps.push((
                cmd("undo"),
                format!(
                    "the devices run {stable} again, but the spec still says revision {}: make the spec match",
                    r.revision
                ),
            )),
            RolloutPhase::Complete => {}
        }
        steps
    }
}

/// The rollout in a phrase: "the rollout of revision 4 is progressing (batch 2/4,
/// 37/120)", and the operator's message.
pub fn describe(r: &RolloutStatus) -> String {
    let phase = match r.phase {
        RolloutPhase::Progressing => "progressing",
        RolloutPhase::Paused => "paused",
        RolloutPhase::Suspended => "suspended",
        RolloutPhase::RollingBack => "rolling back",
        RolloutPhase::RolledBack => "rolled back",
        RolloutPhase::Complete => "complete",
    };
    let summary = if r.summary.is_empty() {
        format!("batch {}/{}", r.current_batch, r.batches.len())
    } else {
        r.summary.clone()
    };
    let mut text = format!("the rollout of revision {} is {phase} ({summary})", r.revision);
    if !r.message.is_empty() {
        text.push_str(": ");
        text.push_str(&r.message);
    }
    text
}

/// Devices of a batch that failed one way or another.
fn failures(b: &BatchStatus) -> u32 {
    b.failed + b.timed_out + b.silent + b.never_acknowledged
}

fn batch_state(r: &RolloutStatus, number: u32, b: &BatchStatus) -> &'static str {
    use std::cmp::Ordering::*;
    match number.cmp(&r.current_batch) {
        Less => {
            if b.passed_at.is_some() {
                "passed"
            } else {
                "done"
            }
        }
        Equal => match r.phase {
            RolloutPhase::Progressing if b.passed_at.is_some() => "baking",
            RolloutPhase::Progressing => "in progress",
            RolloutPhase::Paused if b.passed_at.is_some() => "passed, waiting",
            RolloutPhase::Paused => "paused",
            RolloutPhase::Suspended => "suspended",
            RolloutPhase::RollingBack => "rolling back",
            RolloutPhase::RolledBack => "rolled back",
            RolloutPhase::Complete => "passed",
        },
        Greater => match r.phase {
            RolloutPhase::Complete => "passed",
            RolloutPhase::RollingBack | RolloutPhase::RolledBack => "not started",
            _ => "waiting",
        },
    }
}

/// One cell per 1/BAR_CELLS of the batch: █ succeeded, ▓ failed, ▒ dispatched
/// and not done yet, ░ not dispatched.
fn bar(b: &BatchStatus) -> String {
    let total = b.selected.max(b.dispatched);
    if total == 0 {
        return "░".repeat(BAR_CELLS);
    }
    let cells =
        |n: u32| ((u64::from(n.min(total)) * BAR_CELLS as u64 + u64::from(total) / 2) / u64::from(total)) as usize;
    let done = b.succeeded;
    let failed = done.saturating_add(failures(b));
    let dispatched = b.dispatched.max(failed);
    let (a, f, d) = (cells(done), cells(failed), cells(dispatched));
    format!(
        "{}{}{}{}",
        "█".repeat(a),
        "▓".repeat(f.saturating_sub(a)),
        "▒".repeat(d.saturating_sub(f.max(a))),
        "░".repeat(BAR_CELLS.saturating_sub(d.max(f).max(a)))
    )
}

fn batch_table(r: &RolloutStatus, bars: bool) -> String {
    let mut header = vec!["BATCH", "STATE"];
    if bars {
        header.push("PROGRESS");
    }
    header.extend([
        "SELECTED",
        "DISPATCHED",
        "SUCCEEDED",
        "FAILED",
        "TIMED-OUT",
        "SILENT",
        "NEVER-ACK",
        "OFFLINE",
        "PENDING-PULL",
    ]);
    let mut t = Table::new(&header);
    for (i, b) in r.batches.iter().enumerate() {
        let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let mut row = vec![
            format!("{number}/{}", r.batches.len()),
            batch_state(r, number, b).to_owned(),
        ];
        if bars {
            row.push(bar(b));
        }
        row.extend(
            [
                b.selected,
                b.dispatched,
                b.succeeded,
                b.failed,
                b.timed_out,
                b.silent,
                b.never_acknowledged,
                b.pending_offline,
                b.pending_pull,
            ]
            .map(|n| n.to_string()),
        );
        t.row(row);
    }
    let mut text = t.render();
    if bars {
        text.push_str("(█ succeeded  ▓ failed  ▒ updating  ░ not dispatched)\n");
    }
    text
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn render_clusters(clusters: &[FailureCluster]) -> String {
    let mut s = format!("failures, grouped by error ({}):\n", clusters.len());
    for c in clusters {
        s.push_str(&format!("  {} device(s): {}\n", c.devices, c.message));
        if !c.shared_labels.is_empty() {
            s.push_str(&format!(
                "    shared labels: {}   (all of these devices have them, not all matched devices)\n",
                labels_text(&c.shared_labels)
            ));
        }
        if !c.example_devices.is_empty() {
            s.push_str(&format!("    for example:   {}\n", c.example_devices.join(", ")));
        }
    }
    s
}

fn deployments(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<Deployment>(&()))
}

/// `iotctl rollout status`: prints the rollout once, or (`watch`) every time it
/// changes until it completes, fails for good, or `timeout` passes. Ok only when
/// complete.
pub async fn status(
    client: &kube::Client,
    ns: &str,
    name: &str,
    watch: bool,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    if !watch {
        let dep = crate::rollout::get_deployment(client, ns, name).await?;
        let view = View::of(&dep, ns, name)?;
        if json {
            crate::print_json(&raw_rollout(&dep))?;
        } else {
            out::text(&view.render(tty, Utc::now()));
        }
        return match view.verdict() {
            Verdict::Complete => Ok(()),
            Verdict::Failed(why) => anyhow::bail!("{ns}/{name}: {why}"),
            Verdict::Waiting(why) => anyhow::bail!("{ns}/{name}: not complete: {why}"),
        };
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_SECONDS);
    // The watcher lists, then watches from the list's resourceVersion, and starts
    // over by itself when a watch ends or the server has forgotten that version
    // (410); the backoff paces its retries after errors.
    let mut events = watcher(deployments(client, ns), config).default_backoff().boxed();
    let mut shown: Option<View> = None;
    let mut drawn_lines = 0usize;
    let mut seen_in_list = false;
    let mut interrupted = false;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, events.try_next()).await {
                Ok(n) => n,
                Err(_) => {
                    let why = match &shown {
                        Some(v) => match v.verdict() {
                            Verdict::Waiting(why) | Verdict::Failed(why) => why,
                            Verdict::Complete => "complete".into(),
                        },
                        None => "the Deployment was never read".into(),
                    };
                    anyhow::bail!(
                        "{ns}/{name}: the rollout did not complete within {}: {why}",
                        humantime::format_duration(timeout.unwrap_or_default())
                    );
                }
            },
            None => events.try_next().await,
        };
        let dep = match next {
            Ok(Some(watcher::Event::Init)) => {
                seen_in_list = false;
                continue;
            }
            Ok(Some(watcher::Event::InitDone)) => {
                if !seen_in_list {
                    anyhow::bail!("no Deployment {ns}/{name}");
                }
                continue;
            }
            Ok(Some(watcher::Event::Delete(_))) => anyhow::bail!("{ns}/{name} was deleted"),
            Ok(Some(watcher::Event::InitApply(d))) => {
                seen_in_list = true;
                d
            }
            Ok(Some(watcher::Event::Apply(d))) => d,
            Ok(None) => anyhow::bail!("the watch of {ns}/{name} ended"),
            Err(e) => {
                if let Some(fatal) = fatal_watch_error(&e, ns, name) {
                    anyhow::bail!(fatal);
                }
                if !interrupted {
                    out::warn(&format!(
                        "iotctl: the watch of {ns}/{name} was interrupted ({e}); retrying"
                    ));
                    interrupted = true;
                }
                continue;
            }
        };
        interrupted = false;
        let view = View::of(&dep, ns, name)?;
        if shown.as_ref() != Some(&view) {
            if json {
                out::line(&serde_json::to_string(&raw_rollout(&dep))?);
            } else {
                let text = view.render(tty, Utc::now());
                if tty && drawn_lines > 0 {
                    // Redraw in place: up over the last report, clear to the end.
                    out::text(&format!("\x1b[{drawn_lines}A\x1b[J{text}"));
                } else if shown.is_some() {
                    out::text(&format!("\n{text}"));
                } else {
                    out::text(&text);
                }
                drawn_lines = text.lines().count();
            }
        }
        let verdict = view.verdict();
        shown = Some(view);
        match verdict {
            Verdict::Complete => return Ok(()),
            Verdict::Failed(why) => anyhow::bail!("{ns}/{name}: {why}"),
            Verdict::Waiting(_) => {}
        }
    }
}

/// `status.rollout` exactly as the operator wrote it (`null` when there is none).
fn raw_rollout(d: &DynamicObject) -> Value {
    d.data.pointer("/status/rollout").cloned().unwrap_or(Value::Null)
}

/// Errors no retry mends: the user may not read the Deployment, or its CRD is not
/// installed.
fn fatal_watch_error(e: &watcher::Error, ns: &str, name: &str) -> Option<String> {
    let (watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e)) = e else {
        return None;
    };
    if let Some(denied) = k8s::permission_denied(e, "watch", crate::rollout::RESOURCE, ns) {
        return Some(denied);
    }
    match e {
        kube::Error::Api(s) if s.code == 404 => Some(format!(
            "cannot watch {ns}/{name}: the Deployment CRD is not installed (run `iot-operator install`)"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(spec_rollout: Value, status: Value) -> DynamicObject {
        let mut d = DynamicObject::new("web", &ApiResource::erase::<Deployment>(&())).within("default");
        d.metadata.generation = Some(3);
        d.data = json!({
            "spec": {"targetDevices": ["pi-1"], "score": {}, "rollout": spec_rollout},
            "status": status,
        });
        d
    }

    fn rollout(phase: &str, current_batch: u32, batches: Value) -> Value {
        json!({
            "revision": 4, "stableRevision": 3, "phase": phase, "currentBatch": current_batch,
            "matchedAtStart": 10, "startedAt": "2026-01-01T00:00:00Z", "batches": batches,
            "summary": format!("batch {current_batch}/2, 1/10"),
        })
    }

    fn view(spec_rollout: Value, status: Value) -> View {
        View::of(&object(spec_rollout, status), "default", "web").expect("decodes")
    }

    #[test]
    fn complete_only_for_the_current_revision_and_the_latest_spec() {
        let batches = json!([{"selected": 1, "succeeded": 1}, {"selected": 9, "succeeded": 9}]);
        let done =
            json!({"observedGeneration": 3, "currentRevision": 4, "rollout": rollout("Complete", 2, batches.clone())});
        assert_eq!(view(json!({}), done).verdict(), Verdict::Complete);
        let newer =
            json!({"observedGeneration": 3, "currentRevision": 5, "rollout": rollout("Complete", 2, batches.clone())});
        assert!(matches!(view(json!({}), newer).verdict(), Verdict::Waiting(w) if w.contains("revision 5")));
        let old_spec =
            json!({"observedGeneration": 2, "currentRevision": 4, "rollout": rollout("Complete", 2, batches.clone())});
        assert!(matches!(view(json!({}), old_spec).verdict(), Verdict::Waiting(w) if w.contains("generation 3")));
        let back = json!({"observedGeneration": 3, "currentRevision": 4, "rollout": rollout("RolledBack", 1, batches)});
        assert!(matches!(view(json!({}), back).verdict(), Verdict::Failed(w) if w.contains("rolled back")));
        assert!(matches!(
            view(json!({}), json!({"observedGeneration": 3})).verdict(),
            Verdict::Waiting(w) if w.contains("no status.rollout")
        ));
    }

    #[test]
    fn without_spec_rollout_the_aggregate_decides() {
        let status = |succeeded: u32| {
            json!({"observedGeneration": 3, "currentRevision": 2, "aggregate": {
                "observedGeneration": 3, "specHash": "h", "targets": 2, "succeeded": succeeded,
                "failed": 0, "pending": 2 - succeeded, "unreported": 0, "revision": 2,
                "revisionSummary": format!("{succeeded}/2 on rev 2"),
            }})
        };
        let all = view(Value::Null, status(2));
        assert_eq!(all.verdict(), Verdict::Complete);
        assert!(
            all.render(false, Utc::now())
                .contains("every matched device gets a new revision at once")
        );
        assert!(matches!(view(Value::Null, status(1)).verdict(), Verdict::Waiting(w) if w.contains("1/2 devices")));
    }

    #[test]
    fn promotion_is_awaited_only_when_paused_at_a_passed_pause_batch() {
        let passed = json!([{"selected": 1, "succeeded": 1, "passedAt": "2026-01-01T00:01:00Z"}, {"selected": 9}]);
        let status = |phase: &str| json!({"observedGeneration": 3, "currentRevision": 4, "rollout": rollout(phase, 1, passed.clone())});
        assert!(view(json!({"batches": [{"limit": 1, "pause": {}}]}), status("Paused")).awaiting_promotion());
        assert!(!view(json!({"batches": [{"limit": 1, "pause": {}}]}), status("Progressing")).awaiting_promotion());
        // Paused by the flag at a batch without `pause: {}`: resume, not promote.
        let flag = view(json!({"paused": true, "batches": [{"limit": 1}]}), status("Paused"));
        assert!(!flag.awaiting_promotion());
        assert_eq!(flag.next_steps()[0].0, "iotctl rollout resume default/web");
        // Both: a pause batch that passed while the flag is set.
        assert!(
            view(
                json!({"paused": true, "batches": [{"limit": 1, "pause": {}}]}),
                status("Paused")
            )
            .awaiting_promotion()
        );
    }

    #[test]
    fn bars_and_plain_lines() {
        let b = BatchStatus {
            selected: 10,
            dispatched: 6,
            succeeded: 3,
            failed: 1,
            timed_out: 1,
            ..Default::default()
        };
        let drawn = bar(&b);
        assert_eq!(drawn.chars().count(), BAR_CELLS);
        assert_eq!(
            drawn,
            format!("{}{}{}{}", "█".repeat(6), "▓".repeat(4), "▒".repeat(2), "░".repeat(8))
        );
        assert_eq!(bar(&BatchStatus::default()), "░".repeat(BAR_CELLS));
        let full = BatchStatus {
            selected: 3,
            dispatched: 3,
            succeeded: 3,
            ..Default::default()
        };
        assert_eq!(bar(&full), "█".repeat(BAR_CELLS));
        let batches = json!([{"selected": 1, "dispatched": 1, "succeeded": 1, "passedAt": "2026-01-01T00:01:00Z"}, {"selected": 9, "dispatched": 4, "succeeded": 1}]);
        let v = view(
            json!({}),
            json!({"observedGeneration": 3, "currentRevision": 4, "rollout": rollout("Progressing", 2, batches)}),
        );
        let plain = v.render(false, Utc::now());
        assert!(!plain.contains('█') && !plain.contains('░'), "{plain}");
        let rows: Vec<Vec<&str>> = plain
            .lines()
            .skip_while(|l| !l.starts_with("BATCH"))
            .take(3)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[1],
            ["1/2", "passed", "1", "1", "1", "0", "0", "0", "0", "0", "0"],
            "{plain}"
        );
        assert_eq!(rows[2][..3], ["2/2", "in", "progress"], "{plain}");
        let tty = v.render(true, Utc::now());
        assert!(
            tty.contains("PROGRESS") && tty.contains(&"█".repeat(BAR_CELLS)),
            "{tty}"
        );
    }

    #[test]
    fn failure_clusters_show_shared_labels_and_examples() {
        let mut status = rollout(
            "RolledBack",
            1,
            json!([{"selected": 3, "dispatched": 3, "failed": 2, "succeeded": 1}]),
        );
        status["reason"] = json!("BatchFailed");
        status["failureClusters"] = json!([{
            "message": "exec format error", "devices": 2, "exampleDevices": ["pi-2", "pi-3"],
            "sharedLabels": {"hw": "rpi3"},
        }]);
        let v = view(
            json!({}),
            json!({"observedGeneration": 3, "currentRevision": 4, "rollout": status}),
        );
        let text = v.render(false, Utc::now());
        assert!(
            text.contains("phase:    RolledBack (batch 1/2, 1/10), reason BatchFailed\n"),
            "{text}"
        );
        assert!(text.contains("2 device(s): exec format error"), "{text}");
        assert!(text.contains("shared labels: hw=rpi3"), "{text}");
        assert!(text.contains("pi-2, pi-3"), "{text}");
        assert!(text.contains("next: iotctl rollout undo default/web"), "{text}");
    }

    #[test]
    fn pull_slots_pending_pulls_and_pinned_images_are_shown() {
        let digest = format!("sha256:{}", "ab12cd34ef56".repeat(5) + "ab12");
        let batches = json!([{"selected": 5, "dispatched": 2, "pendingPull": 3}]);
        let v = view(
            json!({"maxConcurrentPulls": 2}),
            json!({"observedGeneration": 3, "currentRevision": 4, "rollout": rollout("Progressing", 1, batches),
                   "images": [{"image": "10.77.0.1:5000/iot/web:1.2", "digest": digest}]}),
        );
        let text = v.render(false, Utc::now());
        assert!(
            text.contains(
                "pulls:    at most 2 device(s) pull at once (spec.rollout.maxConcurrentPulls); the rest wait as PENDING-PULL\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!("images:   10.77.0.1:5000/iot/web:1.2 -> {digest}\n")),
            "{text}"
        );
        let header: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("BATCH"))
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(header.last(), Some(&"PENDING-PULL"), "{text}");
        let row: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("1/1"))
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(row.last(), Some(&"3"), "{text}");
    }
}
