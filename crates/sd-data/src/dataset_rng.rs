//! The one random-number source of the dataset code: ChaCha8 (`rand_chacha`) with the key
//! built directly from a `u64` seed, plus the few draws the dataset needs (uniform float,
//! bounded integer, Fisher–Yates shuffle) implemented here so their results never depend on
//! a `rand` version.
//!
//! Sequences are bitwise reproducible for a given (seed, stream) on every platform and
//! build. They are *not* the sequences of Python's `random` module: the reference's exact
//! shuffles cannot be reproduced by any port, only their distribution.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// Seeded PRNG for shuffling, dropout and augmentation decisions.
#[derive(Debug, Clone)]
pub struct DataRng(ChaCha8Rng);

impl DataRng {
    /// A generator keyed by `seed` (little-endian in the first 8 key bytes, the rest zero)
    /// on ChaCha stream `stream`. Different streams of one seed are independent sequences.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(stream);
        Self(rng)
    }

    /// The next raw 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform float in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform float in [lo, hi).
    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n) without modulo bias (rejection sampling); 0 when `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        // Largest multiple of n that fits: values at or above it are redrawn.
        let zone = u64::MAX - (u64::MAX % n + 1) % n;
        loop {
            let v = self.next_u64();
            if v <= zone {
                return v % n;
            }
        }
    }

    /// Uniform integer in [0, n] (inclusive, as Python's `random.randint(0, n)`).
    pub fn inclusive(&mut self, n: u32) -> u32 {
        // n + 1 <= 2^32 fits in u64; the result is <= n.
        self.below(u64::from(n) + 1) as u32
    }

    /// Index of a uniformly chosen element of a slice of length `len` (`len > 0`).
    pub fn choose_index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// Fisher–Yates shuffle (from the last element down, as Python's `random.shuffle`).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = DataRng::new(42, 0);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = DataRng::new(42, 0);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut r = DataRng::new(42, 1);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn bounded_draws_stay_in_range() {
        let mut r = DataRng::new(7, 0);
        for n in 1..50u64 {
            assert!(r.below(n) < n);
        }
        for _ in 0..100 {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
        }
        let mut v: Vec<u32> = (0..20).collect();
        r.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }
}
