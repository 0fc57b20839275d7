//! The token embedding at one input size, forward and backward: patch embedding (images
//! unfolded on the host, one GEMM), mask-token substitution, the position embedding (resampled
//! on the device when the crop size differs from the construction size, [`super::pos_embed`]) and the token assembly `[cls, registers, patches]`.

use super::pos_embed::PosBufs;
use super::Vit;
use crate::backend::{
    Accumulate, Backend, InputGrad, LinearOut, PatchLayout, Storage, TokenLayout, WeightStore,
};
use crate::error::{Error, Result};

/// Whether backward also returns the image gradient (golden checks; costs a GEMM and a
/// download).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageGrad {
    Skip,
    Compute,
}

/// `0..count` as indices on the device and the host (the row gathers check the host copy).
pub struct Indices<B: Backend> {
    pub dev: B::BufI64,
    pub host: Vec<i64>,
}

impl<B: Backend> Indices<B> {
    pub fn iota(be: &mut B, count: usize) -> Result<Self> {
        let host: Vec<i64> = (0..count as i64).collect();
        let mut dev = be.alloc_i64(count)?;
        be.upload_i64(&mut dev, &host)?;
        Ok(Indices { dev, host })
    }
}

/// Backward buffers of the embedding (training workspaces only).
struct EmbedGrad<B: Backend> {
    dtok: B::BufF32, // [t·d] token gradients summed over the batch
    dpe: B::BufHalf, // [b·n, d] the patch-embedding output gradient as an operand
}

/// The host staging, buffers and gradient buffers of the token embedding at one size.
pub struct EmbedBufs<B: Backend> {
    pub layout: TokenLayout,
    h: usize,
    w: usize,
    cols_host: Vec<f32>, // [b·n, k] unfolded patches
    cols: B::BufHalf,    // [b·n, k]
    /// `[b·n, d]`: the patch embedding in forward, its gradient in backward.
    pe: B::BufF32,
    masks_host: Vec<u8>, // [b·n]
    masks: B::BufU8,     // [b·n]
    masked: bool,        // the last forward substituted mask tokens
    pos: PosBufs<B>,
    grad: Option<EmbedGrad<B>>,
}

impl<B: Backend> EmbedBufs<B> {
    pub fn new(
        be: &mut B,
        vit: &Vit,
        (b, h, w): (usize, usize, usize),
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
        let grad = if with_grad {
            Some(EmbedGrad {
                dtok: be.alloc_f32(layout.tokens() * d)?,
                dpe: be.alloc_half(b * n * d)?,
            })
        } else {
            None
        };
        Ok(EmbedBufs {
            layout,
            h,
            w,
            cols_host: vec![0.0; b * n * k],
            cols: be.alloc_half(b * n * k)?,
            pe: be.alloc_f32(b * n * d)?,
            masks_host: vec![0; b * n],
            masks: be.alloc_u8(b * n)?,
            masked: false,
            pos: vit.pos.bufs(be, (h, w), (gh, gw))?,
            grad,
        })
    }

    /// Tokens `x0 [b, t, d]` from images `[b, c, h, w]` and masks `[b, n]` (true = masked).
    pub fn forward(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        images: &[f32],
        masks: Option<&[bool]>,
        x0: &mut B::F32,
    ) -> Result<()> {
        let TokenLayout {
            batch: b,
            patches: n,
            channels: d,
            ..
        } = self.layout;
        vit.patch_embed
            .unfold(&mut self.cols_host, images, b, self.h, self.w);
        be.upload_half(&mut self.cols, &self.cols_host)?;
        let proj = &vit.patch_embed.proj;
        proj.forward(be, LinearOut::F32(&mut *self.pe), &self.cols, w, b * n)?;
        self.masked = false;
        if let Some(m) = masks {
            for (o, &v) in self.masks_host.iter_mut().zip(m) {
                *o = u8::from(v);
            }
            be.upload_u8(&mut self.masks, &self.masks_host)?;
            let token = w.f32().window(vit.mask_token.range())?;
            be.mask_token_substitute(&mut self.pe, &self.masks, &token, d)?;
            self.masked = true;
        }
        let cls = w.f32().window(vit.cls_token.range())?;
        let reg = vit
            .register_tokens
            .map(|r| w.f32().window(r.range()))
            .transpose()?;
        let pos = vit.pos.forward(be, &mut self.pos, w)?;
        be.assemble_tokens(x0, &self.pe, &cls, reg.as_deref(), &pos, self.layout)
    }

    /// Backward from the token gradient `dx [b, t, d]`: CLS, registers, position embedding,
    /// mask token, patch-embedding weight and bias gradients accumulate into `grads`.
    /// `patch_rows` are the indices `0..b·n`. Returns the image gradient when asked.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        grads: &mut B::F32,
        dx: &B::F32,
        patch_rows: &Indices<B>,
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
            Error::Unsupported("embedding backward on an inference workspace".into())
        })?;
        // Token gradients summed over the batch: [t, d].
        be.column_sum(&mut g.dtok, dx, b, Accumulate::Overwrite)?;
        add_rows(be, grads, vit.cls_token.range(), &g.dtok, 0)?;
        if let Some(reg) = vit.register_tokens {
            add_rows(be, grads, reg.range(), &g.dtok, d)?;
        }
        let dcls = g.dtok.window(0..d)?;
        let dgrid = g.dtok.window((1 + r) * d..t * d)?;
        vit.pos.backward(be, &mut self.pos, grads, &dcls, &dgrid)?;
        // Patch rows of dx into pe (now the patch-embedding gradient); masked rows feed the
        // mask token instead.
        let patch_layout = PatchLayout {
            crops: b,
            tokens: t,
            patches: n,
            token_offset: 1 + r,
            channels: d,
        };
        be.gather_rows(
            &mut self.pe,
            dx,
            &patch_rows.dev,
            &patch_rows.host,
            patch_layout,
        )?;
        if self.masked {
            let mut dmask = grads.window_mut(vit.mask_token.range())?;
            be.mask_token_backward(&mut dmask, &mut self.pe, &self.masks, d)?;
        }
        be.cast_to_half(&mut g.dpe, &self.pe)?;
        let proj = &vit.patch_embed.proj;
        proj.param_grads(be, grads, &g.dpe, Some(&self.pe), &self.cols, b * n)?;
        if image_grad == ImageGrad::Skip {
            return Ok(None);
        }
        // dcols [b·n, k] = dpe · W, folded back into image positions on the host.
        let mut dcols = be.alloc_f32(b * n * proj.in_dim)?;
        let dinp = InputGrad::F32(&mut *dcols, Accumulate::Overwrite);
        proj.input_grad(be, dinp, &g.dpe, w, b * n)?;
        let dcols = be.download_f32(&dcols)?;
        let c = vit.cfg.in_chans;
        let mut dimages = vec![0f32; b * c * self.h * self.w];
        vit.patch_embed
            .fold(&mut dimages, &dcols, b, self.h, self.w);
        Ok(Some(dimages))
    }
}

/// `grads[dst] += src[at..at + dst.len()]` (a one-row column sum: deterministic).
fn add_rows<B: Backend>(
    be: &mut B,
    grads: &mut B::F32,
    dst: std::ops::Range<usize>,
    src: &B::F32,
    at: usize,
) -> Result<()> {
    let len = dst.len();
    let mut out = grads.window_mut(dst)?;
    let x = src.window(at..at + len)?;
    be.column_sum(&mut out, &x, 1, Accumulate::Add)
}
