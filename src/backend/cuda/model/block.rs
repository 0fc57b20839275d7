//! A stack of transformer blocks on the GPU (`nn::Block` mirrored): the residual stream, the
//! per-branch saved activations, forward with the residual add fused into the next LayerNorm
//! where the whole batch runs the branch, and backward. [`GpuBlock`] runs one block on its own
//! (tests, the golden `block` case).
//!
//! Branch `k` of a stack is block `k / 2`'s attention (`k` even) or FFN (`k` odd).

use super::branch::{
    branch_backward, branch_forward, branch_residual, Allocator, Body, BodyScratch, BranchBufs,
    Dims, Next, RowScratch,
};
use super::DeviceWeights;
use crate::backend::cuda::{cuda_error, CudaBackend, NormShape};
use crate::error::{Error, Result};
use crate::nn::block::Block;
use crate::nn::drop_path::Subset;
use crate::nn::ffn::FfnLayer;
use crate::nn::layernorm::LayerNorm;
use crate::nn::params::ParamRef;
use cudarc::driver::CudaSlice;

/// Whether a forward keeps what backward needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Every branch input and activation (training).
    Cache,
    /// One stream updated in place, one set of branch buffers reused (inference).
    Nothing,
}

/// The backbone's final LayerNorm target: f32 output `[b·t, d]` and its statistics `[b·t]`.
pub(crate) struct FinalNorm<'a> {
    pub norm: &'a LayerNorm,
    pub out: &'a mut CudaSlice<f32>,
    pub mean: &'a mut CudaSlice<f32>,
    pub rstd: &'a mut CudaSlice<f32>,
}

/// Residual-stream buffers and branch activations of a stack of blocks at one size.
pub(crate) struct Stack {
    /// `Cache`: `xs[k]` is the input of branch `k`, `xs[2·depth]` the stack output.
    /// `Nothing`: `xs[0]` only, updated in place. Each `[b, t, d]`.
    pub xs: Vec<CudaSlice<f32>>,
    /// `Cache`: one per branch; `Nothing`: one attention and one FFN set, reused.
    branches: Vec<BranchBufs>,
    rows: RowScratch,
    scratch: BodyScratch,
    pub dims: Dims,
    keep: Keep,
}

/// The LayerNorm, LayerScale and body of branch `k`.
fn branch_parts(blocks: &[Block], k: usize) -> Result<(&LayerNorm, Option<ParamRef>, Body<'_>)> {
    let blk = &blocks[k / 2];
    Ok(if k % 2 == 0 {
        (&blk.norm1, blk.ls1, Body::Attention(&blk.attn))
    } else {
        (&blk.norm2, blk.ls2, Body::ffn(&blk.ffn)?)
    })
}

/// Two distinct elements of a slice, the first shared and the second exclusive.
fn pair<T>(v: &mut [T], i: usize, j: usize) -> (&T, &mut T) {
    debug_assert_ne!(i, j);
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        (&lo[i], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(i);
        (&hi[0], &mut lo[j])
    }
}

