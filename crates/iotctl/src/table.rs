//! Plain aligned text tables (no dependency needed for this).

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(c);
                } else {
                    out.push_str(&format!("{:<w$}   ", c, w = widths[i]));
                }
            }
            out.trim_end().to_owned()
        };
        let mut out = line(&self.header);
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out.push('\n');
        out
    }
}

/// "4s", "3m", "2h", "5d" ago.
pub fn age(secs: i64) -> String {
    match secs {
        s if s < 0 => "in the future".into(),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub fn bytes_gib(b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64)
    }
}

/// Digests and images shortened as tables show them.
pub use harmony_reconciler_contracts::pull_text::short_digest;

/// `image -> digest` for each image a Deployment's current revision is pinned to;
/// `short`: digests shortened as tables show them.
pub fn pinned_images(images: &[iot_api::PinnedImage], short: bool) -> Vec<String> {
    images
        .iter()
        .map(|p| {
            let digest = if short {
                short_digest(&p.digest)
            } else {
                p.digest.clone()
            };
            format!("{} -> {digest}", p.image)
        })
        .collect()
}

/// What a deployment waiting on an image pull is doing, for people:
/// `pulling IMAGE 12.3/40.0 MiB (31%), 14s`, `pulling IMAGE layers 2/5, 14s`, or
/// `pull failed, retrying: ERROR`. `None` when it waits on no pull. The age counts
/// from the attempt's start on the device's clock.
pub fn pull_text(
    p: &harmony_reconciler_contracts::DeploymentPhase,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let pull = p.pull.as_ref()?;
    let took = age((now - pull.started_at).num_seconds());
    harmony_reconciler_contracts::pull_text::pull_summary(p, &took, "iotctl")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone as _, Utc};
    use harmony_reconciler_contracts::{DeploymentPhase, Phase, PullProgress, PullState};

    const DIGEST: &str = "sha256:ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12cd34ef56ab12";

    fn phase(state: PullState, bytes_total: Option<u64>, layers: (u32, u32)) -> DeploymentPhase {
        let at = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .expect("a valid time");
        let mut p = DeploymentPhase::new(Phase::Pending, None, Some("connection reset by peer".into()), at);
        p.pull = Some(PullProgress {
            image: format!("10.77.0.1:5000/iot/web@{DIGEST}"),
            state,
            bytes_done: 12_897_485,
            bytes_total,
            layers_done: layers.0,
            layers_total: layers.1,
            started_at: at,
        });
        p
    }

    fn now() -> chrono::DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 14)
            .single()
            .expect("a valid time")
    }

    #[test]
    fn pulls_read_with_bytes_layers_or_the_error() {
        assert_eq!(
            pull_text(&phase(PullState::Pulling, Some(41_943_040), (2, 5)), now()).as_deref(),
            Some("pulling 10.77.0.1:5000/iot/web@sha256:ab12cd34ef56 12.3/40.0 MiB (30%), 14s")
        );
        assert_eq!(
            pull_text(&phase(PullState::Pulling, None, (2, 5)), now()).as_deref(),
            Some("pulling 10.77.0.1:5000/iot/web@sha256:ab12cd34ef56 layers 2/5, 14s")
        );
        assert_eq!(
            pull_text(&phase(PullState::Pulling, None, (0, 0)), now()).as_deref(),
            Some("pulling 10.77.0.1:5000/iot/web@sha256:ab12cd34ef56, 14s")
        );
        assert_eq!(
            pull_text(&phase(PullState::Failed, Some(41_943_040), (2, 5)), now()).as_deref(),
            Some("pull failed, retrying: connection reset by peer")
        );
        let mut none = phase(PullState::Pulling, None, (0, 0));
        none.pull = None;
        assert_eq!(pull_text(&none, now()), None);
    }

    #[test]
    fn digests_are_short_in_tables_and_whole_otherwise() {
        use harmony_reconciler_contracts::pull_text::short_image;
        let pinned = [iot_api::PinnedImage {
            image: "registry.local/iot/web:1.2".into(),
            digest: DIGEST.into(),
        }];
        assert_eq!(
            pinned_images(&pinned, true),
            ["registry.local/iot/web:1.2 -> sha256:ab12cd34ef56"]
        );
        assert_eq!(
            pinned_images(&pinned, false),
            [format!("registry.local/iot/web:1.2 -> {DIGEST}")]
        );
        assert_eq!(short_digest("md5:abc"), "md5:abc");
        assert_eq!(short_image("web:1.2"), "web:1.2");
    }
}
