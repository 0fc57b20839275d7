//! Launchers of `kernels/attention.cu`: fused attention forward and backward.

use super::{blocks, check_len, config, dim, launch};
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// Dimensions of one attention call: qkv is `[batch, tokens, 3, heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// `[B, T, 3, H, hd]`
    pub fn qkv_len(&self) -> usize {
        self.batch * self.tokens * 3 * self.heads * self.head_dim
    }
    /// `[B, T, H, hd]`
    pub fn out_len(&self) -> usize {
        self.batch * self.tokens * self.heads * self.head_dim
    }
    /// `[B, H, T]`
    pub fn stats_len(&self) -> usize {
        self.batch * self.heads * self.tokens
    }
    /// The softmax scale `hd^-0.5`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Kernel names per supported head dim: (forward, backward dK/dV, backward dQ).
fn kernel_names(head_dim: usize) -> Result<(&'static str, &'static str, &'static str)> {
    Ok(match head_dim {
        16 => (
            "attention_forward_hd16",
            "attention_backward_dkdv_hd16",
            "attention_backward_dq_hd16",
        ),
        32 => (
            "attention_forward_hd32",
            "attention_backward_dkdv_hd32",
            "attention_backward_dq_hd32",
        ),
        48 => (
            "attention_forward_hd48",
            "attention_backward_dkdv_hd48",
            "attention_backward_dq_hd48",
        ),
        64 => (
            "attention_forward_hd64",
            "attention_backward_dkdv_hd64",
            "attention_backward_dq_hd64",
        ),
        80 => (
            "attention_forward_hd80",
            "attention_backward_dkdv_hd80",
            "attention_backward_dq_hd80",
        ),
        96 => (
            "attention_forward_hd96",
            "attention_backward_dkdv_hd96",
            "attention_backward_dq_hd96",
        ),
        112 => (
            "attention_forward_hd112",
            "attention_backward_dkdv_hd112",
            "attention_backward_dq_hd112",
        ),
        128 => (
            "attention_forward_hd128",
            "attention_backward_dkdv_hd128",
            "attention_backward_dq_hd128",
        ),
        _ => {
            return Err(Error::Unsupported(format!(
                "cuda attention: head dim {head_dim} (supported: multiples of 16 up to 128)"
            )))
        }
    })
}

/// Rows per backward tile (must match `BwdTile` in attention.cu).
fn backward_tile(head_dim: usize) -> usize {
    if head_dim <= 64 {
        64
    } else {
        32
    }
}

fn check_shape(op: &'static str, s: &AttentionShape) -> Result<(i32, i32, i32)> {
    if s.batch == 0 || s.tokens == 0 || s.heads == 0 {
        return Err(Error::shape(op, format!("empty attention {s:?}")));
    }
    if s.batch > 65_535 || s.heads > 65_535 {
        return Err(Error::shape(
            op,
            format!("{s:?}: batch and heads must be < 65536"),
        ));
    }
    Ok((
        dim(op, "batch", s.batch)?,
        dim(op, "tokens", s.tokens)?,
        dim(op, "heads", s.heads)?,
    ))
}

impl CudaBackend {
    /// `out [B,T,H,hd] = softmax(q kᵀ · hd^-0.5) v` per head, `lse [B,H,T]` saved for backward,
    /// from `qkv [B,T,3,H,hd]` (bf16 in and out, f32 softmax and accumulation).
    pub fn attention_forward(
        &self,
        out: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<f32>,
        qkv: &CudaSlice<bf16>,
        shape: AttentionShape,
    ) -> Result<()> {
        const OP: &str = "cuda attention_forward";
        let (b, t, h) = check_shape(OP, &shape)?;
        let (forward, _, _) = kernel_names(shape.head_dim)?;
        check_len(OP, "qkv", qkv.len(), shape.qkv_len())?;
        check_len(OP, "out", out.len(), shape.out_len())?;
        check_len(OP, "lse", lse.len(), shape.stats_len())?;
        let scale = shape.scale();
        let grid = (
            blocks(OP, shape.tokens.div_ceil(64))?,
            shape.heads as u32,
            shape.batch as u32,
        );
        launch!(
            self,
            KernelFamily::Attention,
            forward,
            config(grid, 128),
            [out, lse, qkv, &b, &t, &h, &scale]
        );
        Ok(())
    }

    /// `dqkv [B,T,3,H,hd]` (written) from `dout [B,T,H,hd]` and the forward's `qkv`, `out`,
    /// `lse`; `delta [B,H,T]` is caller-owned scratch (rowsum of dout * out).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        dqkv: &mut CudaSlice<bf16>,
        delta: &mut CudaSlice<f32>,
        dout: &CudaSlice<bf16>,
        qkv: &CudaSlice<bf16>,
        out: &CudaSlice<bf16>,
        lse: &CudaSlice<f32>,
        shape: AttentionShape,
    ) -> Result<()> {
        const OP: &str = "cuda attention_backward";
        let (b, t, h) = check_shape(OP, &shape)?;
        let (_, dkdv, dq) = kernel_names(shape.head_dim)?;
        check_len(OP, "dqkv", dqkv.len(), shape.qkv_len())?;
        check_len(OP, "qkv", qkv.len(), shape.qkv_len())?;
        check_len(OP, "dout", dout.len(), shape.out_len())?;
        check_len(OP, "out", out.len(), shape.out_len())?;
        check_len(OP, "lse", lse.len(), shape.stats_len())?;
        check_len(OP, "delta", delta.len(), shape.stats_len())?;
        let hd = dim(OP, "head_dim", shape.head_dim)?;
        let rows = shape.batch * shape.tokens * shape.heads;
        let pre_grid = (blocks(OP, rows.div_ceil(8))?, 1, 1);
        launch!(
            self,
            KernelFamily::Attention,
            "attention_backward_preprocess",
            config(pre_grid, 256),
            [&mut *delta, out, dout, &b, &t, &h, &hd]
        );

        let tile = backward_tile(shape.head_dim);
        let grid = (
            blocks(OP, shape.tokens.div_ceil(tile))?,
            shape.heads as u32,
            shape.batch as u32,
        );
        let threads = (tile / 16 * 32) as u32;
        let scale = shape.scale();
        launch!(
            self,
            KernelFamily::Attention,
            dkdv,
            config(grid, threads),
            [&mut *dqkv, qkv, dout, lse, &*delta, &b, &t, &h, &scale]
        );
        launch!(
            self,
            KernelFamily::Attention,
            dq,
            config(grid, threads),
            [dqkv, qkv, dout, lse, &*delta, &b, &t, &h, &scale]
        );
        Ok(())
    }
}
