//! One residual branch of a transformer block on the GPU, as `nn::block` runs it:
//! `x[kept] += scale · LS(body(LN(x[kept])))`, with body = attention or MLP, and its backward.
//!
//! Buffers are sized for the whole batch once (see [`BranchBufs::new`]); a batch subset
//! (stochastic depth) uses the first `samples · t` rows of each. Precision: LayerNorm
//! statistics, GEMM outputs, biases and the residual stream are f32; GEMM operands and the
//! attention inputs/outputs are bf16.

use super::linear::{
    linear_backward, linear_forward, linear_forward_bf16, linear_gelu_forward, DoutF32, InputGrad,
};
use super::DeviceWeights;
use crate::backend::cuda::{
    bf16, AttentionShape, CudaBackend, GradWrite, NormShape, SampleSubset, SubSlice, SubSliceMut,
};
use crate::error::{Error, Result};
use crate::nn::attention::Attention;
use crate::nn::ffn::FfnLayer;
use crate::nn::layernorm::LayerNorm;
use crate::nn::mlp::Mlp;
use crate::nn::params::ParamRef;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// Counts the device allocations of a workspace (a test checks that a second step at the same
/// size makes none).
pub(crate) struct Allocator<'a> {
    pub gpu: &'a CudaBackend,
    pub count: usize,
}

impl Allocator<'_> {
    /// A zeroed buffer of `len` elements (at least one: CUDA refuses empty allocations; every
    /// launcher gets an exact-length window of it).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&mut self, len: usize) -> Result<CudaSlice<T>> {
        self.count += 1;
        self.gpu.alloc_zeros::<T>(len.max(1))
    }
}

/// The first `len` elements of `buf`.
pub(crate) fn head<'a, T>(
    gpu: &CudaBackend,
    buf: &'a CudaSlice<T>,
    len: usize,
) -> Result<SubSlice<'a, T>> {
    gpu.sub(buf, 0..len)
}

/// The first `len` elements of `buf`, writable.
pub(crate) fn head_mut<'a, T>(
    gpu: &CudaBackend,
    buf: &'a mut CudaSlice<T>,
    len: usize,
) -> Result<SubSliceMut<'a, T>> {
    gpu.sub_mut(buf, 0..len)
}

