//! Image references as a Deployment names them: `[registry/]repository[:tag][@digest]`.
//!
//! Only what the platform needs: which registry an image comes from (so the agent
//! knows whether to ask for credentials, and the operator whether it resolves the
//! tag), the repository (what a registry token grants), and tag or digest.

use std::fmt;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` when the first component names one (has a `.` or `:`, or is
    /// `localhost`); `None` for a bare name such as `nginx` or `library/nginx`.
    pub registry: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image reference {reference:?} is not valid: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

impl ImageRef {
    pub fn parse(reference: &str) -> Result<Self, ReferenceError> {
        let bad = |reason: &str| ReferenceError {
            reference: reference.to_owned(),
            reason: reason.to_owned(),
        };
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => {
                check_digest(d).map_err(|r| bad(&r))?;
                (n, Some(d.to_owned()))
            }
            None => (reference, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &name[last_slash + i + 1..];
                if tag.is_empty()
                    || tag.len() > 128
                    || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                    || tag.starts_with(['.', '-'])
                {
                    return Err(bad(
                        "a tag is up to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
                    ));
                }
                (&name[..last_slash + i], Some(tag.to_owned()))
            }
            None => (name, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (Some(first.to_owned()), rest),
            _ => (None, name),
        };
        if repository.is_empty() {
            return Err(bad("the repository name is empty"));
        }
        for part in repository.split('/') {
            if part.is_empty()
                || !part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
                || !part.starts_with(|c: char| c.is_ascii_alphanumeric())
                || !part.ends_with(|c: char| c.is_ascii_alphanumeric())
            {
                return Err(bad(
                    "each part of a repository is lowercase letters and digits, separated by '.', '_' or '-'",
                ));
            }
        }
        Ok(Self {
            registry,
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        match &self.registry {
            Some(r) => format!("{r}/{}", self.repository),
            None => self.repository.clone(),
        }
    }

    /// The reference pinned to `digest`: `registry/repository@digest`. The tag is
    /// dropped: podman 4 refuses a reference with both.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// The tag a pull of this reference asks for: the tag, or `latest` when neither
    /// tag nor digest is named.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:` and 64 lowercase hex digits: the only digest the platform pins.
pub fn check_digest(d: &str) -> Result<(), String> {
    match d.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) => Ok(()),
        _ => Err(format!("digest {d:?} is not sha256: and 64 lowercase hex digits")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn registry_port_repository_and_tag() {
        let r = parse("10.77.0.1:5000/iot/web:v1");
        assert_eq!(r.registry.as_deref(), Some("10.77.0.1:5000"));
        assert_eq!(r.repository, "iot/web");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest, None);
        assert_eq!(r.pinned(D), format!("10.77.0.1:5000/iot/web@{D}"));
        assert_eq!(r.to_string(), "10.77.0.1:5000/iot/web:v1");
    }

    #[test]
    fn bare_names_have_no_registry_and_localhost_is_one() {
        assert_eq!(parse("nginx").registry, None);
        assert_eq!(parse("library/nginx:1.25").registry, None);
        let l = parse("localhost/iot-web:v2");
        assert_eq!(l.registry.as_deref(), Some("localhost"));
        assert_eq!(l.repository, "iot-web");
        assert_eq!(parse("registry.example.com/a/b").tag_or_latest(), "latest");
    }

    #[test]
    fn digests_with_and_without_a_tag() {
        let r = parse(&format!("reg.io:443/web@{D}"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.tag, None);
        let both = parse(&format!("reg.io/web:v1@{D}"));
        assert_eq!(both.tag.as_deref(), Some("v1"));
        assert_eq!(both.to_string(), format!("reg.io/web:v1@{D}"));
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (s, want) in [
            ("reg.io/Web:v1", "lowercase"),
            ("reg.io/web:", "tag"),
            ("reg.io/web@sha256:abc", "64 lowercase hex"),
            ("reg.io/", "empty"),
            ("reg.io/web:-x", "tag"),
        ] {
            let e = ImageRef::parse(s).expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
