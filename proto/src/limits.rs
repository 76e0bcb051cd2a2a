//! Protocol constants: version, subprotocol and size limits.
//!
//! Both sides enforce the same limits: the agent never sends more, the
//! collector closes a connection that does.

/// Version of the message format. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;

/// WebSocket subprotocol both sides must negotiate.
pub const SUBPROTOCOL: &str = "pulsebell.v1";

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
