//! Position embedding and its interpolation to other patch grids (spec 1.5), with backward.
//!
//! The embedding is `[1 + M·M, D]` (CLS position first, then the M×M grid row-major). For an
//! input grid `gh × gw` it is used as is when `gh·gw == M·M` and the input is square in pixels;
//! otherwise the grid part is resampled separably with PyTorch's bicubic semantics:
//! - [`Resampling::Bicubic`] (antialias off): Keys kernel A = −0.75, `align_corners=False`,
//!   taps clamped to the border. With an offset `o > 0` the coordinate scale is `M / (g + o)`
//!   (PyTorch uses the passed scale factor), else `M / g`.
//! - [`Resampling::Antialias`] (register models): PIL-style filter a = −0.5 whose support
//!   widens with the downscale factor, taps outside the input dropped, weights normalised.
//!
//! Resampling is linear, so it is stored as two small matrices `Wr [gh, M]`, `Wc [gw, M]`:
//! `out = Wr · P · Wcᵀ` per channel, and backward is `dP = Wrᵀ · dout · Wc`, both as f32 GEMMs
//! on the backend.

use super::params::{Init, ParamRef, ParamTable};
use crate::backend::{Accumulate, Backend, Gemm, GemmBatch, Storage, Transpose, WeightStore};
use crate::error::Result;

/// How the grid is resampled when it must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resampling {
    /// `interpolate_antialias = False` (training, non-register released models).
    Bicubic,
    /// `interpolate_antialias = True` (released register models).
    Antialias,
}

#[derive(Clone, Debug)]
pub struct PosEmbed {
    pub pos_embed: ParamRef, // [1, 1 + M·M, D]
    /// M, the side of the construction grid (img_size / patch).
    pub grid: usize,
    pub dim: usize,
    pub offset: f32,
    pub resampling: Resampling,
}

/// The embedding for one input grid on a backend: the parameter as is, or resampled with the
/// plan's weights (fixed per crop size, uploaded once) by two f32 GEMMs forward and backward.
pub enum PosBufs<B: Backend> {
    Identity,
    Resample {
        gh: usize,
        gw: usize,
        wr: B::BufF32,  // [gh, M] row weights
        wc: B::BufF32,  // [gw, M] column weights
        tmp: B::BufF32, // [gh, M·D] rows resampled (forward) / its gradient (backward)
        out: B::BufF32, // [1 + gh·gw, D] the resampled embedding
    },
}

/// Keys' cubic convolution kernel for |x| ≤ 1.
fn cubic1(x: f32, a: f32) -> f32 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

/// Keys' cubic convolution kernel for 1 < |x| < 2.
fn cubic2(x: f32, a: f32) -> f32 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// PyTorch's `upsample_bicubic2d` (antialias off, `align_corners=False`) as a matrix
/// `[out_size, in_size]`; `scale` is the source step per output pixel.
pub fn bicubic_matrix(in_size: usize, out_size: usize, scale: f32) -> Vec<f32> {
    const A: f32 = -0.75;
    let mut m = vec![0f32; out_size * in_size];
    let last = in_size as i64 - 1;
    for i in 0..out_size {
        let src = scale * (i as f32 + 0.5) - 0.5;
        // PyTorch's guard: index at most in−1, fraction clamped to [0, 1].
        let i0 = (src.floor() as i64).min(last);
        let t = (src - i0 as f32).clamp(0.0, 1.0);
        let w = [
            cubic2(t + 1.0, A),
            cubic1(t, A),
            cubic1(1.0 - t, A),
            cubic2(2.0 - t, A),
        ];
        for (k, wk) in w.iter().enumerate() {
            let idx = (i0 - 1 + k as i64).clamp(0, last) as usize;
            m[i * in_size + idx] += wk;
        }
    }
    m
}

