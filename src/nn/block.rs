//! The pre-norm transformer block:
//! `x = x + LS1(Attn(LN1(x)))`, then `x = x + LS2(FFN(LN2(x)))`,
//! each branch optionally on a random subset of the batch (see [`super::drop_path`]).
//!
//! Dimensions: `b` sequences, `t` tokens, `d` channels; the residual stream `x` is `[b, t, d]`.

use super::attention::{Attention, AttnCache};
use super::drop_path::{draw_subset, gather_samples, scatter_add_samples, DropPath, Subset};
use super::ffn::{Ffn, FfnCache, FfnLayer};
use super::layernorm::{LayerNorm, LnStats};
use super::linear::Bias;
use super::params::{Init, ParamRef, ParamTable};
use crate::backend::cpu::elementwise::layerscale_backward;
use rayon::prelude::*;
use std::borrow::Cow;

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

/// What one residual branch saved.
#[derive(Clone, Debug)]
pub struct BranchCache<C> {
    /// The samples the branch ran on (`None` = all, scale 1).
    pub subset: Option<Subset>,
    pub stats: LnStats,
    pub ln_out: Vec<f32>, // [b', t, d]
    pub inner: C,
    pub pre_ls: Vec<f32>, // [b', t, d] branch output before LayerScale
}

/// Activations saved by [`Block::forward`].
#[derive(Clone, Debug)]
pub struct BlockCache {
    pub b: usize,
    pub t: usize,
    pub x_in: Vec<f32>, // [b, t, d] block input
    pub attn: BranchCache<AttnCache>,
    pub x_mid: Vec<f32>, // [b, t, d] after the attention residual
    pub ffn: BranchCache<FfnCache>,
}

impl BlockCache {
    /// f32 values held (for memory planning).
    pub fn floats(&self) -> usize {
        let branch = |stats: &LnStats, ln: &[f32], pre: &[f32]| {
            stats.mean.len() + stats.rstd.len() + ln.len() + pre.len()
        };
        let a = &self.attn;
        let f = &self.ffn;
        let ffn_inner = match &f.inner {
            FfnCache::Mlp(m) => m.pre.len() + m.act.len(),
            FfnCache::SwiGlu(s) => s.x12.len() + s.gated.len(),
        };
        self.x_in.len()
            + self.x_mid.len()
            + branch(&a.stats, &a.ln_out, &a.pre_ls)
            + a.inner.qkv.len()
            + a.inner.lse.len()
            + a.inner.att.len()
            + branch(&f.stats, &f.ln_out, &f.pre_ls)
            + ffn_inner
    }
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

    /// Runs the block in place on the residual stream `x` (`[b, t, d]`). With `drop_path`, each
    /// branch draws its subset (attention first, then FFN).
    pub fn forward(
        &self,
        x: &mut [f32],
        params: &[f32],
        b: usize,
        t: usize,
        mut drop_path: Option<&mut DropPath<'_>>,
    ) -> BlockCache {
        let mut draw = || {
            drop_path
                .as_mut()
                .and_then(|dp| draw_subset(b, dp.rate, dp.rng))
        };
        let attn_subset = draw();
        let x_in = x.to_vec();
        let attn = branch_forward(
            x,
            &self.norm1,
            self.ls1,
            params,
            b,
            t,
            attn_subset,
            |out, inp, bs| self.attn.forward(out, inp, params, bs, t),
        );
        let ffn_subset = draw();
        let x_mid = x.to_vec();
        let ffn = branch_forward(
            x,
            &self.norm2,
            self.ls2,
            params,
            b,
            t,
            ffn_subset,
            |out, inp, bs| self.ffn.forward(out, inp, params, bs * t),
        );
        BlockCache {
            b,
            t,
            x_in,
            attn,
            x_mid,
            ffn,
        }
    }

    /// Backward in place on the residual gradient `dx` (`[b, t, d]`): the branches' input
    /// gradients are added to it; parameter gradients accumulate into `grads`.
    pub fn backward(&self, dx: &mut [f32], grads: &mut [f32], cache: &BlockCache, params: &[f32]) {
        let (b, t) = (cache.b, cache.t);
        branch_backward(
            dx,
            grads,
            &cache.ffn,
            &cache.x_mid,
            &self.norm2,
            self.ls2,
            params,
            b,
            t,
            |dinp, grads, dout, inp, bs| {
                self.ffn
                    .backward(dinp, grads, dout, inp, &cache.ffn.inner, params, bs * t)
            },
        );
        branch_backward(
            dx,
            grads,
            &cache.attn,
            &cache.x_in,
            &self.norm1,
            self.ls1,
            params,
            b,
            t,
            |dinp, grads, dout, inp, bs| {
                self.attn
                    .backward(dinp, grads, dout, inp, &cache.attn.inner, params, bs, t)
            },
        );
    }
}

