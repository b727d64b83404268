//! How a pull a device reports reads for people: one wording for every tool that
//! shows it (`iotctl`, the dashboard).

use crate::status::{DeploymentPhase, PullState};

/// `sha256:` and the first 12 hex digits of a digest; anything else whole.
pub fn short_digest(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 && hex.is_char_boundary(12) => format!("sha256:{}", &hex[..12]),
        _ => digest.to_owned(),
    }
}

/// An image reference with its `@sha256:` digest, if any, shortened.
pub fn short_image(image: &str) -> String {
    match image.split_once('@') {
        Some((name, digest)) => format!("{name}@{}", short_digest(digest)),
        None => image.to_owned(),
    }
}

/// What a deployment waiting on a pull is doing: `pulling IMAGE 12.3/40.0 MiB
/// (30%), 14s`, `pulling IMAGE layers 2/5, 14s`, `pulling IMAGE, 14s` or `pull
/// failed, retrying: ERROR`; `None` when it waits on no pull. `took` is the
/// attempt's age as the caller writes ages; `reader` names the tool in the sentence
/// for a state it does not know.
pub fn pull_summary(phase: &DeploymentPhase, took: &str, reader: &str) -> Option<String> {
    let pull = phase.pull.as_ref()?;
    let image = short_image(&pull.image);
    Some(match pull.state {
        PullState::Failed => format!(
            "pull failed, retrying: {}",
            phase.last_error.as_deref().unwrap_or("no error reported")
        ),
        PullState::Pulling => match pull.bytes_total.filter(|t| *t > 0) {
            Some(total) => {
                const MIB: f64 = (1u64 << 20) as f64;
                let done = pull.bytes_done.min(total);
                format!(
                    "pulling {image} {:.1}/{:.1} MiB ({}%), {took}",
                    done as f64 / MIB,
                    total as f64 / MIB,
                    done * 100 / total
                )
            }
            None if pull.layers_total > 0 => {
                format!(
                    "pulling {image} layers {}/{}, {took}",
                    pull.layers_done, pull.layers_total
                )
            }
            None => format!("pulling {image}, {took}"),
        },
        PullState::Unknown => format!("pulling {image} (a state this {reader} does not know), {took}"),
    })
}
