//! The iBOT collate step: counts, stratification, consistency of the derived tensors,
//! determinism, and the official upperbound.

use dinotrain::rng::{keyed, stream};
use dinotrain::ssl::masking::{
    collate_masks, collate_masks_for_step, linspace_f32, stratified_targets, MaskBatch,
    MaskingGenerator,
};

fn batch(seed: u64, step: u64, n_crops: usize, img: usize, patch: usize) -> MaskBatch {
    let g = MaskingGenerator::official(img, patch).unwrap();
    collate_masks_for_step(seed, step, &g, n_crops, 0.5, (0.1, 0.5)).unwrap()
}

fn crop_counts(b: &MaskBatch) -> Vec<usize> {
    b.masks
        .chunks(b.n_patches)
        .map(|r| r.iter().filter(|&&m| m).count())
        .collect()
}

#[test]
fn exactly_int_2b_p_crops_are_masked() {
    for seed in 0..5 {
        let b = batch(seed, 0, 128, 224, 16); // N = 196
        let masked = crop_counts(&b).iter().filter(|&&c| c > 0).count();
        assert_eq!(masked, 64, "seed {seed}");
        let b = batch(seed, 1, 7, 224, 14); // int(7 · 0.5) = 3
        assert_eq!(crop_counts(&b).iter().filter(|&&c| c > 0).count(), 3);
    }
}

#[test]
fn ratios_are_stratified_over_equal_bins() {
    let n = 196;
    let mut rng = keyed(3, &[stream::MASKS]);
    let (targets, _) = stratified_targets(&mut rng, 64, n, (0.1, 0.5));
    let edges = linspace_f32(0.1, 0.5, 65);
    for (i, &t) in targets.iter().enumerate() {
        let lo = (n as f32 * edges[i]) as usize;
        let hi = (n as f32 * edges[i + 1]) as usize;
        assert!(
            lo <= t && t <= hi,
            "bin {i}: target {t} outside [{lo}, {hi}]"
        );
    }
    // The masks themselves: sorted counts follow the bins (a block generator may stop short of a
    // target, never exceed it).
    let b = batch(3, 0, 128, 224, 16);
    let mut counts: Vec<usize> = crop_counts(&b).into_iter().filter(|&c| c > 0).collect();
    counts.sort_unstable();
    assert!(*counts.last().unwrap() <= (n as f32 * 0.5) as usize);
    assert!(counts[0] >= 4, "smallest mask {}", counts[0]);
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64 / n as f64;
    assert!((0.25..0.33).contains(&mean), "mean ratio {mean}");
}

#[test]
fn mask_indices_and_weights_match_the_masks() {
    let b = batch(11, 4, 32, 224, 14);
    assert_eq!(b.masks.len(), 32 * 256);
    let counts = crop_counts(&b);
    assert_eq!(b.n_masked(), counts.iter().sum::<usize>());
    assert_eq!(b.masks_weight.len(), b.n_masked());
    assert!(b.mask_indices.windows(2).all(|w| w[0] < w[1]));
    for (&i, &w) in b.mask_indices.iter().zip(&b.masks_weight) {
        assert!(b.masks[i]);
        assert_eq!(w, 1.0 / counts[i / b.n_patches] as f32);
    }
    assert!(b.n_masked() <= b.upperbound);
    // Per-crop weights sum to 1 on masked crops: the loss is a per-crop mean.
    let masked_crops = counts.iter().filter(|&&c| c > 0).count() as f32;
    assert!((b.masks_weight.iter().sum::<f32>() - masked_crops).abs() < 1e-3);
}

#[test]
fn masks_are_deterministic_by_seed_and_step() {
    assert_eq!(batch(5, 9, 16, 224, 14), batch(5, 9, 16, 224, 14));
    assert_ne!(
        batch(5, 9, 16, 224, 14).masks,
        batch(6, 9, 16, 224, 14).masks
    );
    assert_ne!(
        batch(5, 9, 16, 224, 14).masks,
        batch(5, 10, 16, 224, 14).masks
    );
}

#[test]
fn upperbound_is_the_official_f32_formula() {
    // sum_i int(N · linspace(0.1, 0.5, n+1)[i+1]) in float32, n = int(2B · 0.5).
    assert_eq!(batch(0, 0, 128, 224, 16).upperbound, 3771); // N 196, 2B 128
    assert_eq!(batch(0, 0, 64, 224, 14).upperbound, 2496); // N 256, 2B 64
    assert_eq!(batch(0, 0, 24, 224, 14).upperbound, 967); // N 256, 2B 24
    assert_eq!(batch(0, 0, 4, 56, 14).upperbound, 12); // N 16, 2B 4 (the ibot_loss fixtures)
}

#[test]
fn bad_configuration_is_an_error() {
    let g = MaskingGenerator::official(224, 16).unwrap();
    let mut rng = keyed(0, &[stream::MASKS]);
    assert!(collate_masks(&mut rng, &g, 8, 1.5, (0.1, 0.5)).is_err());
    assert!(collate_masks(&mut rng, &g, 8, 0.5, (0.6, 0.5)).is_err());
    assert!(MaskBatch::from_masks(vec![true; 5], 2, 3, 0).is_err());
}
