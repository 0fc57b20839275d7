//! The backbone's input tokens on the GPU (`nn::Vit`'s embedding mirrored): patch embedding
//! (unfolded on the host, one bf16 GEMM + bias), mask-token substitution, position embedding,
//! CLS and register tokens; and the backward into their parameters (no image gradient in the
//! training step; on request for the golden case).
//!
//! The position embedding is resampled on the device when the crop needs it: the plan's
//! separable bicubic weights (fixed per crop size) are uploaded once with the workspace and
//! applied by two f32 GEMMs (no TF32), forward and backward, the CPU `PosEmbed`'s products; no
//! host round trip or synchronisation per step.

use super::branch::{head, Allocator};
use super::linear::{linear_backward, linear_forward, DoutF32, InputGrad};
use super::DeviceWeights;
use crate::backend::cpu::{Accumulate, Transpose};
use crate::backend::cuda::{bf16, cuda_error, CudaBackend, GemmShape, GradWrite, TokenLayout};
use crate::error::{Error, Result};
use crate::nn::pos_embed::PosPlan;
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
    /// The resampling weights and buffers when the crop size needs them.
    resample: Option<DeviceResample>,
    pos: CudaSlice<f32>, // [(1 + n)·d]  the resampled embedding
    grad: Option<EmbedGrad>,
}

/// The position-embedding resampling on the device: the separable bicubic weights of the
/// plan (fixed per crop size, uploaded once) applied with two f32 GEMMs, forward and backward,
/// exactly the CPU `PosEmbed` products; no host round trip per step.
struct DeviceResample {
    gh: usize,
    gw: usize,
    wr: CudaSlice<f32>,  // [gh, M] row weights
    wc: CudaSlice<f32>,  // [gw, M] column weights
    tmp: CudaSlice<f32>, // [gh, M·d] rows resampled (forward) / its gradient (backward)
}

/// Backward buffers of the embedding (training workspaces only).
struct EmbedGrad {
    dtok: CudaSlice<f32>,      // [t·d] token gradients summed over the batch
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
        let resample = match &plan {
            PosPlan::Identity => None,
            PosPlan::Resample { gh, gw, wr, wc } => {
                let m = vit.pos.grid;
                let mut upload = |host: &[f32]| -> Result<CudaSlice<f32>> {
                    let mut buf = alloc.zeros(host.len())?;
                    alloc
                        .gpu
                        .stream()
                        .memcpy_htod(host, &mut buf)
                        .map_err(|e| cuda_error("cuMemcpyHtoD", e))?;
                    Ok(buf)
                };
                let (wr, wc) = (upload(wr)?, upload(wc)?);
                Some(DeviceResample {
                    gh: *gh,
                    gw: *gw,
                    wr,
                    wc,
                    tmp: alloc.zeros(gh * m * d)?,
                })
            }
        };
        let resampled = resample.is_some();
        let grad = if with_grad {
            Some(EmbedGrad {
                dtok: alloc.zeros(layout.tokens() * d)?,
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
            resample,
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
                let rs = self.resample.as_mut().ok_or_else(|| {
                    Error::Unsupported("cuda embedding: resampling weights missing".into())
                })?;
                let (m, d) = (vit.pos.grid, vit.cfg.embed_dim);
                let param = gpu.sub(&w.f32, vit.pos.pos_embed.range())?; // [1 + M², d]
                let len = (1 + rs.gh * rs.gw) * d;
                // pos[0] = pos_embed[0] (the CLS row is not resampled).
                {
                    let mut cls_row = gpu.sub_mut(&mut self.pos, 0..d)?;
                    let src = gpu.sub(&param, 0..d)?;
                    gpu.stream()
                        .memcpy_dtod(&*src, &mut *cls_row)
                        .map_err(|e| cuda_error("cuMemcpyDtoD", e))?;
                }
                // tmp [gh, M·d] = wr [gh, M] · grid [M, M·d]
                let grid = gpu.sub(&param, d..(1 + m * m) * d)?;
                gpu.matmul_f32_batched(
                    &mut rs.tmp,
                    &rs.wr,
                    Transpose::No,
                    &grid,
                    Transpose::No,
                    GemmShape::single(rs.gh, m, m * d),
                    Accumulate::Overwrite,
                )?;
                // pos row block i [gw, d] = wc [gw, M] · tmp_i [M, d], for every i < gh.
                {
                    let mut rows = gpu.sub_mut(&mut self.pos, d..len)?;
                    gpu.matmul_f32_batched(
                        &mut rows,
                        &rs.wc,
                        Transpose::No,
                        &rs.tmp,
                        Transpose::No,
                        GemmShape {
                            m: rs.gw,
                            k: m,
                            n: d,
                            batch: rs.gh,
                            stride_a: 0,
                            stride_b: m * d,
                            stride_c: rs.gw * d,
                        },
                        Accumulate::Overwrite,
                    )?;
                }
                let pos = head(gpu, &self.pos, len)?;
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
                let rs = self.resample.as_mut().ok_or_else(|| {
                    Error::Unsupported("cuda embedding: resampling weights missing".into())
                })?;
                let m = vit.pos.grid;
                add_rows(gpu, grads, pos.offset..pos.offset + d, &g.dtok, 0)?;
                // dtmp_i [M, d] = wcᵀ [M, gw] · dpos_i [gw, d]
                let dgrid = gpu.sub(&g.dtok, (1 + r) * d..t * d)?;
                gpu.matmul_f32_batched(
                    &mut rs.tmp,
                    &rs.wc,
                    Transpose::Yes,
                    &dgrid,
                    Transpose::No,
                    GemmShape {
                        m,
                        k: rs.gw,
                        n: d,
                        batch: rs.gh,
                        stride_a: 0,
                        stride_b: rs.gw * d,
                        stride_c: m * d,
                    },
                    Accumulate::Overwrite,
                )?;
                drop(dgrid);
                // d grid [M, M·d] += wrᵀ [M, gh] · dtmp [gh, M·d]
                let mut dparam = gpu.sub_mut(grads, pos.offset + d..pos.offset + pos.len)?;
                gpu.matmul_f32_batched(
                    &mut dparam,
                    &rs.wr,
                    Transpose::Yes,
                    &rs.tmp,
                    Transpose::No,
                    GemmShape::single(m, rs.gh, m * d),
                    Accumulate::Add,
                )?;
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
            InputGrad::Skip,
            grads,
            &g.dpe_bf16,
            DoutF32::Ready(&self.pe),
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
