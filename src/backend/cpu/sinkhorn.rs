//! Sinkhorn-Knopp teacher targets (CPU reference of the CUDA Sinkhorn kernel).
//!
//! The official algorithm on `Q = exp(T / tt)ᵀ` (`[K, R]`): normalise the total to 1, then
//! `n_iters` times divide every prototype row by its sum and by `K`, then every sample column by
//! its sum and by `R`; finally multiply by `R`, so every sample sums to 1. Here the matrix stays
//! in the logits' `[R, K]` layout (prototypes are columns) and:
//!
//! * before `exp`, each prototype's logits are shifted by that prototype's maximum over all rows.
//!   The first operation after `exp` divides each prototype by its sum, so a per-prototype
//!   constant cancels exactly (as does a global one, which the official code's total
//!   normalisation also cancels); unlike a per-sample max, it never changes the result. It keeps
//!   `exp` from overflowing and every prototype sum `>= 1`;
//! * the division by the grand total is skipped for the same reason (the prototype
//!   normalisation follows it);
//! * the final `· R` is folded into the last sample normalisation.
//!
//! All sums accumulate in f64. One iteration is one row-parallel pass (scale by the prototype
//! factors while summing the row, then scale the row, which is still in cache) and one
//! column-block-parallel pass for the next prototype sums.

use super::loss::{check_temp, exp_f32, has_avx2};
use crate::backend::check_len;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Sinkhorn-Knopp: `out_probs [R,K]` from teacher `logits [R,K]`, with `rows = R` samples
/// (all jointly normalised), `k = K` prototypes, temperature `teacher_temp` and `n_iters`
/// iterations (3 officially). Every output row sums to 1.
///
/// Errors: shape mismatches, a non-positive temperature, `n_iters == 0`, or a sample whose
/// weights all underflow (its logits are more than ~87·tt below every prototype's best sample),
/// which the official code would turn into NaN.
pub fn sinkhorn_knopp(
    out_probs: &mut [f32],
    logits: &[f32],
    rows: usize,
    k: usize,
    teacher_temp: f32,
    n_iters: usize,
) -> Result<()> {
    const OP: &str = "sinkhorn_knopp";
    check_len(OP, "out_probs", out_probs.len(), rows * k)?;
    check_len(OP, "logits", logits.len(), rows * k)?;
    check_temp(OP, "teacher temperature", teacher_temp)?;
    if n_iters == 0 {
        return Err(Error::Config(format!("{OP}: needs at least one iteration")));
    }
    if rows == 0 || k == 0 {
        return Ok(());
    }
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        return Err(Error::Numeric {
            op: OP,
            detail: format!("logit {i} (row {}) is {}", i / k, logits[i]),
        });
    }
    let inv_t = 1.0 / teacher_temp;

    // [K] per-prototype max over all rows (the exact-cancelling shift), in scaled units.
    let col_max = column_max(logits, rows, k);
    let shift: Vec<f32> = col_max.iter().map(|&m| m * inv_t).collect();

    // Q = exp(x − shift), then its prototype sums.
    let simd = has_avx2();
    out_probs
        .par_chunks_mut(k)
        .zip(logits.par_chunks(k))
        .for_each(|(q, t)| {
            #[cfg(not(target_arch = "x86_64"))]
            let _ = simd;
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `simd` is true only when the CPU has AVX2 (checked at run time).
                return unsafe { exp_row_avx2(q, t, &shift, inv_t) };
            }
            exp_row(q, t, &shift, inv_t)
        });
    let mut col_sum = column_sums(out_probs, rows, k);

    let inv_k = 1.0 / k as f64;
    let inv_r = 1.0 / rows as f64;
    for it in 0..n_iters {
        // [K] prototype factors 1 / (sum · K).
        let col_scale: Vec<f32> = col_sum.iter().map(|&s| (inv_k / s) as f32).collect();
        // Sample factors 1 / (sum · R), except the last, where the final · R cancels the / R.
        let row_norm = if it + 1 == n_iters { 1.0 } else { inv_r };
        out_probs
            .par_chunks_mut(k)
            .enumerate()
            .try_for_each(|(r, q)| {
                let mut lanes = [0f64; 8];
                let mut chunks = q.chunks_exact_mut(8);
                let mut scales = col_scale.chunks_exact(8);
                for (c, s) in (&mut chunks).zip(&mut scales) {
                    for l in 0..8 {
                        c[l] *= s[l];
                        lanes[l] += c[l] as f64;
                    }
                }
                let mut row_sum: f64 = lanes.iter().sum();
                for (qv, &s) in chunks.into_remainder().iter_mut().zip(scales.remainder()) {
                    *qv *= s;
                    row_sum += *qv as f64;
                }
                if !(row_sum > 0.0 && row_sum.is_finite()) {
                    return Err(Error::Numeric {
                        op: OP,
                        detail: format!(
                            "sample {r} has total weight {row_sum} after {it} iterations: its \
                             logits are too far below the other samples' for temperature {teacher_temp}"
                        ),
                    });
                }
                let f = (row_norm / row_sum) as f32;
                for qv in q.iter_mut() {
                    *qv *= f;
                }
                Ok(())
            })?;
        if it + 1 < n_iters {
            col_sum = column_sums(out_probs, rows, k);
        }
    }
    Ok(())
}

/// `q = exp(t · inv_t − shift)` over one row.
#[inline(always)]
fn exp_row(q: &mut [f32], t: &[f32], shift: &[f32], inv_t: f32) {
    for ((qv, &tv), &sv) in q.iter_mut().zip(t).zip(shift) {
        *qv = exp_f32(tv * inv_t - sv);
    }
}

/// [`exp_row`] built for AVX2 (bit-identical results, see `loss::has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_row_avx2(q: &mut [f32], t: &[f32], shift: &[f32], inv_t: f32) {
    exp_row(q, t, shift, inv_t)
}

/// Columns per parallel task of the column reductions (a 16 KiB f64 accumulator stays in L1).
const COLS: usize = 2048;

/// `[K]` column sums of `m [R,K]`, in f64, parallel over column blocks (no per-thread `[K]`
/// buffers to allocate and merge).
fn column_sums(m: &[f32], rows: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; k];
    out.par_chunks_mut(COLS).enumerate().for_each(|(blk, o)| {
        let c0 = blk * COLS;
        for r in 0..rows {
            let row = &m[r * k + c0..r * k + c0 + o.len()];
            for (a, &v) in o.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
    });
    out
}

/// `[K]` column maxima of `m [R,K]`.
fn column_max(m: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; k];
    out.par_chunks_mut(COLS).enumerate().for_each(|(blk, o)| {
        let c0 = blk * COLS;
        for r in 0..rows {
            let row = &m[r * k + c0..r * k + c0 + o.len()];
            for (a, &v) in o.iter_mut().zip(row) {
                *a = a.max(v);
            }
        }
    });
    out
}