/// The body of a branch: the block's attention or its FFN.
#[derive(Clone, Copy)]
pub(crate) enum Body<'a> {
    Attention(&'a Attention),
    Mlp(&'a Mlp),
}

impl<'a> Body<'a> {
    /// The FFN of a block; SwiGLU has no GPU kernels yet.
    pub fn ffn(ffn: &'a FfnLayer) -> Result<Self> {
        match ffn {
            FfnLayer::Mlp(m) => Ok(Body::Mlp(m)),
            FfnLayer::SwiGlu(_) => Err(Error::Unsupported(
                "SwiGLU FFN (ViT-g) on the CUDA backend; use --device cpu".into(),
            )),
        }
    }
}

/// What a branch body keeps for backward.
pub(crate) enum BodyBufs {
    Attention {
        qkv: CudaSlice<bf16>, // [b·t, 3d] (= [b, t, 3, h, hd])
        att: CudaSlice<bf16>, // [b·t, d] attention output, proj input
        lse: CudaSlice<f32>,  // [b, h, t]
    },
    Mlp {
        pre: CudaSlice<f32>,  // [b·t, f] fc1 output + bias
        act: CudaSlice<bf16>, // [b·t, f] gelu(pre), fc2 input
    },
}

/// One residual branch's saved activations and this step's batch subset.
pub(crate) struct BranchBufs {
    /// `[b]` kept sample indices; the first `samples` are this step's when `subset` is set.
    pub kept: CudaSlice<i64>,
    /// This step's `(samples, scale)`; `None` = the whole batch with scale 1.
    pub subset: Option<(usize, f32)>,
    pub mean: CudaSlice<f32>,    // [b·t]
    pub rstd: CudaSlice<f32>,    // [b·t]
    pub ln_out: CudaSlice<bf16>, // [b·t, d]
    pub body: BodyBufs,
    pub y: CudaSlice<f32>, // [b·t, d] branch output before LayerScale
}

impl BranchBufs {
    pub fn new(
        alloc: &mut Allocator<'_>,
        body: Body<'_>,
        b: usize,
        t: usize,
        d: usize,
    ) -> Result<Self> {
        let rows = b * t;
        let body = match body {
            Body::Attention(a) => BodyBufs::Attention {
                qkv: alloc.zeros(rows * 3 * d)?,
                att: alloc.zeros(rows * d)?,
                lse: alloc.zeros(b * a.num_heads * t)?,
            },
            Body::Mlp(m) => BodyBufs::Mlp {
                pre: alloc.zeros(rows * m.fc1.out_dim)?,
                act: alloc.zeros(rows * m.fc1.out_dim)?,
            },
        };
        Ok(BranchBufs {
            kept: alloc.zeros(b)?,
            subset: None,
            mean: alloc.zeros(rows)?,
            rstd: alloc.zeros(rows)?,
            ln_out: alloc.zeros(rows * d)?,
            body,
            y: alloc.zeros(rows * d)?,
        })
    }

    /// Samples this step's branch runs on, and its output scale.
    pub fn samples(&self, b: usize) -> (usize, f32) {
        self.subset.unwrap_or((b, 1.0))
    }

    /// Sets this step's subset (`kept` sorted, from `drop_path::draw_subset`).
    pub fn set_subset(
        &mut self,
        gpu: &CudaBackend,
        subset: Option<&crate::nn::drop_path::Subset>,
    ) -> Result<()> {
        self.subset = match subset {
            None => None,
            Some(s) => {
                let kept: Vec<i64> = s.kept.iter().map(|&i| i as i64).collect();
                if kept.is_empty() || kept.len() > self.kept.len() {
                    return Err(Error::shape(
                        "cuda drop path",
                        format!(
                            "{} kept samples of a batch of {}",
                            kept.len(),
                            self.kept.len()
                        ),
                    ));
                }
                let mut dst = head_mut(gpu, &mut self.kept, kept.len())?;
                gpu.stream()
                    .memcpy_htod(&kept, &mut *dst)
                    .map_err(|e| crate::backend::cuda::cuda_error("cuMemcpyHtoD", e))?;
                Some((kept.len(), s.scale))
            }
        };
        Ok(())
    }
}

/// Two `[b·t, d]` f32 buffers that hold a branch's gathered input and output gradients.
pub(crate) struct RowScratch {
    pub a: CudaSlice<f32>, // [b·t, d]
    pub b: CudaSlice<f32>, // [b·t, d]
}

/// Temporaries of the branch bodies, shared by every block.
pub(crate) struct BodyScratch {
    pub wide: CudaSlice<f32>,         // [b·t, max(3d, f)]
    pub wide_bf16: CudaSlice<bf16>,   // [b·t, max(4d, f)]
    pub narrow: CudaSlice<f32>,       // [b·t, d] the body's input gradient
    pub narrow_bf16: CudaSlice<bf16>, // [b·t, d]
    pub delta: CudaSlice<f32>,        // [b, h, t]
}

impl BodyScratch {
    pub fn new(
        alloc: &mut Allocator<'_>,
        b: usize,
        t: usize,
        d: usize,
        widest: usize,
        heads: usize,
    ) -> Result<Self> {
        let rows = b * t;
        Ok(BodyScratch {
            wide: alloc.zeros(rows * widest)?,
            // The attention backward keeps dqkv [rows, 3d] and datt [rows, d] here at once.
            wide_bf16: alloc.zeros(rows * widest.max(4 * d))?,
            narrow: alloc.zeros(rows * d)?,
            narrow_bf16: alloc.zeros(rows * d)?,
            delta: alloc.zeros(b * heads * t)?,
        })
    }
}

/// Sizes of one branch call: `b` samples in the stream, `t` tokens, `d` channels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub d: usize,
}

