//! `iotctl rollout`: a Deployment's `DeploymentRevision`s and its progressive
//! rollout.
//!
//! - `history|undo`: the revisions, and writing an earlier one's score back into
//!   the Deployment. Undo writes `spec.score` of the Deployment itself (a JSON merge
//!   patch under the object's resourceVersion), so what runs stays what the
//!   Deployment says: a Git- or kubectl-driven workflow sees the change, and the
//!   operator records it as a new revision. History only grows forward.
//! - `status` ([`rollout_status`]): where the rollout stands, once or followed.
//! - `pause|resume|promote|abort`: ordinary edits of the Deployment
//!   (`spec.rollout.paused`, and the promote and abort annotations), so RBAC
//!   decides who may use them: whoever may patch the Deployment. The annotations
//!   name the revision (and batch) they act on, so a stale one never acts on a later
//!   rollout.

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use iot_api::revision::revisions_of;
use iot_api::rollout::promote_value;
use iot_api::{
    ABORT_ANNOTATION, Deployment, DeploymentRevision, IotScore, PROMOTE_ANNOTATION, RolloutPhase, RolloutStatus,
};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::rollout_status::{self, View, describe};
use crate::table::Table;
use crate::{k8s, out, print_json};

/// Attempts at writing the score when others keep changing the Deployment (the
/// operator writes its status often, which moves its resourceVersion).
const WRITE_ATTEMPTS: usize = 5;

/// The resource, as RBAC and permission errors name it.
pub(crate) const RESOURCE: &str = "deployments.iot.nationtech.io";

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// The Deployment's revisions, oldest first, the current one marked (the
    /// operator records one for every change of spec.score).
    History {
        /// The Deployment, as NAMESPACE/NAME.
        deployment: String,
    },
    /// Write an earlier revision's score back into the Deployment's spec.score; the
    /// operator records it as a new revision. Default: the last good revision (a
    /// rollout's stable one), else the revision before the current one.
    Undo {
        /// The Deployment, as NAMESPACE/NAME.
        deployment: String,
        /// The revision whose score to write back.
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// Where the rollout stands: phase, revisions, each batch's devices, failures
    /// grouped by error, and the command to run next. Exit code 0 only when the
    /// rollout of the current revision is complete (without spec.rollout: when every
    /// target runs it), 1 otherwise. `-o json` prints status.rollout.
    Status {
        /// The Deployment, as NAMESPACE/NAME.
        deployment: String,
        /// Follow the rollout, printing it at every change, until it completes (exit
        /// 0), is rolled back or suspended (exit 1), or --timeout passes (exit 1).
        #[arg(short, long)]
        watch: bool,
        /// With --watch: give up after this long (e.g. 10m).
        #[arg(long, requires = "watch", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Stop dispatching the new revision to more devices (sets spec.rollout.paused);
    /// devices keep what they have, and gates keep being checked.
    Pause {
        /// The Deployment, as NAMESPACE/NAME.
        deployment: String,
    },
    /// Dispatch again after `pause` (removes spec.rollout.paused).
    Resume {
        /// The Deployment, as NAMESPACE/NAME.
        deployment: String,
    },
    /// Go on past a batch with `pause: {}` that passed and waits for a person (the
    /// rollout-promote annotation, naming the revision and batch).
    Promote {
        /// The Deployment, as NAMESPACE/NAME.
        deployment: String,
    },
    /// Stop the rollout and roll the devices that received the new revision back to
    /// the stable one (the rollout-abort annotation, naming the revision).
    Abort {
        /// The Deployment, as NAMESPACE/NAME.
        deployment: String,
    },
}

pub async fn rollout(cmd: &RolloutCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        RolloutCmd::History { deployment } => {
            let (ns, name) = parse_ref(deployment)?;
            history(&k8s::client().await?, ns, name, json).await
        }
        RolloutCmd::Undo {
            deployment,
            to_revision,
        } => {
            let (ns, name) = parse_ref(deployment)?;
            undo(&k8s::client().await?, ns, name, *to_revision, json).await
        }
        RolloutCmd::Status {
            deployment,
            watch,
            timeout,
        } => {
            let (ns, name) = parse_ref(deployment)?;
            rollout_status::status(&k8s::client().await?, ns, name, *watch, *timeout, json).await
        }
        RolloutCmd::Pause { deployment } => {
            let (ns, name) = parse_ref(deployment)?;
            set_paused(&k8s::client().await?, ns, name, true, json).await
        }
        RolloutCmd::Resume { deployment } => {
            let (ns, name) = parse_ref(deployment)?;
            set_paused(&k8s::client().await?, ns, name, false, json).await
        }
        RolloutCmd::Promote { deployment } => {
            let (ns, name) = parse_ref(deployment)?;
            promote(&k8s::client().await?, ns, name, json).await
        }
        RolloutCmd::Abort { deployment } => {
            let (ns, name) = parse_ref(deployment)?;
            abort(&k8s::client().await?, ns, name, json).await
        }
    }
}

