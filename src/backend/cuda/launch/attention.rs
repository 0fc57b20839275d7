//! Launchers of `kernels/attention.cu`: fused attention forward and backward. Head dims with a
//! tensor-core instantiation (multiples of 16 up to 128) run the fast kernels, any other head
//! dim up to [`GENERAL_MAX_HEAD_DIM`] the general scalar ones ([`AttentionKernels`]).

use super::{blocks, config, dim, launch};
use crate::backend::cuda::buffers::Slot;
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::backend::{check_lens, AttentionOps, AttentionShape};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// Which kernels run an attention call. Both compute the same values with the same layouts and
/// saved statistics; they differ in speed and in where the probabilities are rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernels {
    /// FlashAttention-2 style tensor-core kernels, one instantiation per head dim (multiples
    /// of 16 up to 128); probabilities rounded to bf16 for the tensor cores.
    Fast,
    /// Scalar kernels for any head dim `1..=GENERAL_MAX_HEAD_DIM`, f32 probabilities: the odd
    /// shapes (golden fixtures, small test models). Slow at long sequences.
    General,
}

/// The largest head dim of [`AttentionKernels::General`] (`GEN_MAX_HD` in attention.cu).
pub const GENERAL_MAX_HEAD_DIM: usize = 256;

/// Query (or key) rows per block of the general kernels (`GEN_ROWS` in attention.cu).
const GENERAL_ROWS: usize = 4;

impl AttentionKernels {
    /// The fast kernels where the head dim has an instantiation, the general ones otherwise.
    pub fn for_head_dim(head_dim: usize) -> Self {
        if kernel_names(head_dim).is_ok() {
            AttentionKernels::Fast
        } else {
            AttentionKernels::General
        }
    }
}

