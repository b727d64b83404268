//! What each identity may do on NATS: an allow-list of subjects, per-user limits,
//! nothing else. README "Identity and trust" shows the same table.
//!
//! One rule shapes everything here. NATS delivers a request's answer to whatever
//! reply subject the requester names, and a push consumer's messages to whatever
//! deliver subject its creator names; permissions check what a client publishes,
//! not where the server then publishes. So any identity with JetStream API rights
//! can make the server write into any subject of the account, a device's desired
//! state included. Only the operator, which may write every bucket anyway, gets
//! the JetStream API.
//!
//! - A **device** may receive changes of its own desired state
//!   (`$KV.desired-state.<id>.>`, a signal only: it re-reads through the responder),
//!   ask the read responder for it (`iot.desired.read.<id>`), write its own status
//!   through the relay (`iot.status.write.<id>`), and receive on its own inbox
//!   (`_INBOX_<id>.>`).
//! - A **viewer** (the dashboard) may ask the operator for the fleet's reports
//!   (`iot.status.read.<name>`), receive changes of them (`$KV.agent-status.>`),
//!   and receive on its own inbox (`_SVC_INBOX.viewer.<name>.>`).
//! - The **operator** gets the JetStream API of the two platform buckets, writes
//!   desired state and (as the relay) status, serves the three services above,
//!   and receives on its own inbox.
//! - The **callout**'s own user is set in nats-server's configuration, not here:
//!   [`CALLOUT_NATS_PERMISSIONS`].

use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::keys::{kv_stream_name, kv_subject};
use harmony_reconciler_contracts::read::MAX_STATUS_BYTES;
use harmony_reconciler_contracts::read::{
    DESIRED_READ_PREFIX, REGISTRY_GRANT_PREFIX, STATUS_READ_PREFIX, STATUS_WRITE_PREFIX, ServiceRole,
    desired_read_subject, device_inbox_prefix, registry_grant_subject, service_inbox_prefix, status_read_subject,
    status_write_subject,
};
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};

use crate::claims::Identity;
use crate::nats_jwt::{Limits, Permissions};

/// Largest message a device may publish: its biggest status write plus room for
/// headers and protocol framing.
pub const DEVICE_MAX_PAYLOAD: i64 = MAX_STATUS_BYTES as i64 + 16 * 1024;
/// Subscriptions a device may hold. An agent uses two (its desired-state subject
/// and its inbox); the rest is headroom for a newer agent.
pub const DEVICE_MAX_SUBS: i64 = 16;
/// Largest message a viewer may publish: it only sends snapshot requests.
pub const VIEWER_MAX_PAYLOAD: i64 = 64 * 1024;
/// Subscriptions a viewer may hold: report changes and its inbox.
pub const VIEWER_MAX_SUBS: i64 = 16;

/// Subscriptions any one connection of the IOT account may hold, set on the account
/// in nats-server's configuration ([`IOT_ACCOUNT_LIMITS`]). nats-server 2.15 does
/// not apply a user JWT's limits to users admitted by the auth callout (it clears
/// the connection's JWT before it applies limits: `server/auth_callout.go`), so the
/// per-user limits above are carried for servers that do, and this account-wide
/// cap is what holds today. It covers the operator's few subscriptions, and is
/// far below what would let one device cost the server real memory.
pub const ACCOUNT_MAX_SUBS: i64 = 64;

/// The IOT account's `limits` block in nats-server's configuration.
pub const IOT_ACCOUNT_LIMITS: &str = "limits: { max_subscriptions: 64 }";

/// The inbox prefix of the callout's own connection.
pub const CALLOUT_INBOX_PREFIX: &str = "_SVC_INBOX.callout";

