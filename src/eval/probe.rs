//! A linear probe: multinomial logistic regression on frozen features, the other standard
//! measure of a self-supervised backbone next to k-NN.
//!
//! Features are L2-normalised (as k-NN sees them), then standardised with the training set's
//! per-dimension mean and deviation, and a bias column is appended. The weights minimise the
//! mean softmax cross-entropy plus `weight_decay / 2 · ‖W‖²` (bias row excluded), a smooth
//! convex problem, by full-batch Nesterov-accelerated gradient descent with the step 1/L from
//! the curvature bound L = λmax(XᵀX / n) / 2 + weight_decay (the softmax Hessian is at most
//! half the identity per sample). Deterministic: no sampling anywhere.

use crate::backend::cpu::matmul;
use crate::backend::{Gemm, Transpose};
use crate::error::{Error, Result};
use crate::eval::knn::{check_finite_features, inverse_norm};
use rayon::prelude::*;

/// How long and how regularised the probe trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeOptions {
    /// Full-batch gradient iterations.
    pub iterations: usize,
    /// L2 penalty on the weights (not the bias).
    pub weight_decay: f32,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            iterations: 500,
            weight_decay: 1e-4,
        }
    }
}

/// What the probe reached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeResult {
    /// Top-1 (%) on the test features.
    pub test_top1: f64,
    /// Top-1 (%) on the training features (a gap to `test_top1` shows overfitting).
    pub train_top1: f64,
    /// The objective at the end (mean cross-entropy + penalty).
    pub loss: f64,
}

/// Standardised features with a bias column, `[n, dim + 1]`.
struct Design {
    x: Vec<f32>,
    cols: usize,
}

impl Design {
    /// The L2-normalised feature rows with a bias column of ones (not yet standardised).
    fn normalised(features: &[f32], dim: usize) -> Design {
        let cols = dim + 1;
        let mut x = vec![0f32; features.len() / dim * cols];
        x.par_chunks_mut(cols)
            .zip(features.par_chunks(dim))
            .for_each(|(out, row)| {
                let inv = inverse_norm(row);
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = v * inv;
                }
                out[dim] = 1.0;
            });
        Design { x, cols }
    }

    /// Per-dimension (mean, 1 / deviation) of the feature columns (the bias column excluded).
    fn standardiser(&self) -> (Vec<f32>, Vec<f32>) {
        let dim = self.cols - 1;
        let n = (self.x.len() / self.cols).max(1) as f64;
        let mut sum = vec![0f64; dim];
        let mut square = vec![0f64; dim];
        for row in self.x.chunks_exact(self.cols) {
            for ((s, q), &v) in sum.iter_mut().zip(&mut square).zip(row) {
                *s += v as f64;
                *q += v as f64 * v as f64;
            }
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let scale = (sum.iter().zip(&square))
            .map(|(s, q)| {
                let var = (q / n - (s / n) * (s / n)).max(0.0);
                (1.0 / var.sqrt().max(1e-6)) as f32
            })
            .collect();
        (mean, scale)
    }

    /// Centres and scales the feature columns.
    fn standardise(mut self, (mean, scale): &(Vec<f32>, Vec<f32>)) -> Design {
        self.x.par_chunks_mut(self.cols).for_each(|row| {
            for ((v, m), s) in row.iter_mut().zip(mean).zip(scale) {
                *v = (*v - m) * s;
            }
        });
        self
    }
}

/// `[n, classes]` logits of `x · w`.
fn logits(d: &Design, w: &[f32], classes: usize) -> Vec<f32> {
    let n = d.x.len() / d.cols;
    let mut z = vec![0f32; n * classes];
    matmul(&mut z, &d.x, w, Gemm::nn(n, d.cols, classes));
    z
}

