//! Running the backbone ([`Vit`]) on a backend: training forward with a workspace per input
//! size (b, h, w) that is allocated once and reused across steps, backward into the flat
//! gradient buffer, and an inference forward that keeps no cache.
//!
//! Randomness is drawn on the host before anything runs (drop-path subsets in branch order:
//! block 0 attention, block 0 FFN, block 1 attention, ...), so two backends on the same inputs
//! differ only by precision.

use super::block::{FinalNorm, Keep, Stack};
use super::branch::Dims;
use super::drop_path::{draw_subsets, DropPath, Subset};
use super::embed::{EmbedBufs, ImageGrad, Indices};
use super::{Vit, VitConfig, VitOutput};
use crate::backend::{
    check_lens, Accumulate, Backend, LnSaved, NormShape, PatchLayout, Storage, WeightStore,
};
use crate::error::{Error, Result};

/// The backbone's outputs after the final LayerNorm (f32), owned by the workspace of their size.
pub struct VitOutputBufs<B: Backend> {
    pub cls: B::BufF32,         // [b, d]
    pub patch: B::BufF32,       // [b, n, d]
    pub reg: Option<B::BufF32>, // [b, r, d] (None without registers)
    pub b: usize,
    pub n_patches: usize,
    pub n_registers: usize,
    pub dim: usize,
}

impl<B: Backend> VitOutputBufs<B> {
    /// The outputs copied to the host.
    pub fn to_host(&self, be: &mut B) -> Result<VitOutput> {
        Ok(VitOutput {
            cls: be.download_f32(&self.cls)?,
            reg: match &self.reg {
                Some(r) => be.download_f32(r)?,
                None => Vec::new(),
            },
            patch: be.download_f32(&self.patch)?,
            b: self.b,
            n_patches: self.n_patches,
            n_registers: self.n_registers,
            dim: self.dim,
        })
    }
}

/// The output gradients of a backward: `d_cls [b, d]`, `d_patch [b, n, d]`, and `d_reg
/// [b, r, d]` (`None` = zero).
pub struct OutputGrads<'a, B: Backend> {
    pub cls: &'a B::F32,
    pub patch: &'a B::F32,
    pub reg: Option<&'a B::F32>,
}

/// Everything one input size needs, allocated on its first forward.
struct Workspace<B: Backend> {
    key: (usize, usize, usize),
    embed: EmbedBufs<B>,
    stack: Stack<B>,
    xn: B::BufF32,        // [b·t, d] final LayerNorm output
    norm_mean: B::BufF32, // [b·t]
    norm_rstd: B::BufF32, // [b·t]
    cls_rows: Indices<B>,
    patch_rows: Indices<B>,
    reg_rows: Option<Indices<B>>,
    out: VitOutputBufs<B>,
    grad: Option<VitGrad<B>>,
    /// A forward ran since the workspace was built (an output exists; backward may follow).
    forwarded: bool,
}

/// Backward buffers of a training workspace.
struct VitGrad<B: Backend> {
    dx: B::BufF32,  // [b, t, d] residual-stream gradient
    dxn: B::BufF32, // [b, t, d] gradient of the final LayerNorm output
}

impl<B: Backend> Workspace<B> {
    fn new(be: &mut B, vit: &Vit, key: (usize, usize, usize), keep: Keep) -> Result<Self> {
        let training = keep == Keep::Cache;
        let embed = EmbedBufs::new(be, vit, key, training)?;
        let l = embed.layout;
        let (b, n, r, d, t) = (l.batch, l.patches, l.registers, l.channels, l.tokens());
        let stack = Stack::new(be, &vit.blocks, Dims { b, t, d }, keep)?;
        let out = VitOutputBufs {
            cls: be.alloc_f32(b * d)?,
            patch: be.alloc_f32(b * n * d)?,
            reg: (r > 0).then(|| be.alloc_f32(b * r * d)).transpose()?,
            b,
            n_patches: n,
            n_registers: r,
            dim: d,
        };
        let grad = if training {
            Some(VitGrad {
                dx: be.alloc_f32(b * t * d)?,
                dxn: be.alloc_f32(b * t * d)?,
            })
        } else {
            None
        };
        Ok(Workspace {
            key,
            embed,
            stack,
            xn: be.alloc_f32(b * t * d)?,
            norm_mean: be.alloc_f32(b * t)?,
            norm_rstd: be.alloc_f32(b * t)?,
            cls_rows: Indices::iota(be, b)?,
            patch_rows: Indices::iota(be, b * n)?,
            reg_rows: (r > 0).then(|| Indices::iota(be, b * r)).transpose()?,
            out,
            grad,
            forwarded: false,
        })
    }

