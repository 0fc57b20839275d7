//! One residual branch of a transformer block: `x[kept] += scale · LS(body(LN(x[kept])))`,
//! with body = attention or FFN, and its backward, over the backend seam.
//!
//! Buffers are sized for the whole batch once (see [`BranchBufs::new`]); a batch subset
//! (stochastic depth) uses the first `samples · t` rows of each. Precision: LayerNorm
//! statistics, the branch output, biases and the residual stream are f32; the LayerNorm output
//! and the gradients that only feed GEMMs are operands ([`crate::backend::Buffers::Half`]).

use super::attention::{Attention, AttnBufs, AttnScratch};
use super::drop_path::Subset;
use super::ffn::{FfnBufs, FfnLayer};
use super::layernorm::LayerNorm;
use super::params::ParamRef;
use crate::backend::{
    Accumulate, Backend, LnSaved, LnStats, NormOut, NormShape, Residual, SampleSubset, Storage,
    WeightStore,
};
use crate::error::{Error, Result};

/// Sizes of one branch call: `b` samples in the stream, `t` tokens, `d` channels.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub d: usize,
}

/// The body of a branch: the block's attention or its FFN.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Attention(&'a Attention),
    Ffn(&'a FfnLayer),
}

/// What a branch body keeps for backward.
pub enum BodyBufs<B: Backend> {
    Attention(AttnBufs<B>),
    Ffn(FfnBufs<B>),
}

/// One residual branch's saved activations and this step's batch subset.
pub struct BranchBufs<B: Backend> {
    /// `[b]` kept sample indices; the first `samples` are this step's when `subset` is set.
    kept: B::BufI64,
    /// This step's `(samples, scale)`; `None` = the whole batch with scale 1.
    subset: Option<(usize, f32)>,
    mean: B::BufF32,    // [b·t]
    rstd: B::BufF32,    // [b·t]
    ln_out: B::BufHalf, // [b·t, d]
    body: BodyBufs<B>,
    y: B::BufF32, // [b·t, d] branch output before LayerScale
}

impl<B: Backend> BranchBufs<B> {
    pub fn new(be: &mut B, body: Body<'_>, dims: Dims) -> Result<Self> {
        let Dims { b, t, d } = dims;
        let rows = b * t;
        let body = match body {
            Body::Attention(a) => BodyBufs::Attention(a.bufs(be, b, t)?),
            Body::Ffn(f) => BodyBufs::Ffn(f.bufs(be, rows)?),
        };
        Ok(BranchBufs {
            kept: be.alloc_i64(b)?,
            subset: None,
            mean: be.alloc_f32(rows)?,
            rstd: be.alloc_f32(rows)?,
            ln_out: be.alloc_half(rows * d)?,
            body,
            y: be.alloc_f32(rows * d)?,
        })
    }

    /// Samples this step's branch runs on, and its output scale.
    pub fn samples(&self, b: usize) -> (usize, f32) {
        self.subset.unwrap_or((b, 1.0))
    }

    /// Sets this step's subset (`kept` sorted, from `drop_path::draw_subset`).
    pub fn set_subset(&mut self, be: &mut B, subset: Option<&Subset>) -> Result<()> {
        self.subset = match subset {
            None => None,
            Some(s) => {
                let kept: Vec<i64> = s.kept.iter().map(|&i| i as i64).collect();
                if kept.is_empty() || kept.len() > self.kept.len() {
                    return Err(Error::shape(
                        "drop path",
                        format!(
                            "{} kept samples of a batch of {}",
                            kept.len(),
                            self.kept.len()
                        ),
                    ));
                }
                be.upload_i64(&mut self.kept, &kept)?;
                Some((kept.len(), s.scale))
            }
        };
        Ok(())
    }

    /// The branch input's LayerNorm output (an operand) and the branch output (f32).
    pub fn ln_out(&self) -> &B::Half {
        &self.ln_out
    }

    pub fn y(&self) -> &B::F32 {
        &self.y
    }
}

