//! Collapse and no-learning detection: signals a run computes anyway, read against what a
//! learning run looks like, turned into a warning that says what is wrong and what to change.
//!
//! Three findings, each reported once per run:
//! - **uniform targets**: the teacher's DINO targets sit at the uniform distribution (mean
//!   entropy near ln K over a window of steps). The head gives every image the same output and
//!   centering flattens it, so the DINO loss carries no signal.
//! - **collapsed features**: the teacher's CLS features of the evaluation images barely vary
//!   (per-dimension spread tiny next to the feature norm, or an effective dimensionality near 1).
//! - **no learning**: k-NN of the trained teacher no better than at initialisation.

use std::collections::VecDeque;
use std::fmt;

/// Share of ln K above which the windowed mean teacher entropy counts as uniform targets. A
/// collapsed head sits at 0.9998-0.9999 (the official recipe at the demo size, or a teacher
/// temperature of 1.0); the small recipe's runs, which learn, peak at 0.981-0.991 over 20 steps.
const UNIFORM_SHARE: f64 = 0.995;
/// Steps averaged for the entropy check (fewer on short runs: a 20th of the run, at least 5).
const ENTROPY_WINDOW: u64 = 20;
/// Per-dimension spread of the CLS features, relative to their RMS value, below which the
/// features count as one vector (a random ViT with LayerScale 1e-5 sits near 1e-4).
const MIN_RELATIVE_SPREAD: f64 = 1e-2;
/// Effective dimensionality (participation ratio of the covariance) below which the features
/// count as collapsed onto a line.
const MIN_EFFECTIVE_DIMS: f64 = 1.5;
/// k-NN gain (points) over the initialisation below which a run counts as not learning.
const MIN_KNN_GAIN: f64 = 2.0;

/// Spread statistics of a set of feature vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeatureSpread {
    /// Mean over dimensions of the standard deviation across images, divided by the RMS of all
    /// values (0 = every image has the same feature).
    pub relative_std: f64,
    /// Participation ratio of the covariance eigenvalues, `(Σλ)² / Σλ²` = `tr(C)² / tr(C²)`:
    /// 1 when the features vary along one direction, D when they vary equally along all.
    pub effective_dims: f64,
}

