//! The backbone's input tokens on the GPU (`nn::Vit`'s embedding mirrored): patch embedding
//! (unfolded on the host, one bf16 GEMM + bias), mask-token substitution, position embedding,
//! CLS and register tokens; and the backward into their parameters (no image gradient in the
//! training step; on request for the golden case).
//!
//! The position embedding is resampled on the host when the crop needs it: the interpolated
//! grid depends only on `pos_embed` and the crop size, so each forward downloads `pos_embed`
//! (`(1 + M²)·d` floats) and uploads the grid, and backward downloads the token gradient sums
//! and uploads `d pos_embed`. At the construction size no copy is made. (A device version
//! would remove these two small synchronising copies per crop size and step.)

use super::branch::{head, head_mut, Allocator};
use super::linear::{linear_backward, linear_forward};
use super::DeviceWeights;
use crate::backend::cpu::{Accumulate, Transpose};
use crate::backend::cuda::{bf16, cuda_error, CudaBackend, GradWrite, TokenLayout};
use crate::error::{Error, Result};
use crate::nn::params::ParamRef;
use crate::nn::pos_embed::{PosEmbed, PosPlan};
use crate::nn::Vit;
use cudarc::driver::CudaSlice;
use rayon::prelude::*;

/// Values per rayon task when rounding the unfolded patches to bf16.
const CONVERT_CHUNK: usize = 1 << 16;

/// Whether backward also returns the image gradient (golden checks; costs a GEMM, a download
/// and an allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageGrad {
    Skip,
    Compute,
}

/// `0..count` as i64 indices on the device and the host (the gather launchers validate the
/// host copy).
pub(crate) struct Indices {
    pub dev: CudaSlice<i64>,
    pub host: Vec<i64>,
}

impl Indices {
    pub fn iota(alloc: &mut Allocator<'_>, count: usize) -> Result<Self> {
        let host: Vec<i64> = (0..count as i64).collect();
        let mut dev = alloc.zeros::<i64>(count)?;
        if count > 0 {
            alloc
                .gpu
                .stream()
                .memcpy_htod(&host, &mut dev)
                .map_err(|e| cuda_error("cuMemcpyHtoD", e))?;
        }
        Ok(Indices { dev, host })
    }
}

/// The host staging, device buffers and gradient buffers of the token embedding at one size.
pub(crate) struct EmbedBufs {
    pub layout: TokenLayout,
    h: usize,
    w: usize,
    cols_host: Vec<f32>,       // [b·n, k] unfolded patches
    cols_host_bf16: Vec<bf16>, // [b·n, k]
    cols: CudaSlice<bf16>,     // [b·n, k]
    /// `[b·n, d]`: the patch embedding in forward, its gradient in backward.
    pe: CudaSlice<f32>,
    masks_host: Vec<u8>,  // [b·n]
    masks: CudaSlice<u8>, // [b·n]
    masked: bool,         // the last forward substituted mask tokens
    plan: PosPlan,
    /// `vit.pos` re-addressed to a buffer holding only `pos_embed` (offset 0).
    local_pos: PosEmbed,
    param_host: Vec<f32>, // [(1 + M²)·d]  pos_embed (resampled plans only)
    pos_host: Vec<f32>,   // [(1 + n)·d]
    pos: CudaSlice<f32>,  // [(1 + n)·d]  the resampled embedding
    grad: Option<EmbedGrad>,
}

/// Backward buffers of the embedding (training workspaces only).
struct EmbedGrad {
    dtok: CudaSlice<f32>,      // [t·d] token gradients summed over the batch
    dtok_host: Vec<f32>,       // [t·d]
    dpos_host: Vec<f32>,       // [(1 + n)·d]
    dparam_host: Vec<f32>,     // [(1 + M²)·d]
    dparam: CudaSlice<f32>,    // [(1 + M²)·d]
    dpe_bf16: CudaSlice<bf16>, // [b·n, d]
}

