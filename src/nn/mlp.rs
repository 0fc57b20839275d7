//! The ViT MLP: `fc1` → exact GELU → `fc2`. The pre-activation is kept in f32 for backward,
//! the activation as an operand (it only feeds fc2).

use super::attention::LINEAR_INIT;
use super::linear::{Bias, Linear};
use super::params::ParamTable;
use crate::backend::{Accumulate, Backend, InputGrad, LinearOut, Storage};
use crate::error::Result;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub fc1: Linear, // D -> hidden
    pub fc2: Linear, // hidden -> D
}

/// What the MLP keeps for backward, `[rows, hidden]` each.
pub struct MlpBufs<B: Backend> {
    pub pre: B::BufF32,  // fc1 output + bias
    pub act: B::BufHalf, // gelu(pre), fc2 input
}

/// Backward temporaries: `[rows, hidden]` f32 and operand.
pub struct MlpScratch<'a, B: Backend> {
    pub dact: &'a mut B::F32,
    pub dpre: &'a mut B::Half,
}

impl Mlp {
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, hidden: usize, bias: Bias) -> Self {
        Mlp {
            fc1: Linear::new(
                table,
                &format!("{name}fc1."),
                dim,
                hidden,
                bias,
                LINEAR_INIT,
            ),
            fc2: Linear::new(
                table,
                &format!("{name}fc2."),
                hidden,
                dim,
                bias,
                LINEAR_INIT,
            ),
        }
    }

    /// The hidden width.
    pub fn hidden(&self) -> usize {
        self.fc1.out_dim
    }

    pub fn bufs<B: Backend>(&self, be: &mut B, rows: usize) -> Result<MlpBufs<B>> {
        Ok(MlpBufs {
            pre: be.alloc_f32(rows * self.hidden())?,
            act: be.alloc_half(rows * self.hidden())?,
        })
    }

    /// `y [rows, d] = fc2(gelu(fc1(x)))`.
    pub fn forward<B: Backend>(
        &self,
        be: &mut B,
        bufs: &mut MlpBufs<B>,
        y: &mut B::F32,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let f = self.hidden();
        let mut pre = bufs.pre.head_mut(rows * f)?;
        let mut act = bufs.act.head_mut(rows * f)?;
        let out = LinearOut::Gelu {
            pre: &mut *pre,
            act: &mut *act,
        };
        self.fc1.forward(be, out, x, w, rows)?;
        self.fc2.forward(be, LinearOut::F32(y), &act, w, rows)
    }

    /// Backward from `dy` (operand; `dy_f32` its f32 form where the caller has it): parameter
    /// gradients accumulate, `dx [rows, d]` f32 is written.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &mut B,
        grads: &mut B::F32,
        dx: &mut B::F32,
        scratch: MlpScratch<'_, B>,
        (dy, dy_f32): (&B::Half, Option<&B::F32>),
        bufs: &MlpBufs<B>,
        x: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let f = self.hidden();
        let pre = bufs.pre.head(rows * f)?;
        let act = bufs.act.head(rows * f)?;
        self.fc2.param_grads(be, grads, dy, dy_f32, &act, rows)?;
        let dact = InputGrad::F32(&mut *scratch.dact, Accumulate::Overwrite);
        self.fc2.input_grad(be, dact, dy, w, rows)?;
        be.gelu_backward(scratch.dpre, scratch.dact, &pre)?;
        self.fc1
            .param_grads(be, grads, scratch.dpre, None, x, rows)?;
        let dx = InputGrad::F32(dx, Accumulate::Overwrite);
        self.fc1.input_grad(be, dx, scratch.dpre, w, rows)
    }
}
