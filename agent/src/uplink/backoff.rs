//! Reconnect backoff: exponential with full jitter. Pure state, no I/O.
//!
//! Full jitter (a uniformly random delay between a small floor and the
//! exponential ceiling) spreads a fleet that lost its collector at the same
//! moment over the whole window, instead of bringing it back in waves.

use std::time::Duration;

use rand::Rng;

/// First ceiling.
pub const BASE: Duration = Duration::from_secs(1);
/// Largest ceiling.
pub const CAP: Duration = Duration::from_secs(60);
/// Smallest delay, so a failing collector never sees a busy loop.
pub const FLOOR: Duration = Duration::from_millis(100);
/// A connection that lasted this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(BASE, CAP)
    }
}

impl Backoff {
    /// A backoff whose ceiling starts at `base` and doubles up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, attempt: 0 }
    }

    /// The current ceiling: `min(cap, base × 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt, and one step up for the one after.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_ms = ceiling.as_millis() as u64;
        let floor_ms = (FLOOR.as_millis() as u64).min(ceiling_ms);
        Duration::from_millis(rng.random_range(floor_ms..=ceiling_ms))
    }

    /// Back to the first step, after a stable connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn ceiling_doubles_to_the_cap() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = vec![];
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_secs());
            let d = b.next_delay(&mut rng);
            assert!(d >= FLOOR && d <= CAP, "{d:?}");
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        b.reset();
        assert_eq!(b.ceiling(), BASE);
    }

    #[test]
    fn delays_are_spread_over_the_window() {
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut b = Backoff::default();
                for _ in 0..8 {
                    b.next_delay(&mut rng);
                }
                b.next_delay(&mut rng)
            })
            .collect();
        let below_half = delays.iter().filter(|d| **d < CAP / 2).count();
        // Uniform over [0.1 s, 60 s]: about half land in the lower half.
        assert!((400..600).contains(&below_half), "{below_half}");
        assert!(delays.iter().all(|d| *d <= CAP));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            assert!(b.next_delay(&mut rng) <= CAP);
        }
    }
}
