//! Link quality of one device: pulses missed (sequence gaps), pulses late,
//! reconnections in the last 24 h, ping round trip; and when a link looks
//! flaky.

use crate::store::LinkStats;

/// How long connection times are kept for `reconnects_24h`.
pub const DAY_MS: u64 = 24 * 3600 * 1000;
/// Most connection times remembered per device.
pub const MAX_CONNECTS: usize = 128;

/// A connection was accepted at `now`.
pub fn connected(link: &mut LinkStats, now: u64) {
    link.connects_ms.retain(|t| now.saturating_sub(*t) < DAY_MS);
    link.connects_ms.push(now);
    if link.connects_ms.len() > MAX_CONNECTS {
        link.connects_ms.remove(0);
    }
}

/// Pulse `seq` arrived at `now`; the previous one was `last_seq` at
/// `last_seen_ms` (`last_seq` 0: the first of this agent process).
pub fn pulsed(link: &mut LinkStats, last_seq: u32, last_seen_ms: Option<u64>, seq: u32, interval_ms: u64, now: u64) {
    if last_seq != 0 && seq > last_seq {
        link.missed_pulses += u64::from(seq - last_seq - 1);
    }
    if last_seq != 0 {
        if let Some(prev) = last_seen_ms {
            if now.saturating_sub(prev) * 2 > interval_ms * 3 {
                link.late_pulses += 1;
            }
        }
    }
    link.pulses += 1;
}

/// Reconnections in the 24 h before `now` (the first connection is not a
/// reconnection).
pub fn reconnects_24h(link: &LinkStats, now: u64) -> u64 {
    let in_window = link.connects_ms.iter().filter(|t| now.saturating_sub(**t) < DAY_MS).count() as u64;
    let older_known = link.connects_ms.iter().any(|t| now.saturating_sub(*t) >= DAY_MS);
    if older_known {
        in_window
    } else {
        in_window.saturating_sub(1)
    }
}

/// Whether the link looks unreliable: 3+ reconnections a day, or more than
/// 5 % of pulses missed or late.
pub fn flaky(link: &LinkStats, reconnects_24h: u64) -> bool {
    let total = link.pulses;
    let bad = link.missed_pulses + link.late_pulses;
    reconnects_24h >= 3 || (total >= 20 && bad * 20 > total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_lateness() {
        let mut l = LinkStats::default();
        pulsed(&mut l, 0, None, 1, 1000, 0);
        pulsed(&mut l, 1, Some(0), 4, 1000, 1000);
        assert_eq!(l.missed_pulses, 2);
        pulsed(&mut l, 4, Some(1000), 5, 1000, 2600);
        assert_eq!(l.late_pulses, 1);
        assert_eq!(l.pulses, 3);
    }

    #[test]
    fn reconnects_count_within_a_day() {
        let mut l = LinkStats::default();
        for t in [0, 10, 20, 30] {
            connected(&mut l, t);
        }
        assert_eq!(reconnects_24h(&l, 40), 3);
        assert!(flaky(&l, 3));
        assert_eq!(reconnects_24h(&l, DAY_MS + 25), 1);
    }
}
