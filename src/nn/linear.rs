//! `Linear`: `y = x Wᵀ + b` with the PyTorch weight layout `[out, in]`, over the backend seam.
//!
//! The operand `x` is in the backend's operand precision ([`crate::backend::Buffers::Half`]); the weight is read
//! from the model's operand copy and the bias in f32. Where the output goes (f32, an operand,
//! or fc1's GELU pair) is the caller's choice ([`LinearOut`]).

use super::params::{Init, ParamRef, ParamTable};
use crate::backend::{Backend, InputGrad, LinearDims, LinearOut, Storage, WeightStore};
use crate::error::Result;

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
        let weight = table.push(format!("{name}weight"), &[out_dim, in_dim], weight_init);
        let bias = match bias {
            Bias::Yes => Some(table.push(format!("{name}bias"), &[out_dim], Init::Zeros)),
            Bias::No => None,
        };
        Linear {
            weight,
            bias,
            in_dim,
            out_dim,
        }
    }

    /// The call's sizes for `rows` rows.
    pub fn dims(&self, rows: usize) -> LinearDims {
        LinearDims {
            rows,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
        }
    }

    /// `out = inp [rows, in] · Wᵀ + b`.
    pub fn forward<B: Backend>(
        &self,
        be: &mut B,
        out: LinearOut<'_, B>,
        inp: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let weight = w.half().window(self.weight.range())?;
        let bias = self.bias.map(|b| w.f32().window(b.range())).transpose()?;
        be.linear_forward(out, inp, &weight, bias.as_deref(), self.dims(rows))
    }

    /// The input half of the backward: `dinp [rows, in] = dout · W`.
    pub fn input_grad<B: Backend>(
        &self,
        be: &mut B,
        dinp: InputGrad<'_, B>,
        dout: &B::Half,
        w: &B::Weights,
        rows: usize,
    ) -> Result<()> {
        let weight = w.half().window(self.weight.range())?;
        be.linear_input_grad(dinp, dout, &weight, self.dims(rows))
    }

    /// The parameter half: `dW += doutᵀ · inp`, `db += Σ_rows dout` (`dout_f32`: the f32 form
    /// of `dout` where the caller has it, for a backend that sums the bias separately).
    pub fn param_grads<B: Backend>(
        &self,
        be: &mut B,
        grads: &mut B::F32,
        dout: &B::Half,
        dout_f32: Option<&B::F32>,
        inp: &B::Half,
        rows: usize,
    ) -> Result<()> {
        let dims = self.dims(rows);
        match self.bias {
            None => {
                let mut dw = grads.window_mut(self.weight.range())?;
                be.linear_param_grads(&mut dw, None, dout, dout_f32, inp, dims)
            }
            Some(b) => {
                let [mut dw, mut db] = grads.windows_mut([self.weight.range(), b.range()])?;
                be.linear_param_grads(&mut dw, Some(&mut db), dout, dout_f32, inp, dims)
            }
        }
    }

    /// Multiply-adds of one forward row (for FLOP counts).
    pub fn macs_per_row(&self) -> usize {
        self.in_dim * self.out_dim
    }
}
