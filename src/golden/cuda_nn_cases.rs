//! The backbone's golden cases on the GPU (`dinotrain verify --device cuda`): `layernorm`,
//! `attention`, `block`, `vit_forward`. Each parses its fixture like the CPU case
//! ([`super::nn_cases`]), runs the CUDA layers with the precision contract of DESIGN.md (bf16
//! GEMM operands and attention, f32 LayerNorm statistics, residual stream and outputs) and
//! returns the same `out.*` tensors. `pos_interp` stays a host computation in CUDA runs.

use super::nn_cases::{
    attention_module, block_config, dims3, input_shaped, load_params, param_grads, tensor,
    vit_masks,
};
use super::{out, Fixture, Outputs};
use crate::backend::cuda::model::branch::{
    body_backward, body_forward, Allocator, Body, BodyScratch, BranchBufs, Dims,
};
use crate::backend::cuda::model::linear::DoutF32;
use crate::backend::cuda::model::{DeviceWeights, GpuBlock, GpuVit, ImageGrad};
use crate::backend::cuda::{CudaBackend, GradWrite, NormShape};
use crate::error::{Error, Result};
use crate::nn::block::Block;
use crate::nn::layernorm::LayerNorm;
use crate::nn::params::ParamTable;
use crate::nn::vit::Vit;

pub fn compute(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    match fx.case.as_str() {
        "layernorm" => layernorm(fx, gpu),
        "attention" => attention(fx, gpu),
        "block" => block(fx, gpu),
        "vit_forward" => vit_forward(fx, gpu),
        other => Err(Error::Unsupported(format!(
            "golden case '{other}' has no CUDA backbone implementation"
        ))),
    }
}

/// LayerNorm forward (f32 output) and backward, all f32 on the GPU.
fn layernorm(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let eps = fx.param_f64("eps")? as f32;
    let mut table = ParamTable::new();
    let ln = LayerNorm::new(&mut table, "", d, eps);
    let params = load_params(fx, &table)?;
    let x = gpu.upload(&input_shaped(fx, "x", &[b, t, d])?.data)?;
    let dy = gpu.upload(&input_shaped(fx, "grad_out", &[b, t, d])?.data)?;
    let w = gpu.upload(&params)?;
    let rows = b * t;
    let shape = NormShape { rows, channels: d };
    let mut y = gpu.alloc_zeros::<f32>(rows * d)?;
    let mut mean = gpu.alloc_zeros::<f32>(rows)?;
    let mut rstd = gpu.alloc_zeros::<f32>(rows)?;
    let weight = gpu.sub(&w, ln.weight.range())?;
    let bias = gpu.sub(&w, ln.bias.range())?;
    gpu.layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &weight, &bias, shape, eps)?;
    let mut dx = gpu.alloc_zeros::<f32>(rows * d)?;
    let mut grads = gpu.alloc_zeros::<f32>(table.len())?;
    {
        let [mut dw, mut db] =
            gpu.sub_mut_disjoint(&mut grads, [ln.weight.range(), ln.bias.range()])?;
        gpu.layernorm_backward(
            &mut dx,
            &mut dw,
            &mut db,
            &dy,
            &x,
            &weight,
            &mean,
            &rstd,
            shape,
            GradWrite::Overwrite,
        )?;
    }
    let mut o = Outputs::new();
    out(&mut o, "out", tensor(&[b, t, d], gpu.download(&y)?)?);
    out(&mut o, "grad.x", tensor(&[b, t, d], gpu.download(&dx)?)?);
    param_grads(&mut o, &table, &gpu.download(&grads)?);
    Ok(o)
}

/// The attention module alone: input rounded to bf16 (it is a GEMM operand), qkv, fused
/// attention, proj; backward to the input.
fn attention(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let (table, attn) = attention_module(fx, d)?;
    let heads = attn.num_heads;
    let params = load_params(fx, &table)?;
    let x = gpu.upload(&input_shaped(fx, "x", &[b, t, d])?.data)?;
    let dy = gpu.upload(&input_shaped(fx, "grad_out", &[b, t, d])?.data)?;
    let w = DeviceWeights::upload(gpu, &params)?;
    let body = Body::Attention(&attn);
    let mut alloc = Allocator { gpu, count: 0 };
    let mut bufs = BranchBufs::new(&mut alloc, body, b, t, d)?;
    let mut scratch = BodyScratch::new(&mut alloc, b, t, d, 3 * d, heads)?;
    let dims = Dims { b, t, d };
    gpu.cast_f32_to_bf16(&mut bufs.ln_out, &x)?;
    body_forward(gpu, body, &w, &mut bufs, &mut scratch, dims)?;
    let mut grads = gpu.alloc_zeros::<f32>(table.len())?;
    // The body reads its output gradient in bf16 (from the LayerScale pass in a block).
    gpu.cast_f32_to_bf16(&mut scratch.narrow_bf16, &dy)?;
    let dpre = DoutF32::Ready(&dy);
    body_backward(
        gpu,
        body,
        &w,
        &mut grads,
        &bufs,
        &mut scratch,
        dpre,
        b,
        t,
        d,
    )?;
    let mut o = Outputs::new();
    out(&mut o, "out", tensor(&[b, t, d], gpu.download(&bufs.y)?)?);
    out(
        &mut o,
        "grad.x",
        tensor(&[b, t, d], gpu.download(&scratch.narrow)?)?,
    );
    param_grads(&mut o, &table, &gpu.download(&grads)?);
    Ok(o)
}

