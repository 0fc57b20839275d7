//! The official k-NN classifier (spec 11.1): L2-normalised features (eps 1e-12), cosine
//! similarities, the `max_k` nearest training samples sorted by similarity, weights
//! `softmax(sims / T)` over those `max_k`, and per k the class scores of the first k neighbours
//! **without** renormalising the weights.
//!
//! The test set is processed in chunks of [`TEST_CHUNK`] rows, so memory stays at
//! `TEST_CHUNK · n_train` similarities beyond the inputs (10 MB for 10k training images); the
//! training features are not copied (their inverse norms scale the similarity columns).

use crate::backend::cpu::matmul;
use crate::backend::{Gemm, Transpose};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Test rows per similarity block.
pub const TEST_CHUNK: usize = 256;
/// `F.normalize` eps.
pub const NORMALIZE_EPS: f32 = 1e-12;

/// The scores for one k.
#[derive(Clone, Debug, PartialEq)]
pub struct KnnPerK {
    pub k: usize,
    /// `[n_test, C]` class scores.
    pub probas: Vec<f32>,
    /// `[n_test]` the best class (the first on exact ties).
    pub top1: Vec<usize>,
}

/// The k-NN outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct KnnResult {
    pub max_k: usize,
    /// `C = max train label + 1`.
    pub num_classes: usize,
    /// `[n_test, max_k]` similarities, descending per row.
    pub topk_sims: Vec<f32>,
    /// `[n_test, max_k]` labels of those neighbours.
    pub topk_labels: Vec<usize>,
    /// One entry per requested k, in request order.
    pub per_k: Vec<KnnPerK>,
}

/// `1 / max(‖row‖₂, eps)`, the scale `F.normalize` applies to a feature row.
pub fn inverse_norm(row: &[f32]) -> f32 {
    let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
    1.0 / n.max(NORMALIZE_EPS)
}

fn inv_norms(x: &[f32], dim: usize) -> Vec<f32> {
    x.par_chunks(dim).map(inverse_norm).collect()
}

/// Refuses features with a non-finite value (`what`: who computed them; `name`: the image of a
/// row): a metric over NaN features would be a confident wrong answer.
pub fn check_finite_features(
    what: &str,
    features: &[f32],
    dim: usize,
    name: impl Fn(usize) -> String,
) -> Result<()> {
    if let Some(i) = features.iter().position(|v| !v.is_finite()) {
        let row = i / dim.max(1);
        return Err(Error::Numeric {
            op: "features",
            detail: format!(
                "{what}: the feature of image {row} ({}) holds {} at dimension {}: the backbone \
                 computes non-finite values (corrupt weights or a diverged model)",
                name(row),
                features[i],
                i % dim.max(1)
            ),
        });
    }
    Ok(())
}

