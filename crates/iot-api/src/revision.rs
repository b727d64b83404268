//! `DeploymentRevision`: an immutable record of what one `Deployment` ran.
//!
//! Every change of a Deployment's `spec.score` creates one, numbered 1, 2, 3 ...
//! per Deployment, owned by it and named `<deployment>-<number>`. The operator
//! alone creates and prunes them (`spec.revisionHistoryLimit`, default 10).
//! `iotctl rollout undo` writes an old revision's score back into the Deployment,
//! which makes a new revision: history only grows forward.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::score::IotScore;

/// Label on every revision: the name of the Deployment it belongs to.
pub const DEPLOYMENT_LABEL: &str = "iot.nationtech.io/deployment";

/// The value of [`DEPLOYMENT_LABEL`] for a Deployment: its name when that fits a
/// label value (63 characters), else a shortened name with a hash of the whole.
pub fn deployment_label_value(deployment: &str) -> String {
    if deployment.len() <= 63 {
        return deployment.to_owned();
    }
    let tag = &harmony_reconciler_contracts::spec_hash_of(&deployment).to_string()[..10];
    let head = deployment[..52].trim_end_matches(['-', '.']);
    format!("{head}-{tag}")
}

/// The label selector that lists a Deployment's revisions.
pub fn revisions_of(deployment: &str) -> String {
    format!("{DEPLOYMENT_LABEL}={}", deployment_label_value(deployment))
}

/// Revisions kept per Deployment when `spec.revisionHistoryLimit` is not set.
pub const DEFAULT_REVISION_HISTORY_LIMIT: u32 = 10;

/// One revision of a Deployment's score.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "iot.nationtech.io",
    version = "v1alpha1",
    kind = "DeploymentRevision",
    plural = "deploymentrevisions",
    shortname = "iotrev",
    namespaced,
    printcolumn = r#"{"name":"Deployment","type":"string","jsonPath":".metadata.labels.iot\\.nationtech\\.io/deployment"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Hash","type":"string","jsonPath":".spec.specHash"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentRevisionSpec {
    /// 1 for the first score a Deployment ran, then one more per change.
    #[schemars(range(min = 1))]
    pub revision: u64,
    /// The hash devices report once they run this score.
    pub spec_hash: String,
    /// What ran: the Deployment's score, with the tags of images on the platform's
    /// registries pinned to the digests they named when this revision was recorded.
    pub score: IotScore,
    /// For a Deployment with `spec.rollout`: which devices each batch of this
    /// revision's rollout holds, fixed when the revision was recorded (so a
    /// restarted operator dispatches the same devices in the same order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_plan: Option<RolloutPlan>,
    /// Spec hash of the Deployment's score as written (tags unresolved): a
    /// restarted operator finds the revision a score already has without asking
    /// the registry again. Absent from revisions recorded before images were pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_hash: Option<String>,
    /// The `iot.nationtech.io/resolve-images` annotation's value the tags were
    /// resolved under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_for: Option<String>,
    /// Image as the Deployment names it -> the digest it was pinned to.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub images: std::collections::BTreeMap<String, String>,
}

/// The devices of each batch, in batch order; the last batch holds the devices no
/// batch of the spec named.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RolloutPlan {
    pub batches: Vec<Vec<String>>,
}

/// The name of a Deployment's revision `n`: `<deployment>-<n>`, shortened with a
/// hash when that would pass the 253 characters Kubernetes allows.
pub fn revision_name(deployment: &str, n: u64) -> String {
    let suffix = format!("-{n}");
    if deployment.len() + suffix.len() <= 253 {
        return format!("{deployment}{suffix}");
    }
    let tag = &harmony_reconciler_contracts::spec_hash_of(&deployment).to_string()[..8];
    let keep = 253 - suffix.len() - tag.len() - 1;
    let mut head = deployment[..keep].trim_end_matches(['-', '.']).to_owned();
    head.push('-');
    head.push_str(tag);
    head + &suffix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_fit_kubernetes() {
        assert_eq!(deployment_label_value("web"), "web");
        let long = format!("{}.b", "a".repeat(100));
        let v = deployment_label_value(&long);
        assert!(v.len() <= 63, "{v}");
        assert!(v.chars().last().is_some_and(|c| c.is_ascii_alphanumeric()));
        assert_ne!(v, deployment_label_value(&format!("{}.c", "a".repeat(100))));
        assert_eq!(revisions_of("web"), "iot.nationtech.io/deployment=web");
    }

    #[test]
    fn names_fit_kubernetes() {
        assert_eq!(revision_name("web", 3), "web-3");
        let long = "a".repeat(253);
        let name = revision_name(&long, 12);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.ends_with("-12"));
        assert_ne!(revision_name(&long, 12), revision_name(&"b".repeat(253), 12));
    }
}