fn block(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let cfg = block_config(fx, d)?;
    let mut table = ParamTable::new();
    let blk = Block::new(&mut table, "", &cfg);
    let params = load_params(fx, &table)?;
    let w = DeviceWeights::upload(gpu, &params)?;
    let mut x = gpu.upload(&input_shaped(fx, "x", &[b, t, d])?.data)?;
    let mut dx = gpu.upload(&input_shaped(fx, "grad_out", &[b, t, d])?.data)?;
    let mut runner = GpuBlock::new(gpu, &blk, b, t)?;
    runner.forward(gpu, &blk, &w, &mut x, [None, None])?;
    let mut grads = gpu.alloc_zeros::<f32>(table.len())?;
    runner.backward(gpu, &blk, &w, &mut grads, &mut dx)?;
    let mut o = Outputs::new();
    out(&mut o, "out", tensor(&[b, t, d], gpu.download(&x)?)?);
    out(&mut o, "grad.x", tensor(&[b, t, d], gpu.download(&dx)?)?);
    param_grads(&mut o, &table, &gpu.download(&grads)?);
    Ok(o)
}

fn vit_forward(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let cfg = super::step_case::vit_config(fx)?;
    let d = cfg.embed_dim;
    let (b, h, w_px) = (
        fx.param_usize("batch")?,
        fx.param_usize("input_h")?,
        fx.param_usize("input_w")?,
    );
    let (c, r) = (cfg.in_chans, cfg.num_register_tokens);
    let mut table = ParamTable::new();
    let vit = Vit::new(&cfg, &mut table, "");
    let params = load_params(fx, &table)?;
    let w = DeviceWeights::upload(gpu, &params)?;
    let images = input_shaped(fx, "images", &[b, c, h, w_px])?;
    let n = (h / cfg.patch_size) * (w_px / cfg.patch_size);
    let masks = vit_masks(fx, b, n)?;
    let mut gvit = GpuVit::new(&vit);
    let y = gvit.forward(
        gpu,
        &vit,
        &w,
        &images.data,
        b,
        h,
        w_px,
        masks.as_deref(),
        None,
    )?;
    let mut o = Outputs::new();
    out(
        &mut o,
        "x_norm_clstoken",
        tensor(&[b, d], gpu.download(&y.cls)?)?,
    );
    out(
        &mut o,
        "x_norm_patchtokens",
        tensor(&[b, n, d], gpu.download(&y.patch)?)?,
    );
    if let Some(reg) = &y.reg {
        out(
            &mut o,
            "x_norm_regtokens",
            tensor(&[b, r, d], gpu.download(reg)?)?,
        );
    }
    let d_cls = gpu.upload(&input_shaped(fx, "grad_x_norm_clstoken", &[b, d])?.data)?;
    let d_patch = gpu.upload(&input_shaped(fx, "grad_x_norm_patchtokens", &[b, n, d])?.data)?;
    let d_reg = if r > 0 {
        Some(gpu.upload(&input_shaped(fx, "grad_x_norm_regtokens", &[b, r, d])?.data)?)
    } else {
        None
    };
    let mut grads = gpu.alloc_zeros::<f32>(table.len())?;
    let dimages = gvit
        .backward_with(
            gpu,
            &vit,
            &w,
            &mut grads,
            (b, h, w_px),
            &d_cls,
            &d_patch,
            d_reg.as_ref(),
            ImageGrad::Compute,
        )?
        .ok_or_else(|| Error::Unsupported("cuda vit backward returned no image gradient".into()))?;
    out(&mut o, "grad.images", tensor(&[b, c, h, w_px], dimages)?);
    param_grads(&mut o, &table, &gpu.download(&grads)?);
    Ok(o)
}