/// LayerNorm of the branch input (unless a fused residual+LayerNorm already wrote `ln_out`),
/// then the body into `bufs.y`. `x_in [b, t, d]` is the residual stream the branch reads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn branch_forward(
    gpu: &CudaBackend,
    norm: &LayerNorm,
    body: Body<'_>,
    w: &DeviceWeights,
    bufs: &mut BranchBufs,
    rows_scratch: &mut RowScratch,
    scratch: &mut BodyScratch,
    x_in: &CudaSlice<f32>,
    dims: Dims,
    ln_done: bool,
) -> Result<()> {
    let Dims { b, t, d } = dims;
    let (bs, _) = bufs.samples(b);
    let rows = bs * t;
    if !ln_done {
        let weight = gpu.sub(&w.f32, norm.weight.range())?;
        let bias = gpu.sub(&w.f32, norm.bias.range())?;
        let mut ln_out = head_mut(gpu, &mut bufs.ln_out, rows * d)?;
        let mut mean = head_mut(gpu, &mut bufs.mean, rows)?;
        let mut rstd = head_mut(gpu, &mut bufs.rstd, rows)?;
        let shape = NormShape { rows, channels: d };
        match bufs.subset {
            Some(_) => {
                let mut gathered = head_mut(gpu, &mut rows_scratch.a, rows * d)?;
                let kept = head(gpu, &bufs.kept, bs)?;
                gpu.gather_samples_scaled(&mut gathered, x_in, &kept, b, t * d, 1.0)?;
                gpu.layernorm_forward(
                    &mut ln_out,
                    &mut mean,
                    &mut rstd,
                    &gathered,
                    &weight,
                    &bias,
                    shape,
                    norm.eps,
                )?;
            }
            None => gpu.layernorm_forward(
                &mut ln_out,
                &mut mean,
                &mut rstd,
                x_in,
                &weight,
                &bias,
                shape,
                norm.eps,
            )?,
        }
    }
    body_forward(gpu, body, w, bufs, scratch, dims)
}

/// The body of a branch from `bufs.ln_out` into `bufs.y` (`samples · t` rows).
pub(crate) fn body_forward(
    gpu: &CudaBackend,
    body: Body<'_>,
    w: &DeviceWeights,
    bufs: &mut BranchBufs,
    scratch: &mut BodyScratch,
    dims: Dims,
) -> Result<()> {
    let Dims { b, t, d } = dims;
    let (bs, _) = bufs.samples(b);
    let rows = bs * t;
    let ln_out = head(gpu, &bufs.ln_out, rows * d)?;
    let mut y = head_mut(gpu, &mut bufs.y, rows * d)?;
    match (body, &mut bufs.body) {
        (Body::Attention(attn), BodyBufs::Attention { qkv, att, lse }) => {
            let shape = attention_shape(attn, bs, t)?;
            {
                let mut qkv_f32 = head_mut(gpu, &mut scratch.wide, rows * 3 * d)?;
                let mut qkv_bf16 = head_mut(gpu, qkv, rows * 3 * d)?;
                linear_forward_bf16(
                    gpu,
                    &mut qkv_bf16,
                    &mut qkv_f32,
                    &ln_out,
                    &attn.qkv,
                    w,
                    rows,
                )?;
            }
            let qkv = head(gpu, qkv, rows * 3 * d)?;
            {
                let mut att = head_mut(gpu, att, rows * d)?;
                let mut lse = head_mut(gpu, lse, shape.stats_len())?;
                gpu.attention_forward(&mut att, &mut lse, &qkv, shape)?;
            }
            let att = head(gpu, att, rows * d)?;
            linear_forward(gpu, &mut y, &att, &attn.proj, w, rows)
        }
        (Body::Mlp(mlp), BodyBufs::Mlp { pre, act }) => {
            let f = mlp.fc1.out_dim;
            {
                let mut pre = head_mut(gpu, pre, rows * f)?;
                let mut act = head_mut(gpu, act, rows * f)?;
                linear_gelu_forward(gpu, &mut pre, &mut act, &ln_out, &mlp.fc1, w, rows)?;
            }
            let act = head(gpu, act, rows * f)?;
            linear_forward(gpu, &mut y, &act, &mlp.fc2, w, rows)
        }
        _ => Err(Error::Unsupported(
            "cuda branch: buffers built for another body".into(),
        )),
    }
}