fn parse_ref(s: &str) -> anyhow::Result<(&str, &str)> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => anyhow::bail!("{s:?}: give the Deployment as NAMESPACE/NAME"),
    }
}

fn deployments(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<Deployment>(&()))
}

/// The Deployment as the API server holds it (every field, known to iotctl or not).
pub(crate) async fn get_deployment(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<DynamicObject> {
    match deployments(client, ns).get_opt(name).await {
        Ok(Some(d)) => Ok(d),
        Ok(None) => anyhow::bail!("no Deployment {ns}/{name}"),
        Err(e) if k8s::is_missing_kind(&e) => {
            anyhow::bail!("the Deployment CRD is not installed (run `iot-operator install`)")
        }
        Err(e) => match k8s::permission_denied(&e, "get", RESOURCE, ns) {
            Some(denied) => anyhow::bail!("cannot read Deployment {ns}/{name}: {denied}"),
            None => anyhow::bail!("cannot read Deployment {ns}/{name}: {}", k8s::describe(&e)),
        },
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some("iotctl".into()),
        ..Default::default()
    }
}

/// Why a write of the Deployment was refused, in one line: who may not (403), or
/// the API server's own words.
fn write_error(e: &kube::Error, ns: &str) -> String {
    k8s::permission_denied(e, "patch", RESOURCE, ns).unwrap_or_else(|| k8s::describe(e))
}

/// `status.currentRevision`, when the operator has written it.
fn current_revision(d: &DynamicObject) -> Option<u64> {
    d.data.pointer("/status/currentRevision")?.as_u64()
}

/// The revision to go back to by default: the stable revision of a rollout of the
/// current revision, else the last revision every target ran.
fn last_good_revision(d: &DynamicObject) -> Option<u64> {
    let current = current_revision(d);
    let rollout = d.data.pointer("/status/rollout");
    let stable = rollout
        .filter(|r| r.pointer("/revision").and_then(Value::as_u64) == current)
        .and_then(|r| r.pointer("/stableRevision")?.as_u64());
    stable.or_else(|| d.data.pointer("/status/aggregate/lastGoodRevision")?.as_u64())
}

fn raw_score(d: &DynamicObject) -> Value {
    d.data.pointer("/spec/score").cloned().unwrap_or(Value::Null)
}

/// The Deployment's revisions (by the label the operator puts on each), sorted by
/// number.
async fn revisions(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Vec<DeploymentRevision>> {
    let api: Api<DeploymentRevision> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default().labels(&revisions_of(name)))
        .await
        .map_err(|e| {
            if k8s::is_missing_kind(&e) {
                anyhow::anyhow!("the DeploymentRevision CRD is not installed (run `iot-operator install`)")
            } else {
                anyhow::anyhow!("cannot list the revisions of {ns}/{name}: {}", k8s::describe(&e))
            }
        })?;
    let mut revs = list.items;
    revs.sort_by_key(|r| r.spec.revision);
    Ok(revs)
}

/// The images a score runs, in the order of its services.
fn images(score: &IotScore) -> Vec<String> {
    match score {
        IotScore::PodmanV0(s) => s.services.iter().map(|s| s.image.clone()).collect(),
    }
}

fn images_text(images: &[String]) -> String {
    if images.is_empty() {
        "-".into()
    } else {
        images.join(",")
    }
}

async fn history(client: &kube::Client, ns: &str, name: &str, json: bool) -> anyhow::Result<()> {
    let dep = get_deployment(client, ns, name).await?;
    let current = current_revision(&dep);
    let revs = revisions(client, ns, name).await?;
    let created = |r: &DeploymentRevision| r.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
    if json {
        let items: Vec<Value> = revs
            .iter()
            .map(|r| {
                json!({
                    "revision": r.spec.revision,
                    "name": r.metadata.name,
                    "specHash": r.spec.spec_hash,
                    "createdAt": created(r),
                    "images": images(&r.spec.score),
                    "current": Some(r.spec.revision) == current,
                    "score": r.spec.score,
                })
            })
            .collect();
        return print_json(&items);
    }
    if revs.is_empty() {
        out::warn(&format!(
            "{ns}/{name} has no recorded revisions yet (the operator records one for every change of spec.score)"
        ));
        return Ok(());
    }
    let mut t = Table::new(&["REVISION", "CURRENT", "SPEC-HASH", "CREATED", "IMAGES"]);
    for r in &revs {
        t.row(vec![
            r.spec.revision.to_string(),
            if Some(r.spec.revision) == current { "yes" } else { "-" }.into(),
            r.spec.spec_hash.clone(),
            created(r).unwrap_or_else(|| "-".into()),
            images_text(&images(&r.spec.score)),
        ]);
    }
    out::text(&t.render());
    match current {
        None => out::warn(&format!(
            "note: {ns}/{name} names no current revision yet (status.currentRevision)"
        )),
        Some(c) if !revs.iter().any(|r| r.spec.revision == c) => out::warn(&format!(
            "note: the current revision of {ns}/{name}, {c}, is not among the kept ones"
        )),
        Some(_) => {}
    }
    Ok(())
}

/// Which revision `undo` goes back to, of the kept `numbers` (ascending): `to` if
/// given; else the last good one (what every device last ran at once, and what a
/// rollback goes back to) when it is kept and not the current one; else the highest
/// below `current`; else (no current revision known) the second-highest. The last
/// good one comes first because the revision just before a bad one may itself have
/// been bad (rolled back).
fn undo_target(numbers: &[u64], current: Option<u64>, last_good: Option<u64>, to: Option<u64>) -> Result<u64, String> {
    let kept = || {
        if numbers.is_empty() {
            "none".to_owned()
        } else {
            numbers.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        }
    };
    let good = last_good.filter(|g| numbers.contains(g) && Some(*g) != current);
    match (to, current) {
        (Some(n), _) if numbers.contains(&n) => Ok(n),
        (Some(n), _) => Err(format!("no revision {n} (kept: {})", kept())),
        (None, _) if good.is_some() => good.ok_or_else(String::new),
        (None, Some(c)) => numbers
            .iter()
            .rev()
            .find(|n| **n < c)
            .copied()
            .ok_or_else(|| format!("no kept revision before the current one, {c} (kept: {})", kept())),
        (None, None) if numbers.len() >= 2 => Ok(numbers[numbers.len() - 2]),
        (None, None) => Err(format!(
            "no current revision is recorded and fewer than two are kept (kept: {}); give --to-revision",
            kept()
        )),
    }
}

/// A JSON merge patch (RFC 7386) that turns `old` into exactly `new`: keys `new`
/// lacks are removed, objects are patched key by key, everything else replaced.
fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = serde_json::Map::new();
            for (k, ov) in o {
                match n.get(k) {
                    None => {
                        patch.insert(k.clone(), Value::Null);
                    }
                    Some(nv) if nv != ov => {
                        patch.insert(k.clone(), merge_patch(ov, nv));
                    }
                    Some(_) => {}
                }
            }
            for (k, nv) in n {
                if !o.contains_key(k) {
                    patch.insert(k.clone(), nv.clone());
                }
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

async fn undo(client: &kube::Client, ns: &str, name: &str, to: Option<u64>, json: bool) -> anyhow::Result<()> {
    let mut dep = get_deployment(client, ns, name).await?;
    let revs = revisions(client, ns, name).await?;
    let numbers: Vec<u64> = revs.iter().map(|r| r.spec.revision).collect();
    let target_n = undo_target(&numbers, current_revision(&dep), last_good_revision(&dep), to)
        .map_err(|problem| anyhow::anyhow!("cannot undo {ns}/{name}: {problem}"))?;
    let target = revs
        .iter()
        .find(|r| r.spec.revision == target_n)
        .context("the chosen revision is kept")?;
    let target_score = serde_json::to_value(&target.spec.score)?;
    let first_score = raw_score(&dep);
    let params = patch_params();
    for attempt in 1..=WRITE_ATTEMPTS {
        let score = raw_score(&dep);
        let typed: Option<IotScore> = serde_json::from_value(score.clone()).ok();
        // The revision the Deployment is at: as the operator recorded it, else the
        // newest kept revision with this score.
        let from = current_revision(&dep).or_else(|| {
            revs.iter()
                .rev()
                .find(|r| typed.as_ref() == Some(&r.spec.score))
                .map(|r| r.spec.revision)
        });
        if typed.as_ref() == Some(&target.spec.score) {
            return report(ns, name, from, target, typed.as_ref(), false, json);
        }
        anyhow::ensure!(
            score == first_score,
            "the score of {ns}/{name} was changed by someone else while iotctl was writing it; \
             nothing was written: run the command again to undo from the new state"
        );
        let resource_version = dep
            .metadata
            .resource_version
            .clone()
            .context("the API server gave the Deployment no resourceVersion")?;
        // The resourceVersion makes the write conditional: if anything changed the
        // Deployment since it was read, the API server refuses it (409).
        let patch = json!({
            "metadata": {"resourceVersion": resource_version},
            "spec": {"score": merge_patch(&score, &target_score)},
        });
        match deployments(client, ns)
            .patch(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return report(ns, name, from, target, typed.as_ref(), true, json),
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                if attempt < WRITE_ATTEMPTS {
                    dep = get_deployment(client, ns, name).await?;
                }
            }
            Err(e) => anyhow::bail!(
                "cannot write the score of revision {target_n} into {ns}/{name}: {}",
                write_error(&e, ns)
            ),
        }
    }
    anyhow::bail!("{ns}/{name} kept changing while iotctl wrote it ({WRITE_ATTEMPTS} attempts); nothing was written")
}

fn report(
    ns: &str,
    name: &str,
    from: Option<u64>,
    target: &DeploymentRevision,
    before: Option<&IotScore>,
    written: bool,
    json: bool,
) -> anyhow::Result<()> {
    let to = target.spec.revision;
    let before_images = before.map(images);
    let after_images = images(&target.spec.score);
    if json {
        return print_json(&json!({
            "deployment": format!("{ns}/{name}"),
            "from": from,
            "to": to,
            "written": written,
            "images": {"before": before_images, "after": after_images},
        }));
    }
    let from_text = from
        .map(|f| format!("revision {f}"))
        .unwrap_or_else(|| "a score no kept revision has".into());
    if written {
        out::warn(&format!(
            "{ns}/{name}: spec.score set to the score of revision {to} (was {from_text}); images {} -> {}. \
             The operator records it as a new revision.",
            before_images.as_deref().map(images_text).unwrap_or_else(|| "?".into()),
            images_text(&after_images),
        ));
    } else {
        out::warn(&format!(
            "{ns}/{name} already runs the score of revision {to} (images {}): nothing written",
            images_text(&after_images)
        ));
    }
    Ok(())
}

/// Refuses a rollout command on a Deployment without `spec.rollout`.
fn require_rollout_spec(view: &View, verb: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        view.has_rollout_spec,
        "cannot {verb} {}/{}: it has no spec.rollout, so there is no rollout to {verb}: every matched device gets \
         a new revision at once (add spec.rollout to roll out in batches)",
        view.ns,
        view.name
    );
    Ok(())
}

