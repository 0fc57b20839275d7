//! iBOT masks: the BEiT block-masking generator and the collate step that draws the masks of a
//! batch's global crops (spec 4.1, 4.5, 6).
//!
//! Per batch of `n_crops = 2B` global crops with `N = H·W` patches: exactly
//! `int(n_crops · mask_probability)` crops are masked, the i-th with a target ratio drawn
//! uniformly in the i-th of equal bins of `[ratio_min, ratio_max]` (stratified), the rest get no
//! mask, and the list is shuffled over crops. The bin edges and the `upperbound` follow the
//! official float32 arithmetic (`torch.linspace`), so `upperbound` is the official constant.
//! Draws come from a [`crate::rng::Rng`] (key it with `crate::rng::keyed(seed, &[MASKS, step])`):
//! the distribution is the official one, the exact draws are not Python's.

use crate::error::{Error, Result};
use crate::rng::Rng;
use rand::seq::SliceRandom;
use rand::Rng as _;

/// The official smallest block (patches) and aspect range.
pub const MIN_NUM_PATCHES: usize = 4;
pub const MIN_ASPECT: f64 = 0.3;
/// Tries per block before giving up.
const BLOCK_ATTEMPTS: usize = 10;

/// BEiT block masking on an `height × width` patch grid.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskingGenerator {
    pub height: usize,
    pub width: usize,
    pub min_num_patches: usize,
    /// Largest number of patches one block may add.
    pub max_num_patches: usize,
    /// `(ln min_aspect, ln max_aspect)`.
    pub log_aspect_ratio: (f64, f64),
}

impl MaskingGenerator {
    /// A generator with the official block limits (min 4 patches, aspect in [0.3, 1/0.3]) and
    /// `max_num_patches` per block.
    pub fn new(height: usize, width: usize, max_num_patches: usize) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(Error::Config(format!(
                "masking: empty patch grid {height}x{width}"
            )));
        }
        Ok(MaskingGenerator {
            height,
            width,
            min_num_patches: MIN_NUM_PATCHES,
            max_num_patches,
            log_aspect_ratio: (MIN_ASPECT.ln(), (1.0 / MIN_ASPECT).ln()),
        })
    }

    /// The generator the official training builds for global crops of `img_size` px and
    /// patch `patch_size`: grid `img_size/patch_size` square, and `max_num_patches` =
    /// `0.5 * img_size // patch_size * img_size // patch_size` evaluated left to right as Python
    /// does (N/2: 98 for 224/16, 128 for 224/14).
    pub fn official(img_size: usize, patch_size: usize) -> Result<Self> {
        if patch_size == 0 || img_size < patch_size {
            return Err(Error::Config(format!(
                "masking: crop size {img_size} and patch size {patch_size} give no patch"
            )));
        }
        let (s, p) = (img_size as f64, patch_size as f64);
        let max = ((0.5 * s / p).floor() * s / p).floor() as usize;
        let g = img_size / patch_size;
        Self::new(g, g, max)
    }

    /// Number of patches `N`.
    pub fn num_patches(&self) -> usize {
        self.height * self.width
    }

    /// A mask `[H·W]` (row-major) with at most `n_target` patches, built from blocks; it may stop
    /// short when ten attempts in a row add nothing.
    pub fn generate(&self, rng: &mut Rng, n_target: usize) -> Vec<bool> {
        let mut mask = vec![false; self.num_patches()];
        let mut count = 0;
        while count < n_target {
            let budget = (n_target - count).min(self.max_num_patches);
            let delta = self.add_block(rng, &mut mask, budget);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }

    /// Tries up to ten rectangles; masks the first that adds between 1 and `budget` new
    /// patches and returns how many it added (0 if none fitted).
    fn add_block(&self, rng: &mut Rng, mask: &mut [bool], budget: usize) -> usize {
        for _ in 0..BLOCK_ATTEMPTS {
            // Python's uniform(a, b) = a + (b − a)·u, also when b < a (budget below 4).
            let (lo, hi) = (self.min_num_patches as f64, budget as f64);
            let area = lo + (hi - lo) * rng.random::<f64>();
            let (la, lb) = self.log_aspect_ratio;
            let aspect = (la + (lb - la) * rng.random::<f64>()).exp();
            // Python's round() rounds halves to even.
            let h = (area * aspect).sqrt().round_ties_even() as usize;
            let w = (area / aspect).sqrt().round_ties_even() as usize;
            if w < self.width && h < self.height {
                let top = rng.random_range(0..=self.height - h);
                let left = rng.random_range(0..=self.width - w);
                let mut already = 0;
                for i in top..top + h {
                    already += mask[i * self.width + left..i * self.width + left + w]
                        .iter()
                        .filter(|&&m| m)
                        .count();
                }
                let new = h * w - already;
                if new > 0 && new <= budget {
                    for i in top..top + h {
                        mask[i * self.width + left..i * self.width + left + w].fill(true);
                    }
                    return new;
                }
            }
        }
        0
    }
}

