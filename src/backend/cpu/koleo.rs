//! KoLeo regulariser kernels (CPU reference of the CUDA KoLeo nearest-neighbour kernel).
//!
//! Dimensions: `b` vectors of `d` features. Official eps placements (all 1e-8): normalisation
//! `x / max(‖x‖, eps)`; the pairwise distance adds eps to **every component** of the difference
//! before the norm; the log adds eps to the distance.

use super::backend::check;
use super::gemm::matmul;
use crate::backend::{Accumulate, Transpose};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// The official eps (normalisation, pairwise distance and log).
pub const KOLEO_EPS: f32 = 1e-8;

/// What the KoLeo backward needs from the forward.
#[derive(Clone, Debug, Default)]
pub struct KoleoSaved {
    /// `[b,d]` the normalised vectors.
    pub xn: Vec<f32>,
    /// `[b]` the norms `‖x_i‖` (before the eps clamp).
    pub norms: Vec<f32>,
    /// `[b]` nearest neighbour of each vector (max cosine, itself excluded; first on ties).
    pub nn: Vec<usize>,
    /// `[b]` `d_i = ‖xn_i − xn_nn(i) + eps‖`.
    pub dist: Vec<f32>,
}

/// KoLeo forward: returns `−mean_i log(d_i + eps)` and fills `saved`. `x [b,d]`, `b >= 2`.
pub fn koleo_forward(saved: &mut KoleoSaved, x: &[f32], b: usize, d: usize) -> Result<f32> {
    const OP: &str = "koleo_forward";
    check(OP, "x", x.len(), b * d)?;
    if b < 2 {
        return Err(Error::shape(
            OP,
            format!("needs at least 2 vectors to find neighbours, got {b}"),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Numeric {
            op: OP,
            detail: format!("x[{}, {}] is {}", i / d, i % d, x[i]),
        });
    }
    saved.xn.resize(b * d, 0.0);
    saved.norms.resize(b, 0.0);
    saved.nn.resize(b, 0);
    saved.dist.resize(b, 0.0);
    for i in 0..b {
        let row = &x[i * d..(i + 1) * d];
        let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
        saved.norms[i] = n;
        let inv = 1.0 / n.max(KOLEO_EPS);
        for (o, &v) in saved.xn[i * d..(i + 1) * d].iter_mut().zip(row) {
            *o = v * inv;
        }
    }
    // [b,b] cosine similarities.
    let mut dots = vec![0f32; b * b];
    matmul(
        &mut dots,
        &saved.xn,
        Transpose::No,
        &saved.xn,
        Transpose::Yes,
        b,
        d,
        b,
        Accumulate::Overwrite,
    );
    let xn = &saved.xn;
    saved
        .nn
        .par_iter_mut()
        .zip(saved.dist.par_iter_mut())
        .enumerate()
        .for_each(|(i, (nn, dist))| {
            let mut best = usize::MAX;
            let mut best_dot = f32::NEG_INFINITY;
            for (j, &v) in dots[i * b..(i + 1) * b].iter().enumerate() {
                if j != i && (best == usize::MAX || v > best_dot) {
                    best = j;
                    best_dot = v;
                }
            }
            *nn = best;
            let (a, c) = (&xn[i * d..(i + 1) * d], &xn[best * d..(best + 1) * d]);
            let s: f64 = a
                .iter()
                .zip(c)
                .map(|(&p, &q)| {
                    let u = (p - q + KOLEO_EPS) as f64;
                    u * u
                })
                .sum();
            *dist = s.sqrt() as f32;
        });
    let sum_log: f64 = saved
        .dist
        .iter()
        .map(|&v| ((v + KOLEO_EPS) as f64).ln())
        .sum();
    Ok((-sum_log / b as f64) as f32)
}

/// KoLeo backward: `dx (=|+=) dloss · ∂KoLeo/∂x`, with gradients flowing into both `xn_i` and
/// its neighbour `xn_nn(i)` (the neighbour choice itself is not differentiated).
/// `dx [b,d]`, `x [b,d]`.
pub fn koleo_backward(
    dx: &mut [f32],
    saved: &KoleoSaved,
    dloss: f32,
    b: usize,
    d: usize,
    acc: Accumulate,
) -> Result<()> {
    const OP: &str = "koleo_backward";
    check(OP, "dx", dx.len(), b * d)?;
    check(OP, "saved.xn", saved.xn.len(), b * d)?;
    check(OP, "saved.nn", saved.nn.len(), b)?;
    // [b,d] gradient w.r.t. the normalised vectors, in f64 (each row receives from several i).
    let mut dxn = vec![0f64; b * d];
    let xn = &saved.xn;
    for i in 0..b {
        let j = saved.nn[i];
        let di = saved.dist[i] as f64;
        // dL/dd_i, then through the norm (torch gives 0 at a zero norm).
        let g = -(dloss as f64) / (b as f64 * (di + KOLEO_EPS as f64));
        if di == 0.0 {
            continue;
        }
        for c in 0..d {
            let u = (xn[i * d + c] - xn[j * d + c] + KOLEO_EPS) as f64;
            let gu = g * u / di;
            dxn[i * d + c] += gu;
            dxn[j * d + c] -= gu;
        }
    }
    // Through xn = x / max(‖x‖, eps).
    for i in 0..b {
        let n = saved.norms[i] as f64;
        let g = &dxn[i * d..(i + 1) * d];
        let out = &mut dx[i * d..(i + 1) * d];
        let xr = &xn[i * d..(i + 1) * d];
        if n > KOLEO_EPS as f64 {
            let proj: f64 = g.iter().zip(xr).map(|(&a, &v)| a * v as f64).sum();
            for c in 0..d {
                let v = ((g[c] - xr[c] as f64 * proj) / n) as f32;
                match acc {
                    Accumulate::Overwrite => out[c] = v,
                    Accumulate::Add => out[c] += v,
                }
            }
        } else {
            for c in 0..d {
                let v = (g[c] / KOLEO_EPS as f64) as f32;
                match acc {
                    Accumulate::Overwrite => out[c] = v,
                    Accumulate::Add => out[c] += v,
                }
            }
        }
    }
    Ok(())
}