/// The objective at `w` and its gradient.
fn loss_and_gradient(
    d: &Design,
    labels: &[usize],
    w: &[f32],
    classes: usize,
    weight_decay: f32,
) -> (f64, Vec<f32>) {
    let n = labels.len();
    let mut p = logits(d, w, classes);
    // Softmax rows in place; p − onehot(y), scaled by 1/n, is the logits' gradient.
    let cross_entropy: f64 = p
        .par_chunks_mut(classes)
        .zip(labels.par_iter())
        .map(|(row, &y)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v as f64;
            }
            let log_p_y = ((row[y] as f64) / sum).ln();
            for v in row.iter_mut() {
                *v = (*v as f64 / sum) as f32 / n as f32;
            }
            row[y] -= 1.0 / n as f32;
            -log_p_y
        })
        .sum();
    let mut grad = vec![0f32; d.cols * classes];
    let g = Gemm::nn(d.cols, n, classes).t(Transpose::Yes, Transpose::No);
    matmul(&mut grad, &d.x, &p, g);
    let weights = (d.cols - 1) * classes; // the bias row is last and not decayed
    let mut penalty = 0f64;
    for (g, &v) in grad[..weights].iter_mut().zip(&w[..weights]) {
        *g += weight_decay * v;
        penalty += v as f64 * v as f64;
    }
    (
        cross_entropy / n as f64 + 0.5 * weight_decay as f64 * penalty,
        grad,
    )
}

/// λmax(XᵀX / n) by power iteration (an upper estimate: the last Rayleigh quotient, padded).
fn curvature(d: &Design) -> f32 {
    let n = d.x.len() / d.cols;
    let mut v = vec![1f32 / (d.cols as f32).sqrt(); d.cols];
    let mut xv = vec![0f32; n];
    let mut lambda = 1f32;
    for _ in 0..30 {
        matmul(&mut xv, &d.x, &v, Gemm::nn(n, d.cols, 1));
        let mut xtxv = vec![0f32; d.cols];
        let g = Gemm::nn(d.cols, n, 1).t(Transpose::Yes, Transpose::No);
        matmul(&mut xtxv, &d.x, &xv, g);
        let norm = xtxv.iter().map(|&a| a * a).sum::<f32>().sqrt();
        if norm == 0.0 {
            break;
        }
        lambda = norm / n as f32;
        v = xtxv.iter().map(|a| a / norm).collect();
    }
    1.1 * lambda
}

fn top1(d: &Design, labels: &[usize], w: &[f32], classes: usize) -> f64 {
    let z = logits(d, w, classes);
    let correct = (z.chunks_exact(classes).zip(labels))
        .filter(|(row, &y)| {
            let best = (0..classes).fold(0, |b, c| if row[c] > row[b] { c } else { b });
            best == y
        })
        .count();
    100.0 * correct as f64 / labels.len().max(1) as f64
}

fn check_inputs(what: &str, features: &[f32], labels: &[usize], dim: usize) -> Result<()> {
    if dim == 0 || features.len() != labels.len() * dim || labels.is_empty() {
        return Err(Error::shape(
            "linear probe",
            format!(
                "{what}: {} values for {} labels of dimension {dim}",
                features.len(),
                labels.len()
            ),
        ));
    }
    check_finite_features(what, features, dim, |i| format!("row {i}"))
}