/// The masks of one batch's global crops, as the training step consumes them.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskBatch {
    /// Number of global crops (`2B`, crop-major).
    pub n_crops: usize,
    /// Patches per crop (`N`).
    pub n_patches: usize,
    /// `[n_crops, N]` true = masked.
    pub masks: Vec<bool>,
    /// `[M]` flat indices `crop·N + patch` of the masked patches, increasing.
    pub mask_indices: Vec<usize>,
    /// `[M]` `1 / (masked patches of the crop holding patch i)`.
    pub masks_weight: Vec<f32>,
    /// The official bound on `M` for this configuration (a constant: buffers can be sized once).
    pub upperbound: usize,
}

impl MaskBatch {
    /// Number of masked patches `M`.
    pub fn n_masked(&self) -> usize {
        self.mask_indices.len()
    }

    /// Builds the index list and weights from `[n_crops, N]` masks.
    pub fn from_masks(
        masks: Vec<bool>,
        n_crops: usize,
        n_patches: usize,
        upperbound: usize,
    ) -> Result<Self> {
        if masks.len() != n_crops * n_patches {
            return Err(Error::shape(
                "MaskBatch::from_masks",
                format!(
                    "{} mask values for {n_crops} crops of {n_patches}",
                    masks.len()
                ),
            ));
        }
        let mut mask_indices = Vec::new();
        let mut masks_weight = Vec::new();
        for (c, row) in masks.chunks(n_patches.max(1)).enumerate().take(n_crops) {
            let count = row.iter().filter(|&&m| m).count();
            let w = 1.0f32 / count.max(1) as f32;
            for (p, _) in row.iter().enumerate().filter(|(_, &m)| m) {
                mask_indices.push(c * n_patches + p);
                masks_weight.push(w);
            }
        }
        Ok(MaskBatch {
            n_crops,
            n_patches,
            masks,
            mask_indices,
            masks_weight,
            upperbound,
        })
    }
}

/// `torch.linspace(start, end, steps)` in float32 (its CPU kernel: the first half counts up from
/// `start`, the second half down from `end`).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// The stratified per-crop targets of the masked crops (bin `i`:
/// `int(N · U(p_i, p_{i+1}))`) and the official `upperbound = Σ_i int(N · p_{i+1})`, in f32.
pub fn stratified_targets(
    rng: &mut Rng,
    n_masked_crops: usize,
    n_patches: usize,
    ratio_min_max: (f32, f32),
) -> (Vec<usize>, usize) {
    let probs = linspace_f32(ratio_min_max.0, ratio_min_max.1, n_masked_crops + 1);
    let n = n_patches as f32;
    let mut targets = Vec::with_capacity(n_masked_crops);
    let mut upperbound = 0;
    for i in 0..n_masked_crops {
        let (lo, hi) = (probs[i], probs[i + 1]);
        let ratio = lo + (hi - lo) * rng.random::<f64>() as f32;
        targets.push((n * ratio) as usize);
        upperbound += (n * hi) as usize;
    }
    (targets, upperbound)
}

