//! `NormOps` on CUDA: the launchers of `kernels/layernorm.cu`, LayerNorm forward (optionally
//! fused with the LayerScale residual add) and backward. f32 statistics; output bf16 or f32.

use super::{blocks, config, dim, launch, row_chunks, GradWrite, BLOCK, ROWS_PER_BLOCK};
use crate::backend::cuda::buffers::write_code;
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::backend::{
    check_lens, Accumulate, LnParams, LnSaved, LnStats, NormOps, NormOut, NormShape, Residual,
};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};

/// Element types a LayerNorm may write: bf16 (GEMM inputs) or f32 (final norm, heads).
trait LayerNormOutput: DeviceRepr {
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

/// `(rows, channels)` as kernel arguments, and the block grid of one-warp-per-row kernels.
fn dims(op: &'static str, shape: NormShape) -> Result<(i32, i32, (u32, u32, u32))> {
    if shape.channels == 0 {
        return Err(Error::shape(op, "zero channels"));
    }
    let grid = (blocks(op, shape.rows.div_ceil(ROWS_PER_BLOCK))?, 1, 1);
    Ok((
        dim(op, "rows", shape.rows)?,
        dim(op, "channels", shape.channels)?,
        grid,
    ))
}

impl CudaBackend {
    /// `out = LN(inp)` into an output of type `O`, saving the statistics.
    fn layernorm_into<O: LayerNormOutput>(
        &self,
        out: &mut CudaSlice<O>,
        stats: LnStats<'_, Self>,
        inp: &CudaSlice<f32>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cuda layernorm_forward";
        let (n, c, grid) = dims(OP, shape)?;
        let (rows, numel) = (shape.rows, shape.rows * shape.channels);
        let LnStats { mean, rstd } = stats;
        check_lens(
            OP,
            &[
                ("out", out.len(), numel),
                ("inp", inp.len(), numel),
                ("mean", mean.len(), rows),
                ("rstd", rstd.len(), rows),
                ("weight", p.weight.len(), shape.channels),
                ("bias", p.bias.len(), shape.channels),
            ],
        )?;
        let (weight, bias, eps) = (p.weight, p.bias, p.eps);
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
    fn residual_layernorm_into<O: LayerNormOutput>(
        &self,
        res: Residual<'_, Self>,
        out: &mut CudaSlice<O>,
        stats: LnStats<'_, Self>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cuda residual_layernorm_forward";
        let (n, c, grid) = dims(OP, shape)?;
        let (rows, numel, ch) = (shape.rows, shape.rows * shape.channels, shape.channels);
        let LnStats { mean, rstd } = stats;
        let Residual {
            stream,
            branch,
            gamma,
        } = res;
        check_lens(
            OP,
            &[
                ("residual", stream.len(), numel),
                ("branch", branch.len(), numel),
                ("out", out.len(), numel),
                ("mean", mean.len(), rows),
                ("rstd", rstd.len(), rows),
                ("weight", p.weight.len(), ch),
                ("bias", p.bias.len(), ch),
                ("gamma", gamma.map_or(ch, |g| g.len()), ch),
            ],
        )?;
        let gamma_ptr = self.optional_ptr(gamma);
        let residual_ptr = self.device_ptr_mut_raw(stream);
        let (weight, bias, eps) = (p.weight, p.bias, p.eps);
        // The kernel reads and writes the residual in place (same element, same thread).
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

    /// The device address of an optional buffer, 0 (a null pointer) when absent.
    pub(in crate::backend::cuda) fn optional_ptr(&self, buf: Option<&CudaSlice<f32>>) -> u64 {
        buf.map(|b| b.device_ptr(self.stream.as_ref()).0)
            .unwrap_or(0)
    }
}

impl NormOps for CudaBackend {
    fn layernorm_forward(
        &mut self,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        inp: &CudaSlice<f32>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        match out {
            NormOut::F32(o) => self.layernorm_into(o, stats, inp, p, shape),
            NormOut::Half(o) => self.layernorm_into(o, stats, inp, p, shape),
        }
    }

    fn residual_layernorm_forward(
        &mut self,
        res: Residual<'_, Self>,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        match out {
            NormOut::F32(o) => self.residual_layernorm_into(res, o, stats, p, shape),
            NormOut::Half(o) => self.residual_layernorm_into(res, o, stats, p, shape),
        }
    }

    /// `dinp` (= or += per `dinp_write`; the residual stream accumulates), `dweight += Σ dout·x̂`,
    /// `dbias += Σ dout` (deterministic two-stage reductions).
    fn layernorm_backward(
        &mut self,
        dinp: &mut CudaSlice<f32>,
        dinp_write: Accumulate,
        dweight: &mut CudaSlice<f32>,
        dbias: &mut CudaSlice<f32>,
        saved: LnSaved<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cuda layernorm_backward";
        let (n, c, grid) = dims(OP, shape)?;
        let (rows, numel, ch) = (shape.rows, shape.rows * shape.channels, shape.channels);
        let LnSaved {
            dout,
            inp,
            weight,
            mean,
            rstd,
        } = saved;
        check_lens(
            OP,
            &[
                ("dinp", dinp.len(), numel),
                ("dout", dout.len(), numel),
                ("inp", inp.len(), numel),
                ("dweight", dweight.len(), ch),
                ("dbias", dbias.len(), ch),
                ("weight", weight.len(), ch),
                ("mean", mean.len(), rows),
                ("rstd", rstd.len(), rows),
            ],
        )?;
        let write = write_code(dinp_write).code();
        launch!(
            self,
            KernelFamily::Layernorm,
            "layernorm_backward_input",
            config(grid, BLOCK),
            [dinp, dout, inp, weight, mean, rstd, &n, &c, &write]
        );
        let (groups, per_chunk) = row_chunks(rows);
        self.reserve_scratch(2 * groups * ch)?;
        let partial = self.scratch_ptr(0);
        let per_chunk_i = dim(OP, "rows per chunk", per_chunk)?;
        let grid = (blocks(OP, ch.div_ceil(BLOCK as usize))?, groups as u32, 1);
        launch!(
            self,
            KernelFamily::Layernorm,
            "layernorm_backward_params_partial",
            config(grid, BLOCK),
            [&partial, dout, inp, mean, rstd, &n, &c, &per_chunk_i]
        );
        let dbias_partial = self.scratch_ptr(groups * ch);
        let acc = GradWrite::Accumulate;
        self.column_partial_reduce_raw(dweight, partial, groups, ch, 1.0, acc)?;
        self.column_partial_reduce_raw(dbias, dbias_partial, groups, ch, 1.0, acc)
    }
}
