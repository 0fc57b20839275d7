//! `HeadOps` on the CPU (the reference of the CUDA `l2_normalize_*`, `weight_norm_*` and KoLeo
//! kernels): row L2 normalisation with `F.normalize`'s eps, the weight-normalised prototypes
//! `W_k = g_k · v_k / ‖v_k‖` (no eps, as `weight_norm`), and KoLeo ([`super::koleo`]).
//!
//! Dimensions: `rows` rows of `c` channels; `k` prototypes of `bn` (the bottleneck).

use super::backend::{one_scalar, CpuBackend};
use super::koleo::{koleo_backward, koleo_forward, KoleoSaved};
use crate::backend::{check_lens, Accumulate, Buffers, HeadOps, NormShape};
use crate::error::Result;
use rayon::prelude::*;

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

    fn koleo_forward(
        &mut self,
        loss: &mut [f32],
        state: &mut KoleoSaved,
        x: &[f32],
        b: usize,
        d: usize,
    ) -> Result<()> {
        let v = koleo_forward(state, x, b, d)?;
        one_scalar("cpu koleo_forward", loss, v)
    }

    fn koleo_backward(
        &mut self,
        dx: &mut [f32],
        state: &KoleoSaved,
        weight: f32,
        b: usize,
        d: usize,
    ) -> Result<()> {
        koleo_backward(dx, state, weight, b, d, Accumulate::Overwrite)
    }
}
