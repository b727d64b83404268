//! The token service's decisions, pure: who is asking, and what they get.
//!
//! Two kinds of caller, both with HTTP basic credentials:
//! - **Publishers** (people, CI): a name and a password whose SHA-256 is in the
//!   publishers file, with the repositories they may push. Passwords are random
//!   secrets made by `iotctl`-style tooling, so a fast hash is enough (as for API
//!   tokens); a person's memorable password does not belong here.
//! - **Devices**: the password is a pull grant, a registry token the operator
//!   signed for that device (the user name must be the token's subject) listing the
//!   repositories its deployments name. The service re-issues the part of it that
//!   was asked for, expiring no later than the grant.
//!
//! Anything else is refused; a refusal names why, for the service's log and the
//! client's error.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::token::{self, Access, Claims, TokenError};

/// How long a publisher's token lives.
pub const PUBLISHER_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest life of a device's re-issued token (never past its grant).
pub const DEVICE_TTL: Duration = Duration::from_secs(10 * 60);

/// One line of the publishers file: `NAME SHA256HEX PATTERN[,PATTERN...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publisher {
    pub name: String,
    password_sha256: [u8; 32],
    /// `iot/web` (exact), `iot/*` (everything under `iot/`) or `*`.
    pub patterns: Vec<String>,
}

impl Publisher {
    pub fn may_push(&self, repository: &str) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => repository.starts_with(prefix) && prefix.ends_with('/'),
            None => p == repository,
        })
    }
}

/// Parses the publishers file; `#` starts a comment.
pub fn parse_publishers(text: &str) -> Result<Vec<Publisher>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, hash, patterns] = fields[..] else {
            return Err(format!("publishers line {}: want NAME SHA256HEX PATTERNS", n + 1));
        };
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(hash.as_bytes())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| format!("publishers line {}: the hash is not 64 hex digits", n + 1))?;
        out.push(Publisher {
            name: name.to_owned(),
            password_sha256: bytes,
            patterns: patterns.split(',').map(str::to_owned).collect(),
        });
    }
    Ok(out)
}

/// The line for a publisher with this password (what `iot-up` writes).
pub fn publisher_line(name: &str, password: &str, patterns: &[&str]) -> String {
    format!(
        "{name} {} {}",
        data_encoding::HEXLOWER.encode(&Sha256::digest(password.as_bytes())),
        patterns.join(",")
    )
}

/// Who asked, once the credentials checked out.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    Publisher(Publisher),
    /// A device holding a valid pull grant.
    Device(Claims),
}

/// What the service checks tokens against and signs with.
#[derive(Debug, Clone)]
pub struct RealmConfig {
    pub issuer: String,
    pub service: String,
    pub public_key: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no credentials: the registry's token service needs a user name and a password")]
    NoCredentials,
    #[error("user {0:?}: wrong password, and the password is not a valid pull grant")]
    BadPassword(String),
    #[error("user {user:?}: the pull grant {why}")]
    BadGrant { user: String, why: String },
    #[error("the token is for service {asked:?}; this service issues for {ours:?}")]
    WrongService { asked: String, ours: String },
}

/// Checks `user`/`password`.
pub fn authenticate(
    user: &str,
    password: &str,
    publishers: &[Publisher],
    config: &RealmConfig,
    now_unix: i64,
) -> Result<Caller, Refusal> {
    if user.is_empty() || password.is_empty() {
        return Err(Refusal::NoCredentials);
    }
    let sum: [u8; 32] = Sha256::digest(password.as_bytes()).into();
    if let Some(p) = publishers.iter().find(|p| p.name == user) {
        // Both sides are hashes: comparing them leaks nothing about the password.
        if p.password_sha256 == sum {
            return Ok(Caller::Publisher(p.clone()));
        }
    }
    if password.matches('.').count() != 2 {
        return Err(Refusal::BadPassword(user.to_owned()));
    }
    let claims =
        token::verify(password, &config.public_key, &config.issuer, &config.service, now_unix).map_err(|e| {
            Refusal::BadGrant {
                user: user.to_owned(),
                why: match e {
                    TokenError::Signature => "is not signed by the key this service trusts".to_owned(),
                    TokenError::Claims(why) => why,
                    other => format!("is unreadable: {other}"),
                },
            }
        })?;
    // No leeway past a grant's expiry: the token issued from it would live 0 s,
    // and a registry with its own leeway might still take it.
    if claims.exp <= now_unix {
        return Err(Refusal::BadGrant {
            user: user.to_owned(),
            why: "has expired".into(),
        });
    }
    if claims.sub != user {
        return Err(Refusal::BadGrant {
            user: user.to_owned(),
            why: format!("was issued to {:?}", claims.sub),
        });
    }
    Ok(Caller::Device(claims))
}

