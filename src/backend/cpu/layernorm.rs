//! LayerNorm over the last dimension (f32 statistics, biased variance).
//!
//! Dimensions: `rows` independent rows (B·T), `dim` channels (C).
//!
//! Kernels panic if a slice is shorter than its declared shape: a programming error inside the
//! engine, never user input (the layers above validate sizes).

use crate::backend::Accumulate;
use rayon::prelude::*;

/// Rows per rayon task: small enough to balance, large enough to amortise the hand-off.
const ROWS_PER_TASK: usize = 64;

/// `out = (inp - mean) * rstd * weight + bias`, per row; saves `mean` and `rstd` for backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],  // [rows, dim]
    mean: &mut [f32], // [rows]
    rstd: &mut [f32], // [rows]
    inp: &[f32],      // [rows, dim]
    weight: &[f32],   // [dim]
    bias: &[f32],     // [dim]
    rows: usize,
    dim: usize,
    eps: f32,
) {
    assert!(out.len() >= rows * dim && inp.len() >= rows * dim);
    assert!(mean.len() >= rows && rstd.len() >= rows);
    assert!(weight.len() == dim && bias.len() == dim);
    out[..rows * dim]
        .par_chunks_mut(ROWS_PER_TASK * dim)
        .zip(mean[..rows].par_chunks_mut(ROWS_PER_TASK))
        .zip(rstd[..rows].par_chunks_mut(ROWS_PER_TASK))
        .zip(inp[..rows * dim].par_chunks(ROWS_PER_TASK * dim))
        .for_each(|(((out, mean), rstd), inp)| {
            for (r, (o, x)) in out.chunks_mut(dim).zip(inp.chunks(dim)).enumerate() {
                (mean[r], rstd[r]) = normalize_row(o, x, weight, bias, eps);
            }
        });
}

/// One row: `o = (x - mean) * rstd * weight + bias`; returns `(mean, rstd)`.
#[inline]
fn normalize_row(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> (f32, f32) {
    let dim = x.len();
    // Two passes in f32 like PyTorch's CPU kernel (mean first, then centred variance).
    let m = x.iter().sum::<f32>() / dim as f32;
    let var = x.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() / dim as f32;
    let s = 1.0 / (var + eps).sqrt();
    for i in 0..dim {
        o[i] = (x[i] - m) * s * weight[i] + bias[i];
    }
    (m, s)
}

/// The residual add fused with the next LayerNorm: `stream += gamma ∘ branch` (no LayerScale
/// without `gamma`), then [`layernorm_forward`] of the updated row, row by row while it is in cache.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward(
    stream: &mut [f32],    // [rows, dim]
    out: &mut [f32],       // [rows, dim]
    mean: &mut [f32],      // [rows]
    rstd: &mut [f32],      // [rows]
    branch: &[f32],        // [rows, dim]
    gamma: Option<&[f32]>, // [dim]
    weight: &[f32],        // [dim]
    bias: &[f32],          // [dim]
    rows: usize,
    dim: usize,
    eps: f32,
) {
    assert!(stream.len() >= rows * dim && branch.len() >= rows * dim);
    assert!(out.len() >= rows * dim && mean.len() >= rows && rstd.len() >= rows);
    assert!(weight.len() == dim && bias.len() == dim);
    stream[..rows * dim]
        .par_chunks_mut(ROWS_PER_TASK * dim)
        .zip(branch[..rows * dim].par_chunks(ROWS_PER_TASK * dim))
        .zip(out[..rows * dim].par_chunks_mut(ROWS_PER_TASK * dim))
        .zip(mean[..rows].par_chunks_mut(ROWS_PER_TASK))
        .zip(rstd[..rows].par_chunks_mut(ROWS_PER_TASK))
        .for_each(|((((x, y), out), mean), rstd)| {
            let rows = x
                .chunks_mut(dim)
                .zip(y.chunks(dim))
                .zip(out.chunks_mut(dim));
            for (r, ((xr, yr), o)) in rows.enumerate() {
                match gamma {
                    Some(g) => (0..dim).for_each(|i| xr[i] += g[i] * yr[i]),
                    None => xr.iter_mut().zip(yr).for_each(|(a, b)| *a += b),
                }
                (mean[r], rstd[r]) = normalize_row(o, xr, weight, bias, eps);
            }
        });
}

/// Backward of [`layernorm_forward`]: `dinp` is written or added (`dinp_write`),
/// `dweight`/`dbias` accumulate.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],    // [rows, dim]
    dweight: &mut [f32], // [dim]
    dbias: &mut [f32],   // [dim]
    dout: &[f32],        // [rows, dim]
    inp: &[f32],         // [rows, dim]
    weight: &[f32],      // [dim]
    mean: &[f32],        // [rows]
    rstd: &[f32],        // [rows]
    rows: usize,
    dim: usize,
    dinp_write: Accumulate,
) {
    assert!(dinp.len() >= rows * dim && dout.len() >= rows * dim && inp.len() >= rows * dim);
    assert!(dweight.len() == dim && dbias.len() == dim && weight.len() == dim);
    // Each task returns its partial dweight/dbias; they are summed after (no shared writes).
    let partials: Vec<Vec<f32>> = dinp[..rows * dim]
        .par_chunks_mut(ROWS_PER_TASK * dim)
        .enumerate()
        .map(|(task, dinp)| {
            let mut acc = vec![0f32; 2 * dim]; // [dweight | dbias]
            let r0 = task * ROWS_PER_TASK;
            for (r, di) in dinp.chunks_mut(dim).enumerate() {
                let row = r0 + r;
                let x = &inp[row * dim..(row + 1) * dim];
                let dy = &dout[row * dim..(row + 1) * dim];
                let (m, s) = (mean[row], rstd[row]);
                // dnorm = dy * w; dx = s * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))
                let mut sum_dn = 0f32;
                let mut sum_dn_xhat = 0f32;
                for i in 0..dim {
                    let xhat = (x[i] - m) * s;
                    let dn = dy[i] * weight[i];
                    sum_dn += dn;
                    sum_dn_xhat += dn * xhat;
                    acc[i] += dy[i] * xhat;
                    acc[dim + i] += dy[i];
                }
                let mean_dn = sum_dn / dim as f32;
                let mean_dn_xhat = sum_dn_xhat / dim as f32;
                for i in 0..dim {
                    let xhat = (x[i] - m) * s;
                    let dn = dy[i] * weight[i];
                    let v = s * (dn - mean_dn - xhat * mean_dn_xhat);
                    match dinp_write {
                        Accumulate::Overwrite => di[i] = v,
                        Accumulate::Add => di[i] += v,
                    }
                }
            }
            acc
        })
        .collect();
    for p in &partials {
        for i in 0..dim {
            dweight[i] += p[i];
            dbias[i] += p[dim + i];
        }
    }
}