/// What follows a branch's residual add, so the add can be fused with its LayerNorm.
pub(crate) enum Next<'a, 'b> {
    /// The next branch of the stack: its LayerNorm and buffers.
    Branch(&'a LayerNorm, &'b mut BranchBufs),
    /// The backbone's final LayerNorm into f32 `out [b·t, d]` with its statistics.
    FinalNorm {
        norm: &'a LayerNorm,
        out: &'b mut CudaSlice<f32>,
        mean: &'b mut CudaSlice<f32>,
        rstd: &'b mut CudaSlice<f32>,
    },
    /// Nothing to fuse.
    Nothing,
}

/// `x[kept] += scale · LS(y)`; when the branch covered the whole batch and the next LayerNorm
/// reads the whole stream, fused with it (one pass). Returns whether the next LayerNorm ran.
pub(crate) fn branch_residual(
    gpu: &CudaBackend,
    bufs: &BranchBufs,
    ls: Option<ParamRef>,
    w: &DeviceWeights,
    x: &mut CudaSlice<f32>,
    dims: Dims,
    next: Next<'_, '_>,
) -> Result<bool> {
    let Dims { b, t, d } = dims;
    let gamma = ls.map(|g| gpu.sub(&w.f32, g.range())).transpose()?;
    let rows = b * t;
    if bufs.subset.is_none() {
        let shape = NormShape { rows, channels: d };
        let y = head(gpu, &bufs.y, rows * d)?;
        match next {
            Next::Branch(norm, nb) if nb.subset.is_none() => {
                let weight = gpu.sub(&w.f32, norm.weight.range())?;
                let bias = gpu.sub(&w.f32, norm.bias.range())?;
                let mut out = head_mut(gpu, &mut nb.ln_out, rows * d)?;
                let mut mean = head_mut(gpu, &mut nb.mean, rows)?;
                let mut rstd = head_mut(gpu, &mut nb.rstd, rows)?;
                gpu.residual_layernorm_forward(
                    x,
                    &mut out,
                    &mut mean,
                    &mut rstd,
                    &y,
                    gamma.as_deref(),
                    &weight,
                    &bias,
                    shape,
                    norm.eps,
                )?;
                return Ok(true);
            }
            Next::FinalNorm {
                norm,
                out,
                mean,
                rstd,
            } => {
                let weight = gpu.sub(&w.f32, norm.weight.range())?;
                let bias = gpu.sub(&w.f32, norm.bias.range())?;
                gpu.residual_layernorm_forward(
                    x,
                    out,
                    mean,
                    rstd,
                    &y,
                    gamma.as_deref(),
                    &weight,
                    &bias,
                    shape,
                    norm.eps,
                )?;
                return Ok(true);
            }
            _ => {}
        }
    }
    let (bs, scale) = bufs.samples(b);
    let y = head(gpu, &bufs.y, bs * t * d)?;
    let kept = head(gpu, &bufs.kept, bs)?;
    let subset = SampleSubset {
        kept: bufs.subset.is_some().then_some(&*kept),
        samples: bs,
    };
    gpu.residual_add_samples(x, &y, gamma.as_deref(), subset, b, t * d, d, scale)?;
    Ok(false)
}