impl EmbedBufs {
    pub fn new(
        alloc: &mut Allocator<'_>,
        vit: &Vit,
        b: usize,
        h: usize,
        w: usize,
        with_grad: bool,
    ) -> Result<Self> {
        let p = vit.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let n = gh * gw;
        let d = vit.cfg.embed_dim;
        let k = vit.patch_embed.proj.in_dim;
        let layout = TokenLayout {
            batch: b,
            patches: n,
            registers: vit.cfg.num_register_tokens,
            channels: d,
        };
        let plan = vit.pos.plan(h, w, gh, gw);
        let param_len = vit.pos.pos_embed.len;
        let local_pos = PosEmbed {
            pos_embed: ParamRef {
                offset: 0,
                len: param_len,
            },
            ..vit.pos.clone()
        };
        let resampled = matches!(plan, PosPlan::Resample { .. });
        let grad = if with_grad {
            Some(EmbedGrad {
                dtok: alloc.zeros(layout.tokens() * d)?,
                dtok_host: vec![0.0; layout.tokens() * d],
                dpos_host: vec![0.0; (1 + n) * d],
                dparam_host: vec![0.0; param_len],
                dparam: alloc.zeros(if resampled { param_len } else { 1 })?,
                dpe_bf16: alloc.zeros(b * n * d)?,
            })
        } else {
            None
        };
        Ok(EmbedBufs {
            layout,
            h,
            w,
            cols_host: vec![0.0; b * n * k],
            cols_host_bf16: vec![bf16::ZERO; b * n * k],
            cols: alloc.zeros(b * n * k)?,
            pe: alloc.zeros(b * n * d)?,
            masks_host: vec![0; b * n],
            masks: alloc.zeros(b * n)?,
            masked: false,
            plan,
            local_pos,
            param_host: vec![0.0; if resampled { param_len } else { 0 }],
            pos_host: vec![0.0; if resampled { (1 + n) * d } else { 0 }],
            pos: alloc.zeros(if resampled { (1 + n) * d } else { 1 })?,
            grad,
        })
    }

    /// Tokens `x0 [b, t, d]` from images `[b, c, h, w]` and masks `[b, n]` (true = masked).
    pub fn forward(
        &mut self,
        gpu: &CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        images: &[f32],
        masks: Option<&[bool]>,
        x0: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let TokenLayout {
            batch: b,
            patches: n,
            channels: d,
            ..
        } = self.layout;
        let stream = gpu.stream();
        let htod = |e| cuda_error("cuMemcpyHtoD", e);
        vit.patch_embed
            .unfold(&mut self.cols_host, images, b, self.h, self.w);
        // Rounded on the host in parallel: the upload then moves half the bytes.
        self.cols_host_bf16
            .par_chunks_mut(CONVERT_CHUNK)
            .zip(self.cols_host.par_chunks(CONVERT_CHUNK))
            .for_each(|(o, v)| {
                o.iter_mut()
                    .zip(v)
                    .for_each(|(o, &v)| *o = bf16::from_f32(v))
            });
        stream
            .memcpy_htod(&self.cols_host_bf16, &mut self.cols)
            .map_err(htod)?;
        linear_forward(
            gpu,
            &mut self.pe,
            &self.cols,
            &vit.patch_embed.proj,
            w,
            b * n,
        )?;
        self.masked = false;
        if let Some(m) = masks {
            for (o, &v) in self.masks_host.iter_mut().zip(m) {
                *o = u8::from(v);
            }
            stream
                .memcpy_htod(&self.masks_host, &mut self.masks)
                .map_err(htod)?;
            let mask_token = gpu.sub(&w.f32, vit.mask_token.range())?;
            gpu.mask_token_substitute(&mut self.pe, &self.masks, &mask_token, b * n, d)?;
            self.masked = true;
        }
        let cls = gpu.sub(&w.f32, vit.cls_token.range())?;
        let reg = vit
            .register_tokens
            .map(|r| gpu.sub(&w.f32, r.range()))
            .transpose()?;
        match &self.plan {
            PosPlan::Identity => {
                let pos = gpu.sub(&w.f32, vit.pos.pos_embed.range())?;
                gpu.assemble_tokens(x0, &self.pe, &cls, reg.as_deref(), &pos, self.layout)
            }
            PosPlan::Resample { .. } => {
                let param = gpu.sub(&w.f32, vit.pos.pos_embed.range())?;
                stream
                    .memcpy_dtoh(&*param, &mut self.param_host)
                    .map_err(|e| cuda_error("cuMemcpyDtoH", e))?;
                // The host reads the copy next (pageable copies are synchronous; be explicit).
                gpu.synchronize()?;
                self.local_pos
                    .forward(&mut self.pos_host, &self.param_host, &self.plan);
                let mut pos = head_mut(gpu, &mut self.pos, self.pos_host.len())?;
                stream
                    .memcpy_htod(&self.pos_host, &mut *pos)
                    .map_err(htod)?;
                drop(pos);
                let pos = head(gpu, &self.pos, self.pos_host.len())?;
                gpu.assemble_tokens(x0, &self.pe, &cls, reg.as_deref(), &pos, self.layout)
            }
        }
    }