/// The rollout a promote or abort acts on: the one of the revision the spec is now,
/// once the operator has started it.
fn started_rollout<'a>(view: &'a View, verb: &str) -> anyhow::Result<&'a RolloutStatus> {
    let (ns, name) = (&view.ns, &view.name);
    let r = view.rollout.as_ref().with_context(|| {
        format!("cannot {verb} {ns}/{name}: the operator has not started a rollout yet (no status.rollout)")
    })?;
    if let Some(current) = view.current_revision().filter(|c| *c != r.revision) {
        anyhow::bail!(
            "cannot {verb} {ns}/{name}: the spec is revision {current}, whose rollout has not started yet \
             (status.rollout is about revision {}); try again once it has",
            r.revision
        );
    }
    Ok(r)
}

/// `spec.rollout.paused`: set (pause) or removed (resume). The write is conditional
/// on the resourceVersion read: had spec.rollout been removed in between, a plain
/// merge patch would create one. It is sent even when the flag is already as asked
/// (a no-op for the API server), so whether the command works never depends on
/// what someone else did first, only on RBAC, and the audit log names who asked.
async fn set_paused(client: &kube::Client, ns: &str, name: &str, pause: bool, json: bool) -> anyhow::Result<()> {
    let verb = if pause { "pause" } else { "resume" };
    let mut dep = get_deployment(client, ns, name).await?;
    for attempt in 1..=WRITE_ATTEMPTS {
        let view = View::of(&dep, ns, name)?;
        require_rollout_spec(&view, verb)?;
        let resource_version = dep
            .metadata
            .resource_version
            .clone()
            .context("the API server gave the Deployment no resourceVersion")?;
        let paused = if pause { Value::Bool(true) } else { Value::Null };
        let patch = json!({
            "metadata": {"resourceVersion": resource_version},
            "spec": {"rollout": {"paused": paused}},
        });
        match deployments(client, ns)
            .patch(name, &patch_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return report_paused(&view, pause, view.paused != pause, json),
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                if attempt < WRITE_ATTEMPTS {
                    dep = get_deployment(client, ns, name).await?;
                }
            }
            Err(e) => anyhow::bail!("cannot {verb} the rollout of {ns}/{name}: {}", write_error(&e, ns)),
        }
    }
    anyhow::bail!("{ns}/{name} kept changing while iotctl wrote it ({WRITE_ATTEMPTS} attempts); nothing was written")
}