/// The callout's user in nats-server's configuration (the AUTH account, which has
/// no JetStream and no other user): it receives authorization requests and answers
/// them (`allow_responses`), and uses its own inbox. Nothing else.
pub const CALLOUT_NATS_PERMISSIONS: &str = "{ publish: { allow: [\"_SVC_INBOX.callout.>\"] }, subscribe: { allow: [\"$SYS.REQ.USER.AUTH\", \"_SVC_INBOX.callout.>\"] }, allow_responses: { max: 1 } }";

pub fn permissions_for(identity: &Identity) -> Permissions {
    match identity {
        Identity::Device(id) => Permissions {
            publish: vec![
                status_write_subject(id),
                desired_read_subject(id),
                registry_grant_subject(id),
            ],
            subscribe: vec![
                kv_subject(DESIRED_STATE_BUCKET, &format!("{id}.>")),
                format!("{}.>", device_inbox_prefix(id)),
            ],
            respond: false,
            limits: Limits {
                subs: DEVICE_MAX_SUBS,
                payload: DEVICE_MAX_PAYLOAD,
            },
        },
        Identity::Viewer(name) => Permissions {
            publish: vec![status_read_subject(name)],
            subscribe: vec![
                kv_subject(AGENT_STATUS_BUCKET, ">"),
                format!("{}.>", service_inbox_prefix(ServiceRole::Viewer, name)),
            ],
            respond: false,
            limits: Limits {
                subs: VIEWER_MAX_SUBS,
                payload: VIEWER_MAX_PAYLOAD,
            },
        },
        Identity::Operator(name) => operator_permissions(name),
    }
}

