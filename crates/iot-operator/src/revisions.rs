//! `DeploymentRevision`s: the write path records every score a Deployment runs,
//! before it writes that score to NATS, so that the number devices get always
//! names a revision that exists.
//!
//! The numbering is per Deployment and only grows: a score that comes back (an
//! undo) gets a new number. The operator prunes the oldest beyond
//! `spec.revisionHistoryLimit` itself (the API servers this runs on may have no
//! garbage collector; a cluster's would only act when the owner goes), and deletes
//! them all when the Deployment goes. A per-process cache keeps steady-state
//! reconciles free of API calls: only a score change, or the first reconcile after
//! a start, lists revisions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use harmony_reconciler_contracts::{DeploymentRef, SpecHash};
use iot_api::revision::{DEPLOYMENT_LABEL, deployment_label_value, revisions_of};
use iot_api::{
    Deployment, DeploymentRevision, DeploymentRevisionSpec, IotScore, RESOLVE_IMAGES_ANNOTATION, RolloutPlan,
    revision_name,
};

use crate::images::{ImagePinner, Pinned};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};

/// What the revision step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionPlan {
    /// The number the current score has, or gets.
    pub current: u64,
    /// Whether a new revision must be created with that number.
    pub create: bool,
    /// Revisions to delete, oldest first (never the current one).
    pub prune: Vec<u64>,
}

/// Pure: `existing` are (number, spec hash) of the Deployment's revisions;
/// `floor` the highest number the Deployment's status ever named, so that numbers
/// are not reused when someone deletes revisions by hand.
pub fn plan_revision(existing: &[(u64, String)], current_hash: &str, limit: u32, floor: Option<u64>) -> RevisionPlan {
    let newest = existing.iter().max_by_key(|(n, _)| *n);
    let highest = newest.map(|(n, _)| *n).max(floor).unwrap_or(0);
    let (current, create) = match newest {
        Some((n, h)) if h == current_hash => (*n, false),
        _ => (highest + 1, true),
    };
    let mut numbers: Vec<u64> = existing.iter().map(|(n, _)| *n).filter(|n| *n != current).collect();
    numbers.sort_unstable();
    // The current one counts towards the limit.
    let keep_others = (limit as usize).saturating_sub(1);
    let prune = numbers[..numbers.len().saturating_sub(keep_others)].to_vec();
    RevisionPlan { current, create, prune }
}

#[derive(Debug, thiserror::Error)]
#[error("DeploymentRevisions of {deployment}: {message}")]
pub struct RevisionError {
    deployment: DeploymentRef,
    message: String,
}

/// The current revision as the write path uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentRevision {
    pub number: u64,
    /// Its rollout's batches (deployments with `spec.rollout` when it was recorded).
    pub plan: Option<Arc<RolloutPlan>>,
    /// What devices run: the score with its managed images pinned.
    pub score: Arc<IotScore>,
    /// The hash devices report once they run it.
    pub spec_hash: SpecHash,
    /// Image as named -> digest.
    pub images: std::collections::BTreeMap<String, String>,
}

/// What a revision is found again by: the score as written and the
/// resolve-images annotation's value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    hash: SpecHash,
    resolved_for: Option<String>,
}

/// Revisions as the write path sees them.
#[derive(Default)]
pub struct Revisions {
    /// Deployment -> (its score as written, its revision) as last recorded by this
    /// process.
    known: Mutex<HashMap<DeploymentRef, (Source, CurrentRevision)>>,
    /// Scores of revisions read so far, for rollbacks: revisions never change.
    scores: Mutex<HashMap<(DeploymentRef, u64), IotScore>>,
}

