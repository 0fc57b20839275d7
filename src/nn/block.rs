//! The pre-norm transformer block, `x = x + LS1(Attn(LN1(x)))`, then `x = x + LS2(FFN(LN2(x)))`,
//! each branch optionally on a random subset of the batch ([`super::drop_path`]); and
//! [`Stack`], a stack of blocks at one input size: the residual stream, every branch's saved
//! activations, forward with the residual add fused into the next LayerNorm where the whole
//! batch runs the branch, and backward.
//!
//! Dimensions: `b` sequences, `t` tokens, `d` channels; the residual stream is `[b, t, d]`.
//! Branch `k` of a stack is block `k / 2`'s attention (`k` even) or FFN (`k` odd).

use super::attention::Attention;
use super::branch::{
    branch_backward, branch_forward, branch_residual, Body, BodyScratch, BranchBufs, BranchParts,
    Dims, Next, RowScratch,
};
use super::drop_path::Subset;
use super::ffn::{Ffn, FfnLayer};
use super::layernorm::LayerNorm;
use super::linear::Bias;
use super::params::{Init, ParamRef, ParamTable};
use crate::backend::{Backend, LnStats, NormOut, NormShape, Storage};
use crate::error::{Error, Result};

/// Block hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockConfig {
    pub dim: usize,
    pub num_heads: usize,
    pub ffn: Ffn,
    /// LayerScale init value; `None` = no LayerScale (identity, no `gamma`).
    pub layerscale: Option<f32>,
    pub eps: f32,
    pub qkv_bias: bool,
    pub proj_bias: bool,
    pub ffn_bias: bool,
}

#[derive(Clone, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub ls1: Option<ParamRef>, // [d]
    pub norm2: LayerNorm,
    pub ffn: FfnLayer,
    pub ls2: Option<ParamRef>, // [d]
    pub dim: usize,
}

impl Block {
    /// Registers `<name>norm1.*`, `attn.*`, `ls1.gamma`, `norm2.*`, `mlp.*`, `ls2.gamma`.
    pub fn new(table: &mut ParamTable, name: &str, cfg: &BlockConfig) -> Self {
        let d = cfg.dim;
        let gamma = |table: &mut ParamTable, key: &str| {
            cfg.layerscale
                .map(|v| table.push(format!("{name}{key}.gamma"), &[d], Init::Const(v)))
        };
        let norm1 = LayerNorm::new(table, &format!("{name}norm1."), d, cfg.eps);
        let attn = Attention::new(
            table,
            &format!("{name}attn."),
            d,
            cfg.num_heads,
            Bias::from(cfg.qkv_bias),
            Bias::from(cfg.proj_bias),
        );
        let ls1 = gamma(table, "ls1");
        let norm2 = LayerNorm::new(table, &format!("{name}norm2."), d, cfg.eps);
        let ffn = FfnLayer::new(
            table,
            &format!("{name}mlp."),
            d,
            cfg.ffn,
            Bias::from(cfg.ffn_bias),
        );
        let ls2 = gamma(table, "ls2");
        Block {
            norm1,
            attn,
            ls1,
            norm2,
            ffn,
            ls2,
            dim: d,
        }
    }

    /// The LayerNorm, LayerScale and body of branch `k % 2` (0 attention, 1 FFN).
    fn branch(&self, k: usize) -> BranchParts<'_> {
        if k % 2 == 0 {
            BranchParts {
                norm: &self.norm1,
                ls: self.ls1,
                body: Body::Attention(&self.attn),
            }
        } else {
            BranchParts {
                norm: &self.norm2,
                ls: self.ls2,
                body: Body::Ffn(&self.ffn),
            }
        }
    }
}

/// Whether a forward keeps what backward needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Every branch input and activation (training).
    Cache,
    /// One stream updated in place, one set of branch buffers reused (inference).
    Nothing,
}

/// The backbone's final LayerNorm target: f32 output `[b·t, d]` and its statistics `[b·t]`.
pub struct FinalNorm<'a, B: Backend> {
    pub norm: &'a LayerNorm,
    pub out: &'a mut B::F32,
    pub mean: &'a mut B::F32,
    pub rstd: &'a mut B::F32,
}