impl Stack {
    pub fn new(
        alloc: &mut Allocator<'_>,
        blocks: &[Block],
        dims: Dims,
        keep: Keep,
    ) -> Result<Self> {
        let Dims { b, t, d } = dims;
        // Every block has the same shape; a stack without blocks (depth 0) only carries the
        // stream to the final norm.
        let (hidden, heads) = match blocks.first() {
            Some(first) => {
                Body::ffn(&first.ffn)?; // SwiGLU: a typed Unsupported error
                let hidden = match &first.ffn {
                    FfnLayer::Mlp(m) => m.fc1.out_dim,
                    FfnLayer::SwiGlu(s) => 2 * s.width,
                };
                (hidden, first.attn.num_heads)
            }
            None => (0, 1),
        };
        let n_xs = match keep {
            Keep::Cache => 2 * blocks.len() + 1,
            Keep::Nothing => 1,
        };
        let n_branches = match keep {
            Keep::Cache => 2 * blocks.len(),
            Keep::Nothing => 2 * blocks.len().min(1),
        };
        let xs = (0..n_xs)
            .map(|_| alloc.zeros(b * t * d))
            .collect::<Result<Vec<_>>>()?;
        let branches = (0..n_branches)
            .map(|k| {
                let (_, _, body) = branch_parts(blocks, k)?;
                BranchBufs::new(alloc, body, b, t, d)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Stack {
            xs,
            branches,
            rows: RowScratch {
                a: alloc.zeros(b * t * d)?,
                b: alloc.zeros(b * t * d)?,
            },
            scratch: BodyScratch::new(alloc, b, t, d, (3 * d).max(hidden), heads)?,
            dims,
            keep,
        })
    }

    /// The stack's output stream `[b, t, d]` (before any final norm).
    pub fn output(&self) -> &CudaSlice<f32> {
        // `new` creates at least one stream buffer.
        &self.xs[self.xs.len() - 1]
    }

    /// Runs the blocks on `xs[0]`. `subsets[k]` is branch `k`'s batch subset (empty = none;
    /// only with `Keep::Cache`). With `final_norm`, the output is also normalised into it.
    pub fn forward(
        &mut self,
        gpu: &CudaBackend,
        blocks: &[Block],
        w: &DeviceWeights,
        subsets: &[Option<&Subset>],
        mut final_norm: Option<FinalNorm<'_>>,
    ) -> Result<()> {
        let n = 2 * blocks.len();
        let want = match self.keep {
            Keep::Cache => n,
            Keep::Nothing => 2 * n.min(1),
        };
        if self.branches.len() != want {
            return Err(Error::shape(
                "cuda blocks",
                "workspace built for another depth",
            ));
        }
        if self.keep == Keep::Nothing && subsets.iter().any(Option::is_some) {
            return Err(Error::Unsupported(
                "cuda: stochastic depth in an inference forward".into(),
            ));
        }
        if !subsets.is_empty() && subsets.len() != n {
            return Err(Error::shape(
                "cuda blocks",
                format!("{} drop-path subsets for {n} branches", subsets.len()),
            ));
        }
        let len = self.branches.len();
        for (k, bufs) in self.branches.iter_mut().enumerate() {
            bufs.set_subset(gpu, subsets.get(k).copied().flatten())?;
        }
        let dims = self.dims;
        let mut ln_done = false;
        for k in 0..n {
            let (norm, ls, body) = branch_parts(blocks, k)?;
            let bi = k % len;
            // The residual stream this branch adds to, and the stream its LayerNorm reads.
            let (x_in, x): (Option<&CudaSlice<f32>>, &mut CudaSlice<f32>) = match self.keep {
                Keep::Cache => {
                    let (lo, hi) = self.xs.split_at_mut(k + 1);
                    gpu.stream()
                        .memcpy_dtod(&lo[k], &mut hi[0])
                        .map_err(|e| cuda_error("cuMemcpyDtoD", e))?;
                    (Some(&lo[k]), &mut hi[0])
                }
                Keep::Nothing => (None, &mut self.xs[0]),
            };
            branch_forward(
                gpu,
                norm,
                body,
                w,
                &mut self.branches[bi],
                &mut self.rows,
                &mut self.scratch,
                x_in.unwrap_or(&*x),
                dims,
                ln_done,
            )?;
            let next_norm = if k + 1 < n {
                Some(branch_parts(blocks, k + 1)?.0)
            } else {
                None
            };
            ln_done = match next_norm {
                Some(next_norm) => {
                    let (bufs, next_bufs) = pair(&mut self.branches, bi, (k + 1) % len);
                    let next = Next::Branch(next_norm, next_bufs);
                    branch_residual(gpu, bufs, ls, w, x, dims, next)?
                }
                None => {
                    let next = match final_norm.as_mut() {
                        Some(f) => Next::FinalNorm {
                            norm: f.norm,
                            out: &mut *f.out,
                            mean: &mut *f.mean,
                            rstd: &mut *f.rstd,
                        },
                        None => Next::Nothing,
                    };
                    branch_residual(gpu, &self.branches[bi], ls, w, x, dims, next)?
                }
            };
        }
        // The final norm, unless the last residual add ran it (no blocks, or the last branch
        // covered a batch subset).
        if let (false, Some(f)) = (ln_done, final_norm) {
            let weight = gpu.sub(&w.f32, f.norm.weight.range())?;
            let bias = gpu.sub(&w.f32, f.norm.bias.range())?;
            let shape = NormShape {
                rows: dims.b * dims.t,
                channels: dims.d,
            };
            let x = &self.xs[self.xs.len() - 1];
            gpu.layernorm_forward(f.out, f.mean, f.rstd, x, &weight, &bias, shape, f.norm.eps)?;
        }
        Ok(())
    }

    /// Backward through the blocks of the last `Keep::Cache` forward: `dx [b, t, d]` holds the
    /// gradient of the stack output and becomes that of its input; parameter gradients
    /// accumulate into `grads`.
    pub fn backward(
        &mut self,
        gpu: &mut CudaBackend,
        blocks: &[Block],
        w: &DeviceWeights,
        grads: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = 2 * blocks.len();
        if self.keep != Keep::Cache || self.branches.len() != n {
            return Err(Error::Unsupported(
                "cuda blocks: backward needs a training forward of the same model".into(),
            ));
        }
        for k in (0..n).rev() {
            let (norm, ls, body) = branch_parts(blocks, k)?;
            branch_backward(
                gpu,
                norm,
                ls,
                body,
                w,
                grads,
                &self.branches[k],
                &mut self.rows,
                &mut self.scratch,
                dx,
                &self.xs[k],
                self.dims,
            )?;
        }
        Ok(())
    }
}

/// One transformer block on the GPU with its own workspace (`nn::Block::forward` /
/// `backward` mirrored, in place on the residual stream).
pub struct GpuBlock {
    stack: Stack,
    allocations: usize,
}

impl GpuBlock {
    /// Buffers for `b` sequences of `t` tokens.
    pub fn new(gpu: &CudaBackend, block: &Block, b: usize, t: usize) -> Result<Self> {
        if b == 0 || t == 0 {
            return Err(Error::shape(
                "cuda block",
                format!("empty input [{b}, {t}]"),
            ));
        }
        let mut alloc = Allocator { gpu, count: 0 };
        let dims = Dims { b, t, d: block.dim };
        let stack = Stack::new(&mut alloc, std::slice::from_ref(block), dims, Keep::Cache)?;
        Ok(GpuBlock {
            stack,
            allocations: alloc.count,
        })
    }