/// Spread of `n` features of dimension `d` (row-major `[n, d]`).
pub fn feature_spread(features: &[f32], n: usize, d: usize) -> FeatureSpread {
    assert_eq!(features.len(), n * d, "features must be [n, d]");
    if n < 2 || d == 0 {
        return FeatureSpread {
            relative_std: 0.0,
            effective_dims: 0.0,
        };
    }
    let rows = || features.chunks_exact(d);
    let mut mean = vec![0f64; d];
    let mut square_sum = 0f64;
    for row in rows() {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
            square_sum += v as f64 * v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    // Covariance [d, d] in f64; d is the embedding width (at most a few thousand).
    let mut cov = vec![0f64; d * d];
    let mut centred = vec![0f64; d];
    for row in rows() {
        for ((c, &v), m) in centred.iter_mut().zip(row).zip(&mean) {
            *c = v as f64 - m;
        }
        for (i, &ci) in centred.iter().enumerate() {
            for (out, &cj) in cov[i * d..(i + 1) * d].iter_mut().zip(&centred) {
                *out += ci * cj;
            }
        }
    }
    cov.iter_mut().for_each(|c| *c /= (n - 1) as f64);
    let trace: f64 = (0..d).map(|i| cov[i * d + i]).sum();
    let trace_of_square: f64 = cov.iter().map(|c| c * c).sum(); // C symmetric: tr(C²) = ‖C‖²_F
    let rms = (square_sum / (n * d) as f64).sqrt();
    let mean_std = (0..d).map(|i| cov[i * d + i].sqrt()).sum::<f64>() / d as f64;
    FeatureSpread {
        relative_std: if rms > 0.0 { mean_std / rms } else { 0.0 },
        effective_dims: if trace_of_square > 0.0 {
            trace * trace / trace_of_square
        } else {
            0.0
        },
    }
}

/// Something wrong with the run, with what to change.
#[derive(Clone, Debug, PartialEq)]
pub enum Finding {
    UniformTargets { entropy: f64, ln_k: f64 },
    CollapsedFeatures { spread: FeatureSpread },
    NoLearning { initial: f64, now: f64 },
}

impl Finding {
    /// A short name for logs and `metrics.jsonl`.
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::UniformTargets { .. } => "uniform_targets",
            Finding::CollapsedFeatures { .. } => "collapsed_features",
            Finding::NoLearning { .. } => "no_learning",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::UniformTargets { entropy, ln_k } => write!(
                f,
                "uniform teacher targets: their mean entropy is {entropy:.3} nats of ln K = \
                 {ln_k:.3}, so the DINO head gives every image the same output and the DINO \
                 loss teaches nothing. Try a lower teacher.teacher_temp, fewer prototypes \
                 (dino.head_n_prototypes), a larger student.layerscale (1e-5 starts every image \
                 at nearly the same CLS token) or --recipe small"
            ),
            Finding::CollapsedFeatures { spread } => write!(
                f,
                "collapsed features: the teacher's CLS features barely differ between images \
                 (per-dimension spread {:.1e} of their RMS value, effective dimensionality \
                 {:.2}). A run that has trained a while: lower optim.base_lr, raise \
                 dino.koleo_loss_weight, or check teacher.teacher_temp and train.centering; \
                 LayerScale 1e-5 (student.layerscale) starts every image this way",
                spread.relative_std, spread.effective_dims
            ),
            Finding::NoLearning { initial, now } => write!(
                f,
                "no learning: k-NN of the teacher is {now:.2}%, against {initial:.2}% at \
                 initialisation. Check optim.base_lr (is it 0?), the run length (--steps) \
                 and the warnings above; --recipe small suits small datasets and short runs"
            ),
        }
    }
}

/// Watches a run's signals and reports each kind of finding once.
#[derive(Debug)]
pub struct HealthMonitor {
    ln_k: f64,
    window: usize,
    /// The first step the entropy check may fire at (after the teacher-temperature warm-up
    /// has begun to matter: a tenth of the run).
    first_entropy_step: u64,
    entropies: VecDeque<f64>,
    reported: Vec<&'static str>,
}

impl HealthMonitor {
    /// A monitor for a run of `total_steps` with `prototypes` DINO prototypes.
    pub fn new(prototypes: usize, total_steps: u64) -> Self {
        HealthMonitor {
            ln_k: (prototypes.max(1) as f64).ln(),
            window: (total_steps / 20).clamp(5, ENTROPY_WINDOW) as usize,
            first_entropy_step: total_steps / 10,
            entropies: VecDeque::new(),
            reported: Vec::new(),
        }
    }

    fn once(&mut self, finding: Finding) -> Option<Finding> {
        if self.reported.contains(&finding.kind()) {
            return None;
        }
        self.reported.push(finding.kind());
        Some(finding)
    }

    /// One step's mean teacher entropy (nats).
    pub fn on_step(&mut self, step: u64, teacher_entropy: f64) -> Option<Finding> {
        self.entropies.push_back(teacher_entropy);
        if self.entropies.len() > self.window {
            self.entropies.pop_front();
        }
        let full = self.entropies.len() == self.window;
        let mean = self.entropies.iter().sum::<f64>() / self.entropies.len().max(1) as f64;
        if full && step >= self.first_entropy_step && mean >= UNIFORM_SHARE * self.ln_k {
            return self.once(Finding::UniformTargets {
                entropy: mean,
                ln_k: self.ln_k,
            });
        }
        None
    }

