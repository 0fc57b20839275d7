//! `nn::Linear` on the GPU: bf16 operands (the weights' bf16 copy), f32 output and bias. The
//! bias rides in the GEMM's epilogue where cuBLASLt can (forward: added to the output; backward:
//! summed from `dout` by the weight-gradient GEMM), else it takes a separate pass.

use super::DeviceWeights;
use crate::backend::cpu::{Accumulate, Transpose};
use crate::backend::cuda::{bf16, CudaBackend, EpilogueRun};
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
    let Some(b) = lin.bias else {
        return linear_matmul(gpu, out, inp, lin, w, rows);
    };
    let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
    let bias = gpu.sub(&w.f32, b.range())?; // [out]
    gpu.matmul_bf16_bias(
        out,
        inp,
        &weight,
        Transpose::Yes,
        &bias,
        rows,
        lin.in_dim,
        lin.out_dim,
    )
}

/// `out [rows, out] = inp [rows, in] · Wᵀ` without the bias (a fused epilogue adds it).
pub(crate) fn linear_matmul(
    gpu: &CudaBackend,
    out: &mut CudaSlice<f32>,
    inp: &CudaSlice<bf16>,
    lin: &Linear,
    w: &DeviceWeights,
    rows: usize,
) -> Result<()> {
    let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
    gpu.matmul_bf16(
        out,
        inp,
        Transpose::No,
        &weight,
        Transpose::Yes,
        rows,
        lin.in_dim,
        lin.out_dim,
        Accumulate::Overwrite,
    )
}

/// Backward: `dinp [rows, in] = dout · W` (written; skipped when `None`), `dW += doutᵀ · inp`,
/// `db += Σ_rows dout`. `dout` comes twice: bf16 for the GEMMs (and the fused bias sum), f32
/// for the separate bias sum when cuBLASLt cannot fuse it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    gpu: &mut CudaBackend,
    dinp: Option<&mut CudaSlice<f32>>,
    grads: &mut CudaSlice<f32>,
    dout: &CudaSlice<bf16>,
    dout_f32: &CudaSlice<f32>,
    inp: &CudaSlice<bf16>,
    lin: &Linear,
    w: &DeviceWeights,
    rows: usize,
) -> Result<()> {
    let (k, n) = (lin.in_dim, lin.out_dim);
    if let Some(dinp) = dinp {
        let weight = gpu.sub(&w.bf16, lin.weight.range())?; // [out, in]
        gpu.matmul_bf16(
            dinp,
            dout,
            Transpose::No,
            &weight,
            Transpose::No,
            rows,
            n,
            k,
            Accumulate::Overwrite,
        )?;
    }
    let Some(b) = lin.bias else {
        let mut dw = gpu.sub_mut(grads, lin.weight.range())?;
        return gpu.matmul_bf16(
            &mut dw,
            dout,
            Transpose::Yes,
            inp,
            Transpose::No,
            n,
            rows,
            k,
            Accumulate::Add,
        );
    };
    let [mut dw, mut db] = gpu.sub_mut_disjoint(grads, [lin.weight.range(), b.range()])?;
    let run = gpu.matmul_bf16_row_sums(
        &mut dw,
        dout,
        Transpose::Yes,
        inp,
        Transpose::No,
        n,
        rows,
        k,
        Accumulate::Add,
        &mut db,
    )?;
    if run == EpilogueRun::Separate {
        gpu.bias_backward(&mut db, dout_f32, rows, n)?;
    }
    Ok(())
}