/// Classifies `test_features [n_test, dim]` against `train_features [n_train, dim]` with
/// `train_labels [n_train]`, for every k in `nb_knn`, at temperature `temperature` (0.07
/// officially).
///
/// Errors: shape mismatches, an empty `nb_knn` or a zero k, a non-positive temperature, and
/// `max k > n_train` (there would be fewer neighbours than asked for: lower k instead).
pub fn knn_classify(
    train_features: &[f32],
    train_labels: &[usize],
    test_features: &[f32],
    dim: usize,
    nb_knn: &[usize],
    temperature: f32,
) -> Result<KnnResult> {
    const OP: &str = "knn";
    let n_train = train_labels.len();
    if dim == 0 || train_features.len() != n_train * dim || test_features.len() % dim != 0 {
        return Err(Error::shape(
            OP,
            format!(
                "train features {} values for {n_train} labels of dim {dim}, test features {} values",
                train_features.len(),
                test_features.len()
            ),
        ));
    }
    check_finite_features("k-NN train", train_features, dim, |r| {
        format!("train row {r}")
    })?;
    check_finite_features("k-NN test", test_features, dim, |r| format!("test row {r}"))?;
    let max_k = nb_knn.iter().copied().max().unwrap_or(0);
    if nb_knn.contains(&0) || max_k == 0 {
        return Err(Error::Config(format!(
            "{OP}: every k must be positive, got {nb_knn:?}"
        )));
    }
    if max_k > n_train {
        return Err(Error::Config(format!(
            "{OP}: k = {max_k} needs at least {max_k} training samples, got {n_train}"
        )));
    }
    if temperature.is_nan() || temperature <= 0.0 {
        return Err(Error::Config(format!(
            "{OP}: temperature must be positive, got {temperature}"
        )));
    }
    let num_classes = train_labels.iter().copied().max().map_or(0, |m| m + 1);
    let n_test = test_features.len() / dim;
    let train_inv = inv_norms(train_features, dim);
    let test_inv = inv_norms(test_features, dim);

    let mut topk_sims = vec![0f32; n_test * max_k];
    let mut topk_idx = vec![0usize; n_test * max_k];
    let mut sims = vec![0f32; TEST_CHUNK.min(n_test.max(1)) * n_train]; // [chunk, n_train]
    let mut test_n = vec![0f32; TEST_CHUNK.min(n_test.max(1)) * dim]; // [chunk, dim]
    for c0 in (0..n_test).step_by(TEST_CHUNK) {
        let rows = TEST_CHUNK.min(n_test - c0);
        for r in 0..rows {
            let src = &test_features[(c0 + r) * dim..(c0 + r + 1) * dim];
            for (o, &v) in test_n[r * dim..(r + 1) * dim].iter_mut().zip(src) {
                *o = v * test_inv[c0 + r];
            }
        }
        let sims = &mut sims[..rows * n_train];
        let g = Gemm::nn(rows, dim, n_train).t(Transpose::No, Transpose::Yes);
        matmul(sims, &test_n[..rows * dim], train_features, g);
        sims.par_chunks_mut(n_train)
            .zip(topk_sims[c0 * max_k..(c0 + rows) * max_k].par_chunks_mut(max_k))
            .zip(topk_idx[c0 * max_k..(c0 + rows) * max_k].par_chunks_mut(max_k))
            .for_each(|((row, out_s), out_i)| {
                for (s, &inv) in row.iter_mut().zip(&train_inv) {
                    *s *= inv;
                }
                // Descending by similarity, then by index (deterministic on exact ties).
                let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
                let mut idx: Vec<usize> = (0..n_train).collect();
                if max_k < n_train {
                    idx.select_nth_unstable_by(max_k - 1, cmp);
                }
                let top = &mut idx[..max_k];
                top.sort_unstable_by(cmp);
                for (j, &i) in top.iter().enumerate() {
                    out_s[j] = row[i];
                    out_i[j] = i;
                }
            });
    }
    let topk_labels: Vec<usize> = topk_idx.iter().map(|&i| train_labels[i]).collect();

    // [n_test, max_k] softmax weights over the retrieved neighbours.
    let mut weights = vec![0f32; n_test * max_k];
    for (w, s) in weights.chunks_mut(max_k).zip(topk_sims.chunks(max_k)) {
        let m = s[0] / temperature;
        let e: Vec<f64> = s
            .iter()
            .map(|&v| ((v / temperature - m) as f64).exp())
            .collect();
        let z: f64 = e.iter().sum();
        for (wv, ev) in w.iter_mut().zip(e) {
            *wv = (ev / z) as f32;
        }
    }
    let per_k = nb_knn
        .iter()
        .map(|&k| {
            let mut probas = vec![0f32; n_test * num_classes];
            let mut top1 = vec![0usize; n_test];
            for t in 0..n_test {
                let p = &mut probas[t * num_classes..(t + 1) * num_classes];
                for j in 0..k {
                    p[topk_labels[t * max_k + j]] += weights[t * max_k + j];
                }
                top1[t] = argmax(p);
            }
            KnnPerK { k, probas, top1 }
        })
        .collect();
    Ok(KnnResult {
        max_k,
        num_classes,
        topk_sims,
        topk_labels,
        per_k,
    })
}

fn argmax(p: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in p.iter().enumerate() {
        if v > p[best] {
            best = i;
        }
    }
    best
}

/// Top-`top` accuracy (`top` = 1 or 5 usually): the fraction of test rows whose label is among
/// the `top` highest class scores of `probas [n_test, C]`.
pub fn topk_accuracy(
    probas: &[f32],
    num_classes: usize,
    labels: &[usize],
    top: usize,
) -> Result<f64> {
    if num_classes == 0 || probas.len() != labels.len() * num_classes {
        return Err(Error::shape(
            "topk_accuracy",
            format!(
                "{} scores for {} labels of {num_classes} classes",
                probas.len(),
                labels.len()
            ),
        ));
    }
    if labels.is_empty() {
        return Ok(0.0);
    }
    let hits = probas
        .chunks(num_classes)
        .zip(labels)
        .filter(|(p, &l)| {
            // The label is in the top `top` when fewer than `top` classes score strictly higher.
            l < num_classes && p.iter().filter(|&&v| v > p[l]).count() < top
        })
        .count();
    Ok(hits as f64 / labels.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_neighbours_vote_with_softmax_weights() {
        // Train: two clusters along x (class 0) and y (class 1).
        let train = [1.0f32, 0.0, 2.0, 0.1, 0.0, 1.0, 0.1, 3.0];
        let labels = [0usize, 0, 1, 1];
        let test = [5.0f32, 0.2, 0.1, 2.0];
        let r = knn_classify(&train, &labels, &test, 2, &[1, 3], 0.07).unwrap();
        assert_eq!(r.num_classes, 2);
        assert_eq!(&r.topk_labels[..3], &[0, 0, 1]);
        assert!(r.topk_sims[0] >= r.topk_sims[1] && r.topk_sims[1] >= r.topk_sims[2]);
        assert_eq!(r.per_k[1].top1, vec![0, 1]);
        // k = 1 keeps only the first weight: not renormalised, so below 1.
        let p = &r.per_k[0].probas;
        assert!(p[0] < 1.0 && p[0] > 0.3 && p[1] == 0.0);
        assert_eq!(
            topk_accuracy(&r.per_k[1].probas, 2, &[0, 1], 1).unwrap(),
            1.0
        );
        assert!(knn_classify(&train, &labels, &test, 2, &[5], 0.07).is_err());
        assert!(knn_classify(&train, &labels, &test, 3, &[1], 0.07).is_err());
    }
}