/// Trains the probe on `train` (`[n_train, dim]`, labels `0..C`) and measures it on `test`.
pub fn linear_probe(
    train: &[f32],
    train_labels: &[usize],
    test: &[f32],
    test_labels: &[usize],
    dim: usize,
    options: ProbeOptions,
) -> Result<ProbeResult> {
    check_inputs("probe training features", train, train_labels, dim)?;
    check_inputs("probe test features", test, test_labels, dim)?;
    let classes = train_labels
        .iter()
        .chain(test_labels)
        .max()
        .map_or(0, |m| m + 1);
    let train_x = Design::normalised(train, dim);
    let standardiser = train_x.standardiser();
    let train_x = train_x.standardise(&standardiser);
    let test_x = Design::normalised(test, dim).standardise(&standardiser);
    let step = 1.0 / (0.5 * curvature(&train_x) + options.weight_decay);
    let wd = options.weight_decay;
    // Nesterov: gradient at the look-ahead point y, then momentum (t-1)/(t+2).
    let mut w = vec![0f32; train_x.cols * classes];
    let mut previous = w.clone();
    for t in 0..options.iterations {
        let momentum = t as f32 / (t as f32 + 3.0);
        let y: Vec<f32> = (w.iter().zip(&previous))
            .map(|(&a, &b)| a + momentum * (a - b))
            .collect();
        let (_, g) = loss_and_gradient(&train_x, train_labels, &y, classes, wd);
        previous = std::mem::take(&mut w);
        w = y.iter().zip(&g).map(|(&a, &b)| a - step * b).collect();
    }
    let loss = match options.iterations {
        0 => f64::NAN,
        _ => loss_and_gradient(&train_x, train_labels, &w, classes, wd).0,
    };
    Ok(ProbeResult {
        test_top1: top1(&test_x, test_labels, &w, classes),
        train_top1: top1(&train_x, train_labels, &w, classes),
        loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::keyed;
    use rand::Rng as _;

    /// `n` points per class around `classes` centres in `dim` dimensions (offset so that the
    /// L2 normalisation keeps them apart), noise `sigma`; the centres come from `seed`, the
    /// noise from `draw`.
    fn blobs(
        n: usize,
        classes: usize,
        dim: usize,
        sigma: f32,
        (seed, draw): (u64, u64),
    ) -> (Vec<f32>, Vec<usize>) {
        let mut rng = keyed(seed, &[]);
        let centres: Vec<f32> = (0..classes * dim)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut rng = keyed(seed, &[1, draw]);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n * classes {
            let c = i % classes;
            for j in 0..dim {
                x.push(3.0 + centres[c * dim + j] + sigma * rng.random_range(-1.0f32..1.0));
            }
            y.push(c);
        }
        (x, y)
    }

    #[test]
    fn the_gradient_is_the_objectives() {
        let (x, y) = blobs(10, 3, 5, 0.5, (1, 0));
        let d = Design::normalised(&x, 5);
        let standardiser = d.standardiser();
        let d = d.standardise(&standardiser);
        let mut rng = keyed(2, &[]);
        let w: Vec<f32> = (0..d.cols * 3)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        let (_, g) = loss_and_gradient(&d, &y, &w, 3, 0.1);
        for i in 0..w.len() {
            let h = 1e-2f32;
            let (mut plus, mut minus) = (w.clone(), w.clone());
            plus[i] += h;
            minus[i] -= h;
            let fd = (loss_and_gradient(&d, &y, &plus, 3, 0.1).0
                - loss_and_gradient(&d, &y, &minus, 3, 0.1).0)
                / (2.0 * h as f64);
            assert!((fd - g[i] as f64).abs() < 2e-3, "w[{i}]: {fd} vs {}", g[i]);
        }
    }

    #[test]
    fn separable_blobs_are_classified_and_the_optimum_is_reached() {
        let (train, train_y) = blobs(100, 4, 8, 0.3, (3, 0));
        let (test, test_y) = blobs(50, 4, 8, 0.3, (3, 1));
        let r = linear_probe(&train, &train_y, &test, &test_y, 8, ProbeOptions::default()).unwrap();
        assert!(r.train_top1 > 99.0 && r.test_top1 > 99.0, "{r:?}");
        // More iterations cannot lower the objective much further: near the optimum.
        let longer = ProbeOptions {
            iterations: 4000,
            ..ProbeOptions::default()
        };
        let best = linear_probe(&train, &train_y, &test, &test_y, 8, longer).unwrap();
        assert!(
            best.loss <= r.loss && r.loss - best.loss < 0.05 * r.loss.max(1e-3),
            "{r:?} {best:?}"
        );
    }

    #[test]
    fn overlapping_classes_give_chance_and_bad_inputs_are_errors() {
        // Labels independent of the features: test accuracy near chance (50%).
        let (x, _) = blobs(400, 1, 6, 1.0, (4, 0));
        let mut rng = keyed(5, &[]);
        let y: Vec<usize> = (0..x.len() / 6).map(|_| rng.random_range(0..2)).collect();
        let r = linear_probe(
            &x[..300 * 6],
            &y[..300],
            &x[300 * 6..],
            &y[300..],
            6,
            ProbeOptions::default(),
        )
        .unwrap();
        assert!((r.test_top1 - 50.0).abs() < 15.0, "{r:?}");
        assert!(linear_probe(
            &x[..5],
            &y[..1],
            &x[..6],
            &y[..1],
            6,
            ProbeOptions::default()
        )
        .is_err());
        let mut nan = x[..12].to_vec();
        nan[3] = f32::NAN;
        let err =
            linear_probe(&nan, &y[..2], &x[..6], &y[..1], 6, ProbeOptions::default()).unwrap_err();
        assert!(err.to_string().contains("row 0"), "{err}");
    }
}
