//! `nn::Linear` on the GPU: bf16 operands (the weights' bf16 copy), f32 output and bias. The
//! bias rides in the GEMM's epilogue where cuBLASLt can (forward: added to the output; backward:
//! summed from `dout` by the weight-gradient GEMM), else it takes a separate pass.

use super::DeviceWeights;
use crate::backend::cpu::{Accumulate, Transpose};
use crate::backend::cuda::{bf16, CudaBackend, EpilogueRun, LtOutcome};
use crate::error::Result;
use crate::nn::linear::Linear;
use cudarc::driver::CudaSlice;

/// `out [rows, out] = inp [rows, in] · Wᵀ + b`.
pub(crate) fn linear_forward(
    gpu: &CudaBackend,
    out: &mut CudaSlice<f32>,
    inp: &CudaSlice<bf16>,
    lin: &Linear,
    w: &DeviceWeights,
    rows: usize,
) -> Result<()> {
    let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
    let bias = lin.bias.map(|b| gpu.sub(&w.f32, b.range())).transpose()?; // [out]
    let (k, n) = (lin.in_dim, lin.out_dim);
    gpu.matmul_bf16_bias(
        out,
        inp,
        &weight,
        Transpose::Yes,
        bias.as_deref(),
        rows,
        k,
        n,
    )
}

/// [`linear_forward`] rounded to bf16 for a consumer that reads bf16 only: straight from the
/// GEMM where cuBLASLt can (bias in its epilogue), else through the f32 `scratch [rows, out]`
/// and a cast. Either way the f32 result (bias included) is rounded once.
pub(crate) fn linear_forward_bf16(
    gpu: &CudaBackend,
    out: &mut CudaSlice<bf16>,
    scratch: &mut CudaSlice<f32>,
    inp: &CudaSlice<bf16>,
    lin: &Linear,
    w: &DeviceWeights,
    rows: usize,
) -> Result<()> {
    let direct = {
        let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
        let bias = lin.bias.map(|b| gpu.sub(&w.f32, b.range())).transpose()?;
        gpu.matmul_bf16_to_bf16(
            out,
            inp,
            &weight,
            Transpose::Yes,
            bias.as_deref(),
            rows,
            lin.in_dim,
            lin.out_dim,
        )?
    };
    if direct == LtOutcome::Unsupported {
        linear_forward(gpu, scratch, inp, lin, w, rows)?;
        gpu.cast_f32_to_bf16(out, scratch)?;
    }
    Ok(())
}

/// fc1 and its GELU: `pre [rows, out] = inp · Wᵀ + b` (f32, kept for the backward) and
/// `act = bf16(gelu(pre))`. The bias rides in the GEMM's epilogue where cuBLASLt can, else in
/// the GELU pass; either way one pass follows the GEMM.
pub(crate) fn linear_gelu_forward(
    gpu: &CudaBackend,
    pre: &mut CudaSlice<f32>,
    act: &mut CudaSlice<bf16>,
    inp: &CudaSlice<bf16>,
    lin: &Linear,
    w: &DeviceWeights,
    rows: usize,
) -> Result<()> {
    let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
    let bias = lin.bias.map(|b| gpu.sub(&w.f32, b.range())).transpose()?;
    let (k, n) = (lin.in_dim, lin.out_dim);
    let run = gpu.matmul_bf16_try_bias(
        pre,
        inp,
        &weight,
        Transpose::Yes,
        bias.as_deref(),
        rows,
        k,
        n,
    )?;
    let left = match run {
        EpilogueRun::Fused => None,
        EpilogueRun::Separate => bias.as_deref(),
    };
    gpu.bias_gelu_forward(pre, act, left, rows, n)
}

