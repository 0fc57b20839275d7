//! The DINOv2 backbone on the GPU (`nn::Vit` mirrored): training forward with a workspace per
//! input size (b, h, w) that is allocated once and reused across steps, backward into the flat
//! gradient buffer, and an inference forward that keeps no cache.
//!
//! Randomness is drawn on the host exactly as the CPU backbone draws it (drop-path subsets in
//! branch order: block 0 attention, block 0 FFN, block 1 attention, ...), so a GPU and a CPU
//! forward on the same inputs differ only by precision.

use super::block::{FinalNorm, Keep, Stack};
use super::branch::{Allocator, Dims};
use super::embed::{EmbedBufs, ImageGrad, Indices};
use super::DeviceWeights;
use crate::backend::cuda::{cuda_error, CudaBackend, GradWrite, NormShape, PatchLayout};
use crate::error::{Error, Result};
use crate::nn::drop_path::{check_rate, draw_subset, Subset};
use crate::nn::{DropPath, Vit, VitConfig};
use cudarc::driver::CudaSlice;

/// The backbone's outputs after the final LayerNorm (f32), owned by the workspace of their size.
pub struct GpuVitOutput {
    pub cls: CudaSlice<f32>,         // [b, d]
    pub patch: CudaSlice<f32>,       // [b, n, d]
    pub reg: Option<CudaSlice<f32>>, // [b, r, d] (None without registers)
    pub b: usize,
    pub n_patches: usize,
    pub n_registers: usize,
    pub dim: usize,
}

/// Everything one input size needs, allocated on its first forward.
struct Workspace {
    key: (usize, usize, usize),
    embed: EmbedBufs,
    stack: Stack,
    xn: CudaSlice<f32>,        // [b·t, d] final LayerNorm output
    norm_mean: CudaSlice<f32>, // [b·t]
    norm_rstd: CudaSlice<f32>, // [b·t]
    cls_rows: Indices,         // 0..b
    patch_rows: Indices,       // 0..b·n
    reg_rows: Option<Indices>, // 0..b·r
    out: GpuVitOutput,
    grad: Option<VitGrad>,
    /// A training forward ran since the workspace was built (backward may follow).
    forwarded: bool,
}

/// Backward buffers of a training workspace.
struct VitGrad {
    dx: CudaSlice<f32>,  // [b, t, d] residual-stream gradient
    dxn: CudaSlice<f32>, // [b, t, d] gradient of the final LayerNorm output
}

