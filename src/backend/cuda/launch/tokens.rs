//! Launchers of the backbone's token kernels: token assembly (`patch.cu`) and the batch-subset
//! residual branches of stochastic depth (`elementwise.cu`).

use super::{check_len, dim, grid_stride, launch};
use crate::backend::cuda::{CudaBackend, KernelFamily};
use crate::backend::TokenLayout;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr};

/// Which samples of the batch a residual branch covers, and its output scale.
#[derive(Clone, Copy)]
pub struct KeptSamples<'a> {
    /// `[S]` kept sample indices (unique); `None` = samples `0..S` in order.
    pub kept: Option<&'a CudaSlice<i64>>,
    pub samples: usize,
}

impl KeptSamples<'_> {
    fn kept_ptr(&self, gpu: &CudaBackend) -> u64 {
        self.kept
            .map(|k| k.device_ptr(gpu.stream().as_ref()).0)
            .unwrap_or(0)
    }
}

impl CudaBackend {
    /// `x [B, T, C] = [cls + pos[0], reg..., pe[b, p] + pos[1 + p]]`; `reg` is `None` exactly
    /// when there are no registers.
    pub fn assemble_tokens(
        &self,
        x: &mut CudaSlice<f32>,
        pe: &CudaSlice<f32>,
        cls: &CudaSlice<f32>,
        reg: Option<&CudaSlice<f32>>,
        pos: &CudaSlice<f32>,
        layout: TokenLayout,
    ) -> Result<()> {
        const OP: &str = "cuda assemble_tokens";
        let TokenLayout {
            batch,
            patches,
            registers,
            channels,
        } = layout;
        check_len(OP, "x", x.len(), batch * layout.tokens() * channels)?;
        check_len(OP, "pe", pe.len(), batch * patches * channels)?;
        check_len(OP, "cls", cls.len(), channels)?;
        check_len(OP, "pos", pos.len(), (1 + patches) * channels)?;
        match reg {
            Some(r) => check_len(OP, "reg", r.len(), registers * channels)?,
            None if registers > 0 => {
                return Err(Error::shape(
                    OP,
                    format!("{registers} registers but no values"),
                ))
            }
            None => {}
        }
        let reg_ptr = self.optional_ptr(reg);
        let total = x.len();
        let (b, n, r, c) = (
            dim(OP, "batch", batch)?,
            dim(OP, "patches", patches)?,
            dim(OP, "registers", registers)?,
            dim(OP, "channels", channels)?,
        );
        launch!(
            self,
            KernelFamily::Patch,
            "assemble_tokens",
            grid_stride(total),
            [x, pe, cls, &reg_ptr, pos, &b, &n, &r, &c]
        );
        Ok(())
    }

    /// `out [S, L] = alpha · x[kept[j]]` with samples of `sample_len` values; `x` holds
    /// `batch` samples.
    pub fn gather_samples_scaled(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        kept: &CudaSlice<i64>,
        batch: usize,
        sample_len: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "cuda gather_samples_scaled";
        let s = kept.len();
        if s > batch {
            return Err(Error::shape(
                OP,
                format!("{s} kept samples of a batch of {batch}"),
            ));
        }
        check_len(OP, "x", x.len(), batch * sample_len)?;
        check_len(OP, "out", out.len(), s * sample_len)?;
        let si = dim(OP, "samples", s)?;
        let l = sample_len as i64;
        launch!(
            self,
            KernelFamily::Elementwise,
            "gather_samples_scaled",
            grid_stride(s * sample_len),
            [out, x, kept, &si, &l, &alpha]
        );
        Ok(())
    }

    /// `x[kept[j]] += alpha · gamma ∘ y[j]` over samples of `sample_len = T · C` values
    /// (`gamma [C]`, `None` = 1); `x` holds `batch` samples, `y` holds `subset.samples`. The
    /// kept indices must be unique (they are: drawn without replacement).
    #[allow(clippy::too_many_arguments)]
    pub fn residual_add_samples(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        gamma: Option<&CudaSlice<f32>>,
        subset: KeptSamples<'_>,
        batch: usize,
        sample_len: usize,
        channels: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "cuda residual_add_samples";
        let s = subset.samples;
        if s > batch || channels == 0 || sample_len % channels != 0 {
            return Err(Error::shape(
                OP,
                format!(
                    "{s} samples of {batch}, sample {sample_len} values of {channels} channels"
                ),
            ));
        }
        if let Some(k) = subset.kept {
            check_len(OP, "kept", k.len(), s)?;
        }
        check_len(OP, "x", x.len(), batch * sample_len)?;
        check_len(OP, "y", y.len(), s * sample_len)?;
        if let Some(g) = gamma {
            check_len(OP, "gamma", g.len(), channels)?;
        }
        let gamma_ptr = self.optional_ptr(gamma);
        let kept_ptr = subset.kept_ptr(self);
        let si = dim(OP, "samples", s)?;
        let l = sample_len as i64;
        let c = dim(OP, "channels", channels)?;
        launch!(
            self,
            KernelFamily::Elementwise,
            "residual_add_samples",
            grid_stride(s * sample_len),
            [x, y, &gamma_ptr, &kept_ptr, &si, &l, &c, &alpha]
        );
        Ok(())
    }
}
