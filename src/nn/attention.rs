//! The attention module: `qkv` Linear → multi-head softmax attention → `proj` Linear.
//!
//! Precision: the qkv output, the attention output and their gradients are operands
//! ([`crate::backend::Buffers::Half`]): the attention kernel reads and writes them directly; the softmax
//! statistics (`lse`) are f32.

use super::linear::{Bias, Linear};
use super::params::{Init, ParamTable};
use crate::backend::{AttentionShape, Backend, InputGrad, LinearOut, Storage};
use crate::error::{Error, Result};

/// Linear weights of the backbone: trunc-normal std 0.02 (spec 1.8).
pub const LINEAR_INIT: Init = Init::TruncNormal { std: 0.02 };

#[derive(Clone, Debug)]
pub struct Attention {
    pub qkv: Linear,  // D -> 3D
    pub proj: Linear, // D -> D
    pub num_heads: usize,
    pub dim: usize,
}

/// What the attention keeps for backward, sized for `rows = b·t` rows.
pub struct AttnBufs<B: Backend> {
    pub qkv: B::BufHalf, // [b·t, 3d] (= [b, t, 3, h, hd])
    pub att: B::BufHalf, // [b·t, d] attention output, proj input
    pub lse: B::BufF32,  // [b, h, t]
}

/// The f32 / operand temporaries of one body call (shared by every branch of a stack).
pub struct AttnScratch<'a, B: Backend> {
    /// `[rows, 3d]` operand: dqkv.
    pub dqkv: &'a mut B::Half,
    /// `[rows, d]` operand: the attention output's gradient.
    pub datt: &'a mut B::Half,
}

impl Attention {
    /// Registers `<name>qkv.*` and `<name>proj.*`.
    pub fn new(
        table: &mut ParamTable,
        name: &str,
        dim: usize,
        num_heads: usize,
        qkv_bias: Bias,
        proj_bias: Bias,
    ) -> Self {
        let lin = |table: &mut ParamTable, key: &str, out: usize, bias| {
            Linear::new(table, &format!("{name}{key}."), dim, out, bias, LINEAR_INIT)
        };
        Attention {
            qkv: lin(table, "qkv", 3 * dim, qkv_bias),
            proj: lin(table, "proj", dim, proj_bias),
            num_heads,
            dim,
        }
    }

    /// The attention's shape for `b` sequences of `t` tokens.
    pub fn shape(&self, b: usize, t: usize) -> Result<AttentionShape> {
        if self.num_heads == 0 || self.dim % self.num_heads != 0 {
            return Err(Error::shape(
                "attention",
                format!("dim {} not divisible by {} heads", self.dim, self.num_heads),
            ));
        }
        Ok(AttentionShape {
            batch: b,
            tokens: t,
            heads: self.num_heads,
            head_dim: self.dim / self.num_heads,
        })
    }

    /// Buffers for up to `b` sequences of `t` tokens.
    pub fn bufs<B: Backend>(&self, be: &mut B, b: usize, t: usize) -> Result<AttnBufs<B>> {
        let rows = b * t;
        Ok(AttnBufs {
            qkv: be.alloc_half(rows * 3 * self.dim)?,
            att: be.alloc_half(rows * self.dim)?,
            lse: be.alloc_f32(b * self.num_heads * t)?,
        })
    }

    /// `y [b·t, d] = proj(attention(qkv(x)))` for `b` sequences of `t` tokens.
    pub fn forward<B: Backend>(
        &self,
        be: &mut B,
        bufs: &mut AttnBufs<B>,
        y: &mut B::F32,
        x: &B::Half,
        w: &B::Weights,
        (b, t): (usize, usize),
    ) -> Result<()> {
        let (d, rows) = (self.dim, b * t);
        let shape = self.shape(b, t)?;
        let mut qkv = bufs.qkv.head_mut(rows * 3 * d)?;
        self.qkv
            .forward(be, LinearOut::Half(&mut *qkv), x, w, rows)?;
        let mut att = bufs.att.head_mut(rows * d)?;
        let mut lse = bufs.lse.head_mut(shape.stats_len())?;
        be.attention_forward(&mut att, &mut lse, &qkv, shape)?;
        self.proj.forward(be, LinearOut::F32(y), &att, w, rows)
    }

    /// Backward from `dy` (the output gradient as an operand; `dy_f32` its f32 form where the
    /// caller has it): parameter gradients accumulate, `dx [b·t, d]` f32 is written.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &mut B,
        grads: &mut B::F32,
        dx: &mut B::F32,
        scratch: AttnScratch<'_, B>,
        (dy, dy_f32): (&B::Half, Option<&B::F32>),
        bufs: &AttnBufs<B>,
        x: &B::Half,
        w: &B::Weights,
        (b, t): (usize, usize),
    ) -> Result<()> {
        let (d, rows) = (self.dim, b * t);
        let shape = self.shape(b, t)?;
        let att = bufs.att.head(rows * d)?;
        // proj: datt = dy · Wproj, as an operand for the attention backward.
        self.proj.param_grads(be, grads, dy, dy_f32, &att, rows)?;
        self.proj
            .input_grad(be, InputGrad::Half(scratch.datt), dy, w, rows)?;
        let qkv = bufs.qkv.head(rows * 3 * d)?;
        let lse = bufs.lse.head(shape.stats_len())?;
        be.attention_backward(scratch.dqkv, scratch.datt, &qkv, &att, &lse, shape)?;
        self.qkv
            .param_grads(be, grads, scratch.dqkv, None, x, rows)?;
        self.qkv.input_grad(
            be,
            InputGrad::F32(dx, crate::backend::Accumulate::Overwrite),
            scratch.dqkv,
            w,
            rows,
        )
    }
}
