//! Batch-subset stochastic depth, as the official student runs it (`NestedTensorBlock`, list
//! path): a residual branch runs on `keep = max(int(b·(1−rate)), 1)` samples chosen by a random
//! permutation, and its output is added to those samples only, scaled by `b / keep`. The
//! attention and FFN branches of every block draw their own subsets. A run can also be given
//! its subsets ([`GivenSubsets`]): the multi-step parity check replays the official run's draws.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Stochastic depth for one forward pass: the rate of every block, and the stream it draws from.
pub struct DropPath<'a> {
    pub rate: f32,
    pub rng: &'a mut Rng,
}

/// The samples one residual branch runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct Subset {
    /// Kept sample indices, sorted ascending.
    pub kept: Vec<usize>,
    /// `b / keep`, applied to the branch output.
    pub scale: f32,
}

impl Subset {
    /// The subset of a batch of `b` that keeps the samples `kept` (any order, each once).
    pub fn new(mut kept: Vec<usize>, b: usize) -> Result<Subset> {
        kept.sort_unstable();
        let unique = kept.windows(2).all(|w| w[0] < w[1]);
        if kept.is_empty() || !unique || kept.last().is_some_and(|&i| i >= b) {
            return Err(Error::shape(
                "drop path subset",
                format!("{kept:?} is not a non-empty set of distinct samples of a batch of {b}"),
            ));
        }
        let scale = b as f32 / kept.len() as f32;
        Ok(Subset { kept, scale })
    }
}

/// One micro-batch's stochastic depth given instead of drawn: the subset of every student
/// branch (block 0 attention, block 0 FFN, block 1 attention, ...; `None` = every sample) in
/// the forward of the global crops and in that of the local crops.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GivenSubsets {
    pub global: Vec<Option<Subset>>,
    pub local: Vec<Option<Subset>>,
}

impl GivenSubsets {
    /// One micro-batch's subsets drawn at `rate` for `branches` branches, in the order the
    /// student's forwards would draw them from one stream: every branch of the global crops
    /// (`b_global` samples), then every branch of the local crops.
    pub fn draw(
        rate: f32,
        branches: usize,
        (b_global, b_local): (usize, usize),
        rng: &mut Rng,
    ) -> Result<GivenSubsets> {
        let global = draw_subsets(b_global, rate, branches, rng)?;
        let local = draw_subsets(b_local, rate, branches, rng)?;
        Ok(GivenSubsets { global, local })
    }
}

/// Checks a drop-path rate: finite and in [0, 1).
pub fn check_rate(rate: f32) -> Result<()> {
    if rate.is_finite() && (0.0..1.0).contains(&rate) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "drop path rate must be in [0, 1), got {rate}"
        )))
    }
}

/// `max(int(b·(1−rate)), 1)`, evaluated as Python does on the rate's decimal value.
pub fn keep_count(b: usize, rate: f32) -> usize {
    // The official rate is a Python float (f64) written in decimal (0.3, 0.4). Widening the f32
    // directly would give 0.30000001192..., and int(10 · 0.69999998...) = 6 where Python gets 7;
    // the shortest decimal that round-trips the f32 recovers the configured value.
    let rate64: f64 = format!("{rate}").parse().unwrap_or(rate as f64);
    ((b as f64 * (1.0 - rate64)) as usize).max(1)
}

/// The subsets of `branches` branches over a batch of `b`, drawn one after the other (branch
/// order: block 0 attention, FFN, block 1 attention, ...), after checking the rate.
pub fn draw_subsets(
    b: usize,
    rate: f32,
    branches: usize,
    rng: &mut Rng,
) -> Result<Vec<Option<Subset>>> {
    check_rate(rate)?;
    Ok((0..branches).map(|_| draw_subset(b, rate, rng)).collect())
}

/// Draws the kept samples of one branch over a batch of `b`: `None` means every sample with
/// scale 1 (rate 0, or nothing to drop).
pub fn draw_subset(b: usize, rate: f32, rng: &mut Rng) -> Option<Subset> {
    if rate <= 0.0 || b == 0 {
        return None;
    }
    let keep = keep_count(b, rate);
    let mut kept = rand::seq::index::sample(rng, b, keep).into_vec();
    kept.sort_unstable();
    Some(Subset {
        kept,
        scale: b as f32 / keep as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_count_follows_the_official_examples() {
        // Spec: rate 0.3 keeps 89 of 128 and 358 of 512.
        assert_eq!(keep_count(128, 0.3), 89);
        assert_eq!(keep_count(512, 0.3), 358);
        // Python: int(10 * (1 - 0.3)) = 7 (a naive f32 widening gives 6).
        assert_eq!(keep_count(10, 0.3), 7);
        assert_eq!(keep_count(1, 0.4), 1);
        assert_eq!(keep_count(2, 0.9), 1);
    }

    #[test]
    fn subset_is_sorted_unique_scaled_and_deterministic() {
        let draw = |seed| draw_subset(128, 0.3, &mut crate::rng::keyed(seed, &[1])).unwrap();
        let a = draw(5);
        assert_eq!(a.kept.len(), 89);
        assert!(a.kept.windows(2).all(|w| w[0] < w[1]) && *a.kept.last().unwrap() < 128);
        assert!((a.scale - 128.0 / 89.0).abs() < 1e-7);
        assert_eq!(a, draw(5));
        assert_ne!(a.kept, draw(6).kept);
        assert!(draw_subset(8, 0.0, &mut crate::rng::keyed(0, &[])).is_none());
    }

    #[test]
    fn given_subsets_are_sorted_scaled_and_checked() {
        let s = Subset::new(vec![3, 0], 4).unwrap();
        assert_eq!(s.kept, [0, 3]);
        assert_eq!(s.scale, 2.0);
        assert!(Subset::new(vec![], 4).is_err());
        assert!(Subset::new(vec![1, 1], 4).is_err());
        assert!(Subset::new(vec![4], 4).is_err());
    }

    #[test]
    fn bad_rates_are_errors() {
        assert!(
            check_rate(1.0).is_err() && check_rate(-0.1).is_err() && check_rate(f32::NAN).is_err()
        );
        assert!(check_rate(0.0).is_ok() && check_rate(0.4).is_ok());
    }
}