/// Residual-stream buffers and branch activations of a stack of blocks at one size.
pub struct Stack<B: Backend> {
    /// `Cache`: `xs[k]` is the input of branch `k`, `xs[2·depth]` the stack output.
    /// `Nothing`: `xs[0]` only, updated in place. Each `[b, t, d]`.
    xs: Vec<B::BufF32>,
    /// `Cache`: one per branch; `Nothing`: one attention and one FFN set, reused.
    branches: Vec<BranchBufs<B>>,
    rows: RowScratch<B>,
    scratch: BodyScratch<B>,
    pub dims: Dims,
    keep: Keep,
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

impl<B: Backend> Stack<B> {
    pub fn new(be: &mut B, blocks: &[Block], dims: Dims, keep: Keep) -> Result<Self> {
        let n_xs = match keep {
            Keep::Cache => 2 * blocks.len() + 1,
            Keep::Nothing => 1,
        };
        let n_branches = match keep {
            Keep::Cache => 2 * blocks.len(),
            Keep::Nothing => 2 * blocks.len().min(1),
        };
        let stream = dims.b * dims.t * dims.d;
        let xs = (0..n_xs)
            .map(|_| be.alloc_f32(stream))
            .collect::<Result<Vec<_>>>()?;
        let branches = (0..n_branches)
            .map(|k| BranchBufs::new(be, blocks[k / 2].branch(k).body, dims))
            .collect::<Result<Vec<_>>>()?;
        // Every block has the same shape; a stack without blocks only carries the stream.
        let ffn = blocks.first().map(|blk| &blk.ffn);
        Ok(Stack {
            xs,
            branches,
            rows: RowScratch::new(be, dims)?,
            scratch: BodyScratch::new(be, dims, ffn)?,
            dims,
            keep,
        })
    }

    /// The stack's input stream `[b, t, d]` (write the tokens here before [`Stack::forward`]).
    pub fn input_mut(&mut self) -> &mut B::F32 {
        &mut self.xs[0]
    }

    /// The stack's output stream `[b, t, d]` (before any final norm).
    pub fn output(&self) -> &B::F32 {
        // `new` creates at least one stream buffer.
        &self.xs[self.xs.len() - 1]
    }

    /// Runs the blocks on the input stream. `subsets[k]` is branch `k`'s batch subset (empty =
    /// none; only with `Keep::Cache`). With `final_norm`, the output is also normalised into it.
    pub fn forward(
        &mut self,
        be: &mut B,
        blocks: &[Block],
        w: &B::Weights,
        subsets: &[Option<&Subset>],
        mut final_norm: Option<FinalNorm<'_, B>>,
    ) -> Result<()> {
        let n = 2 * blocks.len();
        self.check_forward(n, subsets)?;
        let len = self.branches.len();
        for (k, bufs) in self.branches.iter_mut().enumerate() {
            bufs.set_subset(be, subsets.get(k).copied().flatten())?;
        }
        let dims = self.dims;
        let mut ln_done = false;
        for k in 0..n {
            let parts = blocks[k / 2].branch(k);
            let bi = k % len;
            // The residual stream this branch adds to, and the stream its LayerNorm reads.
            let (x_in, x): (Option<&B::F32>, &mut B::F32) = match self.keep {
                Keep::Cache => {
                    let (lo, hi) = self.xs.split_at_mut(k + 1);
                    be.copy_f32(&mut hi[0], &lo[k])?;
                    (Some(&lo[k]), &mut hi[0])
                }
                Keep::Nothing => (None, &mut self.xs[0]),
            };
            branch_forward(
                be,
                parts.norm,
                parts.body,
                w,
                &mut self.branches[bi],
                &mut self.rows,
                x_in.unwrap_or(&*x),
                dims,
                ln_done,
            )?;
            ln_done = if k + 1 < n {
                let next_norm = blocks[k.div_ceil(2)].branch(k + 1).norm;
                let (bufs, next_bufs) = pair(&mut self.branches, bi, (k + 1) % len);
                let next = Next::Branch(next_norm, next_bufs);
                branch_residual(be, bufs, parts.ls, w, x, dims, next)?
            } else {
                let next = match final_norm.as_mut() {
                    Some(f) => Next::FinalNorm {
                        norm: f.norm,
                        out: &mut *f.out,
                        mean: &mut *f.mean,
                        rstd: &mut *f.rstd,
                    },
                    None => Next::Nothing,
                };
                branch_residual(be, &self.branches[bi], parts.ls, w, x, dims, next)?
            };
        }
        // The final norm, unless the last residual add ran it (no blocks, or the last branch
        // covered a batch subset).
        if let (false, Some(f)) = (ln_done, final_norm) {
            let shape = NormShape {
                rows: dims.b * dims.t,
                channels: dims.d,
            };
            let x = &self.xs[self.xs.len() - 1];
            f.norm.with_params::<B, _>(w, |p| {
                let stats = LnStats {
                    mean: f.mean,
                    rstd: f.rstd,
                };
                be.layernorm_forward(NormOut::F32(f.out), stats, x, p, shape)
            })?;
        }
        Ok(())
    }

