//! SwiGLU FFN (`SwiGLUFFNFused`, ViT-g): fused `w12` (first half the gate x1 → SiLU, second
//! half x2), `silu(x1) * x2`, then `w3`. `x12` is kept in f32 for backward, the gated product
//! as an operand (it only feeds w3).

use super::attention::LINEAR_INIT;
use super::linear::{Bias, Linear};
use super::params::ParamTable;
use crate::backend::{Accumulate, Backend, InputGrad, LinearOut, Storage};
use crate::error::Result;

/// The fused SwiGLU width for a nominal MLP width: `(int(hidden·2/3) + 7) / 8 · 8`.
pub fn swiglu_width(hidden: usize) -> usize {
    (hidden * 2 / 3).div_ceil(8) * 8
}

#[derive(Clone, Debug)]
pub struct SwiGlu {
    pub w12: Linear, // D -> 2·width
    pub w3: Linear,  // width -> D
    pub width: usize,
}

/// What SwiGLU keeps for backward.
pub struct SwiGluBufs<B: Backend> {
    pub x12: B::BufF32,    // [rows, 2·width]
    pub gated: B::BufHalf, // [rows, width]
}

/// Backward temporaries.
pub struct SwiGluScratch<'a, B: Backend> {
    pub dgated: &'a mut B::F32, // [rows, width]
    pub dx12: &'a mut B::Half,  // [rows, 2·width]
}

impl SwiGlu {
    /// `hidden` is the nominal MLP width (D·mlp_ratio); the layer uses [`swiglu_width`].
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, hidden: usize, bias: Bias) -> Self {
        let width = swiglu_width(hidden);
        SwiGlu {
            w12: Linear::new(
                table,
                &format!("{name}w12."),
                dim,
                2 * width,
                bias,
                LINEAR_INIT,
            ),
            w3: Linear::new(table, &format!("{name}w3."), width, dim, bias, LINEAR_INIT),
            width,
        }
    }

    pub fn bufs<B: Backend>(&self, be: &mut B, rows: usize) -> Result<SwiGluBufs<B>> {
        Ok(SwiGluBufs {
            x12: be.alloc_f32(rows * 2 * self.width)?,
            gated: be.alloc_half(rows * self.width)?,
        })
    }

    /// `y [rows, d] = w3(silu(x1) · x2)` with `[x1 | x2] = w12(x)`.
    pub fn forward<B: Backend>(
        &self,
        be: &mut B,
        bufs: &mut SwiGluBufs<B>,
        y: &mut B::F32,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let wd = self.width;
        let mut x12 = bufs.x12.head_mut(rows * 2 * wd)?;
        self.w12
            .forward(be, LinearOut::F32(&mut *x12), x, w, rows)?;
        let mut gated = bufs.gated.head_mut(rows * wd)?;
        be.swiglu_forward(&mut gated, &x12, rows, wd)?;
        self.w3.forward(be, LinearOut::F32(y), &gated, w, rows)
    }

    /// Backward from `dy` (operand; `dy_f32` its f32 form where the caller has it): parameter
    /// gradients accumulate, `dx [rows, d]` f32 is written.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &mut B,
        grads: &mut B::F32,
        dx: &mut B::F32,
        scratch: SwiGluScratch<'_, B>,
        (dy, dy_f32): (&B::Half, Option<&B::F32>),
        bufs: &SwiGluBufs<B>,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let wd = self.width;
        let x12 = bufs.x12.head(rows * 2 * wd)?;
        let gated = bufs.gated.head(rows * wd)?;
        self.w3.param_grads(be, grads, dy, dy_f32, &gated, rows)?;
        let dgated = InputGrad::F32(&mut *scratch.dgated, Accumulate::Overwrite);
        self.w3.input_grad(be, dgated, dy, w, rows)?;
        be.swiglu_backward(scratch.dx12, scratch.dgated, &x12, rows, wd)?;
        self.w12
            .param_grads(be, grads, scratch.dx12, None, x, rows)?;
        let dx = InputGrad::F32(dx, Accumulate::Overwrite);
        self.w12.input_grad(be, dx, scratch.dx12, w, rows)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn swiglu_width_matches_the_official_sizes() {
        // hidden' = 1024 (S), 2048 (B), 2736 (L), 4096 (g) for hidden = 4D.
        let w: Vec<usize> = [384, 768, 1024, 1536]
            .iter()
            .map(|d| super::swiglu_width(4 * d))
            .collect();
        assert_eq!(w, vec![1024, 2048, 2736, 4096]);
    }
}