/// `changed`: the flag was not already as asked.
fn report_paused(view: &View, pause: bool, changed: bool, json: bool) -> anyhow::Result<()> {
    let reference = format!("{}/{}", view.ns, view.name);
    if json {
        return print_json(&json!({"deployment": reference, "paused": pause, "changed": changed}));
    }
    let revision = view
        .rollout
        .as_ref()
        .map(|r| format!("revision {}", r.revision))
        .unwrap_or_else(|| "a new revision".into());
    out::warn(&match (pause, changed) {
        (true, true) => format!(
            "{reference}: rollout paused (spec.rollout.paused: true): no more devices get {revision} until \
             `iotctl rollout resume {reference}`; devices keep what they have, and gates keep being checked"
        ),
        (true, false) => format!("{reference}: already paused (spec.rollout.paused is true); nothing changed"),
        (false, true) => {
            format!(
                "{reference}: rollout resumed (spec.rollout.paused removed): the operator dispatches {revision} again"
            )
        }
        (false, false) => format!("{reference}: was not paused (no spec.rollout.paused); nothing changed"),
    });
    Ok(())
}

/// Sets one annotation of the Deployment; returns whether that changed it (it did
/// not have that value). The value names what it acts on, so the write needs no
/// resourceVersion: a later rollout ignores it. Sent even when the value is already
/// there, as [`set_paused`] is.
async fn annotate(client: &kube::Client, view: &View, key: &str, value: &str, verb: &str) -> anyhow::Result<bool> {
    let (ns, name) = (view.ns.as_str(), view.name.as_str());
    let changed = view.annotation(key) != Some(value);
    let patch = json!({"metadata": {"annotations": {key: value}}});
    deployments(client, ns)
        .patch(name, &patch_params(), &Patch::Merge(&patch))
        .await
        .map_err(|e| anyhow::anyhow!("cannot {verb} {ns}/{name}: {}", write_error(&e, ns)))?;
    Ok(changed)
}

