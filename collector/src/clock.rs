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

/// `deadline` rounded up to the next multiple of `step`, counted from one
/// process-wide origin: deadlines of many tasks on the same grid fall due
/// together and wake their thread once (connection timers, dashboard ticks).
pub fn on_grid(deadline: tokio::time::Instant, step: Duration) -> tokio::time::Instant {
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
    let since = deadline.saturating_duration_since(origin).as_nanos();
    let step = step.as_nanos().max(1);
    let steps = since.div_ceil(step);
    origin + Duration::from_nanos(u64::try_from(steps * step).unwrap_or(u64::MAX))
}