/// Backward of one branch: `dx [b, t, d]` (the residual gradient) gains the branch's input
/// gradient; parameter gradients accumulate into `grads`. `x_in` is the stream the branch read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn branch_backward(
    gpu: &mut CudaBackend,
    norm: &LayerNorm,
    ls: Option<ParamRef>,
    body: Body<'_>,
    w: &DeviceWeights,
    grads: &mut CudaSlice<f32>,
    bufs: &BranchBufs,
    rows_scratch: &mut RowScratch,
    scratch: &mut BodyScratch,
    dx: &mut CudaSlice<f32>,
    x_in: &CudaSlice<f32>,
    dims: Dims,
) -> Result<()> {
    let Dims { b, t, d } = dims;
    let (bs, scale) = bufs.samples(b);
    let rows = bs * t;
    let kept = head(gpu, &bufs.kept, bs)?;
    let y = head(gpu, &bufs.y, rows * d)?;
    // dy = scale · dx[kept] (a subset) or dx itself.
    {
        let mut dy_buf;
        let dy: &CudaSlice<f32> = match bufs.subset {
            Some(_) => {
                dy_buf = head_mut(gpu, &mut rows_scratch.a, rows * d)?;
                gpu.gather_samples_scaled(&mut dy_buf, dx, &kept, b, t * d, scale)?;
                &dy_buf
            }
            None => dx,
        };
        // The body's output gradient goes to its GEMMs in bf16 (scratch.narrow_bf16); in f32
        // it only serves a bias gradient that cuBLASLt cannot fuse.
        let mut dpre_bf16 = head_mut(gpu, &mut scratch.narrow_bf16, rows * d)?;
        match ls {
            Some(g) => {
                let gamma = gpu.sub(&w.f32, g.range())?;
                let mut dgamma = gpu.sub_mut(grads, g.range())?;
                gpu.layerscale_backward(&mut dpre_bf16, &mut dgamma, dy, &y, &gamma, rows, d)?;
                drop((dgamma, dpre_bf16));
                let mut widen = head_mut(gpu, &mut rows_scratch.b, rows * d)?;
                let dpre = DoutF32::Widen(&mut widen);
                body_backward(gpu, body, w, grads, bufs, scratch, dpre, bs, t, d)?;
            }
            None => {
                gpu.cast_f32_to_bf16(&mut dpre_bf16, dy)?;
                drop(dpre_bf16);
                let dpre = DoutF32::Ready(dy);
                body_backward(gpu, body, w, grads, bufs, scratch, dpre, bs, t, d)?;
            }
        }
    }
    // LayerNorm backward from dln (in scratch.narrow) to the stream.
    let dln = head(gpu, &scratch.narrow, rows * d)?;
    let weight = gpu.sub(&w.f32, norm.weight.range())?;
    let mean = head(gpu, &bufs.mean, rows)?;
    let rstd = head(gpu, &bufs.rstd, rows)?;
    let shape = NormShape { rows, channels: d };
    let [mut dweight, mut dbias] =
        gpu.sub_mut_disjoint(grads, [norm.weight.range(), norm.bias.range()])?;
    match bufs.subset {
        Some(_) => {
            let mut xs = head_mut(gpu, &mut rows_scratch.a, rows * d)?;
            gpu.gather_samples_scaled(&mut xs, x_in, &kept, b, t * d, 1.0)?;
            let mut dxs = head_mut(gpu, &mut rows_scratch.b, rows * d)?;
            gpu.layernorm_backward(
                &mut dxs,
                &mut dweight,
                &mut dbias,
                &dln,
                &xs,
                &weight,
                &mean,
                &rstd,
                shape,
                GradWrite::Overwrite,
            )?;
            let subset = SampleSubset {
                kept: Some(&kept),
                samples: bs,
            };
            gpu.residual_add_samples(dx, &dxs, None, subset, b, t * d, d, 1.0)
        }
        None => gpu.layernorm_backward(
            dx,
            &mut dweight,
            &mut dbias,
            &dln,
            x_in,
            &weight,
            &mean,
            &rstd,
            shape,
            GradWrite::Accumulate,
        ),
    }
}

