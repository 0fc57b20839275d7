//! `Linear`: `y = x Wᵀ + b` with the PyTorch weight layout `[out, in]`.

use super::params::{Init, ParamRef, ParamTable};
use crate::backend::cpu::{matmul, Accumulate, Transpose};
use rayon::prelude::*;

/// Rows per rayon task in the bias loops.
const ROWS_PER_TASK: usize = 256;

/// Whether a linear layer has a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    Yes,
    No,
}

impl From<bool> for Bias {
    fn from(on: bool) -> Self {
        if on {
            Bias::Yes
        } else {
            Bias::No
        }
    }
}

/// A linear layer: parameter views and sizes.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamRef,       // [out_dim, in_dim]
    pub bias: Option<ParamRef>, // [out_dim]
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    /// Registers `<name>weight` (init `weight_init`) and `<name>bias` (zeros).
    pub fn new(
        table: &mut ParamTable,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: Bias,
        weight_init: Init,
    ) -> Self {
        Self::with_bias_init(table, name, in_dim, out_dim, bias, weight_init, Init::Zeros)
    }

    /// As [`Linear::new`] with an explicit bias init (Conv2d-style layers use a uniform bias).
    pub fn with_bias_init(
        table: &mut ParamTable,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: Bias,
        weight_init: Init,
        bias_init: Init,
    ) -> Self {
        let weight = table.push(format!("{name}weight"), &[out_dim, in_dim], weight_init);
        let bias = match bias {
            Bias::Yes => Some(table.push(format!("{name}bias"), &[out_dim], bias_init)),
            Bias::No => None,
        };
        Linear {
            weight,
            bias,
            in_dim,
            out_dim,
        }
    }

    /// `out = inp Wᵀ + b`.
    pub fn forward(&self, out: &mut [f32], inp: &[f32], params: &[f32], rows: usize) {
        // out: [rows, out_dim], inp: [rows, in_dim]
        let (k, n) = (self.in_dim, self.out_dim);
        let w = &params[self.weight.range()];
        matmul(
            out,
            inp,
            Transpose::No,
            w,
            Transpose::Yes,
            rows,
            k,
            n,
            Accumulate::Overwrite,
        );
        if let Some(b) = self.bias {
            let b = &params[b.range()];
            out[..rows * n]
                .par_chunks_mut(ROWS_PER_TASK * n)
                .for_each(|chunk| {
                    for row in chunk.chunks_mut(n) {
                        row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                    }
                });
        }
    }

    /// Backward: `dinp = dout W` (written, skipped when `None`), `dW += doutᵀ inp`,
    /// `db += Σ_rows dout`.
    pub fn backward(
        &self,
        dinp: Option<&mut [f32]>, // [rows, in_dim]
        grads: &mut [f32],
        dout: &[f32], // [rows, out_dim]
        inp: &[f32],  // [rows, in_dim]
        params: &[f32],
        rows: usize,
    ) {
        let (k, n) = (self.in_dim, self.out_dim);
        if let Some(dinp) = dinp {
            let w = &params[self.weight.range()];
            matmul(
                dinp,
                dout,
                Transpose::No,
                w,
                Transpose::No,
                rows,
                n,
                k,
                Accumulate::Overwrite,
            );
        }
        let dw = &mut grads[self.weight.range()];
        matmul(
            dw,
            dout,
            Transpose::Yes,
            inp,
            Transpose::No,
            n,
            rows,
            k,
            Accumulate::Add,
        );
        if let Some(b) = self.bias {
            // Partial column sums per fixed row chunk, added in order: the result does not
            // depend on the thread count.
            let partials: Vec<Vec<f32>> = dout[..rows * n]
                .par_chunks(ROWS_PER_TASK * n)
                .map(|chunk| {
                    let mut acc = vec![0f32; n];
                    for row in chunk.chunks(n) {
                        acc.iter_mut().zip(row).for_each(|(a, g)| *a += g);
                    }
                    acc
                })
                .collect();
            let db = &mut grads[b.range()];
            for p in &partials {
                db.iter_mut().zip(p).for_each(|(d, g)| *d += g);
            }
        }
    }

    /// Multiply-adds of one forward row (for FLOP counts).
    pub fn macs_per_row(&self) -> usize {
        self.in_dim * self.out_dim
    }
}
