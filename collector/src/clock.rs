//! Wall-clock time as the collector records it: Unix milliseconds, shown as
//! RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix time now, ms.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) of a Unix ms time.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