/// Two `[b·t, d]` f32 buffers for a branch's gathered input and output gradients.
pub struct RowScratch<B: Backend> {
    a: B::BufF32,
    b: B::BufF32,
}

impl<B: Backend> RowScratch<B> {
    pub fn new(be: &mut B, dims: Dims) -> Result<Self> {
        let n = dims.b * dims.t * dims.d;
        Ok(RowScratch {
            a: be.alloc_f32(n)?,
            b: be.alloc_f32(n)?,
        })
    }
}

/// Temporaries of the branch bodies' backward, shared by every branch of a stack.
pub struct BodyScratch<B: Backend> {
    pub wide: B::BufF32,         // [b·t, FFN f32 width]
    pub wide_half: B::BufHalf,   // [b·t, max(4d, FFN operand width)]: attention's dqkv | datt
    pub narrow: B::BufF32,       // [b·t, d] the body's input gradient
    pub narrow_half: B::BufHalf, // [b·t, d] the body's output gradient as an operand
}

impl<B: Backend> BodyScratch<B> {
    /// Scratch for branches of `dims` whose FFN is `ffn` (none: attention only).
    pub fn new(be: &mut B, dims: Dims, ffn: Option<&FfnLayer>) -> Result<Self> {
        let rows = dims.b * dims.t;
        let (fw, hw) = ffn.map_or((0, 0), FfnLayer::scratch_widths);
        Ok(BodyScratch {
            wide: be.alloc_f32(rows * fw)?,
            wide_half: be.alloc_half(rows * hw.max(4 * dims.d))?,
            narrow: be.alloc_f32(rows * dims.d)?,
            narrow_half: be.alloc_half(rows * dims.d)?,
        })
    }
}

/// LayerNorm of the branch input (unless a fused residual + LayerNorm already wrote `ln_out`),
/// then the body into `bufs.y`. `x_in [b, t, d]` is the residual stream the branch reads.
#[allow(clippy::too_many_arguments)]
pub fn branch_forward<B: Backend>(
    be: &mut B,
    norm: &LayerNorm,
    body: Body<'_>,
    w: &B::Weights,
    bufs: &mut BranchBufs<B>,
    rows_scratch: &mut RowScratch<B>,
    x_in: &B::F32,
    dims: Dims,
    ln_done: bool,
) -> Result<()> {
    let Dims { b, t, d } = dims;
    let (bs, _) = bufs.samples(b);
    let rows = bs * t;
    if !ln_done {
        let mut ln_out = bufs.ln_out.head_mut(rows * d)?;
        let mut mean = bufs.mean.head_mut(rows)?;
        let mut rstd = bufs.rstd.head_mut(rows)?;
        let shape = NormShape { rows, channels: d };
        let mut gathered;
        let input: &B::F32 = match bufs.subset {
            Some(_) => {
                gathered = rows_scratch.a.head_mut(rows * d)?;
                let kept = bufs.kept.head(bs)?;
                be.gather_samples_scaled(&mut gathered, x_in, &kept, t * d, 1.0)?;
                &gathered
            }
            None => x_in,
        };
        norm.with_params::<B, _>(w, |p| {
            let stats = LnStats {
                mean: &mut *mean,
                rstd: &mut *rstd,
            };
            be.layernorm_forward(NormOut::Half(&mut *ln_out), stats, input, p, shape)
        })?;
    }
    // The body from `ln_out` into `y`.
    let ln_out = bufs.ln_out.head(rows * d)?;
    let mut y = bufs.y.head_mut(rows * d)?;
    match (body, &mut bufs.body) {
        (Body::Attention(attn), BodyBufs::Attention(a)) => {
            attn.forward(be, a, &mut y, &ln_out, w, (bs, t))
        }
        (Body::Ffn(ffn), BodyBufs::Ffn(f)) => ffn.forward(be, f, &mut y, &ln_out, w, rows),
        _ => Err(other_body()),
    }
}

