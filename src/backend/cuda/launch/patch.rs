//! Launchers of `kernels/patch.cu`: mask-token substitution and the masked-patch gather/scatter.

use super::{blocks, check_len, config, dim, grid_stride, launch, row_chunks, GradWrite, BLOCK};
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::backend::PatchLayout;
use crate::error::Result;
use cudarc::driver::{CudaSlice, DeviceRepr};

/// Element types of the token rows the gather reads.
pub trait GatherElement: DeviceRepr {
    const GATHER: &'static str;
}
impl GatherElement for f32 {
    const GATHER: &'static str = "gather_rows_f32";
}
impl GatherElement for bf16 {
    const GATHER: &'static str = "gather_rows_bf16";
}

impl CudaBackend {
    /// `x[r] = mask_token` where `masks[r] = 1`; x `[rows, channels]`, masks `[rows]` (u8).
    pub fn mask_token_substitute(
        &self,
        x: &mut CudaSlice<f32>,
        masks: &CudaSlice<u8>,
        mask_token: &CudaSlice<f32>,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cuda mask_token_substitute";
        check_len(OP, "x", x.len(), rows * channels)?;
        check_len(OP, "masks", masks.len(), rows)?;
        check_len(OP, "mask_token", mask_token.len(), channels)?;
        let (r, c) = (dim(OP, "rows", rows)?, dim(OP, "channels", channels)?);
        launch!(
            self,
            KernelFamily::Patch,
            "mask_token_substitute",
            grid_stride(rows * channels),
            [x, masks, mask_token, &r, &c]
        );
        Ok(())
    }

    /// Backward of the substitution: `dmask_token += Σ_masked dx`, then masked rows of `dx` = 0.
    pub fn mask_token_backward(
        &mut self,
        dmask_token: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        masks: &CudaSlice<u8>,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cuda mask_token_backward";
        check_len(OP, "dx", dx.len(), rows * channels)?;
        check_len(OP, "masks", masks.len(), rows)?;
        check_len(OP, "dmask_token", dmask_token.len(), channels)?;
        let (r, c) = (dim(OP, "rows", rows)?, dim(OP, "channels", channels)?);
        let (groups, per_chunk) = row_chunks(rows);
        self.reserve_scratch(groups * channels)?;
        let partial = self.scratch_ptr(0);
        let per_chunk_i = dim(OP, "rows per chunk", per_chunk)?;
        let grid = (
            blocks(OP, channels.div_ceil(BLOCK as usize))?,
            groups as u32,
            1,
        );
        launch!(
            self,
            KernelFamily::Patch,
            "mask_token_backward_partial",
            config(grid, BLOCK),
            [&partial, dx, masks, &r, &c, &per_chunk_i]
        );
        self.column_partial_reduce_raw(
            dmask_token,
            partial,
            groups,
            channels,
            1.0,
            GradWrite::Accumulate,
        )
    }

    /// `gathered [M, C]` = the token rows of the masked patches. `indices_host` is the same
    /// list as `indices` (validated on the host: strictly increasing and in range).
    pub fn gather_masked_patches<T: GatherElement>(
        &self,
        gathered: &mut CudaSlice<T>,
        tokens: &CudaSlice<T>,
        indices: &CudaSlice<i64>,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        const OP: &str = "cuda gather_masked_patches";
        let m = indices.len();
        check_len(OP, "indices_host", indices_host.len(), m)?;
        layout.check(OP, indices_host)?;
        check_len(
            OP,
            "tokens",
            tokens.len(),
            layout.crops * layout.tokens * layout.channels,
        )?;
        check_len(OP, "gathered", gathered.len(), m * layout.channels)?;
        let args = self.patch_args(OP, m, layout)?;
        let (mi, c, np, t, off, rows) = args;
        launch!(
            self,
            KernelFamily::Patch,
            T::GATHER,
            grid_stride(m * layout.channels),
            [gathered, tokens, indices, &mi, &c, &np, &t, &off, &rows]
        );
        Ok(())
    }

    /// `dtokens[row(m)] += dgathered[m]` (the gather's backward; indices are unique).
    pub fn scatter_masked_patches_add(
        &self,
        dtokens: &mut CudaSlice<f32>,
        dgathered: &CudaSlice<f32>,
        indices: &CudaSlice<i64>,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        const OP: &str = "cuda scatter_masked_patches_add";
        let m = indices.len();
        check_len(OP, "indices_host", indices_host.len(), m)?;
        layout.check(OP, indices_host)?;
        check_len(
            OP,
            "dtokens",
            dtokens.len(),
            layout.crops * layout.tokens * layout.channels,
        )?;
        check_len(OP, "dgathered", dgathered.len(), m * layout.channels)?;
        let (mi, c, np, t, off, rows) = self.patch_args(OP, m, layout)?;
        launch!(
            self,
            KernelFamily::Patch,
            "scatter_rows_add_f32",
            grid_stride(m * layout.channels),
            [dtokens, dgathered, indices, &mi, &c, &np, &t, &off, &rows]
        );
        Ok(())
    }

    fn patch_args(
        &self,
        op: &'static str,
        m: usize,
        l: PatchLayout,
    ) -> Result<(i32, i32, i32, i32, i32, i64)> {
        Ok((
            dim(op, "masked patches", m)?,
            dim(op, "channels", l.channels)?,
            dim(op, "patches", l.patches)?,
            dim(op, "tokens", l.tokens)?,
            dim(op, "token_offset", l.token_offset)?,
            (l.crops * l.tokens) as i64,
        ))
    }
}