impl Revisions {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentRef, (Source, CurrentRevision)>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn scores(&self) -> std::sync::MutexGuard<'_, HashMap<(DeploymentRef, u64), IotScore>> {
        self.scores.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The score of revision `n`, if that revision still exists.
    pub async fn score_of(
        &self,
        client: &kube::Client,
        dep: &DeploymentRef,
        n: u64,
    ) -> Result<Option<IotScore>, RevisionError> {
        if let Some(s) = self.scores().get(&(dep.clone(), n)) {
            return Ok(Some(s.clone()));
        }
        let api: Api<DeploymentRevision> = Api::namespaced(client.clone(), dep.namespace());
        match api.get_opt(&revision_name(dep.name(), n)).await {
            Ok(Some(r)) => {
                self.scores().insert((dep.clone(), n), r.spec.score.clone());
                Ok(Some(r.spec.score))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(RevisionError {
                deployment: dep.clone(),
                message: format!("cannot read revision {n}: {e}"),
            }),
        }
    }

    /// The current score's revision, recording a new revision (and pruning old
    /// ones) when the score changed. `plan` gives a new revision's rollout batches.
    ///
    /// Tags are resolved (`pinner`) only for a score no revision has under the
    /// current resolve-images annotation: a restart, a resync or a moved tag never
    /// asks the registry again.
    pub async fn ensure(
        &self,
        client: &kube::Client,
        obj: &Deployment,
        dep: &DeploymentRef,
        pinner: Option<&ImagePinner>,
        plan: impl FnOnce() -> Option<RolloutPlan>,
    ) -> Result<CurrentRevision, crate::controller::Error> {
        let source = Source {
            hash: obj.spec.score.spec_hash(),
            resolved_for: obj.annotations().get(RESOLVE_IMAGES_ANNOTATION).cloned(),
        };
        if let Some((s, current)) = self.known().get(dep)
            && *s == source
        {
            return Ok(current.clone());
        }
        let fail = |message: String| RevisionError {
            deployment: dep.clone(),
            message,
        };
        let api: Api<DeploymentRevision> = Api::namespaced(client.clone(), dep.namespace());
        let list = api
            .list(&ListParams::default().labels(&revisions_of(dep.name())))
            .await
            .map_err(|e| fail(format!("cannot list: {e}")))?;
        let existing: Vec<(u64, String)> = list
            .items
            .iter()
            .map(|r| (r.spec.revision, r.spec.spec_hash.clone()))
            .collect();
        let floor = obj.status.as_ref().and_then(|s| {
            let agg = s.aggregate.as_ref();
            s.current_revision.max(agg.and_then(|a| a.last_good_revision))
        });
        {
            let mut scores = self.scores();
            for r in &list.items {
                scores.insert((dep.clone(), r.spec.revision), r.spec.score.clone());
            }
        }
        let rollout_plan = plan;
        let recorded = list
            .items
            .iter()
            .filter(|r| {
                r.spec.source_hash.as_deref() == Some(source.hash.as_str())
                    && r.spec.resolved_for == source.resolved_for
            })
            .max_by_key(|r| r.spec.revision);
        let pinned = match (recorded, pinner) {
            (Some(r), _) => Pinned {
                score: r.spec.score.clone(),
                images: r.spec.images.clone(),
            },
            (None, Some(p)) => p
                .pin(&obj.spec.score)
                .await
                .map_err(|e| crate::controller::Error::Images {
                    deployment: dep.clone(),
                    source: e,
                })?,
            (None, None) => Pinned {
                score: obj.spec.score.clone(),
                images: Default::default(),
            },
        };
        let hash = pinned.score.spec_hash();
        let plan = plan_revision(&existing, hash.as_str(), obj.spec.revision_history_limit(), floor);
        let mut batches = list
            .items
            .iter()
            .find(|r| r.spec.revision == plan.current)
            .and_then(|r| r.spec.rollout_plan.clone());
        if plan.create {
            batches = rollout_plan();
            let revision = DeploymentRevision {
                metadata: ObjectMeta {
                    name: Some(revision_name(dep.name(), plan.current)),
                    namespace: Some(dep.namespace().to_owned()),
                    labels: Some(
                        [
                            (DEPLOYMENT_LABEL.to_owned(), deployment_label_value(dep.name())),
                            (iot_api::labels::MANAGED_BY.to_owned(), "iot-operator".to_owned()),
                            (
                                iot_api::labels::PART_OF.to_owned(),
                                iot_api::labels::PLATFORM.to_owned(),
                            ),
                        ]
                        .into(),
                    ),
                    owner_references: owner(obj).map(|o| vec![o]),
                    ..Default::default()
                },
                spec: DeploymentRevisionSpec {
                    revision: plan.current,
                    spec_hash: hash.to_string(),
                    score: pinned.score.clone(),
                    rollout_plan: batches.clone(),
                    // Only a revision whose tags were resolved is found by its source:
                    // one recorded while no registry was managed must be pinned once
                    // one is.
                    source_hash: pinner.map(|_| source.hash.to_string()),
                    resolved_for: source.resolved_for.clone(),
                    images: pinned.images.clone(),
                },
            };
            match api.create(&PostParams::default(), &revision).await {
                Ok(_) => {
                    tracing::info!(deployment = %dep, revision = plan.current, spec_hash = %hash, images = ?pinned.images, "recorded a new revision")
                }
                // Left by an earlier attempt whose answer was lost: only the same
                // score may be reused; anything else is retried from a fresh list.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let theirs = api
                        .get(&revision.name_any())
                        .await
                        .map_err(|e| fail(format!("cannot read back: {e}")))?;
                    if theirs.spec.spec_hash != hash.as_str() {
                        return Err(
                            fail(format!("revision {} exists with another score; retrying", plan.current)).into(),
                        );
                    }
                    batches = theirs.spec.rollout_plan;
                }
                Err(e) => return Err(fail(format!("cannot create revision {}: {e}", plan.current)).into()),
            }
        } else if pinner.is_some()
            && let Some(r) = list.items.iter().find(|r| r.spec.revision == plan.current)
            && (r.spec.source_hash.as_deref() != Some(source.hash.as_str())
                || r.spec.resolved_for != source.resolved_for)
        {
            // The same bits under another source (tags re-resolved to the digests
            // they had, or a revision recorded before pinning): remember the source,
            // so that a restart finds this revision without asking the registry.
            // `images` is replaced whole (a merge patch of a map would keep names
            // the revision no longer has): cleared first, then set.
            let clear = serde_json::json!({"spec": {"images": null}});
            let patch = serde_json::json!({"spec": {
                "sourceHash": source.hash.as_str(),
                "resolvedFor": source.resolved_for,
                "images": pinned.images,
            }});
            let name = r.name_any();
            let params = PatchParams::default();
            let result = match api.patch(&name, &params, &Patch::Merge(&clear)).await {
                Ok(_) => api.patch(&name, &params, &Patch::Merge(&patch)).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(deployment = %dep, revision = plan.current, error = %e, "cannot record the revision's source");
            }
        }
        for n in &plan.prune {
            let name = revision_name(dep.name(), *n);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(deployment = %dep, revision = n, "pruned an old revision"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                // Pruning is housekeeping: the next score change tries again.
                Err(e) => tracing::warn!(deployment = %dep, revision = n, error = %e, "cannot prune an old revision"),
            }
        }
        self.scores().insert((dep.clone(), plan.current), pinned.score.clone());
        let current = CurrentRevision {
            number: plan.current,
            plan: batches.map(Arc::new),
            score: Arc::new(pinned.score),
            spec_hash: hash,
            images: pinned.images,
        };
        self.known().insert(dep.clone(), (source, current.clone()));
        Ok(current)
    }