/// Where the separate bias-gradient pass finds `dout` in f32, needed only when cuBLASLt
/// cannot fuse the bias gradient into the weight-gradient GEMM.
pub(crate) enum DoutF32<'a> {
    /// The caller has it already (its gradient was f32 before the bf16 cast).
    Ready(&'a CudaSlice<f32>),
    /// Widened from the bf16 `dout` into this `[rows, out]` buffer, only if needed.
    Widen(&'a mut CudaSlice<f32>),
}

/// Where a linear layer's input gradient `dinp [rows, in] = dout · W` goes.
pub(crate) enum InputGrad<'a> {
    /// Not needed (the first layer of a model).
    Skip,
    /// f32, written.
    F32(&'a mut CudaSlice<f32>),
    /// bf16 for a consumer that reads bf16 only (the attention backward): straight from the
    /// GEMM where cuBLASLt can, else through the f32 `scratch` and a cast.
    Bf16 {
        out: &'a mut CudaSlice<bf16>,
        scratch: &'a mut CudaSlice<f32>,
    },
}

/// Backward: the input gradient `dinp = dout · W` (see [`InputGrad`]), `dW += doutᵀ · inp`,
/// `db += Σ_rows dout` (fused into the `dW` GEMM where cuBLASLt can, else from `dout_f32`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    gpu: &mut CudaBackend,
    dinp: InputGrad<'_>,
    grads: &mut CudaSlice<f32>,
    dout: &CudaSlice<bf16>,
    dout_f32: DoutF32<'_>,
    inp: &CudaSlice<bf16>,
    lin: &Linear,
    w: &DeviceWeights,
    rows: usize,
) -> Result<()> {
    let overwrite = Accumulate::Overwrite;
    match dinp {
        InputGrad::Skip => {}
        InputGrad::F32(dinp) => linear_input_grad(gpu, dinp, dout, lin, w, rows, overwrite)?,
        InputGrad::Bf16 { out, scratch } => {
            let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
            let (k, n) = (lin.in_dim, lin.out_dim);
            let direct =
                gpu.matmul_bf16_to_bf16(out, dout, &weight, Transpose::No, None, rows, n, k)?;
            if direct == LtOutcome::Unsupported {
                linear_input_grad(gpu, scratch, dout, lin, w, rows, overwrite)?;
                gpu.cast_f32_to_bf16(out, scratch)?;
            }
        }
    }
    linear_param_grads(gpu, grads, lin, dout, dout_f32, inp, rows)
}

/// The input half of the backward: `dinp [rows, in] (=|+=) dout · W`, f32.
pub(crate) fn linear_input_grad(
    gpu: &CudaBackend,
    dinp: &mut CudaSlice<f32>,
    dout: &CudaSlice<bf16>,
    lin: &Linear,
    w: &DeviceWeights,
    rows: usize,
    write: Accumulate,
) -> Result<()> {
    let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
    gpu.matmul_bf16(
        dinp,
        dout,
        Transpose::No,
        &weight,
        Transpose::No,
        rows,
        lin.out_dim,
        lin.in_dim,
        write,
    )
}

/// The parameter half of the backward: `dW += doutᵀ · inp`, `db += Σ_rows dout` (fused into
/// the `dW` GEMM where cuBLASLt can, else from `dout_f32`).
pub(crate) fn linear_param_grads(
    gpu: &mut CudaBackend,
    grads: &mut CudaSlice<f32>,
    lin: &Linear,
    dout: &CudaSlice<bf16>,
    dout_f32: DoutF32<'_>,
    inp: &CudaSlice<bf16>,
    rows: usize,
) -> Result<()> {
    let (k, n) = (lin.in_dim, lin.out_dim);
    let weight_grad = |gpu: &mut CudaBackend, dw: &mut CudaSlice<f32>, db| {
        gpu.matmul_bf16_with_row_sums(
            dw,
            dout,
            Transpose::Yes,
            inp,
            Transpose::No,
            n,
            rows,
            k,
            Accumulate::Add,
            db,
        )
    };
    let Some(b) = lin.bias else {
        let mut dw = gpu.sub_mut(grads, lin.weight.range())?;
        return weight_grad(gpu, &mut dw, None).map(drop);
    };
    let [mut dw, mut db] = gpu.sub_mut_disjoint(grads, [lin.weight.range(), b.range()])?;
    if weight_grad(gpu, &mut dw, Some(&mut db))? == EpilogueRun::Separate {
        let dout_f32 = match dout_f32 {
            DoutF32::Ready(ready) => ready,
            DoutF32::Widen(buf) => {
                gpu.cast_bf16_to_f32(buf, dout)?;
                &*buf
            }
        };
        gpu.bias_backward(&mut db, dout_f32, rows, n)?;
    }
    Ok(())
}