/// Backward of the body from the gradient of the branch output before LayerScale (bf16 in
/// `scratch.narrow_bf16`, `[rows, d]`; `dpre` its f32 form for an unfused bias gradient) to
/// `scratch.narrow` (gradient of the LayerNorm output, written).
#[allow(clippy::too_many_arguments)]
pub(crate) fn body_backward(
    gpu: &mut CudaBackend,
    body: Body<'_>,
    w: &DeviceWeights,
    grads: &mut CudaSlice<f32>,
    bufs: &BranchBufs,
    scratch: &mut BodyScratch,
    dpre: DoutF32<'_>,
    bs: usize,
    t: usize,
    d: usize,
) -> Result<()> {
    let rows = bs * t;
    let ln_out = head(gpu, &bufs.ln_out, rows * d)?;
    match (body, &bufs.body) {
        (Body::Attention(attn), BodyBufs::Attention { qkv, att, lse }) => {
            let shape = attention_shape(attn, bs, t)?;
            let att = head(gpu, att, rows * d)?;
            // dqkv [rows, 3d] and datt [rows, d] side by side in wide_bf16 (see BodyScratch).
            let [mut dqkv, mut datt] = gpu.sub_mut_disjoint(
                &mut scratch.wide_bf16,
                [0..rows * 3 * d, rows * 3 * d..rows * 4 * d],
            )?;
            {
                // proj: datt = bf16(dpre · Wproj) for the attention backward.
                let dpre_bf16 = head(gpu, &scratch.narrow_bf16, rows * d)?;
                let mut datt_f32 = head_mut(gpu, &mut scratch.narrow, rows * d)?;
                let datt_grad = InputGrad::Bf16 {
                    out: &mut datt,
                    scratch: &mut datt_f32,
                };
                let proj = &attn.proj;
                linear_backward(gpu, datt_grad, grads, &dpre_bf16, dpre, &att, proj, w, rows)?;
            }
            {
                let qkv = head(gpu, qkv, rows * 3 * d)?;
                let lse = head(gpu, lse, shape.stats_len())?;
                let mut delta = head_mut(gpu, &mut scratch.delta, shape.stats_len())?;
                gpu.attention_backward(&mut dqkv, &mut delta, &datt, &qkv, &att, &lse, shape)?;
            }
            drop(datt);
            // The attention gradient is bf16; its f32 copy only serves an unfused bias sum.
            let mut dqkv_f32 = head_mut(gpu, &mut scratch.wide, rows * 3 * d)?;
            let mut dln = head_mut(gpu, &mut scratch.narrow, rows * d)?;
            linear_backward(
                gpu,
                InputGrad::F32(&mut dln),
                grads,
                &dqkv,
                DoutF32::Widen(&mut dqkv_f32),
                &ln_out,
                &attn.qkv,
                w,
                rows,
            )
        }
        (Body::Mlp(mlp), BodyBufs::Mlp { pre, act }) => {
            let f = mlp.fc1.out_dim;
            let pre = head(gpu, pre, rows * f)?;
            let act = head(gpu, act, rows * f)?;
            {
                let dpre_bf16 = head(gpu, &scratch.narrow_bf16, rows * d)?;
                let mut dact = head_mut(gpu, &mut scratch.wide, rows * f)?;
                linear_backward(
                    gpu,
                    InputGrad::F32(&mut dact),
                    grads,
                    &dpre_bf16,
                    dpre,
                    &act,
                    &mlp.fc2,
                    w,
                    rows,
                )?;
                let mut dfc1_bf16 = head_mut(gpu, &mut scratch.wide_bf16, rows * f)?;
                gpu.gelu_backward(&mut dfc1_bf16, &dact, &pre)?;
            }
            let dfc1_bf16 = head(gpu, &scratch.wide_bf16, rows * f)?;
            // dact is spent: its buffer takes fc1's output gradient in f32 if its bias needs it.
            let mut dfc1_f32 = head_mut(gpu, &mut scratch.wide, rows * f)?;
            let mut dln = head_mut(gpu, &mut scratch.narrow, rows * d)?;
            linear_backward(
                gpu,
                InputGrad::F32(&mut dln),
                grads,
                &dfc1_bf16,
                DoutF32::Widen(&mut dfc1_f32),
                &ln_out,
                &mlp.fc1,
                w,
                rows,
            )
        }
        _ => Err(Error::Unsupported(
            "cuda branch: buffers built for another body".into(),
        )),
    }
}

/// The fused attention's shape for `bs` sequences of `t` tokens.
pub(crate) fn attention_shape(attn: &Attention, bs: usize, t: usize) -> Result<AttentionShape> {
    if attn.num_heads == 0 || attn.dim % attn.num_heads != 0 {
        return Err(Error::shape(
            "cuda attention",
            format!("dim {} not divisible by {} heads", attn.dim, attn.num_heads),
        ));
    }
    Ok(AttentionShape {
        batch: bs,
        tokens: t,
        heads: attn.num_heads,
        head_dim: attn.dim / attn.num_heads,
    })
}