/// `x[kept] += scale · LS(f(LN(x[kept])))`; `f(out, inp, b')` runs the branch body.
#[allow(clippy::too_many_arguments)]
fn branch_forward<C>(
    x: &mut [f32],
    norm: &LayerNorm,
    ls: Option<ParamRef>,
    params: &[f32],
    b: usize,
    t: usize,
    subset: Option<Subset>,
    f: impl FnOnce(&mut [f32], &[f32], usize) -> C,
) -> BranchCache<C> {
    let d = norm.dim;
    let sample = t * d;
    let (xs, bs): (Cow<[f32]>, usize) = match &subset {
        Some(s) => (Cow::Owned(gather_samples(x, &s.kept, sample)), s.kept.len()),
        None => (Cow::Borrowed(&x[..b * sample]), b),
    };
    let rows = bs * t;
    let mut ln_out = vec![0f32; rows * d]; // [b', t, d]
    let stats = norm.forward(&mut ln_out, &xs, params, rows);
    drop(xs);
    let mut pre_ls = vec![0f32; rows * d]; // [b', t, d]
    let inner = f(&mut pre_ls, &ln_out, bs);
    let gamma = ls.map(|g| &params[g.range()]);
    match &subset {
        Some(s) => add_branch(x, &pre_ls, gamma, Some(&s.kept), b, sample, d, s.scale),
        None => add_branch(x, &pre_ls, gamma, None, b, sample, d, 1.0),
    }
    BranchCache {
        subset,
        stats,
        ln_out,
        inner,
        pre_ls,
    }
}

/// The residual add fused with LayerScale: `x[kept[j]] += alpha · gamma ∘ y[j]` (all samples
/// in order when `kept` is `None`; `gamma` `None` = no LayerScale).
#[allow(clippy::too_many_arguments)]
fn add_branch(
    x: &mut [f32], // [b, t, d]
    y: &[f32],     // [b', t, d]
    gamma: Option<&[f32]>,
    kept: Option<&[usize]>,
    b: usize,
    sample: usize,
    d: usize,
    alpha: f32,
) {
    // Where each sample's branch output lives in `y` (None = dropped).
    let mut src: Vec<Option<usize>> = vec![None; b];
    match kept {
        Some(kept) => kept.iter().enumerate().for_each(|(j, &i)| src[i] = Some(j)),
        None => src.iter_mut().enumerate().for_each(|(i, s)| *s = Some(i)),
    }
    x[..b * sample]
        .par_chunks_mut(sample)
        .zip(src.par_iter())
        .for_each(|(xs, j)| {
            let Some(j) = *j else { return };
            let ys = &y[j * sample..(j + 1) * sample];
            match gamma {
                Some(g) => {
                    for (xr, yr) in xs.chunks_mut(d).zip(ys.chunks(d)) {
                        for c in 0..d {
                            xr[c] += alpha * g[c] * yr[c];
                        }
                    }
                }
                None => xs.iter_mut().zip(ys).for_each(|(a, v)| *a += alpha * v),
            }
        });
}

/// Backward of [`branch_forward`]: `dx[kept] += LN'ᵀ f'ᵀ LS'ᵀ (scale · dx[kept])`.
#[allow(clippy::too_many_arguments)]
fn branch_backward<C>(
    dx: &mut [f32],
    grads: &mut [f32],
    cache: &BranchCache<C>,
    x_branch_in: &[f32], // [b, t, d] the stream the branch read
    norm: &LayerNorm,
    ls: Option<ParamRef>,
    params: &[f32],
    b: usize,
    t: usize,
    f: impl FnOnce(&mut [f32], &mut [f32], &[f32], &[f32], usize),
) {
    let d = norm.dim;
    let sample = t * d;
    let (mut dy, xs, bs) = match &cache.subset {
        Some(s) => {
            let mut dy = gather_samples(dx, &s.kept, sample);
            dy.iter_mut().for_each(|v| *v *= s.scale);
            (
                dy,
                Cow::Owned(gather_samples(x_branch_in, &s.kept, sample)),
                s.kept.len(),
            )
        }
        None => (
            dx[..b * sample].to_vec(),
            Cow::Borrowed(&x_branch_in[..b * sample]),
            b,
        ),
    };
    let rows = bs * t;
    if let Some(g) = ls {
        let mut dpre = vec![0f32; rows * d];
        layerscale_backward(
            &mut dpre,
            &mut grads[g.range()],
            &dy,
            &cache.pre_ls,
            &params[g.range()],
            rows,
            d,
        );
        dy = dpre;
    }
    let mut dln = vec![0f32; rows * d]; // [b', t, d]
    f(&mut dln, grads, &dy, &cache.ln_out, bs);
    let mut dxs = dy; // reuse: [b', t, d]
    norm.backward(&mut dxs, grads, &dln, &xs, &cache.stats, params, rows);
    match &cache.subset {
        Some(s) => scatter_add_samples(dx, &dxs, &s.kept, sample, 1.0),
        None => crate::backend::cpu::elementwise::residual_add(&mut dx[..b * sample], &dxs, 1.0),
    }
}
