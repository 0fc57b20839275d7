//! LayerNorm over the last dimension with affine weight and bias (eps 1e-6 in the ViT).

use super::params::{two_mut, Init, ParamRef, ParamTable};
use crate::backend::cpu::{layernorm_backward, layernorm_forward};

/// The ViT's LayerNorm epsilon (not PyTorch's default 1e-5).
pub const LN_EPS: f32 = 1e-6;

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: ParamRef, // [dim]
    pub bias: ParamRef,   // [dim]
    pub dim: usize,
    pub eps: f32,
}

/// What backward needs besides the input.
#[derive(Clone, Debug, Default)]
pub struct LnStats {
    pub mean: Vec<f32>, // [rows]
    pub rstd: Vec<f32>, // [rows]
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

    pub fn forward(&self, out: &mut [f32], inp: &[f32], params: &[f32], rows: usize) -> LnStats {
        let mut stats = LnStats {
            mean: vec![0.0; rows],
            rstd: vec![0.0; rows],
        };
        layernorm_forward(
            out,
            &mut stats.mean,
            &mut stats.rstd,
            inp,
            &params[self.weight.range()],
            &params[self.bias.range()],
            rows,
            self.dim,
            self.eps,
        );
        stats
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dinp: &mut [f32],
        grads: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        stats: &LnStats,
        params: &[f32],
        rows: usize,
    ) {
        let (dw, db) = two_mut(grads, self.weight, self.bias);
        layernorm_backward(
            dinp,
            dw,
            db,
            dout,
            inp,
            &params[self.weight.range()],
            &stats.mean,
            &stats.rstd,
            rows,
            self.dim,
        );
    }
}
