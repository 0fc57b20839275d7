//! Shared helpers of the CUDA kernel tests: the skip-without-GPU gate, seeded inputs, bf16
//! rounding and the relative-error check `‖out − ref‖ / ‖ref‖` (f64).

#![allow(dead_code)] // each test binary uses a different subset

use dinotrain::backend::cuda::{bf16, CudaBackend};
use rand::{Rng as _, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// The GPU backend, or `None` after printing why the test is skipped.
pub fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(backend) => Some(backend),
        Err(reason) => {
            eprintln!("skipping: {reason}");
            None
        }
    }
}

/// Seeded standard-normal values times `scale`.
pub fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let v: f32 = StandardNormal.sample(&mut rng);
            v * scale
        })
        .collect()
}

/// Seeded uniform values in `[lo, hi)`.
pub fn uniform(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// The value a bf16 buffer holds after upload (round to nearest even).
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f32::from(bf16::from_f32(x))).collect()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `‖out − ref‖ / max(‖ref‖, 1e-30)` in f64.
pub fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "length mismatch");
    let mut diff = 0.0f64;
    let mut norm = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        diff += (o as f64 - r).powi(2);
        norm += r * r;
    }
    diff.sqrt() / norm.sqrt().max(1e-30)
}

/// Asserts `rel_err <= bound` and every output finite; prints the first bad pairs on failure.
pub fn assert_close(name: &str, out: &[f32], reference: &[f64], bound: f64) {
    assert_eq!(out.len(), reference.len(), "{name}: length mismatch");
    assert!(
        out.iter().all(|v| v.is_finite()),
        "{name}: non-finite output"
    );
    let err = rel_err(out, reference);
    if err > bound {
        let scale = reference.iter().map(|r| r.abs()).fold(0.0, f64::max);
        let bad: Vec<String> = out
            .iter()
            .zip(reference)
            .enumerate()
            .filter(|(_, (&o, &r))| (o as f64 - r).abs() > 1e-3 * scale + 1e-2 * r.abs())
            .take(8)
            .map(|(i, (o, r))| format!("[{i}] {o} vs {r}"))
            .collect();
        panic!("{name}: relative error {err:.3e} > {bound:.1e}; first bad pairs: {bad:?}");
    }
    eprintln!("{name}: relative error {err:.3e} (bound {bound:.1e})");
}
