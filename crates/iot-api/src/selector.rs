//! Label selectors over `Device` resources, in the standard Kubernetes shape
//! (`matchLabels`, `matchExpressions` with `In`, `NotIn`, `Exists`, `DoesNotExist`),
//! typed so that the API server rejects an unknown operator and names the field.
//!
//! Matching is pure. An empty selector matches nothing (flightctl's rule): a
//! selector left empty by mistake must not deploy to the whole fleet.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which devices a `Deployment` runs on, by their labels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSelector {
    /// Labels a device must carry with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: SelectorOperator,
    /// For In and NotIn: at least one value. For Exists and DoesNotExist: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A requirement that cannot be evaluated as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.selector.matchExpressions[{index}]: {problem}")]
pub struct SelectorError {
    pub index: usize,
    pub problem: &'static str,
}

impl DeviceSelector {
    /// A selector with neither labels nor expressions: it matches no device.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Checks what the schema cannot: `In`/`NotIn` need values, the others none.
    pub fn validate(&self) -> Result<(), SelectorError> {
        for (index, r) in self.match_expressions.iter().enumerate() {
            let problem = match r.operator {
                SelectorOperator::In | SelectorOperator::NotIn if r.values.is_empty() => {
                    "In and NotIn need at least one value"
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist if !r.values.is_empty() => {
                    "Exists and DoesNotExist take no values"
                }
                _ => continue,
            };
            return Err(SelectorError { index, problem });
        }
        Ok(())
    }

    /// Whether a device with these labels is selected. Empty selects nothing.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.is_empty() {
            return false;
        }
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl SelectorRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            // As in Kubernetes: a device without the key is not "in" the values.
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selects_nothing() {
        assert!(!DeviceSelector::default().matches(&labels(&[("site", "madrid")])));
        assert!(!DeviceSelector::default().matches(&labels(&[])));
    }

    #[test]
    fn labels_and_every_operator() {
        let s = DeviceSelector {
            match_labels: labels(&[("site", "madrid")]),
            match_expressions: vec![
                req("ring", SelectorOperator::In, &["canary", "early"]),
                req("model", SelectorOperator::NotIn, &["pi3"]),
                req("gpu", SelectorOperator::Exists, &[]),
                req("retired", SelectorOperator::DoesNotExist, &[]),
            ],
        };
        let yes = labels(&[("site", "madrid"), ("ring", "canary"), ("gpu", "")]);
        assert!(s.matches(&yes));
        let mut no = yes.clone();
        no.insert("site".into(), "paris".into());
        assert!(!s.matches(&no), "matchLabels");
        let mut no = yes.clone();
        no.insert("ring".into(), "late".into());
        assert!(!s.matches(&no), "In");
        let mut no = yes.clone();
        no.insert("model".into(), "pi3".into());
        assert!(!s.matches(&no), "NotIn");
        let mut no = yes.clone();
        no.remove("gpu");
        assert!(!s.matches(&no), "Exists");
        let mut no = yes.clone();
        no.insert("retired".into(), "yes".into());
        assert!(!s.matches(&no), "DoesNotExist");
        // NotIn holds for a device without the key at all.
        assert!(s.matches(&yes) && !yes.contains_key("model"));
    }

    #[test]
    fn values_must_fit_the_operator() {
        let bad = DeviceSelector {
            match_expressions: vec![
                req("a", SelectorOperator::Exists, &[]),
                req("b", SelectorOperator::In, &[]),
            ],
            ..Default::default()
        };
        let e = bad.validate().expect_err("In without values");
        assert_eq!(e.index, 1);
        assert!(e.to_string().starts_with("spec.selector.matchExpressions[1]: "), "{e}");
        let bad = DeviceSelector {
            match_expressions: vec![req("a", SelectorOperator::DoesNotExist, &["x"])],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