impl Workspace {
    fn new(
        gpu: &CudaBackend,
        vit: &Vit,
        b: usize,
        h: usize,
        w: usize,
        keep: Keep,
    ) -> Result<(Self, usize)> {
        let mut alloc = Allocator { gpu, count: 0 };
        let training = keep == Keep::Cache;
        let embed = EmbedBufs::new(&mut alloc, vit, b, h, w, training)?;
        let layout = embed.layout;
        let (n, r, d, t) = (
            layout.patches,
            layout.registers,
            layout.channels,
            layout.tokens(),
        );
        let stack = Stack::new(&mut alloc, &vit.blocks, Dims { b, t, d }, keep)?;
        let out = GpuVitOutput {
            cls: alloc.zeros(b * d)?,
            patch: alloc.zeros(b * n * d)?,
            reg: if r > 0 {
                Some(alloc.zeros(b * r * d)?)
            } else {
                None
            },
            b,
            n_patches: n,
            n_registers: r,
            dim: d,
        };
        let grad = if training {
            Some(VitGrad {
                dx: alloc.zeros(b * t * d)?,
                dxn: alloc.zeros(b * t * d)?,
            })
        } else {
            None
        };
        let ws = Workspace {
            key: (b, h, w),
            embed,
            stack,
            xn: alloc.zeros(b * t * d)?,
            norm_mean: alloc.zeros(b * t)?,
            norm_rstd: alloc.zeros(b * t)?,
            cls_rows: Indices::iota(&mut alloc, b)?,
            patch_rows: Indices::iota(&mut alloc, b * n)?,
            reg_rows: if r > 0 {
                Some(Indices::iota(&mut alloc, b * r)?)
            } else {
                None
            },
            out,
            grad,
            forwarded: false,
        };
        Ok((ws, alloc.count))
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

    /// [`Workspace::forward`], marking the output valid only once it completed.
    fn run_forward(
        &mut self,
        gpu: &CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        images: &[f32],
        masks: Option<&[bool]>,
        subsets: &[Option<&Subset>],
    ) -> Result<&GpuVitOutput> {
        self.forwarded = false;
        self.forward(gpu, vit, w, images, masks, subsets)?;
        self.forwarded = true;
        Ok(&self.out)
    }

    /// Embedding, blocks, final LayerNorm, and the output split.
    fn forward(
        &mut self,
        gpu: &CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        images: &[f32],
        masks: Option<&[bool]>,
        subsets: &[Option<&Subset>],
    ) -> Result<()> {
        self.embed
            .forward(gpu, vit, w, images, masks, &mut self.stack.xs[0])?;
        let final_norm = FinalNorm {
            norm: &vit.norm,
            out: &mut self.xn,
            mean: &mut self.norm_mean,
            rstd: &mut self.norm_rstd,
        };
        self.stack
            .forward(gpu, &vit.blocks, w, subsets, Some(final_norm))?;
        let [cls_at, patch_at, reg_at] = self.layouts();
        gpu.gather_masked_patches(
            &mut self.out.cls,
            &self.xn,
            &self.cls_rows.dev,
            &self.cls_rows.host,
            cls_at,
        )?;
        gpu.gather_masked_patches(
            &mut self.out.patch,
            &self.xn,
            &self.patch_rows.dev,
            &self.patch_rows.host,
            patch_at,
        )?;
        if let (Some(reg), Some(rows)) = (self.out.reg.as_mut(), self.reg_rows.as_ref()) {
            gpu.gather_masked_patches(reg, &self.xn, &rows.dev, &rows.host, reg_at)?;
        }
        Ok(())
    }
}

/// The backbone's GPU workspaces, one per input size (b, h, w), reused across steps.
pub struct GpuVit {
    /// The architecture the workspaces are built for.
    cfg: VitConfig,
    train: Vec<Workspace>,
    inference: Vec<Workspace>,
    allocations: usize,
}

fn find(list: &[Workspace], key: (usize, usize, usize)) -> Option<usize> {
    list.iter().position(|ws| ws.key == key)
}

impl GpuVit {
    pub fn new(vit: &Vit) -> Self {
        GpuVit {
            cfg: vit.cfg.clone(),
            train: Vec::new(),
            inference: Vec::new(),
            allocations: 0,
        }
    }

    /// Device buffers allocated so far by all workspaces (a forward at a size seen before
    /// allocates nothing).
    pub fn allocations(&self) -> usize {
        self.allocations
    }

    /// Refuses a model of another architecture than the one this `GpuVit` was made for.
    fn check_model(&self, vit: &Vit) -> Result<()> {
        if vit.cfg != self.cfg {
            return Err(Error::Config(format!(
                "cuda vit: made for {:?}, called with {:?}",
                self.cfg, vit.cfg
            )));
        }
        Ok(())
    }

    /// The workspace for `key` in `train` or `inference`, built on first use.
    fn workspace(
        &mut self,
        gpu: &CudaBackend,
        vit: &Vit,
        key: (usize, usize, usize),
        keep: Keep,
    ) -> Result<&mut Workspace> {
        self.check_model(vit)?;
        let list = match keep {
            Keep::Cache => &mut self.train,
            Keep::Nothing => &mut self.inference,
        };
        let i = match find(list, key) {
            Some(i) => i,
            None => {
                let (ws, count) = Workspace::new(gpu, vit, key.0, key.1, key.2, keep)?;
                self.allocations += count;
                list.push(ws);
                list.len() - 1
            }
        };
        Ok(&mut list[i])
    }