    /// Backward from the token gradient `dx [b, t, d]`: CLS, registers, position embedding,
    /// mask token, patch-embedding weight and bias gradients accumulate into `grads`.
    /// `patch_rows` are the indices `0..b·n`. Returns the image gradient when asked.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        gpu: &mut CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        grads: &mut CudaSlice<f32>,
        dx: &CudaSlice<f32>,
        patch_rows: &Indices,
        image_grad: ImageGrad,
    ) -> Result<Option<Vec<f32>>> {
        let layout = self.layout;
        let TokenLayout {
            batch: b,
            patches: n,
            registers: r,
            channels: d,
        } = layout;
        let t = layout.tokens();
        let g = self.grad.as_mut().ok_or_else(|| {
            Error::Unsupported("cuda embedding backward on an inference workspace".into())
        })?;
        // Token gradients summed over the batch: [t, d].
        gpu.column_sum(&mut g.dtok, dx, None, b, t * d, GradWrite::Overwrite)?;
        add_rows(gpu, grads, vit.cls_token.range(), &g.dtok, 0)?;
        if let Some(reg) = vit.register_tokens {
            add_rows(gpu, grads, reg.range(), &g.dtok, d)?;
        }
        let pos = vit.pos.pos_embed;
        match &self.plan {
            PosPlan::Identity => {
                add_rows(gpu, grads, pos.offset..pos.offset + d, &g.dtok, 0)?;
                add_rows(
                    gpu,
                    grads,
                    pos.offset + d..pos.offset + pos.len,
                    &g.dtok,
                    (1 + r) * d,
                )?;
            }
            PosPlan::Resample { .. } => {
                gpu.stream()
                    .memcpy_dtoh(&g.dtok, &mut g.dtok_host)
                    .map_err(|e| cuda_error("cuMemcpyDtoH", e))?;
                gpu.synchronize()?;
                g.dpos_host[..d].copy_from_slice(&g.dtok_host[..d]);
                g.dpos_host[d..].copy_from_slice(&g.dtok_host[(1 + r) * d..]);
                g.dparam_host.fill(0.0);
                self.local_pos
                    .backward(&mut g.dparam_host, &g.dpos_host, &self.plan);
                gpu.stream()
                    .memcpy_htod(&g.dparam_host, &mut g.dparam)
                    .map_err(|e| cuda_error("cuMemcpyHtoD", e))?;
                add_rows(gpu, grads, pos.range(), &g.dparam, 0)?;
            }
        }
        // Patch rows of dx into pe (now the patch-embedding gradient); masked rows feed the
        // mask token instead.
        let patch_layout = crate::backend::cuda::PatchLayout {
            crops: b,
            tokens: t,
            patches: n,
            token_offset: 1 + r,
            channels: d,
        };
        gpu.gather_masked_patches(
            &mut self.pe,
            dx,
            &patch_rows.dev,
            &patch_rows.host,
            patch_layout,
        )?;
        if self.masked {
            let mut dmask = gpu.sub_mut(grads, vit.mask_token.range())?;
            gpu.mask_token_backward(&mut dmask, &mut self.pe, &self.masks, b * n, d)?;
        }
        gpu.cast_f32_to_bf16(&mut g.dpe_bf16, &self.pe)?;
        let proj = &vit.patch_embed.proj;
        linear_backward(
            gpu,
            None,
            grads,
            &g.dpe_bf16,
            &self.pe,
            &self.cols,
            proj,
            w,
            b * n,
        )?;
        if image_grad == ImageGrad::Skip {
            return Ok(None);
        }
        // dcols [b·n, k] = dpe · W, folded back into image positions on the host.
        let k = proj.in_dim;
        let mut dcols = gpu.alloc_zeros::<f32>(b * n * k)?;
        let weight = gpu.sub(&w.bf16, proj.weight.range())?;
        gpu.matmul_bf16(
            &mut dcols,
            &g.dpe_bf16,
            Transpose::No,
            &weight,
            Transpose::No,
            b * n,
            d,
            k,
            Accumulate::Overwrite,
        )?;
        let dcols = gpu.download(&dcols)?;
        let c = vit.cfg.in_chans;
        let mut dimages = vec![0f32; b * c * self.h * self.w];
        vit.patch_embed
            .fold(&mut dimages, &dcols, b, self.h, self.w);
        Ok(Some(dimages))
    }
}

/// `grads[dst] += src[at..at + dst.len()]` (a one-row column sum: deterministic, no new kernel).
fn add_rows(
    gpu: &mut CudaBackend,
    grads: &mut CudaSlice<f32>,
    dst: std::ops::Range<usize>,
    src: &CudaSlice<f32>,
    at: usize,
) -> Result<()> {
    let len = dst.len();
    let mut out = gpu.sub_mut(grads, dst)?;
    let x = gpu.sub(src, at..at + len)?;
    gpu.column_sum(&mut out, &x, None, 1, len, GradWrite::Accumulate)
}
