//! Deterministic random streams.
//!
//! Every random draw in dinotrain (initialisation, crops, masks, drop path) comes from a stream
//! keyed by the run seed and a short list of integers (e.g. `[STREAM_CROPS, epoch, image]`), so a
//! run is reproducible and a resumed run draws exactly what the uninterrupted run would have.

use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;

/// The generator used everywhere.
pub type Rng = Pcg64Mcg;

/// Stream tags: the first key of every stream, so two uses never share draws.
pub mod stream {
    pub const INIT: u64 = 1;
    pub const CROPS: u64 = 2;
    pub const MASKS: u64 = 3;
    pub const DROP_PATH: u64 = 4;
    pub const SHUFFLE: u64 = 5;
    pub const TEST: u64 = 99;
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A generator for the stream identified by `seed` and `keys`.
pub fn keyed(seed: u64, keys: &[u64]) -> Rng {
    let mut h = splitmix64(seed);
    for &k in keys {
        h = splitmix64(h ^ splitmix64(k));
    }
    let lo = splitmix64(h ^ 0x5555_5555_5555_5555) as u128;
    Rng::from_seed(((h as u128) << 64 | lo).to_le_bytes())
}

/// `n` values drawn uniformly from `[-scale, scale)` on the test stream of `seed`: the seeded
/// inputs of tests and benchmarks.
pub fn uniform_vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    use rand::Rng as _;
    let mut rng = keyed(seed, &[stream::TEST]);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng as _;

    #[test]
    fn same_keys_same_draws_different_keys_different_draws() {
        let a: Vec<u32> = keyed(7, &[1, 2]).random_iter().take(4).collect();
        let b: Vec<u32> = keyed(7, &[1, 2]).random_iter().take(4).collect();
        let c: Vec<u32> = keyed(7, &[2, 1]).random_iter().take(4).collect();
        let d: Vec<u32> = keyed(8, &[1, 2]).random_iter().take(4).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