/// `int(n_crops · mask_probability)` as Python computes it from the configured decimal: the f32 is
/// widened through its shortest decimal form (0.35f32 → 0.35), so 20 · 0.35 gives 7, not the
/// 6 that f32 or a plain widening (0.3499999940…) would give.
pub fn masked_crop_count(n_crops: usize, mask_probability: f32) -> usize {
    let p: f64 = mask_probability
        .to_string()
        .parse()
        .unwrap_or(mask_probability as f64); // Display of a finite f32 always parses.
    (n_crops as f64 * p) as usize
}

/// Draws the masks of `n_crops` global crops (the collate step): `int(n_crops ·
/// mask_probability)` masked crops with stratified ratios in `ratio_min_max`, shuffled.
pub fn collate_masks(
    rng: &mut Rng,
    generator: &MaskingGenerator,
    n_crops: usize,
    mask_probability: f32,
    ratio_min_max: (f32, f32),
) -> Result<MaskBatch> {
    if !(0.0..=1.0).contains(&mask_probability) {
        return Err(Error::Config(format!(
            "mask probability must lie in [0, 1], got {mask_probability}"
        )));
    }
    let (lo, hi) = ratio_min_max;
    if !(0.0 <= lo && lo <= hi && hi <= 1.0) {
        return Err(Error::Config(format!(
            "mask ratio range must satisfy 0 <= min <= max <= 1, got [{lo}, {hi}]"
        )));
    }
    let n = generator.num_patches();
    let n_masked_crops = masked_crop_count(n_crops, mask_probability);
    let (targets, upperbound) = stratified_targets(rng, n_masked_crops, n, ratio_min_max);
    let mut per_crop: Vec<Vec<bool>> = targets
        .iter()
        .map(|&t| generator.generate(rng, t))
        .collect();
    per_crop.resize(n_crops, vec![false; n]);
    per_crop.shuffle(rng);
    MaskBatch::from_masks(per_crop.concat(), n_crops, n, upperbound)
}

/// [`collate_masks`] with the run's deterministic stream for training step `step`
/// (`keyed(seed, [MASKS, step])`): a resumed run draws the masks the uninterrupted run drew.
pub fn collate_masks_for_step(
    seed: u64,
    step: u64,
    generator: &MaskingGenerator,
    n_crops: usize,
    mask_probability: f32,
    ratio_min_max: (f32, f32),
) -> Result<MaskBatch> {
    let mut rng = crate::rng::keyed(seed, &[crate::rng::stream::MASKS, step]);
    collate_masks(
        &mut rng,
        generator,
        n_crops,
        mask_probability,
        ratio_min_max,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{keyed, stream};

    #[test]
    fn official_generator_limits() {
        assert_eq!(
            MaskingGenerator::official(224, 16).unwrap().max_num_patches,
            98
        );
        assert_eq!(
            MaskingGenerator::official(224, 14).unwrap().max_num_patches,
            128
        );
        assert!(MaskingGenerator::official(10, 14).is_err());
    }

    #[test]
    fn one_block_never_adds_more_than_the_per_block_maximum() {
        let g = MaskingGenerator::official(224, 14).unwrap(); // N 256, max 128
        let mut rng = keyed(1, &[stream::TEST]);
        for _ in 0..200 {
            let mut mask = vec![false; g.num_patches()];
            let budget = g.max_num_patches;
            let delta = g.add_block(&mut rng, &mut mask, budget);
            assert!(delta <= budget);
            assert_eq!(mask.iter().filter(|&&m| m).count(), delta);
        }
    }

    #[test]
    fn masked_crop_count_follows_the_decimal_config_value() {
        assert_eq!(masked_crop_count(20, 0.35), 7);
        assert_eq!(masked_crop_count(128, 0.5), 64);
        assert_eq!(masked_crop_count(7, 0.5), 3);
        assert_eq!(masked_crop_count(10, 0.3), 3);
        assert_eq!(masked_crop_count(4, 1.0), 4);
    }

    #[test]
    fn linspace_matches_torch_f32() {
        let p = linspace_f32(0.1, 0.5, 5);
        assert_eq!(p[0], 0.1f32);
        assert_eq!(p[4], 0.5f32);
        assert!((p[2] - 0.3).abs() < 1e-7);
    }
}