    /// The Deployment is gone: so are its revisions.
    pub async fn delete_all(&self, client: &kube::Client, dep: &DeploymentRef) -> Result<(), RevisionError> {
        self.known().remove(dep);
        self.scores().retain(|(d, _), _| d != dep);
        let api: Api<DeploymentRevision> = Api::namespaced(client.clone(), dep.namespace());
        let fail = |message: String| RevisionError {
            deployment: dep.clone(),
            message,
        };
        let list = match api
            .list_metadata(&ListParams::default().labels(&revisions_of(dep.name())))
            .await
        {
            Ok(list) => list,
            // No DeploymentRevision CRD: there is nothing to delete, and the
            // Deployment must not hang in Terminating for it.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(fail(format!("cannot list: {e}"))),
        };
        for r in list.items {
            match api.delete(&r.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(fail(format!("cannot delete {}: {e}", r.name_any()))),
            }
        }
        Ok(())
    }
}

fn owner(obj: &Deployment) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Deployment::api_version(&()).into_owned(),
        kind: Deployment::kind(&()).into_owned(),
        name: obj.name_any(),
        uid: obj.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revs(list: &[(u64, &str)]) -> Vec<(u64, String)> {
        list.iter().map(|(n, h)| (*n, h.to_string())).collect()
    }

    #[test]
    fn first_score_is_revision_one() {
        assert_eq!(
            plan_revision(&[], "a", 10, None),
            RevisionPlan {
                current: 1,
                create: true,
                prune: vec![]
            }
        );
    }

    #[test]
    fn unchanged_score_keeps_its_number_and_a_returning_one_gets_a_new_number() {
        let existing = revs(&[(1, "a"), (2, "b"), (3, "c")]);
        assert_eq!(plan_revision(&existing, "c", 10, None).current, 3);
        assert!(!plan_revision(&existing, "c", 10, None).create);
        // An undo to the score of revision 1 is revision 4.
        let undo = plan_revision(&existing, "a", 10, None);
        assert_eq!((undo.current, undo.create), (4, true));
    }

    #[test]
    fn numbers_are_not_reused_after_revisions_were_deleted_by_hand() {
        // Status said revision 7; someone deleted every revision object.
        assert_eq!(plan_revision(&[], "a", 10, Some(7)).current, 8);
        let existing = revs(&[(2, "b")]);
        assert_eq!(plan_revision(&existing, "c", 10, Some(7)).current, 8);
        // The newest still carrying the current score keeps its number.
        assert_eq!(plan_revision(&existing, "b", 10, Some(7)).current, 2);
    }

    #[test]
    fn the_limit_prunes_the_oldest_and_counts_the_current() {
        let existing = revs(&[(1, "a"), (2, "b"), (3, "c")]);
        assert_eq!(plan_revision(&existing, "d", 2, None).prune, vec![1, 2]);
        assert_eq!(plan_revision(&existing, "d", 3, None).prune, vec![1]);
        assert_eq!(plan_revision(&existing, "c", 1, None).prune, vec![1, 2]);
        assert!(plan_revision(&existing, "d", 10, None).prune.is_empty());
    }
}