/// Kernel names of one fast instantiation: (forward, backward dK/dV, backward dQ).
type FastNames = (&'static str, &'static str, &'static str);

/// Fast-kernel names per supported head dim.
fn kernel_names(head_dim: usize) -> Result<FastNames> {
    macro_rules! instances {
        ($($hd:literal),*) => {
            match head_dim {
                $($hd => Ok((
                    concat!("attention_forward_hd", $hd),
                    concat!("attention_backward_dkdv_hd", $hd),
                    concat!("attention_backward_dq_hd", $hd),
                )),)*
                _ => Err(Error::Unsupported(format!(
                    "cuda attention (fast kernels): head dim {head_dim} (supported: multiples of 16 up to 128)"
                ))),
            }
        };
    }
    instances!(16, 32, 48, 64, 80, 96, 112, 128)
}

/// Rows per backward tile (must match `BwdTile` in attention.cu).
fn backward_tile(head_dim: usize) -> usize {
    if head_dim <= 64 {
        64
    } else {
        32
    }
}

/// Threads per block of the general kernels: one warp per row.
const GENERAL_THREADS: u32 = (GENERAL_ROWS * 32) as u32;

/// Grid of every general kernel: `(ceil(T / GENERAL_ROWS), H, B)`.
fn general_grid(op: &'static str, s: &AttentionShape) -> Result<(u32, u32, u32)> {
    Ok((
        blocks(op, s.tokens.div_ceil(GENERAL_ROWS))?,
        s.heads as u32,
        s.batch as u32,
    ))
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
    /// Runs attention on `kernels` from now on (an [`Error::Unsupported`] where they have no
    /// instance for a head dim); `None` (the default) picks
    /// [`AttentionKernels::for_head_dim`]. Tests compare both.
    pub fn set_attention_kernels(&mut self, kernels: Option<AttentionKernels>) {
        self.attention_kernels = kernels;
    }

    /// The fast kernels' names for the kernels attention runs on, `None` for the general ones.
    fn fast_kernels(&self, op: &'static str, head_dim: usize) -> Result<Option<FastNames>> {
        let kernels = self
            .attention_kernels
            .unwrap_or_else(|| AttentionKernels::for_head_dim(head_dim));
        match kernels {
            AttentionKernels::Fast => kernel_names(head_dim).map(Some),
            AttentionKernels::General if (1..=GENERAL_MAX_HEAD_DIM).contains(&head_dim) => Ok(None),
            AttentionKernels::General => Err(Error::Unsupported(format!(
                "{op}: head dim {head_dim} (supported: 1 to {GENERAL_MAX_HEAD_DIM})"
            ))),
        }
    }
}

impl AttentionOps for CudaBackend {
    fn attention_forward(
        &mut self,
        out: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<f32>,
        qkv: &CudaSlice<bf16>,
        shape: AttentionShape,
    ) -> Result<()> {
        const OP: &str = "cuda attention_forward";
        let (b, t, h) = check_shape(OP, &shape)?;
        let fast = self.fast_kernels(OP, shape.head_dim)?;
        check_lens(
            OP,
            &[
                ("qkv", qkv.len(), shape.qkv_len()),
                ("out", out.len(), shape.out_len()),
                ("lse", lse.len(), shape.stats_len()),
            ],
        )?;
        let scale = shape.scale();
        match fast {
            Some((forward, _, _)) => {
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
            }
            None => {
                let hd = dim(OP, "head_dim", shape.head_dim)?;
                launch!(
                    self,
                    KernelFamily::Attention,
                    "attention_forward_general",
                    config(general_grid(OP, &shape)?, GENERAL_THREADS),
                    [out, lse, qkv, &b, &t, &h, &hd, &scale]
                );
            }
        }
        Ok(())
    }

    /// The softmax row sums `delta [B, H, T]` go to a work buffer.
    fn attention_backward(
        &mut self,
        dqkv: &mut CudaSlice<bf16>,
        dout: &CudaSlice<bf16>,
        qkv: &CudaSlice<bf16>,
        out: &CudaSlice<bf16>,
        lse: &CudaSlice<f32>,
        shape: AttentionShape,
    ) -> Result<()> {
        const OP: &str = "cuda attention_backward";
        let (b, t, h) = check_shape(OP, &shape)?;
        let fast = self.fast_kernels(OP, shape.head_dim)?;
        check_lens(
            OP,
            &[
                ("dqkv", dqkv.len(), shape.qkv_len()),
                ("qkv", qkv.len(), shape.qkv_len()),
                ("dout", dout.len(), shape.out_len()),
                ("out", out.len(), shape.out_len()),
                ("lse", lse.len(), shape.stats_len()),
            ],
        )?;
        let hd = dim(OP, "head_dim", shape.head_dim)?;
        let rows = shape.batch * shape.tokens * shape.heads;
        let pre_grid = (blocks(OP, rows.div_ceil(8))?, 1, 1);
        let scale = shape.scale();
        self.with_work(Slot::B, shape.stats_len(), |gpu, delta| {
            launch!(
                gpu,
                KernelFamily::Attention,
                "attention_backward_preprocess",
                config(pre_grid, 256),
                [&mut *delta, out, dout, &b, &t, &h, &hd]
            );
            match fast {
                Some((_, dkdv, dq)) => {
                    let tile = backward_tile(shape.head_dim);
                    let grid = (
                        blocks(OP, shape.tokens.div_ceil(tile))?,
                        shape.heads as u32,
                        shape.batch as u32,
                    );
                    let threads = (tile / 16 * 32) as u32;
                    launch!(
                        gpu,
                        KernelFamily::Attention,
                        dkdv,
                        config(grid, threads),
                        [&mut *dqkv, qkv, dout, lse, &*delta, &b, &t, &h, &scale]
                    );
                    launch!(
                        gpu,
                        KernelFamily::Attention,
                        dq,
                        config(grid, threads),
                        [dqkv, qkv, dout, lse, &*delta, &b, &t, &h, &scale]
                    );
                }
                None => {
                    let grid = general_grid(OP, &shape)?;
                    launch!(
                        gpu,
                        KernelFamily::Attention,
                        "attention_backward_dkdv_general",
                        config(grid, GENERAL_THREADS),
                        [&mut *dqkv, qkv, dout, lse, &*delta, &b, &t, &h, &hd, &scale]
                    );
                    launch!(
                        gpu,
                        KernelFamily::Attention,
                        "attention_backward_dq_general",
                        config(grid, GENERAL_THREADS),
                        [dqkv, qkv, dout, lse, &*delta, &b, &t, &h, &hd, &scale]
                    );
                }
            }
            Ok(())
        })
    }
}