    /// Training forward; images are host `[b, 3, h, w]` f32 (normalised); masks `[b, n]`.
    /// The cache stays inside `self`, keyed by (b, h, w_px); the output is also reachable later
    /// through [`GpuVit::output`] (so two sizes' outputs can be read at once).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        gpu: &mut CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        images: &[f32],
        b: usize,
        h: usize,
        w_px: usize,
        masks: Option<&[bool]>,
        drop_path: Option<DropPath<'_>>,
    ) -> Result<&GpuVitOutput> {
        check_inputs(vit, w, images, b, h, w_px, masks)?;
        // Subsets drawn in the CPU's order before anything runs (block 0 attention, FFN, ...).
        let subsets: Vec<Option<Subset>> = match drop_path {
            Some(dp) => {
                check_rate(dp.rate)?;
                (0..2 * vit.blocks.len())
                    .map(|_| draw_subset(b, dp.rate, dp.rng))
                    .collect()
            }
            None => Vec::new(),
        };
        let subset_refs: Vec<Option<&Subset>> = subsets.iter().map(Option::as_ref).collect();
        let ws = self.workspace(gpu, vit, (b, h, w_px), Keep::Cache)?;
        ws.run_forward(gpu, vit, w, images, masks, &subset_refs)
    }

    /// The output of the last training forward at this size.
    pub fn output(&self, b: usize, h: usize, w_px: usize) -> Result<&GpuVitOutput> {
        forwarded_output(&self.train, (b, h, w_px), "output")
    }

    /// Backward of the last `forward` at this size; gradients ACCUMULATE into `grads [P]`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        gpu: &mut CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        grads: &mut CudaSlice<f32>,
        b: usize,
        h: usize,
        w_px: usize,
        d_cls: &CudaSlice<f32>,
        d_patch: &CudaSlice<f32>,
    ) -> Result<()> {
        let key = (b, h, w_px);
        self.backward_with(
            gpu,
            vit,
            w,
            grads,
            key,
            d_cls,
            d_patch,
            None,
            ImageGrad::Skip,
        )
        .map(|_| ())
    }

    /// [`backward`](Self::backward) with the register-token gradient `d_reg [b, r, d]` and,
    /// when asked, the image gradient `[b, c, h, w]` returned on the host (golden checks).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with(
        &mut self,
        gpu: &mut CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        grads: &mut CudaSlice<f32>,
        (b, h, w_px): (usize, usize, usize),
        d_cls: &CudaSlice<f32>,
        d_patch: &CudaSlice<f32>,
        d_reg: Option<&CudaSlice<f32>>,
        image_grad: ImageGrad,
    ) -> Result<Option<Vec<f32>>> {
        self.check_model(vit)?;
        if grads.len() != w.f32.len() {
            return Err(Error::shape(
                "cuda vit backward",
                format!(
                    "grads hold {} values, parameters {}",
                    grads.len(),
                    w.f32.len()
                ),
            ));
        }
        let i = find(&self.train, (b, h, w_px))
            .filter(|&i| self.train[i].forwarded)
            .ok_or_else(|| no_forward("backward", b, h, w_px))?;
        let ws = &mut self.train[i];
        let layout = ws.embed.layout;
        let (n, r, d, t) = (
            layout.patches,
            layout.registers,
            layout.channels,
            layout.tokens(),
        );
        let check = |what: &str, len: usize, want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(Error::shape(
                    "cuda vit backward",
                    format!("{what} holds {len} values, expected {want}"),
                ))
            }
        };
        check("d_cls", d_cls.len(), b * d)?;
        check("d_patch", d_patch.len(), b * n * d)?;
        if let Some(dr) = d_reg {
            check("d_reg", dr.len(), b * r * d)?;
        }
        let [cls_at, patch_at, reg_at] = ws.layouts();
        let g = ws.grad.as_mut().ok_or_else(|| {
            Error::Unsupported("cuda vit backward without gradient buffers".into())
        })?;
        // Output gradients in token layout.
        gpu.stream()
            .memset_zeros(&mut g.dxn)
            .map_err(|e| cuda_error("cuMemsetD8", e))?;
        gpu.scatter_masked_patches_add(
            &mut g.dxn,
            d_cls,
            &ws.cls_rows.dev,
            &ws.cls_rows.host,
            cls_at,
        )?;
        gpu.scatter_masked_patches_add(
            &mut g.dxn,
            d_patch,
            &ws.patch_rows.dev,
            &ws.patch_rows.host,
            patch_at,
        )?;
        if let (Some(dr), Some(rows)) = (d_reg, ws.reg_rows.as_ref()) {
            gpu.scatter_masked_patches_add(&mut g.dxn, dr, &rows.dev, &rows.host, reg_at)?;
        }
        {
            let weight = gpu.sub(&w.f32, vit.norm.weight.range())?;
            let [mut dweight, mut dbias] =
                gpu.sub_mut_disjoint(grads, [vit.norm.weight.range(), vit.norm.bias.range()])?;
            gpu.layernorm_backward(
                &mut g.dx,
                &mut dweight,
                &mut dbias,
                &g.dxn,
                ws.stack.output(),
                &weight,
                &ws.norm_mean,
                &ws.norm_rstd,
                NormShape {
                    rows: b * t,
                    channels: d,
                },
                GradWrite::Overwrite,
            )?;
        }
        ws.stack.backward(gpu, &vit.blocks, w, grads, &mut g.dx)?;
        ws.embed
            .backward(gpu, vit, w, grads, &g.dx, &ws.patch_rows, image_grad)
    }

    /// Inference forward (teacher, embeddings): no backward cache kept.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_inference(
        &mut self,
        gpu: &mut CudaBackend,
        vit: &Vit,
        w: &DeviceWeights,
        images: &[f32],
        b: usize,
        h: usize,
        w_px: usize,
    ) -> Result<&GpuVitOutput> {
        check_inputs(vit, w, images, b, h, w_px, None)?;
        let ws = self.workspace(gpu, vit, (b, h, w_px), Keep::Nothing)?;
        ws.run_forward(gpu, vit, w, images, None, &[])
    }

    /// The output of the last inference forward at this size.
    pub fn inference_output(&self, b: usize, h: usize, w_px: usize) -> Result<&GpuVitOutput> {
        forwarded_output(&self.inference, (b, h, w_px), "inference_output")
    }
}

