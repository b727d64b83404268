//! Turns raw desired-state payloads into [`DesiredContent`], one deployment at a time,
//! so a payload that cannot be used fails only its own deployment.

use std::collections::BTreeMap;

use bytes::Bytes;
use harmony_reconciler_contracts::{
    DecodedDesiredState, DeploymentRef, IotScore, ScoreSlot, describe_problems, validate_score,
};

use crate::plan::DesiredContent;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn decode_all(entries: &BTreeMap<DeploymentRef, Bytes>) -> BTreeMap<DeploymentRef, DesiredContent> {
    entries
        .iter()
        .map(|(dep, bytes)| (dep.clone(), decode_payload(dep, bytes)))
        .collect()
}

pub fn decode_payload(deployment: &DeploymentRef, bytes: &[u8]) -> DesiredContent {
    let decoded = match DecodedDesiredState::from_slice(bytes) {
        Ok(d) => d,
        Err(e) => {
            return DesiredContent::Invalid {
                spec_hash: None,
                error: format!("desired state for {deployment} does not parse: {e}"),
                revision: None,
            };
        }
    };
    let revision = decoded.state.revision;
    let invalid = |error: String| DesiredContent::Invalid {
        spec_hash: Some(decoded.spec_hash.clone()),
        error,
        revision,
    };
    if &decoded.state.deployment != deployment {
        return invalid(format!(
            "payload names deployment {} but is stored under the key of {deployment}",
            decoded.state.deployment
        ));
    }
    let score = match &decoded.state.score {
        ScoreSlot::Known(score) => score,
        ScoreSlot::Unsupported { variant, .. } => {
            return invalid(format!(
                "score variant {variant} is not supported by iot-agent {AGENT_VERSION} (supported: {}); upgrade the agent",
                IotScore::VARIANTS.join(", ")
            ));
        }
    };
    let problems = validate_score(score);
    if !problems.is_empty() {
        return invalid(describe_problems(&problems));
    }
    match score {
        IotScore::PodmanV0(p) => DesiredContent::Valid {
            spec_hash: decoded.spec_hash.clone(),
            services: p.services.clone(),
            revision,
        },
    }
}
