//! Which collector to try next: round robin from a random start. Pure
//! state, no I/O.
//!
//! A random start spreads a fleet over the collectors of `collector_urls`
//! instead of piling every device onto the first one; moving on after each
//! failed attempt or dropped session means a dead collector costs one
//! backoff delay, not the whole reconnect budget. With one URL nothing
//! changes: `advance` comes back to it.

/// A non-empty ring of endpoints with a cursor on the current one.
#[derive(Debug, Clone)]
pub struct Endpoints<T> {
    items: Vec<T>,
    current: usize,
}

impl<T> Endpoints<T> {
    /// A ring over `items`, starting at `start` (taken modulo the length, so
    /// a random `u64`/`usize` will do). `None` when `items` is empty.
    pub fn new(items: Vec<T>, start: usize) -> Option<Self> {
        if items.is_empty() {
            return None;
        }
        let current = start % items.len();
        Some(Endpoints { items, current })
    }

    /// A ring over `items` starting at a uniformly random position.
    pub fn with_random_start(items: Vec<T>, rng: &mut impl rand::Rng) -> Option<Self> {
        let len = items.len().max(1);
        Endpoints::new(items, rng.random_range(0..len))
    }

    /// The endpoint to try now.
    pub fn current(&self) -> &T {
        &self.items[self.current]
    }

    /// Position of [`Endpoints::current`] in the list as configured.
    pub fn index(&self) -> usize {
        self.current
    }

    /// Moves to the next endpoint (wrapping around) and returns it.
    pub fn advance(&mut self) -> &T {
        self.current = (self.current + 1) % self.items.len();
        self.current()
    }

    /// How many endpoints there are (at least one).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Always `false`: a ring is never empty. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn empty_is_refused() {
        assert!(Endpoints::<&str>::new(vec![], 0).is_none());
        assert!(Endpoints::<&str>::with_random_start(vec![], &mut StdRng::seed_from_u64(1)).is_none());
    }

    #[test]
    fn starts_at_the_injected_index_and_wraps_around() {
        let mut e = Endpoints::new(vec!["a", "b", "c"], 1).unwrap();
        assert_eq!((*e.current(), e.index()), ("b", 1));
        let order: Vec<&str> = (0..5).map(|_| *e.advance()).collect();
        assert_eq!(order, ["c", "a", "b", "c", "a"]);
        assert_eq!(e.index(), 0);
        assert_eq!(e.len(), 3);
    }

    #[test]
    fn start_is_taken_modulo_the_length() {
        let e = Endpoints::new(vec!["a", "b", "c"], 7).unwrap();
        assert_eq!(*e.current(), "b");
        let e = Endpoints::new(vec!["a", "b", "c"], usize::MAX).unwrap();
        assert_eq!(e.index(), usize::MAX % 3);
    }

    #[test]
    fn one_endpoint_stays_put() {
        let mut e = Endpoints::new(vec!["only"], 5).unwrap();
        assert_eq!(*e.current(), "only");
        assert_eq!(*e.advance(), "only");
        assert_eq!(*e.advance(), "only");
        assert_eq!(e.index(), 0);
    }

    #[test]
    fn a_full_lap_visits_each_endpoint_once() {
        for start in 0..4 {
            let mut e = Endpoints::new(vec![0, 1, 2, 3], start).unwrap();
            let mut seen = vec![*e.current()];
            for _ in 1..e.len() {
                seen.push(*e.advance());
            }
            seen.sort();
            assert_eq!(seen, [0, 1, 2, 3], "start {start}");
            assert_eq!(*e.advance(), start, "back where it started");
        }
    }

    #[test]
    fn random_starts_cover_every_endpoint() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            let e = Endpoints::with_random_start(vec!["a", "b", "c"], &mut rng).unwrap();
            counts[e.index()] += 1;
        }
        // Uniform: about 1000 each.
        assert!(counts.iter().all(|c| (850..1150).contains(c)), "{counts:?}");
    }
}
