//! Seeded shuffling shared by the data utilities.
//!
//! Owns the one Fisher–Yates loop and an unbiased bounded draw; must not hold
//! state of its own (callers own the generator, so successive calls continue
//! one stream).

use crate::bind::SplitMix64;

/// A uniform integer in `0..n` (`n > 0`). Rejects the top partial range of
/// `u64` so no value is more likely than another, unlike a bare `% n`.
pub(super) fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    debug_assert!(n > 0, "below(0) has no value to draw");
    // The largest multiple of n that fits: draws at or above it would favour
    // small results, so they are drawn again (fewer than half on average).
    let limit = u64::MAX - (u64::MAX % n);
    loop {
        let x = rng.next();
        if x < limit {
            return x % n;
        }
    }
}

/// Shuffles `items` in place, in the same loop shape as Python's
/// `random.shuffle` (from the last index down, swap with one at or below it).
pub(super) fn fisher_yates<T>(rng: &mut SplitMix64, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            let v = below(&mut rng, 5) as usize;
            seen[v] += 1;
        }
        // Each bucket expects 1000; a fair draw stays well inside ±200.
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    #[test]
    fn fisher_yates_is_a_seeded_permutation() {
        let shuffled = |seed| {
            let mut v: Vec<u32> = (0..20).collect();
            fisher_yates(&mut SplitMix64::new(seed), &mut v);
            v
        };
        let a = shuffled(1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_eq!(a, shuffled(1));
        assert_ne!(a, shuffled(2));
        assert_ne!(a, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn fisher_yates_handles_tiny_slices() {
        let mut rng = SplitMix64::new(0);
        let mut empty: Vec<u8> = vec![];
        fisher_yates(&mut rng, &mut empty);
        let mut one = vec![9];
        fisher_yates(&mut rng, &mut one);
        assert_eq!(one, vec![9]);
    }
}