    /// Where CLS, patch and register rows sit among the `[b, t, d]` token rows.
    fn layouts(&self) -> [PatchLayout; 3] {
        let l = self.embed.layout;
        let at = |patches, token_offset| PatchLayout {
            crops: l.batch,
            tokens: l.tokens(),
            patches,
            token_offset,
            channels: l.channels,
        };
        [at(1, 0), at(l.patches, 1 + l.registers), at(l.registers, 1)]
    }

    /// Embedding, blocks, final LayerNorm, and the output split; the output is marked valid
    /// only once all of it ran.
    fn forward(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        (images, masks): (&[f32], Option<&[bool]>),
        subsets: &[Option<&Subset>],
    ) -> Result<&VitOutputBufs<B>> {
        self.forwarded = false;
        self.embed
            .forward(be, vit, w, images, masks, self.stack.input_mut())?;
        let final_norm = FinalNorm {
            norm: &vit.norm,
            out: &mut *self.xn,
            mean: &mut *self.norm_mean,
            rstd: &mut *self.norm_rstd,
        };
        self.stack
            .forward(be, &vit.blocks, w, subsets, Some(final_norm))?;
        let [cls_at, patch_at, reg_at] = self.layouts();
        let rows = &self.cls_rows;
        be.gather_rows(&mut self.out.cls, &self.xn, &rows.dev, &rows.host, cls_at)?;
        let rows = &self.patch_rows;
        be.gather_rows(
            &mut self.out.patch,
            &self.xn,
            &rows.dev,
            &rows.host,
            patch_at,
        )?;
        if let (Some(reg), Some(rows)) = (self.out.reg.as_mut(), self.reg_rows.as_ref()) {
            be.gather_rows(reg, &self.xn, &rows.dev, &rows.host, reg_at)?;
        }
        self.forwarded = true;
        Ok(&self.out)
    }

    /// Backward of the last forward: output gradients in token layout, final norm, blocks,
    /// embedding.
    fn backward(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        grads: &mut B::F32,
        d: OutputGrads<'_, B>,
        image_grad: ImageGrad,
    ) -> Result<Option<Vec<f32>>> {
        let l = self.embed.layout;
        let (b, n, r, c, t) = (l.batch, l.patches, l.registers, l.channels, l.tokens());
        let d_reg = d.reg.map_or(b * r * c, |dr| dr.len());
        let lens = [
            ("d_cls", d.cls.len(), b * c),
            ("d_patch", d.patch.len(), b * n * c),
            ("d_reg", d_reg, b * r * c),
        ];
        check_lens("vit backward", &lens)?;
        let [cls_at, patch_at, reg_at] = self.layouts();
        let g = self
            .grad
            .as_mut()
            .ok_or_else(|| Error::Unsupported("vit backward without gradient buffers".into()))?;
        be.zero_f32(&mut g.dxn)?;
        let rows = &self.cls_rows;
        be.scatter_rows_add(&mut g.dxn, d.cls, &rows.dev, &rows.host, cls_at)?;
        let rows = &self.patch_rows;
        be.scatter_rows_add(&mut g.dxn, d.patch, &rows.dev, &rows.host, patch_at)?;
        if let (Some(dr), Some(rows)) = (d.reg, self.reg_rows.as_ref()) {
            be.scatter_rows_add(&mut g.dxn, dr, &rows.dev, &rows.host, reg_at)?;
        }
        {
            let weight = w.f32().window(vit.norm.weight.range())?;
            let [mut dweight, mut dbias] =
                grads.windows_mut([vit.norm.weight.range(), vit.norm.bias.range()])?;
            let saved = LnSaved {
                dout: &*g.dxn,
                inp: self.stack.output(),
                weight: &*weight,
                mean: &*self.norm_mean,
                rstd: &*self.norm_rstd,
            };
            let shape = NormShape {
                rows: b * t,
                channels: c,
            };
            let write = Accumulate::Overwrite;
            be.layernorm_backward(&mut g.dx, write, &mut dweight, &mut dbias, saved, shape)?;
        }
        self.stack.backward(be, &vit.blocks, w, grads, &mut g.dx)?;
        self.embed
            .backward(be, vit, w, grads, &g.dx, &self.patch_rows, image_grad)
    }
}

