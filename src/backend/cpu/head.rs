//! `HeadOps` on the CPU (the reference of the CUDA `l2_normalize_*`, `weight_norm_*` and KoLeo
//! kernels): row L2 normalisation with `F.normalize`'s eps, the weight-normalised prototypes
//! `W_k = g_k · v_k / ‖v_k‖` (no eps, as `weight_norm`), and KoLeo.
//!
//! Dimensions: `rows` rows of `c` channels; `k` prototypes of `bn` (the bottleneck); KoLeo's
//! `b` vectors of `d` features. KoLeo's official eps placements (all 1e-8): normalisation
//! `x / max(‖x‖, eps)`; the pairwise distance adds eps to **every component** of the
//! difference before the norm; the log adds eps to the distance.

use super::backend::{one_scalar, CpuBackend};
use super::gemm::matmul;
use crate::backend::{check_len, check_lens, Buffers, Gemm, HeadOps, NormShape, Transpose};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// The official eps (normalisation, pairwise distance and log).
const KOLEO_EPS: f32 = 1e-8;

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

impl HeadOps for CpuBackend {
    type Koleo = KoleoSaved;

    /// `z = y / max(‖y‖, eps)` per row, `norm = max(‖y‖, eps)`.
    fn l2_normalize_forward(
        &mut self,
        z: &mut [f32],
        z_half: &mut [f32],
        norm: &mut [f32],
        y: &[f32],
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels: c } = shape;
        check_lens(
            "cpu l2_normalize_forward",
            &[
                ("z", z.len(), rows * c),
                ("y", y.len(), rows * c),
                ("norm", norm.len(), rows),
            ],
        )?;
        z.par_chunks_mut(c)
            .zip(norm.par_iter_mut())
            .zip(y.par_chunks(c))
            .for_each(|((z, n), y)| {
                *n = y.iter().map(|a| a * a).sum::<f32>().sqrt().max(eps);
                z.iter_mut().zip(y).for_each(|(z, a)| *z = a / *n);
            });
        self.cast_to_half(z_half, z)
    }

    /// `dy = (dz − z (z·dz)) / norm` where the norm was not clamped, `dz / eps` where it was.
    fn l2_normalize_backward(
        &mut self,
        dy: &mut [f32],
        dy_half: &mut [f32],
        dz: &[f32],
        z: &[f32],
        norm: &[f32],
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels: c } = shape;
        check_lens(
            "cpu l2_normalize_backward",
            &[
                ("dy", dy.len(), rows * c),
                ("dz", dz.len(), rows * c),
                ("z", z.len(), rows * c),
                ("norm", norm.len(), rows),
            ],
        )?;
        dy.par_chunks_mut(c)
            .zip(dz.par_chunks(c))
            .zip(z.par_chunks(c))
            .zip(norm.par_iter())
            .for_each(|(((dy, dz), z), &n)| {
                let dot: f32 = if n > eps {
                    z.iter().zip(dz).map(|(a, b)| a * b).sum()
                } else {
                    0.0
                };
                (0..c).for_each(|j| dy[j] = (dz[j] - z[j] * dot) / n);
            });
        self.cast_to_half(dy_half, dy)
    }

    /// `w [k, bn] = g · v / ‖v‖` per prototype row, `inv_norm [k] = 1 / ‖v‖`.
    fn weight_norm_forward(
        &mut self,
        w: &mut [f32],
        inv_norm: &mut [f32],
        g: &[f32],
        v: &[f32],
        shape: NormShape,
    ) -> Result<()> {
        let NormShape {
            rows: k,
            channels: bn,
        } = shape;
        check_lens(
            "cpu weight_norm_forward",
            &[
                ("w", w.len(), k * bn),
                ("v", v.len(), k * bn),
                ("g", g.len(), k),
                ("inv_norm", inv_norm.len(), k),
            ],
        )?;
        w.par_chunks_mut(bn)
            .zip(inv_norm.par_iter_mut())
            .zip(v.par_chunks(bn))
            .zip(g.par_iter())
            .for_each(|(((w, inv), v), &g)| {
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                *inv = 1.0 / norm;
                w.iter_mut().zip(v).for_each(|(o, a)| *o = a * (g / norm));
            });
        Ok(())
    }

    /// From `dw [k, bn]`: `dg_k += dW_k·v̂_k`, `dv_k += (g_k/‖v_k‖)(dW_k − (dW_k·v̂_k) v̂_k)`.
    fn weight_norm_backward(
        &mut self,
        dg: &mut [f32],
        dv: &mut [f32],
        dw: &[f32],
        g: &[f32],
        v: &[f32],
        inv_norm: &[f32],
        shape: NormShape,
    ) -> Result<()> {
        let NormShape {
            rows: k,
            channels: bn,
        } = shape;
        check_lens(
            "cpu weight_norm_backward",
            &[
                ("dg", dg.len(), k),
                ("g", g.len(), k),
                ("inv_norm", inv_norm.len(), k),
                ("dv", dv.len(), k * bn),
                ("dw", dw.len(), k * bn),
                ("v", v.len(), k * bn),
            ],
        )?;
        dg.par_iter_mut()
            .zip(dv.par_chunks_mut(bn))
            .enumerate()
            .for_each(|(r, (dg, dv))| {
                let (vr, dwr) = (&v[r * bn..(r + 1) * bn], &dw[r * bn..(r + 1) * bn]);
                let inv = inv_norm[r];
                let dot = dwr.iter().zip(vr).map(|(a, b)| a * b).sum::<f32>() * inv;
                *dg += dot;
                let s = g[r] * inv;
                (0..bn).for_each(|j| dv[j] += s * (dwr[j] - dot * vr[j] * inv));
            });
        Ok(())
    }

    fn koleo_state(&mut self, _b: usize, _d: usize) -> Result<KoleoSaved> {
        self.allocations += 1;
        Ok(KoleoSaved::default())
    }

    /// `−mean_i log(d_i + eps)` of `x [b, d]` (`b >= 2`), saving what backward needs.
    fn koleo_forward(
        &mut self,
        loss: &mut [f32],
        state: &mut KoleoSaved,
        x: &[f32],
        b: usize,
        d: usize,
    ) -> Result<()> {
        const OP: &str = "cpu koleo_forward";
        check_len(OP, "x", x.len(), b * d)?;
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
        state.xn.resize(b * d, 0.0);
        state.norms.resize(b, 0.0);
        state.nn.resize(b, 0);
        state.dist.resize(b, 0.0);
        for i in 0..b {
            let row = &x[i * d..(i + 1) * d];
            let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
            state.norms[i] = n;
            let inv = 1.0 / n.max(KOLEO_EPS);
            for (o, &v) in state.xn[i * d..(i + 1) * d].iter_mut().zip(row) {
                *o = v * inv;
            }
        }
        // [b,b] cosine similarities.
        let mut dots = vec![0f32; b * b];
        let g = Gemm::nn(b, d, b).t(Transpose::No, Transpose::Yes);
        matmul(&mut dots, &state.xn, &state.xn, g);
        let xn = &state.xn;
        state
            .nn
            .par_iter_mut()
            .zip(state.dist.par_iter_mut())
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
        let sum_log: f64 = state
            .dist
            .iter()
            .map(|&v| ((v + KOLEO_EPS) as f64).ln())
            .sum();
        one_scalar(OP, loss, (-sum_log / b as f64) as f32)
    }

    /// `dx = weight · ∂KoLeo/∂x`, with gradients flowing into both `xn_i` and its neighbour
    /// `xn_nn(i)` (the neighbour choice itself is not differentiated).
    fn koleo_backward(
        &mut self,
        dx: &mut [f32],
        state: &KoleoSaved,
        weight: f32,
        b: usize,
        d: usize,
    ) -> Result<()> {
        const OP: &str = "cpu koleo_backward";
        check_len(OP, "dx", dx.len(), b * d)?;
        check_len(OP, "state.xn", state.xn.len(), b * d)?;
        check_len(OP, "state.nn", state.nn.len(), b)?;
        // [b,d] gradient w.r.t. the normalised vectors, in f64 (each row receives from several i).
        let mut dxn = vec![0f64; b * d];
        let xn = &state.xn;
        for i in 0..b {
            let j = state.nn[i];
            let di = state.dist[i] as f64;
            // dL/dd_i, then through the norm (torch gives 0 at a zero norm).
            let g = -(weight as f64) / (b as f64 * (di + KOLEO_EPS as f64));
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
            let n = state.norms[i] as f64;
            let g = &dxn[i * d..(i + 1) * d];
            let out = &mut dx[i * d..(i + 1) * d];
            let xr = &xn[i * d..(i + 1) * d];
            if n > KOLEO_EPS as f64 {
                let proj: f64 = g.iter().zip(xr).map(|(&a, &v)| a * v as f64).sum();
                for c in 0..d {
                    out[c] = ((g[c] - xr[c] as f64 * proj) / n) as f32;
                }
            } else {
                for c in 0..d {
                    out[c] = (g[c] / KOLEO_EPS as f64) as f32;
                }
            }
        }
        Ok(())
    }
}
