//! LayerNorm over the last dimension with affine weight and bias (eps 1e-6 in the ViT).

use super::params::{Init, ParamRef, ParamTable};
use crate::backend::{Backend, LnParams, Storage, WeightStore};
use crate::error::Result;

/// The ViT's LayerNorm epsilon (not PyTorch's default 1e-5).
pub const LN_EPS: f32 = 1e-6;

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: ParamRef, // [dim]
    pub bias: ParamRef,   // [dim]
    pub dim: usize,
    pub eps: f32,
}

impl LayerNorm {
    /// Registers `<name>weight` (ones) and `<name>bias` (zeros).
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, eps: f32) -> Self {
        LayerNorm {
            weight: table.push(format!("{name}weight"), &[dim], Init::Const(1.0)),
            bias: table.push(format!("{name}bias"), &[dim], Init::Zeros),
            dim,
            eps,
        }
    }

    /// The affine parameters as windows of the model's f32 weights, passed to
    /// `f(LnParams)` (the windows borrow `w`).
    pub fn with_params<B: Backend, R>(
        &self,
        w: &B::Weights,
        f: impl FnOnce(LnParams<'_, B>) -> Result<R>,
    ) -> Result<R> {
        let weight = w.f32().window(self.weight.range())?;
        let bias = w.f32().window(self.bias.range())?;
        f(LnParams {
            weight: &weight,
            bias: &bias,
            eps: self.eps,
        })
    }
}