/// The backbone's workspaces on one backend, one per input size (b, h, w), reused across steps.
pub struct VitWorkspaces<B: Backend> {
    /// The architecture the workspaces are built for.
    cfg: VitConfig,
    train: Vec<Workspace<B>>,
    inference: Vec<Workspace<B>>,
}

fn find<B: Backend>(list: &[Workspace<B>], key: (usize, usize, usize)) -> Option<usize> {
    list.iter().position(|ws| ws.key == key)
}

impl<B: Backend> VitWorkspaces<B> {
    pub fn new(vit: &Vit) -> Self {
        VitWorkspaces {
            cfg: vit.cfg.clone(),
            train: Vec::new(),
            inference: Vec::new(),
        }
    }

    /// Refuses a model of another architecture than the one these workspaces are for.
    fn check_model(&self, vit: &Vit) -> Result<()> {
        if vit.cfg != self.cfg {
            return Err(Error::Config(format!(
                "vit workspaces: made for {:?}, called with {:?}",
                self.cfg, vit.cfg
            )));
        }
        Ok(())
    }

    /// The workspace for `key` in `train` or `inference`, built on first use.
    fn workspace(
        &mut self,
        be: &mut B,
        vit: &Vit,
        key: (usize, usize, usize),
        keep: Keep,
    ) -> Result<&mut Workspace<B>> {
        self.check_model(vit)?;
        let list = match keep {
            Keep::Cache => &mut self.train,
            Keep::Nothing => &mut self.inference,
        };
        let i = match find(list, key) {
            Some(i) => i,
            None => {
                list.push(Workspace::new(be, vit, key, keep)?);
                list.len() - 1
            }
        };
        Ok(&mut list[i])
    }

