//! Error text that clusters across a fleet.
//!
//! The same failure on 500 devices must read as one message, so the operator can
//! group it. Runtime messages carry tokens that differ per device and per attempt:
//! container ids, hashes, the device's own id, timestamps, durations. Both sides use
//! [`normalize_error`]: the agent before it reports an error (so what it sends is
//! already stable), the operator before it groups (for older agents, and to mask the
//! device id).
//!
//! Only whole tokens are replaced. A token is a maximal run of `A-Z a-z 0-9 _ - . :`
//! characters (so `2026-11-30T02:23:51Z` and `1.5s` are single tokens), and a device
//! called `web` or `1` never mangles `web` inside another word or `10` in a port.

/// Placeholders, so a reader sees that something was masked.
pub const ID_MASK: &str = "<id>";
pub const DEVICE_MASK: &str = "<device>";
pub const TIME_MASK: &str = "<time>";
pub const DURATION_MASK: &str = "<duration>";

/// Replaces volatile tokens in `message`: hex ids of 12 or more digits, the device id
/// (if given; as a whole token, or as the first part of a dotted container name),
/// RFC 3339 timestamps and durations such as `250ms`, `1.5s` or `2m30s`.
pub fn normalize_error(message: &str, device: Option<&str>) -> String {
    let mut out = String::with_capacity(message.len());
    let mut token = String::new();
    for ch in message.chars() {
        if is_token_char(ch) {
            token.push(ch);
        } else {
            flush(&mut out, &mut token, device);
            out.push(ch);
        }
    }
    flush(&mut out, &mut token, device);
    out
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

fn flush(out: &mut String, token: &mut String, device: Option<&str>) {
    if token.is_empty() {
        return;
    }
    // Sentence punctuation is not part of the token ("... in use by abc123.").
    let core_len = token.trim_end_matches(['.', ':']).len();
    let (core, tail) = token.split_at(core_len);
    match (mask(core, device), device) {
        (Some(m), _) => out.push_str(m),
        // A container name: `<device>.<namespace>.<name>...`.
        (None, Some(d)) if core.strip_prefix(d).is_some_and(|rest| rest.starts_with('.')) => {
            out.push_str(DEVICE_MASK);
            out.push_str(&core[d.len()..]);
        }
        (None, _) => out.push_str(core),
    }
    out.push_str(tail);
    token.clear();
}

fn mask(token: &str, device: Option<&str>) -> Option<&'static str> {
    if token.is_empty() {
        return None;
    }
    if device.is_some_and(|d| d == token) {
        return Some(DEVICE_MASK);
    }
    if token.len() >= 12 && token.bytes().all(|b| b.is_ascii_hexdigit()) && token.bytes().any(|b| b.is_ascii_digit()) {
        return Some(ID_MASK);
    }
    if is_timestamp(token) {
        return Some(TIME_MASK);
    }
    if is_duration(token) {
        return Some(DURATION_MASK);
    }
    None
}

/// `2026-11-30T02:23:51Z`, `2026-11-30T02:23:51.123+00:00` and the like.
fn is_timestamp(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() >= 19
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && b[16] == b':'
}

/// One or more `<number><unit>` groups: `250ms`, `1.5s`, `2m30s`, `1h0m0s`.
fn is_duration(token: &str) -> bool {
    const UNITS: [&str; 7] = ["ns", "us", "µs", "ms", "s", "m", "h"];
    let mut rest = token;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        if digits == 0 || !rest[..digits].bytes().any(|b| b.is_ascii_digit()) {
            return false;
        }
        rest = &rest[digits..];
        // Longest unit first, so "ms" is not read as "m" followed by "s".
        let Some(unit) = UNITS.iter().filter(|u| rest.starts_with(**u)).max_by_key(|u| u.len()) else {
            return false;
        };
        rest = &rest[unit.len()..];
        groups += 1;
    }
    groups > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_and_hashes_are_masked() {
        let a = normalize_error(
            "the container name \"x\" is already in use by 33a466ebe20f2670fe38e88607e5af7cc4a53e19a3a0bae56a5daa8128ac258f.",
            None,
        );
        assert_eq!(a, "the container name \"x\" is already in use by <id>.");
        assert_eq!(normalize_error("start 33a466ebe20f failed", None), "start <id> failed");
        // Short hex words and plain words stay.
        assert_eq!(normalize_error("image deadbeef cafe", None), "image deadbeef cafe");
        assert_eq!(normalize_error("abcdefabcdefab", None), "abcdefabcdefab");
    }

    #[test]
    fn device_ids_are_masked_as_whole_tokens_only() {
        assert_eq!(
            normalize_error("device web: service web-api failed on web", Some("web")),
            "device <device>: service web-api failed on <device>"
        );
        assert_eq!(
            normalize_error("listen tcp4 :10: bind on port 17 of device 7 after 7.5s", Some("7")),
            "listen tcp4 :10: bind on port 17 of device <device> after <duration>"
        );
        // Container names start with the device id.
        assert_eq!(
            normalize_error("container dev-a.default.web.web is stopping", Some("dev-a")),
            "container <device>.default.web.web is stopping"
        );
        assert_eq!(normalize_error("default.dev-a.x", Some("dev-a")), "default.dev-a.x");
        assert_eq!(normalize_error("pi-7 is down", Some("pi-7")), "<device> is down");
    }

    #[test]
    fn timestamps_and_durations_are_masked() {
        assert_eq!(
            normalize_error("exited at 2026-11-30T02:23:51.114618578Z after 1.5s", None),
            "exited at <time> after <duration>"
        );
        assert_eq!(
            normalize_error("timed out after 250ms (retry in 2m30s)", None),
            "timed out after <duration> (retry in <duration>)"
        );
        // Not durations: plain numbers, words that start with digits.
        assert_eq!(
            normalize_error("port 8080, 3 devices, 2nd try", None),
            "port 8080, 3 devices, 2nd try"
        );
    }

    #[test]
    fn the_same_failure_on_two_devices_reads_the_same() {
        let a = normalize_error(
            "service web: cannot listen on the TCP port: listen tcp4 :8080: bind: address already in use (container 0123456789abcdef)",
            Some("dev-a"),
        );
        let b = normalize_error(
            "service web: cannot listen on the TCP port: listen tcp4 :8080: bind: address already in use (container fedcba9876543210)",
            Some("dev-b"),
        );
        assert_eq!(a, b);
    }
}