async fn promote(client: &kube::Client, ns: &str, name: &str, json: bool) -> anyhow::Result<()> {
    let dep = get_deployment(client, ns, name).await?;
    let view = View::of(&dep, ns, name)?;
    require_rollout_spec(&view, "promote")?;
    let r = started_rollout(&view, "promote")?;
    // A phase read before the operator saw a `resume` may still say Paused: a
    // promotion written then would approve a batch before it passed.
    if let Some(why) = view.spec_not_observed() {
        anyhow::bail!("cannot promote {ns}/{name} yet: {why}; try again in a moment");
    }
    if !view.awaiting_promotion() {
        let hint = if view.paused && r.phase == RolloutPhase::Paused {
            format!(", by spec.rollout.paused: `iotctl rollout resume {ns}/{name}` goes on")
        } else {
            String::new()
        };
        anyhow::bail!(
            "cannot promote {ns}/{name}: {}; no batch waits for promotion{hint} (only a batch with `pause: {{}}` that \
             passed does)",
            describe(r)
        );
    }
    let value = promote_value(r.revision, r.current_batch);
    let changed = annotate(client, &view, PROMOTE_ANNOTATION, &value, "promote").await?;
    let batches = r.batches.len();
    if json {
        return print_json(&json!({
            "deployment": format!("{ns}/{name}"),
            "revision": r.revision,
            "batch": r.current_batch,
            "annotation": {PROMOTE_ANNOTATION: value},
            "changed": changed,
        }));
    }
    let then = if (r.current_batch as usize) < batches {
        format!("the operator goes on with batch {}/{batches}", r.current_batch + 1)
    } else {
        "that was the last batch".to_owned()
    };
    out::warn(&if changed {
        format!(
            "{ns}/{name}: promoted batch {}/{batches} of revision {} ({PROMOTE_ANNOTATION}={value}); {then}",
            r.current_batch, r.revision
        )
    } else {
        format!(
            "{ns}/{name}: batch {}/{batches} of revision {} was already promoted ({PROMOTE_ANNOTATION}={value}); \
             nothing changed, waiting for the operator",
            r.current_batch, r.revision
        )
    });
    Ok(())
}