    /// Training forward of images `[b, c, h, w]` (host f32, normalised) with masks `[b, n]`
    /// (true = masked) and drop path. The cache stays here, keyed by (b, h, w); the output is
    /// also reachable later through [`VitWorkspaces::output`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        images: &[f32],
        (b, h, w_px): (usize, usize, usize),
        masks: Option<&[bool]>,
        drop_path: Option<DropPath<'_>>,
    ) -> Result<&VitOutputBufs<B>> {
        // Subsets drawn in branch order before anything runs (block 0 attention, FFN, ...).
        let subsets = match drop_path {
            Some(dp) => draw_subsets(b, dp.rate, 2 * vit.blocks.len(), dp.rng)?,
            None => Vec::new(),
        };
        self.forward_with_subsets(be, vit, w, images, (b, h, w_px), masks, &subsets)
    }

    /// [`Self::forward`] with the drop-path subsets given, one per branch in branch order
    /// (block 0 attention, FFN, ...; `None` = every sample), or none at all (no drop path).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_subsets(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        images: &[f32],
        (b, h, w_px): (usize, usize, usize),
        masks: Option<&[bool]>,
        subsets: &[Option<Subset>],
    ) -> Result<&VitOutputBufs<B>> {
        check_inputs::<B>(vit, w, images, (b, h, w_px), masks)?;
        let branches = 2 * vit.blocks.len();
        if !subsets.is_empty() && subsets.len() != branches {
            return Err(Error::shape(
                "drop path",
                format!("{} subsets for {branches} branches", subsets.len()),
            ));
        }
        let outside = subsets
            .iter()
            .flatten()
            .any(|s| s.kept.last().is_some_and(|&i| i >= b));
        if outside {
            return Err(Error::shape(
                "drop path",
                format!("a subset keeps a sample outside the batch of {b}"),
            ));
        }
        let subset_refs: Vec<Option<&Subset>> = subsets.iter().map(Option::as_ref).collect();
        let ws = self.workspace(be, vit, (b, h, w_px), Keep::Cache)?;
        ws.forward(be, vit, w, (images, masks), &subset_refs)
    }

    /// Inference forward (teacher, embeddings): no backward cache kept.
    pub fn forward_inference(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        images: &[f32],
        (b, h, w_px): (usize, usize, usize),
    ) -> Result<&VitOutputBufs<B>> {
        check_inputs::<B>(vit, w, images, (b, h, w_px), None)?;
        let ws = self.workspace(be, vit, (b, h, w_px), Keep::Nothing)?;
        ws.forward(be, vit, w, (images, None), &[])
    }

    /// The output of the last training forward at this size.
    pub fn output(&self, key: (usize, usize, usize)) -> Result<&VitOutputBufs<B>> {
        forwarded(&self.train, key, "output").map(|ws| &ws.out)
    }

    /// Backward of the last training forward at this size; gradients ACCUMULATE into
    /// `grads [P]`. Returns the image gradient `[b, c, h, w]` on the host when asked.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &mut B,
        vit: &Vit,
        w: &B::Weights,
        grads: &mut B::F32,
        key: (usize, usize, usize),
        d: OutputGrads<'_, B>,
        image_grad: ImageGrad,
    ) -> Result<Option<Vec<f32>>> {
        self.check_model(vit)?;
        if grads.len() != w.f32().len() {
            return Err(Error::shape(
                "vit backward",
                format!(
                    "grads hold {} values, parameters {}",
                    grads.len(),
                    w.f32().len()
                ),
            ));
        }
        let i = find(&self.train, key)
            .filter(|&i| self.train[i].forwarded)
            .ok_or_else(|| no_forward("backward", key))?;
        self.train[i].backward(be, vit, w, grads, d, image_grad)
    }
}

/// The workspace for `key` in `list`, if a forward has run in it.
fn forwarded<'a, B: Backend>(
    list: &'a [Workspace<B>],
    key: (usize, usize, usize),
    what: &str,
) -> Result<&'a Workspace<B>> {
    find(list, key)
        .map(|i| &list[i])
        .filter(|ws| ws.forwarded)
        .ok_or_else(|| no_forward(what, key))
}

fn no_forward(what: &str, (b, h, w): (usize, usize, usize)) -> Error {
    Error::Unsupported(format!(
        "vit {what}: no forward has run at batch {b}, {h}x{w} px"
    ))
}

/// The backbone's input checks.
fn check_inputs<B: Backend>(
    vit: &Vit,
    w: &B::Weights,
    images: &[f32],
    (b, h, w_px): (usize, usize, usize),
    masks: Option<&[bool]>,
) -> Result<()> {
    const OP: &str = "vit forward";
    let (p, c) = (vit.cfg.patch_size, vit.cfg.in_chans);
    let need = vit.norm.bias.offset + vit.norm.bias.len;
    if w.f32().len() < need || w.half().len() != w.f32().len() {
        return Err(Error::shape(
            OP,
            format!(
                "parameter buffers hold {} (f32) and {} (operand) values, the model needs {need}",
                w.f32().len(),
                w.half().len()
            ),
        ));
    }
    if b == 0 || h == 0 || w_px == 0 || h % p != 0 || w_px % p != 0 {
        return Err(Error::shape(
            OP,
            format!(
                "batch {b} of {h}x{w_px} images: need a positive batch and multiples of the patch size {p}"
            ),
        ));
    }
    if images.len() != b * c * h * w_px {
        return Err(Error::shape(
            OP,
            format!(
                "images hold {} values, expected [{b}, {c}, {h}, {w_px}] = {}",
                images.len(),
                b * c * h * w_px
            ),
        ));
    }
    let n = (h / p) * (w_px / p);
    if let Some(m) = masks {
        if m.len() != b * n {
            return Err(Error::shape(
                OP,
                format!("masks hold {} values, expected [{b}, {n}]", m.len()),
            ));
        }
    }
    Ok(())
}
