//! `NormOps` on the CPU: LayerNorm over the last dimension (f32 statistics, biased variance,
//! two passes like PyTorch's CPU kernel), optionally fused with the residual add, and its
//! backward. The reference of `kernels/layernorm.cu`.
//!
//! Dimensions: `rows` independent rows (B·T), `dim` channels (C).

use super::backend::CpuBackend;
use crate::backend::{
    check_lens, Accumulate, LnParams, LnSaved, LnStats, NormOps, NormOut, NormShape, Residual,
};
use crate::error::Result;
use rayon::prelude::*;

/// Rows per rayon task: small enough to balance, large enough to amortise the hand-off.
const ROWS_PER_TASK: usize = 64;

/// One row: `o = (x - mean) * rstd * weight + bias`; returns `(mean, rstd)`.
#[inline]
fn normalize_row(o: &mut [f32], x: &[f32], p: &LnParams<'_, CpuBackend>) -> (f32, f32) {
    let dim = x.len();
    let m = x.iter().sum::<f32>() / dim as f32;
    let var = x.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() / dim as f32;
    let s = 1.0 / (var + p.eps).sqrt();
    for i in 0..dim {
        o[i] = (x[i] - m) * s * p.weight[i] + p.bias[i];
    }
    (m, s)
}

/// Checks a forward's statistics, parameters and output; returns the output and whether it is
/// an operand (rounded under bf16).
fn check_forward<'a>(
    op: &'static str,
    out: NormOut<'a, CpuBackend>,
    stats: &LnStats<'_, CpuBackend>,
    p: &LnParams<'_, CpuBackend>,
    shape: NormShape,
) -> Result<(&'a mut [f32], bool)> {
    let (out, operand) = match out {
        NormOut::F32(o) => (o, false),
        NormOut::Half(o) => (o, true),
    };
    let NormShape { rows, channels: c } = shape;
    check_lens(
        op,
        &[
            ("out", out.len(), rows * c),
            ("mean", stats.mean.len(), rows),
            ("rstd", stats.rstd.len(), rows),
            ("weight", p.weight.len(), c),
            ("bias", p.bias.len(), c),
        ],
    )?;
    Ok((out, operand))
}

impl NormOps for CpuBackend {
    /// `out = (inp - mean) * rstd * weight + bias` per row; saves `mean` and `rstd`.
    fn layernorm_forward(
        &mut self,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        inp: &[f32],
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu layernorm_forward";
        let (out, operand) = check_forward(OP, out, &stats, &p, shape)?;
        let c = shape.channels;
        check_lens(OP, &[("inp", inp.len(), shape.rows * c)])?;
        out.par_chunks_mut(ROWS_PER_TASK * c)
            .zip(stats.mean.par_chunks_mut(ROWS_PER_TASK))
            .zip(stats.rstd.par_chunks_mut(ROWS_PER_TASK))
            .zip(inp.par_chunks(ROWS_PER_TASK * c))
            .for_each(|(((out, mean), rstd), inp)| {
                for (r, (o, x)) in out.chunks_mut(c).zip(inp.chunks(c)).enumerate() {
                    (mean[r], rstd[r]) = normalize_row(o, x, &p);
                }
            });
        if operand {
            self.round(out);
        }
        Ok(())
    }

    /// `stream += gamma ∘ branch` (no LayerScale without `gamma`), then the LayerNorm of each
    /// updated row while it is in cache.
    fn residual_layernorm_forward(
        &mut self,
        res: Residual<'_, Self>,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu residual_layernorm_forward";
        let (out, operand) = check_forward(OP, out, &stats, &p, shape)?;
        let (n, c) = (shape.rows * shape.channels, shape.channels);
        let g = res.gamma;
        check_lens(
            OP,
            &[
                ("stream", res.stream.len(), n),
                ("branch", res.branch.len(), n),
                ("gamma", g.map_or(c, <[f32]>::len), c),
            ],
        )?;
        res.stream
            .par_chunks_mut(ROWS_PER_TASK * c)
            .zip(res.branch.par_chunks(ROWS_PER_TASK * c))
            .zip(out.par_chunks_mut(ROWS_PER_TASK * c))
            .zip(stats.mean.par_chunks_mut(ROWS_PER_TASK))
            .zip(stats.rstd.par_chunks_mut(ROWS_PER_TASK))
            .for_each(|((((x, y), out), mean), rstd)| {
                let rows = x.chunks_mut(c).zip(y.chunks(c)).zip(out.chunks_mut(c));
                for (r, ((xr, yr), o)) in rows.enumerate() {
                    match g {
                        Some(g) => (0..c).for_each(|i| xr[i] += g[i] * yr[i]),
                        None => xr.iter_mut().zip(yr).for_each(|(a, b)| *a += b),
                    }
                    (mean[r], rstd[r]) = normalize_row(o, xr, &p);
                }
            });
        if operand {
            self.round(out);
        }
        Ok(())
    }

    /// `dinp (=|+=) s · (dnorm − mean(dnorm) − x̂ · mean(dnorm · x̂))` with `dnorm = dout · w`;
    /// `dweight += Σ dout · x̂`, `dbias += Σ dout` (partials per fixed row chunk, summed in
    /// order: the result does not depend on the thread count).
    fn layernorm_backward(
        &mut self,
        dinp: &mut [f32],
        dinp_write: Accumulate,
        dweight: &mut [f32],
        dbias: &mut [f32],
        saved: LnSaved<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape {
            rows,
            channels: dim,
        } = shape;
        let LnSaved {
            dout,
            inp,
            weight,
            mean,
            rstd,
        } = saved;
        check_lens(
            "cpu layernorm_backward",
            &[
                ("dinp", dinp.len(), rows * dim),
                ("dout", dout.len(), rows * dim),
                ("inp", inp.len(), rows * dim),
                ("mean", mean.len(), rows),
                ("rstd", rstd.len(), rows),
                ("weight", weight.len(), dim),
                ("dweight", dweight.len(), dim),
                ("dbias", dbias.len(), dim),
            ],
        )?;
        let partials: Vec<Vec<f32>> = dinp
            .par_chunks_mut(ROWS_PER_TASK * dim)
            .enumerate()
            .map(|(task, dinp)| {
                let mut acc = vec![0f32; 2 * dim]; // [dweight | dbias]
                for (r, di) in dinp.chunks_mut(dim).enumerate() {
                    let row = task * ROWS_PER_TASK + r;
                    let x = &inp[row * dim..(row + 1) * dim];
                    let dy = &dout[row * dim..(row + 1) * dim];
                    let (m, s) = (mean[row], rstd[row]);
                    let (mut sum_dn, mut sum_dn_xhat) = (0f32, 0f32);
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
                        let v = s * (dy[i] * weight[i] - mean_dn - xhat * mean_dn_xhat);
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
        Ok(())
    }
}
