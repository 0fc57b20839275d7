//! The block's feed-forward layer: plain MLP (S/B/L) or fused SwiGLU (g).

use super::linear::Bias;
use super::mlp::{Mlp, MlpBufs, MlpScratch};
use super::params::ParamTable;
use super::swiglu::{SwiGlu, SwiGluBufs, SwiGluScratch};
use crate::backend::{Backend, Storage};
use crate::error::{Error, Result};

/// Which FFN a block uses; `hidden` is the nominal width D·mlp_ratio (SwiGLU derives its own
/// width from it, see [`super::swiglu::swiglu_width`]).
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
            Ffn::SwiGlu { hidden } => super::swiglu::swiglu_width(hidden),
        }
    }
}

#[derive(Clone, Debug)]
pub enum FfnLayer {
    Mlp(Mlp),
    SwiGlu(SwiGlu),
}

/// What the FFN keeps for backward.
pub enum FfnBufs<B: Backend> {
    Mlp(MlpBufs<B>),
    SwiGlu(SwiGluBufs<B>),
}

impl FfnLayer {
    /// Registers `<name>fc1/fc2` or `<name>w12/w3`.
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, ffn: Ffn, bias: Bias) -> Self {
        match ffn {
            Ffn::Mlp { hidden } => FfnLayer::Mlp(Mlp::new(table, name, dim, hidden, bias)),
            Ffn::SwiGlu { hidden } => FfnLayer::SwiGlu(SwiGlu::new(table, name, dim, hidden, bias)),
        }
    }

    /// Widths per row of the backward temporaries: (f32, operand).
    pub fn scratch_widths(&self) -> (usize, usize) {
        match self {
            FfnLayer::Mlp(m) => (m.hidden(), m.hidden()),
            FfnLayer::SwiGlu(s) => (s.width, 2 * s.width),
        }
    }

    pub fn bufs<B: Backend>(&self, be: &mut B, rows: usize) -> Result<FfnBufs<B>> {
        Ok(match self {
            FfnLayer::Mlp(m) => FfnBufs::Mlp(m.bufs(be, rows)?),
            FfnLayer::SwiGlu(s) => FfnBufs::SwiGlu(s.bufs(be, rows)?),
        })
    }

    pub fn forward<B: Backend>(
        &self,
        be: &mut B,
        bufs: &mut FfnBufs<B>,
        y: &mut B::F32,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        match (self, bufs) {
            (FfnLayer::Mlp(m), FfnBufs::Mlp(b)) => m.forward(be, b, y, x, w, rows),
            (FfnLayer::SwiGlu(s), FfnBufs::SwiGlu(b)) => s.forward(be, b, y, x, w, rows),
            _ => Err(mismatch()),
        }
    }

    /// Backward; `wide [rows, f32 width]` and `wide_half [rows, operand width]` are scratch
    /// (see [`FfnLayer::scratch_widths`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &mut B,
        grads: &mut B::F32,
        dx: &mut B::F32,
        (wide, wide_half): (&mut B::F32, &mut B::Half),
        dy: (&B::Half, Option<&B::F32>),
        bufs: &FfnBufs<B>,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let (fw, hw) = self.scratch_widths();
        let mut f = wide.head_mut(rows * fw)?;
        let mut h = wide_half.head_mut(rows * hw)?;
        match (self, bufs) {
            (FfnLayer::Mlp(m), FfnBufs::Mlp(b)) => {
                let s = MlpScratch {
                    dact: &mut *f,
                    dpre: &mut *h,
                };
                m.backward(be, grads, dx, s, dy, b, x, w, rows)
            }
            (FfnLayer::SwiGlu(sw), FfnBufs::SwiGlu(b)) => {
                let s = SwiGluScratch {
                    dgated: &mut *f,
                    dx12: &mut *h,
                };
                sw.backward(be, grads, dx, s, dy, b, x, w, rows)
            }
            _ => Err(mismatch()),
        }
    }

    /// Multiply-adds per token (for FLOP counts).
    pub fn macs_per_row(&self) -> usize {
        match self {
            FfnLayer::Mlp(m) => m.fc1.macs_per_row() + m.fc2.macs_per_row(),
            FfnLayer::SwiGlu(s) => s.w12.macs_per_row() + s.w3.macs_per_row(),
        }
    }
}

fn mismatch() -> Error {
    Error::Unsupported("FFN buffers built for another FFN kind".into())
}
