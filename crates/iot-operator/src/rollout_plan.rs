//! Which devices each batch of a rollout holds, decided once when a revision is
//! recorded and kept in the `DeploymentRevision` (so a restarted operator
//! dispatches the same devices in the same order). Pure.
//!
//! Limits are cumulative and count the devices matched at the start. Within the
//! devices a batch's selector allows, devices are taken in an order that is fixed
//! per deployment but spread (a hash of deployment and device), so the canary is not
//! always the alphabetically first board of every fleet. The devices no batch
//! takes form a final batch.

use std::collections::{BTreeMap, BTreeSet};

use harmony_reconciler_contracts::{DeploymentRef, Id, spec_hash_of};
use iot_api::RolloutSpec;
use iot_api::rollout::resolve_amount;

/// The batches of a rollout over `matched`; `labels` gives each device's labels.
pub fn plan_batches(
    deployment: &DeploymentRef,
    spec: &RolloutSpec,
    matched: &BTreeSet<Id>,
    labels: &BTreeMap<Id, BTreeMap<String, String>>,
) -> Vec<Vec<Id>> {
    let total = matched.len() as u32;
    let mut order: Vec<(String, &Id)> = matched
        .iter()
        .map(|d| (spec_hash_of(&(deployment.to_string(), d.as_str())).to_string(), d))
        .collect();
    order.sort();
    let mut taken: BTreeSet<&Id> = BTreeSet::new();
    let mut batches = Vec::new();
    let empty = BTreeMap::new();
    for batch in &spec.batches {
        let limit = resolve_amount(&batch.limit, total).unwrap_or(total).min(total) as usize;
        let room = limit.saturating_sub(taken.len());
        let picked: Vec<Id> = order
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| !taken.contains(d))
            .filter(|d| {
                batch
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.matches(labels.get(*d).unwrap_or(&empty)))
            })
            .take(room)
            .cloned()
            .collect();
        taken.extend(matched.iter().filter(|d| picked.contains(d)));
        batches.push(picked);
    }
    let rest: Vec<Id> = order
        .iter()
        .map(|(_, d)| *d)
        .filter(|d| !taken.contains(d))
        .cloned()
        .collect();
    if !rest.is_empty() || batches.is_empty() {
        batches.push(rest);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_api::{DeviceSelector, RolloutBatch};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn ids(n: usize) -> BTreeSet<Id> {
        (0..n).map(|i| Id::new(format!("d{i}")).expect("id")).collect()
    }

    #[test]
    fn limits_are_cumulative_and_the_rest_is_a_final_batch() {
        let dep = DeploymentRef::new("ns", "web").expect("ref");
        let spec = RolloutSpec {
            batches: vec![
                RolloutBatch::of(IntOrString::Int(1)),
                RolloutBatch::of(IntOrString::String("50%".into())),
            ],
            ..Default::default()
        };
        let plan = plan_batches(&dep, &spec, &ids(6), &BTreeMap::new());
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 3]);
        let all: BTreeSet<Id> = plan.iter().flatten().cloned().collect();
        assert_eq!(all, ids(6));
        // The same inputs give the same plan.
        assert_eq!(plan, plan_batches(&dep, &spec, &ids(6), &BTreeMap::new()));
    }

    #[test]
    fn a_batch_selector_picks_among_its_labels_only() {
        let dep = DeploymentRef::new("ns", "web").expect("ref");
        let mut canary = RolloutBatch::of(IntOrString::Int(2));
        canary.selector = Some(DeviceSelector {
            match_labels: [("ring".to_owned(), "canary".to_owned())].into(),
            ..Default::default()
        });
        let spec = RolloutSpec {
            batches: vec![canary, RolloutBatch::of(IntOrString::String("100%".into()))],
            ..Default::default()
        };
        let labels: BTreeMap<Id, BTreeMap<String, String>> = [(
            Id::new("d4").expect("id"),
            [("ring".to_owned(), "canary".to_owned())].into(),
        )]
        .into();
        let plan = plan_batches(&dep, &spec, &ids(5), &labels);
        // Only one device carries the label: the canary batch holds it alone.
        assert_eq!(plan[0], vec![Id::new("d4").expect("id")]);
        assert_eq!(plan[1].len(), 4);
        assert_eq!(plan.len(), 2);
    }
}
