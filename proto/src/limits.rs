//! Protocol constants: version, subprotocol and size limits.
//!
//! Both sides enforce the same limits: the agent never sends more, the
//! collector closes a connection that does.

/// Version of the message format this build speaks. Bumped on any
/// incompatible change.
///
/// - 1: Hello, Pulse, bells.
/// - 2: adds checks ([`crate::check`]): `AgentMsg::Checks`,
///   `AgentMsg::CheckedPulse`, `ServerMsg::ResendChecks`. Every version-1
///   message is unchanged, byte for byte.
pub const PROTOCOL_VERSION: u16 = 2;

/// Oldest version this build still speaks: a collector serves agents of
/// every version from this one to [`PROTOCOL_VERSION`], and an agent falls
/// back to it against an older collector.
pub const OLDEST_PROTOCOL_VERSION: u16 = 1;

/// WebSocket subprotocol of [`PROTOCOL_VERSION`]. The agent offers every
/// version it speaks, newest first; the collector answers with the newest
/// it speaks too, and that version holds for the connection.
pub const SUBPROTOCOL: &str = "pulsebell.v2";

/// WebSocket subprotocol of version 1.
pub const SUBPROTOCOL_V1: &str = "pulsebell.v1";

/// The subprotocol name of `version`, if this build speaks it.
pub fn subprotocol(version: u16) -> Option<&'static str> {
    match version {
        1 => Some(SUBPROTOCOL_V1),
        2 => Some(SUBPROTOCOL),
        _ => None,
    }
}

/// The version a subprotocol name stands for, if this build speaks it.
pub fn subprotocol_version(name: &str) -> Option<u16> {
    (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).find(|v| subprotocol(*v) == Some(name))
}

/// Path of the device WebSocket endpoint on the collector.
pub const WS_PATH: &str = "/v1/ws";

/// Largest WebSocket message either side accepts, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Longest device id, in bytes. Ids are `[A-Za-z0-9._-]`, see [`valid_device_id`].
pub const MAX_DEVICE_ID: usize = 64;

/// Longest short string in a message (hostname, OS, kernel, versions, boot id).
pub const MAX_STRING: usize = 256;

/// Most tags one device may carry.
pub const MAX_TAGS: usize = 32;

/// Longest tag, in bytes.
pub const MAX_TAG: usize = 64;

/// Most actions an agent may advertise, and most parameters one bell may carry.
pub const MAX_ITEMS: usize = 64;

/// Longest bell parameter value, in bytes.
pub const MAX_PARAM_VALUE: usize = 1024;

/// Tail of an action's combined stdout and stderr that is kept and reported.
pub const MAX_OUTPUT: usize = 4 * 1024;

/// Most checks one agent may report (version 2).
pub const MAX_CHECKS: usize = 64;

/// Longest check name, in bytes; names follow the device id rules.
pub const MAX_CHECK_NAME: usize = 64;

/// Tail of a check's output that travels (version 2). With
/// [`MAX_CHECKS`] full reports this keeps one report under [`MAX_FRAME`].
pub const MAX_CHECK_OUTPUT: usize = 512;

/// Shortest pulse interval an agent may ask for, in milliseconds.
pub const MIN_INTERVAL_MS: u32 = 100;

/// Longest pulse interval an agent may ask for, in milliseconds (1 hour).
pub const MAX_INTERVAL_MS: u32 = 3_600_000;

/// Whether `id` is a valid device id: 1 to [`MAX_DEVICE_ID`] bytes of ASCII
/// letters, digits, `.`, `_` and `-`, not starting with `.` or `-`.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID
        && !id.starts_with(['.', '-'])
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `tag` is a valid tag: like a device id, at most [`MAX_TAG`] bytes.
pub fn valid_tag(tag: &str) -> bool {
    tag.len() <= MAX_TAG && valid_device_id(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocols_name_every_version() {
        for v in OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION {
            assert_eq!(subprotocol_version(subprotocol(v).unwrap()), Some(v));
        }
        assert_eq!(subprotocol_version("pulsebell.v1"), Some(1));
        assert_eq!(subprotocol_version("pulsebell.v3"), None);
        // A full check report fits in one frame.
        let per_check = MAX_CHECK_NAME + MAX_STRING + MAX_CHECK_OUTPUT + 3 * 2 + 2 + 10;
        assert!(MAX_CHECKS * per_check + 8 < MAX_FRAME);
    }

    #[test]
    fn device_ids() {
        assert!(valid_device_id("pi-kitchen.01_a"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("-x"));
        assert!(!valid_device_id("a b"));
        assert!(!valid_device_id("a/b"));
        assert!(!valid_device_id(&"a".repeat(MAX_DEVICE_ID + 1)));
        assert!(valid_device_id(&"a".repeat(MAX_DEVICE_ID)));
    }
}
