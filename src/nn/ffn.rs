//! The block's feed-forward layer `fc2(act(fc1(x)))`: the plain MLP (S/B/L: `fc1` → exact GELU
//! → `fc2`) or fused SwiGLU (`SwiGLUFFNFused`, ViT-g: `w12` → `silu(x1) · x2` with the gate x1
//! the first half → `w3`). The first linear's output is kept in f32 for backward, the
//! activation as an operand (it only feeds the second linear).

use super::attention::LINEAR_INIT;
use super::linear::{Bias, Linear};
use super::params::ParamTable;
use crate::backend::{Accumulate, Backend, InputGrad, LinearOut, Storage};
use crate::error::Result;

/// Which FFN a block uses; `hidden` is the nominal width D·mlp_ratio (SwiGLU derives its own
/// width from it, see [`swiglu_width`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ffn {
    Mlp { hidden: usize },
    SwiGlu { hidden: usize },
}

impl Ffn {
    /// The width of the hidden activation: `hidden` for the MLP, the derived SwiGLU width.
    pub fn width(self) -> usize {
        match self {
            Ffn::Mlp { hidden } => hidden,
            Ffn::SwiGlu { hidden } => swiglu_width(hidden),
        }
    }
}

/// The fused SwiGLU width for a nominal MLP width: `(int(hidden·2/3) + 7) / 8 · 8`.
pub fn swiglu_width(hidden: usize) -> usize {
    (hidden * 2 / 3).div_ceil(8) * 8
}

/// An FFN layer: parameter views and its kind.
#[derive(Clone, Debug)]
pub struct FfnLayer {
    pub kind: Ffn,
    pub fc1: Linear, // D -> width (MLP) | 2·width (SwiGLU's w12)
    pub fc2: Linear, // width -> D
}

/// What the FFN keeps for backward.
pub struct FfnBufs<B: Backend> {
    pre: B::BufF32,  // [rows, fc1 out] fc1's output + bias
    act: B::BufHalf, // [rows, width] the activation, fc2's input
}

impl FfnLayer {
    /// Registers `<name>fc1/fc2` (MLP) or `<name>w12/w3` (SwiGLU).
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, ffn: Ffn, bias: Bias) -> Self {
        let width = ffn.width();
        let (first, second, out1) = match ffn {
            Ffn::Mlp { .. } => ("fc1", "fc2", width),
            Ffn::SwiGlu { .. } => ("w12", "w3", 2 * width),
        };
        let linear = |table: &mut ParamTable, key: &str, i, o| {
            Linear::new(table, &format!("{name}{key}."), i, o, bias, LINEAR_INIT)
        };
        FfnLayer {
            kind: ffn,
            fc1: linear(table, first, dim, out1),
            fc2: linear(table, second, width, dim),
        }
    }

    /// Widths per row of the backward temporaries: (f32: the activation's gradient, operand:
    /// fc1's output gradient).
    pub fn scratch_widths(&self) -> (usize, usize) {
        (self.fc2.in_dim, self.fc1.out_dim)
    }

    pub fn bufs<B: Backend>(&self, be: &mut B, rows: usize) -> Result<FfnBufs<B>> {
        Ok(FfnBufs {
            pre: be.alloc_f32(rows * self.fc1.out_dim)?,
            act: be.alloc_half(rows * self.fc2.in_dim)?,
        })
    }

    /// `y [rows, d] = fc2(act(fc1(x)))`.
    pub fn forward<B: Backend>(
        &self,
        be: &mut B,
        bufs: &mut FfnBufs<B>,
        y: &mut B::F32,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let wd = self.fc2.in_dim;
        let mut pre = bufs.pre.head_mut(rows * self.fc1.out_dim)?;
        let mut act = bufs.act.head_mut(rows * wd)?;
        match self.kind {
            Ffn::Mlp { .. } => {
                let out = LinearOut::Gelu {
                    pre: &mut *pre,
                    act: &mut *act,
                };
                self.fc1.forward(be, out, x, w, rows)?;
            }
            Ffn::SwiGlu { .. } => {
                self.fc1
                    .forward(be, LinearOut::F32(&mut *pre), x, w, rows)?;
                be.swiglu_forward(&mut act, &pre, rows, wd)?;
            }
        }
        self.fc2.forward(be, LinearOut::F32(y), &act, w, rows)
    }

    /// Backward from `dy` (operand; `dy_f32` its f32 form where the caller has it): parameter
    /// gradients accumulate, `dx [rows, d]` f32 is written. `wide [rows, f32 width]` and
    /// `wide_half [rows, operand width]` are scratch (see [`FfnLayer::scratch_widths`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &mut B,
        grads: &mut B::F32,
        dx: &mut B::F32,
        (wide, wide_half): (&mut B::F32, &mut B::Half),
        (dy, dy_f32): (&B::Half, Option<&B::F32>),
        bufs: &FfnBufs<B>,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let (wd, w1) = self.scratch_widths();
        let pre = bufs.pre.head(rows * w1)?;
        let act = bufs.act.head(rows * wd)?;
        let mut dact = wide.head_mut(rows * wd)?;
        let mut dpre = wide_half.head_mut(rows * w1)?;
        self.fc2.param_grads(be, grads, dy, dy_f32, &act, rows)?;
        let dinp = InputGrad::F32(&mut *dact, Accumulate::Overwrite);
        self.fc2.input_grad(be, dinp, dy, w, rows)?;
        match self.kind {
            Ffn::Mlp { .. } => be.gelu_backward(&mut dpre, &dact, &pre)?,
            Ffn::SwiGlu { .. } => be.swiglu_backward(&mut dpre, &dact, &pre, rows, wd)?,
        }
        self.fc1.param_grads(be, grads, &dpre, None, x, rows)?;
        let dx = InputGrad::F32(dx, Accumulate::Overwrite);
        self.fc1.input_grad(be, dx, &dpre, w, rows)
    }

    /// Multiply-adds per token (for FLOP counts).
    pub fn macs_per_row(&self) -> usize {
        self.fc1.macs_per_row() + self.fc2.macs_per_row()
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