    /// The spread of the trained teacher's features of the evaluation images.
    pub fn on_features(&mut self, spread: FeatureSpread) -> Option<Finding> {
        let collapsed =
            spread.relative_std < MIN_RELATIVE_SPREAD || spread.effective_dims < MIN_EFFECTIVE_DIMS;
        if collapsed {
            return self.once(Finding::CollapsedFeatures { spread });
        }
        None
    }

    /// k-NN top-1 (%) of the trained teacher against the initialisation's.
    pub fn on_knn(&mut self, initial: f64, now: f64) -> Option<Finding> {
        if now < initial + MIN_KNN_GAIN {
            return self.once(Finding::NoLearning { initial, now });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{keyed, Rng};
    use rand::Rng as _;

    fn gaussian(rng: &mut Rng) -> f32 {
        // Box-Muller: enough for a spread test.
        let (u, v): (f32, f32) = (rng.random_range(1e-6..1.0), rng.random());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }

    #[test]
    fn spread_tells_isotropic_from_one_direction_and_from_constant() {
        let (n, d) = (400, 16);
        let mut rng = keyed(3, &[]);
        let isotropic: Vec<f32> = (0..n * d).map(|_| gaussian(&mut rng)).collect();
        let s = feature_spread(&isotropic, n, d);
        // Sample covariance of 400 draws: participation ratio near d (d / (1 + d/n) ≈ 15.4).
        assert!(s.effective_dims > 13.0 && s.effective_dims <= 16.0, "{s:?}");
        assert!((s.relative_std - 1.0).abs() < 0.1, "{s:?}");
        // Every row a multiple of one direction, plus a large shared offset.
        let line: Vec<f32> = (0..n)
            .flat_map(|i| (0..d).map(move |j| 5.0 + (i as f32 - 200.0) * 1e-3 * (j as f32 + 1.0)))
            .collect();
        let s = feature_spread(&line, n, d);
        assert!((s.effective_dims - 1.0).abs() < 1e-6, "{s:?}");
        let constant = vec![0.7f32; n * d];
        let s = feature_spread(&constant, n, d);
        assert_eq!((s.relative_std, s.effective_dims), (0.0, 0.0));
    }

    #[test]
    fn uniform_targets_fire_once_after_a_full_window() {
        let ln_k = 4096f64.ln();
        let mut m = HealthMonitor::new(4096, 200);
        // Sharp targets: quiet.
        for step in 0..100 {
            assert_eq!(m.on_step(step, 0.9 * ln_k), None);
        }
        // Uniform for 9 steps (window 10): not yet.
        for step in 100..109 {
            assert_eq!(m.on_step(step, ln_k), None, "step {step}");
        }
        let f = m
            .on_step(109, ln_k)
            .expect("a full window of uniform targets");
        assert_eq!(f.kind(), "uniform_targets");
        assert!(f.to_string().contains("teacher.teacher_temp"), "{f}");
        assert_eq!(m.on_step(110, ln_k), None, "reported once");
        // Early uniform entropy (the first tenth of a run) is not judged.
        let mut early = HealthMonitor::new(4096, 1000);
        assert!((0..99).all(|s| early.on_step(s, ln_k).is_none()));
        assert!(early.on_step(100, ln_k).is_some());
    }

    #[test]
    fn features_and_knn_findings() {
        let mut m = HealthMonitor::new(1024, 100);
        let fine = FeatureSpread {
            relative_std: 0.3,
            effective_dims: 20.0,
        };
        assert_eq!(m.on_features(fine), None);
        let flat = FeatureSpread {
            relative_std: 1e-4,
            effective_dims: 30.0,
        };
        assert_eq!(m.on_features(flat).unwrap().kind(), "collapsed_features");
        assert_eq!(m.on_knn(60.0, 75.0), None);
        let f = m.on_knn(60.0, 61.0).unwrap();
        assert!(f.to_string().contains("61.00%"), "{f}");
        assert_eq!(m.on_knn(60.0, 59.0), None, "reported once");
    }
}