    /// Device buffers this block allocated.
    pub fn allocations(&self) -> usize {
        self.allocations
    }

    /// `x [b, t, d]` in place; `subsets` are the attention branch's and the FFN branch's batch
    /// subsets (`None` = every sample), drawn on the host as `nn::Block::forward` draws them.
    pub fn forward(
        &mut self,
        gpu: &CudaBackend,
        block: &Block,
        w: &DeviceWeights,
        x: &mut CudaSlice<f32>,
        subsets: [Option<&Subset>; 2],
    ) -> Result<()> {
        let stream = gpu.stream();
        check_stream(x, &self.stack.dims)?;
        stream
            .memcpy_dtod(&*x, &mut self.stack.xs[0])
            .map_err(|e| cuda_error("cuMemcpyDtoD", e))?;
        self.stack
            .forward(gpu, std::slice::from_ref(block), w, &subsets, None)?;
        stream
            .memcpy_dtod(self.stack.output(), x)
            .map_err(|e| cuda_error("cuMemcpyDtoD", e))
    }

    /// Backward in place on the residual gradient `dx [b, t, d]` (output gradient in, input
    /// gradient out); parameter gradients accumulate into `grads`.
    pub fn backward(
        &mut self,
        gpu: &mut CudaBackend,
        block: &Block,
        w: &DeviceWeights,
        grads: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_stream(dx, &self.stack.dims)?;
        self.stack
            .backward(gpu, std::slice::from_ref(block), w, grads, dx)
    }
}

fn check_stream(x: &CudaSlice<f32>, dims: &Dims) -> Result<()> {
    let need = dims.b * dims.t * dims.d;
    if x.len() != need {
        return Err(Error::shape(
            "cuda block",
            format!(
                "stream holds {} values, expected [{}, {}, {}]",
                x.len(),
                dims.b,
                dims.t,
                dims.d
            ),
        ));
    }
    Ok(())
}