/// PIL-style antialiased bicubic (a = −0.5) as a matrix `[out_size, in_size]`; `scale` is the
/// source step per output pixel (in/out for a size-based resize).
pub fn antialias_matrix(in_size: usize, out_size: usize, scale: f32) -> Vec<f32> {
    const A: f32 = -0.5;
    let filter = |x: f32| {
        let x = x.abs();
        if x < 1.0 {
            cubic1(x, A)
        } else if x < 2.0 {
            cubic2(x, A)
        } else {
            0.0
        }
    };
    let support = 2.0 * scale.max(1.0);
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut m = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let center = scale * (i as f32 + 0.5);
        // `as i64` truncates toward zero like the reference's integer cast.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let row = &mut m[i * in_size..(i + 1) * in_size];
        let mut total = 0f32;
        for (j, r) in row.iter_mut().enumerate().take(hi).skip(lo) {
            *r = filter((j as f32 - center + 0.5) * invscale);
            total += *r;
        }
        if total != 0.0 {
            row.iter_mut().for_each(|r| *r /= total);
        }
    }
    m
}

impl PosEmbed {
    /// Registers `<name>pos_embed [1, 1 + grid², D]` (trunc-normal 0.02).
    pub fn new(
        table: &mut ParamTable,
        name: &str,
        grid: usize,
        dim: usize,
        offset: f32,
        resampling: Resampling,
    ) -> Self {
        let pos_embed = table.push(
            format!("{name}pos_embed"),
            &[1, 1 + grid * grid, dim],
            Init::TruncNormal { std: 0.02 },
        );
        PosEmbed {
            pos_embed,
            grid,
            dim,
            offset,
            resampling,
        }
    }

    /// The resampling for an input of `h × w` pixels cut into `gh × gw` patches, on `be`.
    pub fn bufs<B: Backend>(
        &self,
        be: &mut B,
        (h, w): (usize, usize),
        (gh, gw): (usize, usize),
    ) -> Result<PosBufs<B>> {
        let (m, d) = (self.grid, self.dim);
        if gh * gw == m * m && h == w {
            return Ok(PosBufs::Identity);
        }
        // Source step per output index: 1/scale_factor with an offset, else M/g (f32 like PyTorch).
        let step = |g: usize| -> f32 {
            if self.offset != 0.0 {
                let sf = (g as f64 + self.offset as f64) / m as f64;
                (1.0 / sf) as f32
            } else {
                m as f32 / g as f32
            }
        };
        let mut matrix = |g: usize| -> Result<B::BufF32> {
            let host = match self.resampling {
                Resampling::Bicubic => bicubic_matrix(m, g, step(g)),
                Resampling::Antialias => antialias_matrix(m, g, step(g)),
            };
            let mut buf = be.alloc_f32(host.len())?;
            be.upload_f32(&mut buf, &host)?;
            Ok(buf)
        };
        let (wr, wc) = (matrix(gh)?, matrix(gw)?);
        Ok(PosBufs::Resample {
            gh,
            gw,
            wr,
            wc,
            tmp: be.alloc_f32(gh * m * d)?,
            out: be.alloc_f32((1 + gh * gw) * d)?,
        })
    }