    fn check_forward(&self, n: usize, subsets: &[Option<&Subset>]) -> Result<()> {
        let want = match self.keep {
            Keep::Cache => n,
            Keep::Nothing => 2 * n.min(1),
        };
        if self.branches.len() != want {
            return Err(Error::shape("blocks", "workspace built for another depth"));
        }
        if self.keep == Keep::Nothing && subsets.iter().any(Option::is_some) {
            return Err(Error::Unsupported(
                "stochastic depth in an inference forward".into(),
            ));
        }
        if !subsets.is_empty() && subsets.len() != n {
            return Err(Error::shape(
                "blocks",
                format!("{} drop-path subsets for {n} branches", subsets.len()),
            ));
        }
        Ok(())
    }

    /// Backward through the blocks of the last `Keep::Cache` forward: `dx [b, t, d]` holds the
    /// gradient of the stack output and becomes that of its input; parameter gradients
    /// accumulate into `grads`.
    pub fn backward(
        &mut self,
        be: &mut B,
        blocks: &[Block],
        w: &B::Weights,
        grads: &mut B::F32,
        dx: &mut B::F32,
    ) -> Result<()> {
        let n = 2 * blocks.len();
        if self.keep != Keep::Cache || self.branches.len() != n {
            return Err(Error::Unsupported(
                "blocks: backward needs a training forward of the same model".into(),
            ));
        }
        for k in (0..n).rev() {
            let scratch = (&mut self.rows, &mut self.scratch);
            let parts = blocks[k / 2].branch(k);
            let bufs = &self.branches[k];
            branch_backward(
                be,
                parts,
                w,
                grads,
                bufs,
                scratch,
                dx,
                &self.xs[k],
                self.dims,
            )?;
        }
        Ok(())
    }
}

/// One transformer block with its own workspace (golden cases, tests): forward and backward
/// in place on a residual stream `[b, t, d]`.
pub struct BlockRunner<B: Backend> {
    stack: Stack<B>,
}

impl<B: Backend> BlockRunner<B> {
    /// Buffers for `b` sequences of `t` tokens.
    pub fn new(be: &mut B, block: &Block, b: usize, t: usize) -> Result<Self> {
        if b == 0 || t == 0 {
            return Err(Error::shape("block", format!("empty input [{b}, {t}]")));
        }
        let dims = Dims { b, t, d: block.dim };
        let stack = Stack::new(be, std::slice::from_ref(block), dims, Keep::Cache)?;
        Ok(BlockRunner { stack })
    }

    /// `x [b, t, d]` in place; `subsets` are the attention branch's and the FFN branch's batch
    /// subsets (`None` = every sample), drawn as `drop_path::draw_subset` draws them.
    pub fn forward(
        &mut self,
        be: &mut B,
        block: &Block,
        w: &B::Weights,
        x: &mut B::F32,
        subsets: [Option<&Subset>; 2],
    ) -> Result<()> {
        check_stream(x, &self.stack.dims)?;
        be.copy_f32(self.stack.input_mut(), x)?;
        self.stack
            .forward(be, std::slice::from_ref(block), w, &subsets, None)?;
        be.copy_f32(x, self.stack.output())
    }

    /// Backward in place on the residual gradient `dx [b, t, d]` (output gradient in, input
    /// gradient out); parameter gradients accumulate into `grads`.
    pub fn backward(
        &mut self,
        be: &mut B,
        block: &Block,
        w: &B::Weights,
        grads: &mut B::F32,
        dx: &mut B::F32,
    ) -> Result<()> {
        check_stream(dx, &self.stack.dims)?;
        self.stack
            .backward(be, std::slice::from_ref(block), w, grads, dx)
    }
}

fn check_stream<S: Storage + ?Sized>(x: &S, dims: &Dims) -> Result<()> {
    let need = dims.b * dims.t * dims.d;
    if x.len() != need {
        return Err(Error::shape(
            "block",
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
