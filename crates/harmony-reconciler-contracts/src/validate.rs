//! Checks a score before anything acts on it.
//!
//! The CRD schema already rejects most of these at the API server, but a device must
//! not trust that: KV can be written by other tools, and an older operator may have
//! written it. Each problem names the field, so `last_error` tells a person what to
//! fix.

use std::collections::BTreeSet;
use std::fmt;

use crate::id::dns_label_problem;
use crate::score::{IotScore, MAX_CPU_MILLICORES, MAX_MEMORY_MIB, MIN_MEMORY_MIB, PodmanV0Score};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreProblem {
    /// Path inside the score, like `services[1].image`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ScoreProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems of a score; empty means valid.
pub fn validate_score(score: &IotScore) -> Vec<ScoreProblem> {
    match score {
        IotScore::PodmanV0(s) => validate_podman(s),
    }
}

/// Joins problems into one readable line for `last_error`.
pub fn describe_problems(problems: &[ScoreProblem]) -> String {
    let parts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    format!("invalid score: {}", parts.join("; "))
}

fn validate_podman(score: &PodmanV0Score) -> Vec<ScoreProblem> {
    let mut problems = Vec::new();
    let mut push = |field: String, message: String| problems.push(ScoreProblem { field, message });
    if score.services.is_empty() {
        push("services".into(), "must list at least one service".into());
    }
    let mut names = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (i, svc) in score.services.iter().enumerate() {
        let at = |f: &str| format!("services[{i}].{f}");
        if let Some(reason) = dns_label_problem(&svc.name) {
            push(at("name"), format!("{:?} {reason}", svc.name));
        } else if !names.insert(svc.name.as_str()) {
            push(
                at("name"),
                format!("duplicate service name {:?}; service names must be unique", svc.name),
            );
        }
        if let Some(reason) = image_reference_problem(&svc.image) {
            push(at("image"), reason);
        }
        for (p, port) in svc.ports.iter().enumerate() {
            if port.host_port == 0 {
                push(at(&format!("ports[{p}].host_port")), "must be 1-65535".into());
            }
            if port.container_port == 0 {
                push(at(&format!("ports[{p}].container_port")), "must be 1-65535".into());
            }
            if port.host_port != 0 && !host_ports.insert((port.host_port, port.protocol)) {
                push(
                    at(&format!("ports[{p}].host_port")),
                    format!(
                        "host port {}/{} is published twice in this deployment",
                        port.host_port,
                        port.protocol.as_str()
                    ),
                );
            }
        }
        if let Some(r) = &svc.resources {
            if let Some(mib) = r.memory_mib
                && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib)
            {
                push(
                    at("resources.memory_mib"),
                    format!("{mib} is out of range ({MIN_MEMORY_MIB}-{MAX_MEMORY_MIB} MiB)"),
                );
            }
            if let Some(milli) = r.cpu_millicores
                && !(1..=MAX_CPU_MILLICORES).contains(&milli)
            {
                push(
                    at("resources.cpu_millicores"),
                    format!("{milli} is out of range (1-{MAX_CPU_MILLICORES} millicores)"),
                );
            }
        }
        for key in svc.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                push(at("env"), format!("invalid environment variable name {key:?}"));
            }
        }
    }
    problems
}

/// `None` if `image` looks like a usable image reference, else why not. Deliberately
/// loose: podman is the authority, this only catches what can never work.
pub fn image_reference_problem(image: &str) -> Option<String> {
    if image.trim().is_empty() {
        return Some("must not be empty".into());
    }
    if image.len() > 255 {
        return Some("is longer than 255 characters".into());
    }
    if let Some(c) = image
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-/:@".contains(*c)))
    {
        return Some(format!("{image:?} is not a valid image reference (character {c:?})"));
    }
    if image.starts_with(['/', ':', '@', '.', '-']) || image.ends_with(['/', ':', '@']) {
        return Some(format!("{image:?} is not a valid image reference"));
    }
    None
}
