//! Elementwise ops: exact-erf GELU, SwiGLU's SiLU gate, LayerScale, residual add.
//!
//! Activation gradients are written (`=`), parameter gradients (`dgamma`) accumulate (`+=`).
//!
//! Kernels panic if a slice is shorter than its declared shape: a programming error inside the
//! engine, never user input (the layers above validate sizes).

use super::backend::CpuBackend;
use crate::backend::{check_lens, Accumulate, ElementwiseOps, NormShape};
use crate::error::Result;
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;
/// Rows per rayon task of the reductions (fixed: results do not depend on the thread count).
const ROWS_PER_TASK: usize = 256;

const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/sqrt(2π), the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `erf(x)` to f32 precision (absolute error below 5e-7 in f32 arithmetic, a few ulp of 1;
/// 6.5e-8 for the approximation itself), as a rational
/// minimax approximation on [−4, 4] (the form XLA and Eigen use for f32; beyond ±4, erf is ±1
/// in f32). Branch-free, so GELU loops vectorise; libm's scalar `erff` cost 10% of a CPU
/// training step.
#[inline]
pub fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    // Plain multiply-add, not `mul_add`: without a target FMA feature that is a libm call.
    let p = ALPHA.iter().fold(0.0f32, |acc, &a| acc * x2 + a);
    let q = BETA.iter().fold(0.0f32, |acc, &b| acc * x2 + b);
    x * p / q
}

/// `gelu(x) = 0.5 x (1 + erf(x / √2))`, the exact form (PyTorch's `nn.GELU()` default), not
/// the tanh approximation.
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * INV_SQRT_2))
}

/// `d gelu / dx = Φ(x) + x φ(x)`.
#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * INV_SQRT_2));
    let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
    cdf + x * pdf
}

/// `silu(x) = x σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `d silu / dx = σ(x) (1 + x (1 − σ(x)))`.
#[inline]
pub fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = gelu(x)));
}

impl ElementwiseOps for CpuBackend {
    /// `dpre = dact · gelu'(pre)`.
    fn gelu_backward(&mut self, dpre: &mut [f32], dact: &[f32], pre: &[f32]) -> Result<()> {
        let n = dpre.len();
        check_lens(
            "cpu gelu_backward",
            &[("dact", dact.len(), n), ("pre", pre.len(), n)],
        )?;
        dpre.par_chunks_mut(CHUNK)
            .zip(dact.par_chunks(CHUNK))
            .zip(pre.par_chunks(CHUNK))
            .for_each(|((di, dy), x)| (0..di.len()).for_each(|i| di[i] = dy[i] * gelu_grad(x[i])));
        self.round(dpre);
        Ok(())
    }

    /// `gated = silu(x1) * x2` with `x12 = [x1 | x2]` per row.
    fn swiglu_forward(
        &mut self,
        gated: &mut [f32],
        x12: &[f32],
        rows: usize,
        width: usize,
    ) -> Result<()> {
        check_lens(
            "cpu swiglu_forward",
            &[
                ("gated", gated.len(), rows * width),
                ("x12", x12.len(), rows * 2 * width),
            ],
        )?;
        if width > 0 {
            gated
                .par_chunks_mut(width)
                .zip(x12.par_chunks(2 * width))
                .for_each(|(o, x)| {
                    let (x1, x2) = x.split_at(width);
                    (0..width).for_each(|i| o[i] = silu(x1[i]) * x2[i]);
                });
        }
        self.round(gated);
        Ok(())
    }

    fn swiglu_backward(
        &mut self,
        dx12: &mut [f32],
        dgated: &[f32],
        x12: &[f32],
        rows: usize,
        width: usize,
    ) -> Result<()> {
        check_lens(
            "cpu swiglu_backward",
            &[
                ("dx12", dx12.len(), rows * 2 * width),
                ("dgated", dgated.len(), rows * width),
                ("x12", x12.len(), rows * 2 * width),
            ],
        )?;
        if width > 0 {
            dx12.par_chunks_mut(2 * width)
                .zip(dgated.par_chunks(width))
                .zip(x12.par_chunks(2 * width))
                .for_each(|((dx, dy), x)| {
                    let (x1, x2) = x.split_at(width);
                    let (dx1, dx2) = dx.split_at_mut(width);
                    for i in 0..width {
                        dx1[i] = dy[i] * x2[i] * silu_grad(x1[i]);
                        dx2[i] = dy[i] * silu(x1[i]);
                    }
                });
        }
        self.round(dx12);
        Ok(())
    }

    /// `dbranch = dresidual * gamma`, `dgamma += Σ_rows dresidual * branch` (partials per fixed
    /// row chunk, summed in order: independent of the thread count).
    fn layerscale_backward(
        &mut self,
        dbranch: &mut [f32],
        dgamma: &mut [f32],
        dresidual: &[f32],
        branch: &[f32],
        gamma: &[f32],
        shape: NormShape,
    ) -> Result<()> {
        let NormShape {
            rows,
            channels: dim,
        } = shape;
        check_lens(
            "cpu layerscale_backward",
            &[
                ("dbranch", dbranch.len(), rows * dim),
                ("dresidual", dresidual.len(), rows * dim),
                ("branch", branch.len(), rows * dim),
                ("gamma", gamma.len(), dim),
                ("dgamma", dgamma.len(), dim),
            ],
        )?;
        let partials: Vec<Vec<f32>> = dbranch
            .par_chunks_mut(ROWS_PER_TASK * dim)
            .zip(dresidual.par_chunks(ROWS_PER_TASK * dim))
            .zip(branch.par_chunks(ROWS_PER_TASK * dim))
            .map(|((di, dy), x)| {
                let mut acc = vec![0f32; dim];
                for ((di, dy), x) in di.chunks_mut(dim).zip(dy.chunks(dim)).zip(x.chunks(dim)) {
                    for i in 0..dim {
                        di[i] = dy[i] * gamma[i];
                        acc[i] += dy[i] * x[i];
                    }
                }
                acc
            })
            .collect();
        for p in &partials {
            dgamma.iter_mut().zip(p).for_each(|(g, v)| *g += v);
        }
        self.round(dbranch);
        Ok(())
    }

    /// Partial sums per fixed chunk of rows, added in order.
    fn column_sum(
        &mut self,
        out: &mut [f32],
        x: &[f32],
        rows: usize,
        write: Accumulate,
    ) -> Result<()> {
        let c = out.len();
        check_lens("cpu column_sum", &[("x", x.len(), rows * c)])?;
        if write == Accumulate::Overwrite {
            out.fill(0.0);
        }
        if c == 0 || rows == 0 {
            return Ok(());
        }
        let partials: Vec<Vec<f32>> = x
            .par_chunks(ROWS_PER_TASK * c)
            .map(|chunk| {
                let mut acc = vec![0f32; c];
                for row in chunk.chunks(c) {
                    acc.iter_mut().zip(row).for_each(|(a, g)| *a += g);
                }
                acc
            })
            .collect();
        for p in &partials {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        Ok(())
    }
}
