//! What each identity may do on NATS: an allow-list of subjects, nothing else.
//!
//! A device may:
//! - receive changes of its own desired state (`$KV.desired-state.<id>.>`);
//! - ask the read responder for its own desired state (`iot.desired.read.<id>`);
//! - write its own status through the relay (`iot.status.write.<id>`): never by a
//!   JetStream publish, whose acknowledgement goes to a reply subject the publisher
//!   chooses and could land in another device's desired state;
//! - receive on its own inbox (`_INBOX_<id>.>`).
//!
//! No `$JS.API` subject at all: no stream info, no consumers, no direct gets, no
//! purge or delete. The operator gets the JetStream API of the two platform buckets
//! only, the desired-state writes, the status writes it relays for devices, status
//! reads, and replies to device requests.

use harmony_reconciler_contracts::keys::{kv_stream_name, kv_subject};
use harmony_reconciler_contracts::read::{
    DESIRED_READ_PREFIX, STATUS_WRITE_PREFIX, desired_read_subject, device_inbox_prefix, status_write_subject,
};
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};

use crate::identity::Identity;
use crate::nats_jwt::Permissions;

pub fn permissions_for(identity: &Identity) -> Permissions {
    match identity {
        Identity::Device(id) => Permissions {
            publish: vec![status_write_subject(id), desired_read_subject(id)],
            subscribe: vec![
                format!("$KV.{DESIRED_STATE_BUCKET}.{id}.>"),
                format!("{}.>", device_inbox_prefix(id)),
            ],
            respond: false,
        },
        Identity::Viewer(_) => {
            // One ordered consumer (a KV watch) on the status bucket, and nothing
            // that writes: no KV subject, no acknowledgements, no other stream.
            let stream = kv_stream_name(AGENT_STATUS_BUCKET);
            Permissions {
                publish: vec![
                    "$JS.API.INFO".to_owned(),
                    format!("$JS.API.STREAM.INFO.{stream}"),
                    format!("$JS.API.CONSUMER.CREATE.{stream}"),
                    format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                    format!("$JS.API.CONSUMER.INFO.{stream}.>"),
                    format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
                    format!("$JS.FC.{stream}.>"),
                ],
                subscribe: vec!["_INBOX.>".to_owned()],
                respond: false,
            }
        }
        Identity::Operator(_) => {
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
                    "_INBOX.>".to_owned(),
                    format!("{DESIRED_READ_PREFIX}.*"),
                    format!("{STATUS_WRITE_PREFIX}.*"),
                    kv_subject(AGENT_STATUS_BUCKET, ">"),
                    kv_subject(DESIRED_STATE_BUCKET, ">"),
                ],
                respond: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use harmony_reconciler_contracts::Id;

    use super::*;

    #[test]
    fn a_device_gets_its_own_subjects_and_nothing_else() -> Result<(), harmony_reconciler_contracts::IdError> {
        let p = permissions_for(&Identity::Device(Id::new("pi-7")?));
        assert_eq!(p.publish, ["iot.status.write.pi-7", "iot.desired.read.pi-7"]);
        assert_eq!(p.subscribe, ["$KV.desired-state.pi-7.>", "_INBOX_pi-7.>"]);
        assert!(!p.respond);
        assert!(
            p.publish.iter().all(|s| !s.starts_with('$')),
            "devices publish to no JetStream subject (API, KV or acknowledgement)"
        );
        Ok(())
    }

    #[test]
    fn a_viewer_reads_device_reports_and_writes_nothing() {
        let p = permissions_for(&Identity::Viewer("dashboard".into()));
        assert!(!p.respond);
        for s in &p.publish {
            assert!(!s.starts_with("$KV."), "{s}: a KV write");
            assert!(!s.contains("desired-state"), "{s}: desired state is not its business");
            assert!(!s.starts_with("$JS.ACK"), "{s}");
            assert!(
                !s.contains("STREAM.CREATE") && !s.contains("STREAM.UPDATE") && !s.contains("PURGE"),
                "{s}"
            );
        }
        assert!(
            p.publish
                .iter()
                .any(|s| s == "$JS.API.CONSUMER.CREATE.KV_agent-status.>")
        );
        assert_eq!(p.subscribe, ["_INBOX.>"]);
    }

    #[test]
    fn the_operator_is_limited_to_the_platform_buckets() {
        let p = permissions_for(&Identity::Operator("operator".into()));
        assert!(p.respond);
        for s in p
            .publish
            .iter()
            .filter(|s| s.starts_with("$JS.API.") && *s != "$JS.API.INFO")
        {
            assert!(
                s.contains("KV_desired-state") || s.contains("KV_agent-status"),
                "{s} reaches beyond the platform buckets"
            );
            assert!(
                !s.contains("PURGE") && !s.contains(".DELETE.KV_") || s.contains("CONSUMER"),
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
    }
}