/// What `caller` gets of `requested`, and for how long.
pub fn grant(caller: &Caller, requested: &[Access], now_unix: i64) -> (Vec<Access>, Duration) {
    let mut out = Vec::new();
    for want in requested.iter().filter(|a| a.kind == "repository") {
        let allowed: Vec<String> = match caller {
            Caller::Publisher(p) if p.may_push(&want.name) => want
                .actions
                .iter()
                .filter(|a| *a == "pull" || *a == "push")
                .cloned()
                .collect(),
            Caller::Publisher(_) => Vec::new(),
            Caller::Device(claims) => want
                .actions
                .iter()
                .filter(|a| {
                    claims
                        .access
                        .iter()
                        .any(|g| g.kind == "repository" && g.name == want.name && g.actions.contains(a))
                })
                .cloned()
                .collect(),
        };
        if !allowed.is_empty() {
            out.push(Access {
                kind: want.kind.clone(),
                name: want.name.clone(),
                actions: allowed,
            });
        }
    }
    let ttl = match caller {
        Caller::Publisher(_) => PUBLISHER_TTL,
        Caller::Device(c) => DEVICE_TTL.min(Duration::from_secs(u64::try_from(c.exp - now_unix).unwrap_or(0))),
    };
    (out, ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::SigningKey;
    use crate::token::tests::key;

    fn config(k: &SigningKey) -> RealmConfig {
        RealmConfig {
            issuer: "iss".into(),
            service: "svc".into(),
            public_key: k.public_key().to_vec(),
        }
    }

    #[test]
    fn publishers_push_where_their_patterns_allow() {
        let file = format!(
            "# CI\n{}\n{}\n",
            publisher_line("ci", "s3cret", &["iot/*"]),
            publisher_line("ops", "x", &["*"])
        );
        let pubs = parse_publishers(&file).expect("parse");
        let k = key();
        let ci = authenticate("ci", "s3cret", &pubs, &config(&k), 0).expect("ci");
        let want = [
            Access::repository("iot/web", &["pull", "push", "delete"]),
            Access::repository("other/web", &["pull"]),
            Access::repository("iotx", &["push"]),
        ];
        let (got, ttl) = grant(&ci, &want, 0);
        assert_eq!(got, [Access::repository("iot/web", &["pull", "push"])]);
        assert_eq!(ttl, PUBLISHER_TTL);
        let ops = authenticate("ops", "x", &pubs, &config(&k), 0).expect("ops");
        assert_eq!(grant(&ops, &want, 0).0.len(), 3);
        assert_eq!(
            authenticate("ci", "wrong", &pubs, &config(&k), 0),
            Err(Refusal::BadPassword("ci".into()))
        );
        assert!(parse_publishers("ci nothex iot/*").is_err());
    }

    #[test]
    fn a_device_gets_only_what_its_grant_lists_and_no_longer() {
        let k = key();
        let (grant_token, _) = k
            .mint(
                "iss",
                "svc",
                "pi-1",
                vec![Access::repository("iot/web", &["pull"])],
                1_000,
                Duration::from_secs(300),
            )
            .expect("mint");
        let caller = authenticate("pi-1", &grant_token, &[], &config(&k), 1_100).expect("device");
        let (got, ttl) = grant(
            &caller,
            &[
                Access::repository("iot/web", &["pull", "push"]),
                Access::repository("iot/db", &["pull"]),
            ],
            1_100,
        );
        assert_eq!(
            got,
            [Access::repository("iot/web", &["pull"])],
            "no push, no other repository"
        );
        assert_eq!(ttl, Duration::from_secs(200), "never past the grant");
    }

    #[test]
    fn a_grant_is_bound_to_its_device_and_key() {
        let (k, other) = (key(), key());
        let (t, _) = k
            .mint("iss", "svc", "pi-1", vec![], 1_000, Duration::from_secs(300))
            .expect("mint");
        let e = authenticate("pi-2", &t, &[], &config(&k), 1_000).expect_err("other device");
        assert!(e.to_string().contains("issued to \"pi-1\""), "{e}");
        let e = authenticate("pi-1", &t, &[], &config(&other), 1_000).expect_err("other key");
        assert!(
            e.to_string().contains("not signed by the key this service trusts"),
            "{e}"
        );
        let e = authenticate("pi-1", &t, &[], &config(&k), 1_300).expect_err("at its expiry, no leeway");
        assert!(e.to_string().contains("expired"), "{e}");
        let e = authenticate("pi-1", &t, &[], &config(&k), 2_000).expect_err("expired");
        assert!(e.to_string().contains("expired"), "{e}");
    }
}