    /// `[1 + gh·gw, D]`: the CLS position and the (resampled) grid.
    pub fn forward<'a, B: Backend>(
        &self,
        be: &mut B,
        bufs: &'a mut PosBufs<B>,
        w: &'a B::Weights,
    ) -> Result<<B::F32 as Storage>::Ref<'a>> {
        let (m, d) = (self.grid, self.dim);
        let param = w.f32().window(self.pos_embed.range())?; // [1 + M², D]
        let PosBufs::Resample {
            gh,
            gw,
            wr,
            wc,
            tmp,
            out,
        } = bufs
        else {
            return Ok(param);
        };
        // out[0] = pos_embed[0] (the CLS row is not resampled).
        be.copy_f32(&mut *out.window_mut(0..d)?, &*param.window(0..d)?)?;
        // tmp [gh, M·D] = wr [gh, M] · grid [M, M·D]
        let grid = param.window(d..(1 + m * m) * d)?;
        be.matmul_f32(tmp, wr, &grid, GemmBatch::single(Gemm::nn(*gh, m, m * d)))?;
        // out row block i [gw, D] = wc [gw, M] · tmp_i [M, D], for every i < gh.
        let blocks = GemmBatch {
            gemm: Gemm::nn(*gw, m, d),
            batch: *gh,
            stride_a: 0,
            stride_b: m * d,
            stride_c: *gw * d,
        };
        let len = (1 + *gh * *gw) * d;
        be.matmul_f32(&mut *out.window_mut(d..len)?, wc, tmp, blocks)?;
        out.window(0..len)
    }

    /// Backward: the gradients of the CLS position `dcls [D]` and of the grid
    /// `dgrid [gh·gw, D]` accumulate into the `pos_embed` gradient.
    pub fn backward<B: Backend>(
        &self,
        be: &mut B,
        bufs: &mut PosBufs<B>,
        grads: &mut B::F32,
        dcls: &B::F32,
        dgrid: &B::F32,
    ) -> Result<()> {
        let (m, d) = (self.grid, self.dim);
        let pos = self.pos_embed;
        let (cls_rows, grid_rows) = (pos.offset..pos.offset + d, pos.offset + d..pos.range().end);
        // A one-row column sum: a deterministic `+=`.
        be.column_sum(&mut *grads.window_mut(cls_rows)?, dcls, 1, Accumulate::Add)?;
        let mut dparam = grads.window_mut(grid_rows)?;
        let PosBufs::Resample {
            gh,
            gw,
            wr,
            wc,
            tmp,
            ..
        } = bufs
        else {
            return be.column_sum(&mut dparam, dgrid, 1, Accumulate::Add);
        };
        // dtmp_i [M, D] = wcᵀ [M, gw] · dout_i [gw, D]
        let blocks = GemmBatch {
            gemm: Gemm::nn(m, *gw, d).t(Transpose::Yes, Transpose::No),
            batch: *gh,
            stride_a: 0,
            stride_b: *gw * d,
            stride_c: m * d,
        };
        be.matmul_f32(tmp, wc, dgrid, blocks)?;
        // d grid [M, M·D] += wrᵀ [M, gh] · dtmp [gh, M·D]
        let gemm = Gemm::nn(m, *gh, m * d)
            .t(Transpose::Yes, Transpose::No)
            .acc(Accumulate::Add);
        be.matmul_f32(&mut dparam, wr, tmp, GemmBatch::single(gemm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Antialias weights derived by hand from the PIL filter definition (a = −0.5):
    /// 4 → 2 (scale 2, support 4): output 0 has center 1, taps 0..4 at distances
    /// (j − 1 + 0.5)/2 = −0.25, 0.25, 0.75, 1.25 → f = 0.8671875, 0.8671875, 0.2265625, −0.0703125
    /// (f(x) = 1.5x³ − 2.5x² + 1 for x < 1, −0.5x³ + 2.5x² − 4x + 2 for 1 ≤ x < 2), sum 1.890625.
    #[test]
    fn antialias_downscale_matches_hand_derived_weights() {
        let m = antialias_matrix(4, 2, 2.0);
        let s = 1.890625f32;
        let want0 = [0.8671875 / s, 0.8671875 / s, 0.2265625 / s, -0.0703125 / s];
        for j in 0..4 {
            assert!(
                (m[j] - want0[j]).abs() < 1e-6,
                "{j}: {} vs {}",
                m[j],
                want0[j]
            );
            // Output 1 is the mirror image of output 0.
            assert!((m[4 + j] - want0[3 - j]).abs() < 1e-6);
        }
    }

    /// Upsampling 2 → 4 with antialias (scale 0.5, support 2, no widening): output 0 has center
    /// 0.25, taps j ∈ [0, 2) at x = j − 0.25 + 0.5 = 0.25, 1.25; f = 0.8671875, −0.0703125;
    /// normalised: 0.8671875/0.796875, −0.0703125/0.796875.
    #[test]
    fn antialias_upscale_drops_outside_taps_and_normalises() {
        let m = antialias_matrix(2, 4, 0.5);
        assert!((m[0] - 0.8671875 / 0.796875).abs() < 1e-6);
        assert!((m[1] + 0.0703125 / 0.796875).abs() < 1e-6);
        for row in m.chunks(2) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    /// Non-antialiased bicubic at scale 1 is the identity; clamped taps keep rows summing to 1.
    #[test]
    fn bicubic_identity_at_unit_scale_and_rows_sum_to_one() {
        let m = bicubic_matrix(5, 5, 1.0);
        for i in 0..5 {
            for j in 0..5 {
                assert!((m[i * 5 + j] - f32::from(i == j)).abs() < 1e-6);
            }
        }
        for row in bicubic_matrix(4, 7, 4.0 / 7.1).chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
}
