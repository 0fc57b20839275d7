//! `TokenOps` on CUDA: token assembly, mask tokens and the row gathers by flat index
//! (`patch.cu`), and the batch-subset residual branches of stochastic depth (`elementwise.cu`).

use super::{check_len, column_chunks, config, dim, grid_stride, launch, BLOCK};
use crate::backend::cuda::buffers::rows_of;
use crate::backend::cuda::{CudaBackend, KernelFamily};
use crate::backend::{check_lens, Accumulate, PatchLayout, SampleSubset, TokenLayout, TokenOps};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr};

/// Checks a row gather or scatter (`(gathered, tokens)` lengths) and returns the kernels'
/// integer arguments: rows, channels, patches, tokens, token offset, all token rows.
fn patch_args(
    op: &'static str,
    (gathered, tokens): (usize, usize),
    indices: &CudaSlice<i64>,
    host: &[i64],
    l: PatchLayout,
) -> Result<(i32, i32, i32, i32, i32, i64)> {
    let m = indices.len();
    check_lens(
        op,
        &[
            ("indices_host", host.len(), m),
            ("tokens", tokens, l.crops * l.tokens * l.channels),
            ("gathered", gathered, m * l.channels),
        ],
    )?;
    l.check(op, host)?;
    Ok((
        dim(op, "rows", m)?,
        dim(op, "channels", l.channels)?,
        dim(op, "patches", l.patches)?,
        dim(op, "tokens", l.tokens)?,
        dim(op, "token_offset", l.token_offset)?,
        (l.crops * l.tokens) as i64,
    ))
}

impl TokenOps for CudaBackend {
    /// `x [B, T, C] = [cls + pos[0], reg..., pe[b, p] + pos[1 + p]]`; `reg` is `None` exactly
    /// when there are no registers.
    fn assemble_tokens(
        &mut self,
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

    /// `x[r] = token` where `masks[r] = 1`; x `[rows, channels]`, masks `[rows]` (u8).
    fn mask_token_substitute(
        &mut self,
        x: &mut CudaSlice<f32>,
        masks: &CudaSlice<u8>,
        token: &CudaSlice<f32>,
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cuda mask_token_substitute";
        let rows = masks.len();
        check_lens(
            OP,
            &[
                ("x", x.len(), rows * channels),
                ("token", token.len(), channels),
            ],
        )?;
        let (r, c) = (dim(OP, "rows", rows)?, dim(OP, "channels", channels)?);
        launch!(
            self,
            KernelFamily::Patch,
            "mask_token_substitute",
            grid_stride(rows * channels),
            [x, masks, token, &r, &c]
        );
        Ok(())
    }

    /// `dtoken += Σ_masked dx` (deterministic partial sums), then masked rows of `dx` = 0.
    fn mask_token_backward(
        &mut self,
        dtoken: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        masks: &CudaSlice<u8>,
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cuda mask_token_backward";
        let rows = masks.len();
        check_lens(
            OP,
            &[
                ("dx", dx.len(), rows * channels),
                ("dtoken", dtoken.len(), channels),
            ],
        )?;
        let (r, c) = (dim(OP, "rows", rows)?, dim(OP, "channels", channels)?);
        let chunks = column_chunks(OP, rows, channels)?;
        self.reserve_scratch(chunks.groups * channels)?;
        let partial = self.scratch_ptr(0);
        launch!(
            self,
            KernelFamily::Patch,
            "mask_token_backward_partial",
            config(chunks.grid, BLOCK),
            [&partial, dx, masks, &r, &c, &chunks.per_chunk]
        );
        let (groups, add) = (chunks.groups, Accumulate::Add);
        self.column_partial_reduce_raw(dtoken, partial, groups, channels, 1.0, add)
    }

    /// `out [M, C]` = the token rows `layout.token_row(indices[i])`; `indices_host` is the same
    /// list (validated on the host: strictly increasing and in range).
    fn gather_rows(
        &mut self,
        out: &mut CudaSlice<f32>,
        tokens: &CudaSlice<f32>,
        indices: &CudaSlice<i64>,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        const OP: &str = "cuda gather_rows";
        let lens = (out.len(), tokens.len());
        let (m, c, np, t, off, rows) = patch_args(OP, lens, indices, indices_host, layout)?;
        launch!(
            self,
            KernelFamily::Patch,
            "gather_rows_f32",
            grid_stride(indices.len() * layout.channels),
            [out, tokens, indices, &m, &c, &np, &t, &off, &rows]
        );
        Ok(())
    }

    /// `dtokens[row(i)] += dgathered[i]` (the gather's backward; indices are unique).
    fn scatter_rows_add(
        &mut self,
        dtokens: &mut CudaSlice<f32>,
        dgathered: &CudaSlice<f32>,
        indices: &CudaSlice<i64>,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        const OP: &str = "cuda scatter_rows_add";
        let lens = (dgathered.len(), dtokens.len());
        let (m, c, np, t, off, rows) = patch_args(OP, lens, indices, indices_host, layout)?;
        launch!(
            self,
            KernelFamily::Patch,
            "scatter_rows_add_f32",
            grid_stride(indices.len() * layout.channels),
            [dtokens, dgathered, indices, &m, &c, &np, &t, &off, &rows]
        );
        Ok(())
    }

    /// `out [S, L] = alpha · x[kept[j]]` with samples of `sample_len` values; `x` holds
    /// `batch` samples.
    fn gather_samples_scaled(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        kept: &CudaSlice<i64>,
        sample_len: usize,
        alpha: f32,
    ) -> Result<()> {
        let batch = rows_of("cuda gather_samples_scaled", "x", x.len(), sample_len)?;
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
    fn residual_add_samples(
        &mut self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        gamma: Option<&CudaSlice<f32>>,
        subset: SampleSubset<'_, Self>,
        alpha: f32,
    ) -> Result<()> {
        let SampleSubset {
            kept,
            samples: s,
            batch,
            sample_len,
            channels,
        } = subset;
        const OP: &str = "cuda residual_add_samples";
        if s > batch || channels == 0 || sample_len % channels != 0 {
            return Err(Error::shape(
                OP,
                format!(
                    "{s} samples of {batch}, sample {sample_len} values of {channels} channels"
                ),
            ));
        }
        check_lens(
            OP,
            &[
                ("kept", kept.map_or(s, |k| k.len()), s),
                ("x", x.len(), batch * sample_len),
                ("y", y.len(), s * sample_len),
                ("gamma", gamma.map_or(channels, |g| g.len()), channels),
            ],
        )?;
        let gamma_ptr = self.optional_ptr(gamma);
        // `None`: samples `0..S` in order.
        let kept_ptr = kept.map_or(0, |k| k.device_ptr(self.stream.as_ref()).0);
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