async fn abort(client: &kube::Client, ns: &str, name: &str, json: bool) -> anyhow::Result<()> {
    let dep = get_deployment(client, ns, name).await?;
    let view = View::of(&dep, ns, name)?;
    require_rollout_spec(&view, "abort")?;
    let r = started_rollout(&view, "abort")?;
    let stable = r
        .stable_revision
        .map(|s| format!("revision {s}"))
        .unwrap_or_else(|| "the last good revision".to_owned());
    match r.phase {
        RolloutPhase::Complete => anyhow::bail!(
            "cannot abort {ns}/{name}: {}: nothing to abort (to go back to an earlier revision: \
             `iotctl rollout undo {ns}/{name}`)",
            describe(r)
        ),
        RolloutPhase::RolledBack => anyhow::bail!(
            "cannot abort {ns}/{name}: {}: the devices that received revision {} run {stable} again already",
            describe(r),
            r.revision
        ),
        _ => {}
    }
    let value = r.revision.to_string();
    let changed = annotate(client, &view, ABORT_ANNOTATION, &value, "abort").await?;
    if json {
        return print_json(&json!({
            "deployment": format!("{ns}/{name}"),
            "revision": r.revision,
            "annotation": {ABORT_ANNOTATION: value},
            "changed": changed,
        }));
    }
    let already = if changed {
        ""
    } else {
        " (it already was; nothing changed)"
    };
    out::warn(&format!(
        "{ns}/{name}: abort of revision {} requested ({ABORT_ANNOTATION}={value}){already}: the operator stops the \
         rollout and writes {stable} back to the devices that received revision {}; follow it with \
         `iotctl rollout status {ns}/{name} --watch`",
        r.revision, r.revision
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_references() {
        assert_eq!(parse_ref("default/web").ok(), Some(("default", "web")));
        for bad in ["web", "/web", "default/", "a/b/c"] {
            let e = parse_ref(bad).expect_err(bad).to_string();
            assert!(e.contains("NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_revision_undo_goes_back_to() {
        // The last good one first: after rev 4 was rolled back and rev 5 failed too,
        // undo goes to 3, not to the bad 4.
        assert_eq!(undo_target(&[1, 2, 3, 4, 5], Some(5), Some(3), None), Ok(3));
        // ... unless it is the current one, or not kept.
        assert_eq!(undo_target(&[1, 2, 3], Some(3), Some(3), None), Ok(2));
        assert_eq!(undo_target(&[2, 3], Some(3), Some(1), None), Ok(2));
        // The one before the current one, even when newer ones exist.
        assert_eq!(undo_target(&[1, 2, 3, 4], Some(3), None, None), Ok(2));
        // Pruned revisions in between are skipped.
        assert_eq!(undo_target(&[1, 5, 6], Some(6), None, None), Ok(5));
        assert_eq!(undo_target(&[2, 7], Some(5), None, None), Ok(2));
        // No current revision recorded: the second-highest.
        assert_eq!(undo_target(&[1, 2, 3], None, None, None), Ok(2));
        // An explicit one, if it is kept.
        assert_eq!(undo_target(&[1, 2, 3], Some(3), None, Some(1)), Ok(1));
        assert_eq!(undo_target(&[1, 2, 3], Some(3), None, Some(3)), Ok(3));
        assert_eq!(
            undo_target(&[1, 2, 3], Some(3), None, Some(9)),
            Err("no revision 9 (kept: 1, 2, 3)".into())
        );
        assert_eq!(
            undo_target(&[3, 4], Some(3), None, None),
            Err("no kept revision before the current one, 3 (kept: 3, 4)".into())
        );
        let e = undo_target(&[1], None, None, None).expect_err("one revision");
        assert!(e.contains("--to-revision"), "{e}");
        let e = undo_target(&[], None, None, None).expect_err("none");
        assert!(e.contains("kept: none"), "{e}");
    }

    #[test]
    fn merge_patch_yields_exactly_the_new_value() {
        // RFC 7386 applied by hand, to check the patch really turns old into new.
        fn apply(target: &Value, patch: &Value) -> Value {
            match patch {
                Value::Object(p) => {
                    let mut t = match target {
                        Value::Object(t) => t.clone(),
                        _ => serde_json::Map::new(),
                    };
                    for (k, v) in p {
                        if v.is_null() {
                            t.remove(k);
                        } else {
                            let cur = t.get(k).cloned().unwrap_or(Value::Null);
                            t.insert(k.clone(), apply(&cur, v));
                        }
                    }
                    Value::Object(t)
                }
                other => other.clone(),
            }
        }
        let old =
            json!({"PodmanV0": {"services": [{"name": "web", "image": "a:2", "env": {"X": "1"}}], "extra": {"k": 1}}});
        let new = json!({"PodmanV0": {"services": [{"name": "web", "image": "a:1"}]}});
        let patch = merge_patch(&old, &new);
        assert_eq!(apply(&old, &patch), new);
        assert_eq!(patch["PodmanV0"]["extra"], Value::Null);
        // Another variant replaces the old one entirely.
        let other = json!({"OtherV1": {"x": 1}});
        assert_eq!(apply(&old, &merge_patch(&old, &other)), other);
        assert_eq!(merge_patch(&new, &new), json!({}));
    }
}
