//! Launchers of `kernels/layernorm.cu`: LayerNorm forward (optionally fused with the
//! LayerScale residual add) and backward. f32 statistics; output bf16 or f32.

use super::{blocks, check_len, config, dim, launch, row_chunks, GradWrite, BLOCK, ROWS_PER_BLOCK};
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::backend::NormShape;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};

/// Element types a LayerNorm may write: bf16 (GEMM inputs) or f32 (final norm, heads).
pub trait LayerNormOutput: DeviceRepr {
    const FORWARD: &'static str;
    const RESIDUAL_FORWARD: &'static str;
}
impl LayerNormOutput for bf16 {
    const FORWARD: &'static str = "layernorm_forward_bf16";
    const RESIDUAL_FORWARD: &'static str = "residual_layernorm_forward_bf16";
}
impl LayerNormOutput for f32 {
    const FORWARD: &'static str = "layernorm_forward_f32";
    const RESIDUAL_FORWARD: &'static str = "residual_layernorm_forward_f32";
}

impl NormShape {
    fn check(&self, op: &'static str) -> Result<(i32, i32)> {
        if self.channels == 0 {
            return Err(Error::shape(op, "zero channels"));
        }
        Ok((
            dim(op, "rows", self.rows)?,
            dim(op, "channels", self.channels)?,
        ))
    }
    fn numel(&self) -> usize {
        self.rows * self.channels
    }
}

impl CudaBackend {
    /// `out = LN(inp)`, saving `mean [N]` and `rstd [N]`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<O: LayerNormOutput>(
        &self,
        out: &mut CudaSlice<O>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        shape: NormShape,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "cuda layernorm_forward";
        let (n, c) = shape.check(OP)?;
        check_len(OP, "out", out.len(), shape.numel())?;
        check_len(OP, "inp", inp.len(), shape.numel())?;
        check_len(OP, "mean", mean.len(), shape.rows)?;
        check_len(OP, "rstd", rstd.len(), shape.rows)?;
        check_len(OP, "weight", weight.len(), shape.channels)?;
        check_len(OP, "bias", bias.len(), shape.channels)?;
        let grid = (blocks(OP, shape.rows.div_ceil(ROWS_PER_BLOCK))?, 1, 1);
        launch!(
            self,
            KernelFamily::Layernorm,
            O::FORWARD,
            config(grid, BLOCK),
            [out, mean, rstd, inp, weight, bias, &n, &c, &eps]
        );
        Ok(())
    }

    /// `residual += gamma ∘ branch` (plain add without gamma), then `out = LN(residual)`:
    /// one pass instead of two.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layernorm_forward<O: LayerNormOutput>(
        &self,
        residual: &mut CudaSlice<f32>,
        out: &mut CudaSlice<O>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        branch: &CudaSlice<f32>,
        gamma: Option<&CudaSlice<f32>>,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        shape: NormShape,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "cuda residual_layernorm_forward";
        let (n, c) = shape.check(OP)?;
        check_len(OP, "residual", residual.len(), shape.numel())?;
        check_len(OP, "branch", branch.len(), shape.numel())?;
        check_len(OP, "out", out.len(), shape.numel())?;
        check_len(OP, "mean", mean.len(), shape.rows)?;
        check_len(OP, "rstd", rstd.len(), shape.rows)?;
        check_len(OP, "weight", weight.len(), shape.channels)?;
        check_len(OP, "bias", bias.len(), shape.channels)?;
        if let Some(g) = gamma {
            check_len(OP, "gamma", g.len(), shape.channels)?;
        }
        let gamma_ptr = self.optional_ptr(gamma);
        let residual_ptr = self.device_ptr_mut_raw(residual);
        let grid = (blocks(OP, shape.rows.div_ceil(ROWS_PER_BLOCK))?, 1, 1);
        // The kernel reads and writes `residual` in place (same element, same thread).
        launch!(
            self,
            KernelFamily::Layernorm,
            O::RESIDUAL_FORWARD,
            config(grid, BLOCK),
            [
                &residual_ptr,
                out,
                mean,
                rstd,
                &residual_ptr,
                branch,
                &gamma_ptr,
                weight,
                bias,
                &n,
                &c,
                &eps
            ]
        );
        Ok(())
    }

    /// LayerNorm backward: `dinp` (= or += per `dinp_write`; the residual stream accumulates),
    /// `dweight += Σ dout·x̂`, `dbias += Σ dout` (deterministic two-stage reductions).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &mut self,
        dinp: &mut CudaSlice<f32>,
        dweight: &mut CudaSlice<f32>,
        dbias: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        shape: NormShape,
        dinp_write: GradWrite,
    ) -> Result<()> {
        const OP: &str = "cuda layernorm_backward";
        let (n, c) = shape.check(OP)?;
        for (name, len) in [
            ("dinp", dinp.len()),
            ("dout", dout.len()),
            ("inp", inp.len()),
        ] {
            check_len(OP, name, len, shape.numel())?;
        }
        for (name, len) in [
            ("dweight", dweight.len()),
            ("dbias", dbias.len()),
            ("weight", weight.len()),
        ] {
            check_len(OP, name, len, shape.channels)?;
        }
        check_len(OP, "mean", mean.len(), shape.rows)?;
        check_len(OP, "rstd", rstd.len(), shape.rows)?;
        let write = dinp_write.code();
        let grid = (blocks(OP, shape.rows.div_ceil(ROWS_PER_BLOCK))?, 1, 1);
        launch!(
            self,
            KernelFamily::Layernorm,
            "layernorm_backward_input",
            config(grid, BLOCK),
            [dinp, dout, inp, weight, mean, rstd, &n, &c, &write]
        );

        let (groups, per_chunk) = row_chunks(shape.rows);
        self.reserve_scratch(2 * groups * shape.channels)?;
        let partial = self.scratch_ptr(0);
        let per_chunk_i = dim(OP, "rows per chunk", per_chunk)?;
        let grid = (
            blocks(OP, shape.channels.div_ceil(BLOCK as usize))?,
            groups as u32,
            1,
        );
        launch!(
            self,
            KernelFamily::Layernorm,
            "layernorm_backward_params_partial",
            config(grid, BLOCK),
            [&partial, dout, inp, mean, rstd, &n, &c, &per_chunk_i]
        );
        let dbias_partial = self.scratch_ptr(groups * shape.channels);
        self.column_partial_reduce_raw(
            dweight,
            partial,
            groups,
            shape.channels,
            1.0,
            GradWrite::Accumulate,
        )?;
        self.column_partial_reduce_raw(
            dbias,
            dbias_partial,
            groups,
            shape.channels,
            1.0,
            GradWrite::Accumulate,
        )?;
        Ok(())
    }

    /// The device address of an optional buffer, 0 (a null pointer) when absent.
    pub(in crate::backend::cuda) fn optional_ptr(&self, buf: Option<&CudaSlice<f32>>) -> u64 {
        buf.map(|b| b.device_ptr(self.stream.as_ref()).0)
            .unwrap_or(0)
    }
}
