//! `NormOps` on CUDA: the launchers of `kernels/layernorm.cu`, LayerNorm forward (optionally
//! fused with the LayerScale residual add) and backward. f32 statistics; output bf16 or f32.

use super::{column_chunks, config, dim, launch, warp_per_row, write_code, BLOCK};
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::backend::{
    check_lens, Accumulate, LnParams, LnSaved, LnStats, NormOps, NormOut, NormShape, Residual,
};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

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

/// `(rows, channels)` as kernel arguments, and the launch of one-warp-per-row kernels.
fn dims(op: &'static str, shape: NormShape) -> Result<(i32, i32, LaunchConfig)> {
    if shape.channels == 0 {
        return Err(Error::shape(op, "zero channels"));
    }
    let cfg = warp_per_row(op, shape.rows)?;
    Ok((
        dim(op, "rows", shape.rows)?,
        dim(op, "channels", shape.channels)?,
        cfg,
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
        let (n, c, cfg) = dims(OP, shape)?;
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
            cfg,
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
        let (n, c, cfg) = dims(OP, shape)?;
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
            cfg,
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
        let (n, c, cfg) = dims(OP, shape)?;
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
        let write = write_code(dinp_write);
        launch!(
            self,
            KernelFamily::Layernorm,
            "layernorm_backward_input",
            cfg,
            [dinp, dout, inp, weight, mean, rstd, &n, &c, &write]
        );
        // dweight and dbias partials side by side in scratch, then each reduced.
        let chunks = column_chunks(OP, rows, ch)?;
        self.reserve_scratch(2 * chunks.groups * ch)?;
        let partial = self.scratch_ptr(0);
        launch!(
            self,
            KernelFamily::Layernorm,
            "layernorm_backward_params_partial",
            config(chunks.grid, BLOCK),
            [&partial, dout, inp, mean, rstd, &n, &c, &chunks.per_chunk]
        );
        let dbias_partial = self.scratch_ptr(chunks.groups * ch);
        let (add, groups) = (Accumulate::Add, chunks.groups);
        self.column_partial_reduce_raw(dweight, partial, groups, ch, 1.0, add)?;
        self.column_partial_reduce_raw(dbias, dbias_partial, groups, ch, 1.0, add)
    }
}