/// What follows a branch's residual add, so the add can be fused with its LayerNorm.
pub enum Next<'a, 'b, B: Backend> {
    /// The next branch of the stack: its LayerNorm and buffers.
    Branch(&'a LayerNorm, &'b mut BranchBufs<B>),
    /// The backbone's final LayerNorm into f32 `out [b·t, d]` with its statistics.
    FinalNorm {
        norm: &'a LayerNorm,
        out: &'b mut B::F32,
        mean: &'b mut B::F32,
        rstd: &'b mut B::F32,
    },
    /// Nothing to fuse.
    Nothing,
}

/// `x[kept] += scale · LS(y)`; when the branch covered the whole batch and the next LayerNorm
/// reads the whole stream, fused with it (one pass). Returns whether the next LayerNorm ran.
pub fn branch_residual<B: Backend>(
    be: &mut B,
    bufs: &BranchBufs<B>,
    ls: Option<ParamRef>,
    w: &B::Weights,
    x: &mut B::F32,
    dims: Dims,
    next: Next<'_, '_, B>,
) -> Result<bool> {
    let Dims { b, t, d } = dims;
    let gamma = ls.map(|g| w.f32().window(g.range())).transpose()?;
    let rows = b * t;
    let shape = NormShape { rows, channels: d };
    if bufs.subset.is_none() {
        let y = bufs.y.head(rows * d)?;
        let res = Residual {
            stream: x,
            branch: &*y,
            gamma: gamma.as_deref(),
        };
        match next {
            Next::Branch(norm, nb) if nb.subset.is_none() => {
                let mut out = nb.ln_out.head_mut(rows * d)?;
                let mut mean = nb.mean.head_mut(rows)?;
                let mut rstd = nb.rstd.head_mut(rows)?;
                let stats = LnStats {
                    mean: &mut *mean,
                    rstd: &mut *rstd,
                };
                norm.with_params::<B, _>(w, |p| {
                    be.residual_layernorm_forward(res, NormOut::Half(&mut *out), stats, p, shape)
                })?;
                return Ok(true);
            }
            Next::FinalNorm {
                norm,
                out,
                mean,
                rstd,
            } => {
                let stats = LnStats { mean, rstd };
                norm.with_params::<B, _>(w, |p| {
                    be.residual_layernorm_forward(res, NormOut::F32(out), stats, p, shape)
                })?;
                return Ok(true);
            }
            _ => {}
        }
    }
    let (bs, scale) = bufs.samples(b);
    let y = bufs.y.head(bs * t * d)?;
    let kept = bufs.kept.head(bs)?;
    let subset = SampleSubset {
        kept: bufs.subset.is_some().then_some(&*kept),
        samples: bs,
        batch: b,
        sample_len: t * d,
        channels: d,
    };
    be.residual_add_samples(x, &y, gamma.as_deref(), subset, scale)?;
    Ok(false)
}

/// The parts of one branch backward: its LayerNorm, LayerScale and body.
pub struct BranchParts<'a> {
    pub norm: &'a LayerNorm,
    pub ls: Option<ParamRef>,
    pub body: Body<'a>,
}