/// The output of the workspace for `key` in `list`, if a forward has run in it.
fn forwarded_output<'a>(
    list: &'a [Workspace],
    key: (usize, usize, usize),
    what: &str,
) -> Result<&'a GpuVitOutput> {
    find(list, key)
        .map(|i| &list[i])
        .filter(|ws| ws.forwarded)
        .map(|ws| &ws.out)
        .ok_or_else(|| no_forward(what, key.0, key.1, key.2))
}

fn no_forward(what: &str, b: usize, h: usize, w: usize) -> Error {
    Error::Unsupported(format!(
        "cuda vit {what}: no forward has run at batch {b}, {h}x{w} px"
    ))
}

/// The CPU backbone's input checks, plus the GPU's own limits.
fn check_inputs(
    vit: &Vit,
    w: &DeviceWeights,
    images: &[f32],
    b: usize,
    h: usize,
    w_px: usize,
    masks: Option<&[bool]>,
) -> Result<()> {
    const OP: &str = "cuda vit forward";
    let (p, c) = (vit.cfg.patch_size, vit.cfg.in_chans);
    let need = vit.norm.bias.offset + vit.norm.bias.len;
    if w.f32.len() < need || w.bf16.len() != w.f32.len() {
        return Err(Error::shape(
            OP,
            format!(
                "parameter buffers hold {} (f32) and {} (bf16) values, the model needs {need}",
                w.f32.len(),
                w.bf16.len()
            ),
        ));
    }
    if b == 0 || h == 0 || w_px == 0 || h % p != 0 || w_px % p != 0 {
        return Err(Error::shape(
            OP,
            format!("batch {b} of {h}x{w_px} images: need a positive batch and multiples of the patch size {p}"),
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