fn operator_permissions(name: &Id) -> Permissions {
    let mut publish = vec![
        kv_subject(DESIRED_STATE_BUCKET, ">"),
        // The status relay stores what each device sends on its own subject.
        kv_subject(AGENT_STATUS_BUCKET, "status.*"),
        "$JS.API.INFO".to_owned(),
    ];
    for bucket in [DESIRED_STATE_BUCKET, AGENT_STATUS_BUCKET] {
        let stream = kv_stream_name(bucket);
        publish.extend([
            format!("$JS.API.STREAM.INFO.{stream}"),
            format!("$JS.API.STREAM.CREATE.{stream}"),
            format!("$JS.API.STREAM.UPDATE.{stream}"),
            format!("$JS.API.DIRECT.GET.{stream}"),
            format!("$JS.API.DIRECT.GET.{stream}.>"),
            format!("$JS.API.CONSUMER.CREATE.{stream}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
            format!("$JS.API.CONSUMER.INFO.{stream}.>"),
            format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
            format!("$JS.FC.{stream}.>"),
        ]);
    }
    Permissions {
        publish,
        subscribe: vec![
            format!("{}.>", service_inbox_prefix(ServiceRole::Operator, name)),
            format!("{DESIRED_READ_PREFIX}.*"),
            format!("{REGISTRY_GRANT_PREFIX}.*"),
            format!("{STATUS_WRITE_PREFIX}.*"),
            format!("{STATUS_READ_PREFIX}.*"),
        ],
        // Answers go to the askers' inboxes, which it may not publish to otherwise.
        respond: true,
        limits: Limits::NONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every subject an identity publishes to: none may be a JetStream API, KV or
    /// acknowledgement subject unless it is the operator.
    fn reaches_jetstream(p: &Permissions) -> bool {
        p.publish.iter().any(|s| s.starts_with('$'))
    }

    #[test]
    fn a_device_gets_its_own_subjects_and_nothing_else() {
        let p = permissions_for(&Identity::Device(id("pi-7")));
        assert_eq!(
            p.publish,
            [
                "iot.status.write.pi-7",
                "iot.desired.read.pi-7",
                "iot.registry.grant.pi-7"
            ]
        );
        assert_eq!(p.subscribe, ["$KV.desired-state.pi-7.>", "_INBOX_pi-7.>"]);
        assert!(!p.respond);
        assert!(
            !reaches_jetstream(&p),
            "devices publish to no JetStream subject (API, KV or ack)"
        );
        assert_eq!(p.limits.subs, 16);
        // Room for the largest status the agent may send, and not much more.
        assert!(p.limits.payload > MAX_STATUS_BYTES as i64);
        assert!(p.limits.payload < 2 * MAX_STATUS_BYTES as i64);
    }

    #[test]
    fn a_viewer_reads_reports_and_can_make_the_server_write_nothing() {
        let p = permissions_for(&Identity::Viewer(id("dashboard")));
        assert_eq!(p.publish, ["iot.status.read.dashboard"]);
        assert_eq!(p.subscribe, ["$KV.agent-status.>", "_SVC_INBOX.viewer.dashboard.>"]);
        assert!(!p.respond);
        assert!(
            !reaches_jetstream(&p),
            "no JetStream API: it could aim answers anywhere"
        );
        assert!(
            !p.subscribe.iter().any(|s| s.starts_with("_INBOX")),
            "nobody else's replies"
        );
        assert!(p.limits.payload <= 64 * 1024 && p.limits.subs <= 16);
    }

    #[test]
    fn the_operator_is_limited_to_the_platform_buckets_and_its_own_inbox() {
        let p = permissions_for(&Identity::Operator(id("operator")));
        assert!(p.respond);
        for s in p
            .publish
            .iter()
            .filter(|s| s.starts_with("$JS.") && *s != "$JS.API.INFO")
        {
            assert!(
                s.contains("KV_desired-state") || s.contains("KV_agent-status"),
                "{s} reaches beyond the platform buckets"
            );
            assert!(
                !s.contains("PURGE") && (!s.contains(".DELETE.") || s.contains("CONSUMER")),
                "{s}"
            );
        }
        // It writes desired state, and status only as the devices' relay.
        assert!(p.publish.contains(&"$KV.desired-state.>".to_owned()));
        assert!(
            p.publish
                .iter()
                .filter(|s| s.starts_with("$KV.agent-status"))
                .all(|s| s == "$KV.agent-status.status.*")
        );
        assert_eq!(
            p.subscribe,
            [
                "_SVC_INBOX.operator.operator.>",
                "iot.desired.read.*",
                "iot.registry.grant.*",
                "iot.status.write.*",
                "iot.status.read.*"
            ]
        );
    }

    // The account's cap never cuts below what a user's own limit allows.
    const _: () = assert!(ACCOUNT_MAX_SUBS >= DEVICE_MAX_SUBS && ACCOUNT_MAX_SUBS >= VIEWER_MAX_SUBS);

    #[test]
    fn the_account_cap_is_what_the_configuration_says() {
        assert!(IOT_ACCOUNT_LIMITS.contains(&format!("max_subscriptions: {ACCOUNT_MAX_SUBS}")));
    }

    #[test]
    fn inboxes_of_different_identities_never_overlap() {
        // Names that are prefixes of one another, and a device named like a
        // service, get nothing of each other's.
        let mut inboxes = Vec::new();
        for name in ["a", "ab", "viewer", "operator", "a-b", "a_b"] {
            for identity in [
                Identity::Device(id(name)),
                Identity::Viewer(id(name)),
                Identity::Operator(id(name)),
            ] {
                let p = permissions_for(&identity);
                let inbox = p
                    .subscribe
                    .iter()
                    .find(|s| s.contains("INBOX"))
                    .cloned()
                    .unwrap_or_default();
                inboxes.push((format!("{identity:?}"), inbox));
            }
        }
        inboxes.push(("callout".into(), format!("{CALLOUT_INBOX_PREFIX}.>")));
        for (a, sa) in &inboxes {
            for (b, sb) in &inboxes {
                if a == b {
                    continue;
                }
                // `x.>` covers every subject that starts with `x.`.
                let covered = sa.trim_end_matches('>');
                assert!(!sb.starts_with(covered), "{a}'s {sa} covers {b}'s {sb}");
            }
        }
    }
}