/// Backward of one branch: `dx [b, t, d]` (the residual gradient) gains the branch's input
/// gradient; parameter gradients accumulate into `grads`. `x_in` is the stream the branch read.
#[allow(clippy::too_many_arguments)]
pub fn branch_backward<B: Backend>(
    be: &mut B,
    parts: BranchParts<'_>,
    w: &B::Weights,
    grads: &mut B::F32,
    bufs: &BranchBufs<B>,
    (rows_scratch, scratch): (&mut RowScratch<B>, &mut BodyScratch<B>),
    dx: &mut B::F32,
    x_in: &B::F32,
    dims: Dims,
) -> Result<()> {
    let Dims { b, t, d } = dims;
    let (bs, scale) = bufs.samples(b);
    let rows = bs * t;
    let kept = bufs.kept.head(bs)?;
    let y = bufs.y.head(rows * d)?;
    let shape = NormShape { rows, channels: d };
    // dy = scale · dx[kept] (a subset) or dx itself.
    {
        let mut dy_buf;
        let dy: &B::F32 = match bufs.subset {
            Some(_) => {
                dy_buf = rows_scratch.a.head_mut(rows * d)?;
                be.gather_samples_scaled(&mut dy_buf, dx, &kept, t * d, scale)?;
                &dy_buf
            }
            None => dx,
        };
        // The body's output gradient goes to its GEMMs as an operand; in f32 it only serves a
        // bias gradient the backend cannot sum inside the GEMM.
        let dy_f32 = {
            let mut dpre = scratch.narrow_half.head_mut(rows * d)?;
            match parts.ls {
                Some(g) => {
                    let gamma = w.f32().window(g.range())?;
                    let mut dgamma = grads.window_mut(g.range())?;
                    be.layerscale_backward(&mut dpre, &mut dgamma, dy, &y, &gamma, shape)?;
                    None
                }
                None => {
                    be.cast_to_half(&mut dpre, dy)?;
                    Some(dy)
                }
            }
        };
        // The body's backward into `scratch.narrow` (the gradient of the LayerNorm output).
        let ln_out = bufs.ln_out.head(rows * d)?;
        let dy = scratch.narrow_half.head(rows * d)?;
        let mut dln = scratch.narrow.head_mut(rows * d)?;
        let dy = (&*dy, dy_f32);
        match (parts.body, &bufs.body) {
            (Body::Attention(attn), BodyBufs::Attention(a)) => {
                let [mut dqkv, mut datt] = scratch
                    .wide_half
                    .windows_mut([0..rows * 3 * d, rows * 3 * d..rows * 4 * d])?;
                let s = AttnScratch {
                    dqkv: &mut *dqkv,
                    datt: &mut *datt,
                };
                attn.backward(be, grads, &mut dln, s, dy, a, &ln_out, w, (bs, t))?
            }
            (Body::Ffn(ffn), BodyBufs::Ffn(f)) => {
                let wide = (&mut *scratch.wide, &mut *scratch.wide_half);
                ffn.backward(be, grads, &mut dln, wide, dy, f, &ln_out, w, rows)?
            }
            _ => return Err(other_body()),
        }
    }
    // LayerNorm backward from dln (in scratch.narrow) to the stream.
    let dln = scratch.narrow.head(rows * d)?;
    let weight = w.f32().window(parts.norm.weight.range())?;
    let mean = bufs.mean.head(rows)?;
    let rstd = bufs.rstd.head(rows)?;
    let [mut dweight, mut dbias] =
        grads.windows_mut([parts.norm.weight.range(), parts.norm.bias.range()])?;
    match bufs.subset {
        Some(_) => {
            let mut xs = rows_scratch.a.head_mut(rows * d)?;
            be.gather_samples_scaled(&mut xs, x_in, &kept, t * d, 1.0)?;
            let mut dxs = rows_scratch.b.head_mut(rows * d)?;
            let saved = LnSaved {
                dout: &*dln,
                inp: &*xs,
                weight: &*weight,
                mean: &*mean,
                rstd: &*rstd,
            };
            be.layernorm_backward(
                &mut dxs,
                Accumulate::Overwrite,
                &mut dweight,
                &mut dbias,
                saved,
                shape,
            )?;
            let subset = SampleSubset {
                kept: Some(&*kept),
                samples: bs,
                batch: b,
                sample_len: t * d,
                channels: d,
            };
            be.residual_add_samples(dx, &dxs, None, subset, 1.0)
        }
        None => {
            let saved = LnSaved {
                dout: &*dln,
                inp: x_in,
                weight: &*weight,
                mean: &*mean,
                rstd: &*rstd,
            };
            be.layernorm_backward(dx, Accumulate::Add, &mut dweight, &mut dbias, saved, shape)
        }
    }
}

fn other_body() -> Error {
    Error::Unsupported("branch: buffers built for another body".into())
}
