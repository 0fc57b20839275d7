//! One DINOv2 training step on the GPU, mirroring [`crate::ssl::step::forward_backward`]:
//! teacher backbone (inference) and heads, teacher targets (lagged softmax centering or
//! Sinkhorn-Knopp), the student backbone on the masked global crops and on the local crops (the
//! same drop-path draws in the same order as the CPU), heads, the DINO loss over the official
//! crop pairs and the iBOT loss through the fused cross-entropy, KoLeo on each global crop's
//! backbone CLS tokens, and backward into the flat student gradients.
//!
//! Nothing is read back while the step runs: [`GpuStep::run`] queues the work and
//! [`GpuStep::read`] downloads the loss terms (a few floats, plus the gradient norms the caller
//! passes) in one copy. Masks, mask indices and drop-path subsets are drawn on the host, so a GPU
//! step and a CPU step on the same batch differ only by precision.
//!
//! Dimensions: `B` images, `G`/`Lc` global/local crop sizes, `nl` local crops per image, `N`
//! patches per global crop, `D` embed dim, `K`/`Ki` DINO/iBOT prototypes, `M` masked patches.

use super::buffers::{upload_into, Grow};
use super::head::{GpuHead, HeadCache, HeadScratch};
use super::losses::{dino_loss_forward_backward, ibot_loss_forward_backward, DinoPairs, IbotPairs};
use super::targets::GpuTargets;
use super::vit::GpuVit;
use super::DeviceWeights;
use crate::backend::cpu::Accumulate;
use crate::backend::cuda::{cuda_error, CudaBackend, KoleoSaved, PatchLayout};
use crate::error::{Error, Result};
use crate::nn::DropPath;
use crate::rng::Rng;
use crate::ssl::step::{LossConfig, SslModel, StepBatch, StepOutput};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// Slots of the read-back buffer.
const SLOT_DINO_GLOBAL: usize = 0;
const SLOT_DINO_LOCAL: usize = 1;
const SLOT_KOLEO: usize = 2; // two slots, one per global crop
const SLOT_IBOT: usize = 4;
const SLOT_ENTROPY: usize = 5;
const SLOT_NORMS: usize = 8;
/// Gradient norms the read-back buffer has room for.
pub const MAX_NORMS: usize = 24;

/// Whether [`GpuStep::read`] downloads the teacher targets (large: `[2B, K]` and `[M, Ki]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeacherProbs {
    Download,
    Skip,
}

/// The shape of the step that [`GpuStep::run`] queued, for [`GpuStep::read`].
#[derive(Clone, Copy, Debug, Default)]
struct Queued {
    n_masked: usize,
    use_koleo: bool,
    losses: Option<LossConfigCopy>,
}

#[derive(Clone, Copy, Debug)]
struct LossConfigCopy {
    dino_loss_weight: f32,
    koleo_loss_weight: f32,
    ibot_loss_weight: f32,
}

/// A model's heads on the device.
#[derive(Debug)]
struct Heads {
    dino: GpuHead,
    /// `Some` with a separate iBOT head.
    ibot: Option<GpuHead>,
}

impl Heads {
    fn new(gpu: &CudaBackend, model: &SslModel) -> Result<Self> {
        Ok(Heads {
            dino: GpuHead::new(gpu, &model.dino_head)?,
            ibot: model
                .ibot_head
                .as_ref()
                .map(|h| GpuHead::new(gpu, h))
                .transpose()?,
        })
    }

    fn prepare(&mut self, gpu: &CudaBackend, params: &CudaSlice<f32>) -> Result<()> {
        self.dino.prepare(gpu, params)?;
        if let Some(h) = &mut self.ibot {
            h.prepare(gpu, params)?;
        }
        Ok(())
    }

    /// The head the iBOT loss runs through.
    fn patch(&self) -> &GpuHead {
        self.ibot.as_ref().unwrap_or(&self.dino)
    }
}

/// Every buffer of the step, grown on the first step of a size and reused after.
#[derive(Debug, Default)]
struct Workspace {
    t_dino: HeadCache,
    t_ibot: HeadCache,
    s_dino_global: HeadCache,
    s_dino_local: HeadCache,
    s_ibot: HeadCache,
    head_scratch: HeadScratch,
    dino_probs: Grow<f32>,     // [2B, K]
    ibot_probs: Grow<f32>,     // [M, Ki]
    mask_indices: Grow<i64>,   // [M]
    t_masked: Grow<f32>,       // [M, D] teacher patch tokens of the masked patches
    s_masked: Grow<f32>,       // [M, D] student ones
    ds_global: Grow<f32>,      // [2B, K]
    ds_local: Grow<f32>,       // [nl·B, K]
    ds_ibot: Grow<f32>,        // [M, Ki]
    row_loss: Grow<f32>,       // [rows] per cross-entropy call
    d_cls_global: Grow<f32>,   // [2B, D]
    d_patch_global: Grow<f32>, // [2B, N, D]
    d_masked: Grow<f32>,       // [M, D]
    d_cls_local: Grow<f32>,    // [nl·B, D]
    d_patch_local: Grow<f32>,  // [nl·B, Nl, D], always zero (no patch loss on local crops)
    koleo: Option<KoleoSaved>, // [B, D]
    dino_pairs: DinoPairs,
    ibot_pairs: IbotPairs,
    readback: Option<CudaSlice<f32>>, // [SLOT_NORMS + MAX_NORMS]
}

/// Fills a device buffer with zeros.
fn zero<T: DeviceRepr + ValidAsZeroBits>(gpu: &CudaBackend, buf: &mut CudaSlice<T>) -> Result<()> {
    gpu.stream()
        .memset_zeros(buf)
        .map_err(|e| cuda_error("cuMemsetD8", e))
}

/// The GPU training step of one model layout: backbone workspaces (one per crop size), both
/// models' heads, and every activation buffer.
pub struct GpuStep {
    /// Teacher inference and the student's global crops.
    vit_global: GpuVit,
    /// The student's local crops (a separate workspace, so the global backward cache survives
    /// the local forward even when both crops have the same size).
    vit_local: GpuVit,
    student_heads: Heads,
    teacher_heads: Heads,
    ws: Workspace,
    queued: Queued,
}

impl std::fmt::Debug for GpuStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStep")
            .field("workspace", &self.ws)
            .finish_non_exhaustive()
    }
}

impl GpuStep {
    /// The step of `model` (allocates the heads' prototype buffers; activations grow on the
    /// first step of each size).
    pub fn new(gpu: &CudaBackend, model: &SslModel) -> Result<Self> {
        Ok(GpuStep {
            vit_global: GpuVit::new(&model.backbone),
            vit_local: GpuVit::new(&model.backbone),
            student_heads: Heads::new(gpu, model)?,
            teacher_heads: Heads::new(gpu, model)?,
            ws: Workspace::default(),
            queued: Queued::default(),
        })
    }

    /// Device buffers the two backbone workspaces allocated so far.
    pub fn backbone_allocations(&self) -> usize {
        self.vit_global.allocations() + self.vit_local.allocations()
    }

    /// Forward and backward of one step, then one download of the loss terms: the whole of
    /// [`crate::ssl::step::forward_backward`] on the GPU. Student gradients **accumulate** into
    /// `grads [P]` (zero it first).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &mut self,
        gpu: &mut CudaBackend,
        model: &SslModel,
        student: &DeviceWeights,
        teacher: &DeviceWeights,
        grads: &mut CudaSlice<f32>,
        batch: &StepBatch<'_>,
        targets: &mut GpuTargets,
        teacher_temp: f32,
        losses: &LossConfig,
        drop_path: Option<(f32, &mut Rng)>,
        probs: TeacherProbs,
    ) -> Result<StepOutput> {
        self.run(
            gpu,
            model,
            student,
            teacher,
            grads,
            batch,
            targets,
            teacher_temp,
            losses,
            drop_path,
        )?;
        let (out, _) = self.read(gpu, None, probs)?;
        Ok(out)
    }

    /// Queues the forward and backward of one step (see [`forward_backward`](Self::forward_backward));
    /// nothing is downloaded.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        gpu: &mut CudaBackend,
        model: &SslModel,
        student: &DeviceWeights,
        teacher: &DeviceWeights,
        grads: &mut CudaSlice<f32>,
        batch: &StepBatch<'_>,
        targets: &mut GpuTargets,
        teacher_temp: f32,
        losses: &LossConfig,
        mut drop_path: Option<(f32, &mut Rng)>,
    ) -> Result<()> {
        const OP: &str = "gpu ssl step";
        self.queued = Queued::default();
        let (b, nl) = (batch.n_img, batch.n_local);
        let (g_size, l_size) = (batch.global_size, batch.local_size);
        let vit = &model.backbone;
        let d = vit.cfg.embed_dim;
        let k = model.dino_head.out_dim;
        let ki = model.patch_head().out_dim;
        let use_ibot = losses.method.uses_ibot();
        let use_koleo = losses.method.uses_koleo();
        let masks = match (use_ibot, batch.masks) {
            (true, Some(m)) => Some(m),
            (true, None) => {
                return Err(Error::Config(format!(
                    "method {} needs global-crop masks",
                    losses.method
                )))
            }
            (false, _) => None,
        };
        if b == 0 {
            return Err(Error::shape(OP, "a batch needs at least one image"));
        }
        if let Some(m) = masks {
            if m.n_crops != 2 * b {
                return Err(Error::shape(
                    OP,
                    format!("masks cover {} crops, the batch has {}", m.n_crops, 2 * b),
                ));
            }
        }
        if grads.len() != model.table.len()
            || student.f32.len() != model.table.len()
            || teacher.f32.len() != model.table.len()
        {
            return Err(Error::shape(
                OP,
                format!(
                    "grads / student / teacher hold {} / {} / {} values for a model of {}",
                    grads.len(),
                    student.f32.len(),
                    teacher.f32.len(),
                    model.table.len()
                ),
            ));
        }
        let n_global = 2 * b;
        let n_masked = masks.map_or(0, |m| m.n_masked());
        let GpuStep {
            vit_global,
            vit_local,
            student_heads,
            teacher_heads,
            ws,
            queued,
        } = self;

        // Read-back slots start at zero (terms a method does not use stay 0).
        if ws.readback.is_none() {
            ws.readback = Some(super::buffers::alloc_counted(gpu, SLOT_NORMS + MAX_NORMS)?);
        }
        student_heads.prepare(gpu, &student.f32)?;
        teacher_heads.prepare(gpu, &teacher.f32)?;
        // [M] flat `crop·N + patch` indices of the masked patches, on the host and the device.
        let mask_host: Vec<i64> = masks.map_or_else(Vec::new, |m| {
            m.mask_indices.iter().map(|&i| i as i64).collect()
        });
        if let Some(m) = masks {
            // Buffers sized by M reserve the masks' upper bound once: M changes every step.
            let cap = m.upperbound.max(n_masked);
            let patch_head = &student_heads.patch().head;
            ws.mask_indices.reserve(gpu, cap)?;
            for buf in [&mut ws.t_masked, &mut ws.s_masked, &mut ws.d_masked] {
                buf.reserve(gpu, cap * d)?;
            }
            for buf in [&mut ws.ibot_probs, &mut ws.ds_ibot] {
                buf.reserve(gpu, cap * ki)?;
            }
            ws.row_loss.reserve(gpu, cap.max(n_global).max(nl * b))?;
            ws.t_ibot.reserve(gpu, patch_head, cap)?;
            ws.s_ibot.reserve(gpu, patch_head, cap)?;
            ws.head_scratch.reserve(gpu, patch_head, cap)?;
            ws.mask_indices.resize(gpu, n_masked)?;
            upload_into(gpu, &mut *ws.mask_indices.get_mut(gpu)?, &mask_host)?;
            ws.ibot_pairs
                .set(gpu, &m.masks_weight, n_global, m.upperbound)?;
        }
        let readback = ws
            .readback
            .as_mut()
            .ok_or_else(|| Error::Cuda("read-back buffer missing".into()))?;
        zero(gpu, readback)?;

        // ---- Teacher: no gradient, no masks, no drop path.
        {
            let t_out = vit_global.forward_inference(
                gpu,
                vit,
                teacher,
                batch.global,
                n_global,
                g_size,
                g_size,
            )?;
            teacher_heads
                .dino
                .forward(gpu, &mut ws.t_dino, teacher, &t_out.cls, n_global)?;
            ws.dino_probs.resize(gpu, n_global * k)?;
            {
                let mut probs = ws.dino_probs.get_mut(gpu)?;
                let logits = ws.t_dino.logits.get(gpu)?;
                targets
                    .dino
                    .teacher_probs(gpu, &mut probs, &logits, n_global, k, teacher_temp)?;
            }
            if masks.is_some() && n_masked > 0 {
                gather_masked(
                    gpu,
                    &mut ws.t_masked,
                    &t_out.patch,
                    &ws.mask_indices,
                    &mask_host,
                    patch_layout(n_global, t_out.n_patches, d),
                )?;
                let t_masked = ws.t_masked.get(gpu)?;
                teacher_heads
                    .patch()
                    .forward(gpu, &mut ws.t_ibot, teacher, &t_masked, n_masked)?;
                ws.ibot_probs.resize(gpu, n_masked * ki)?;
                let mut probs = ws.ibot_probs.get_mut(gpu)?;
                let logits = ws.t_ibot.logits.get(gpu)?;
                targets
                    .ibot
                    .teacher_probs(gpu, &mut probs, &logits, n_masked, ki, teacher_temp)?;
            } else {
                ws.ibot_probs.resize(gpu, 0)?;
            }
        }
        {
            let probs = ws.dino_probs.get(gpu)?;
            let mut entropy = gpu.sub_mut(readback, SLOT_ENTROPY..SLOT_ENTROPY + 1)?;
            ws.row_loss.resize(gpu, n_global)?;
            let mut rows = ws.row_loss.get_mut(gpu)?;
            gpu.mean_row_entropy(&mut entropy, &mut rows, &probs, n_global, k)?;
        }

        // ---- Student, global crops (masked): heads, KoLeo and the masked-patch gather right
        // away, while the output is at hand.
        let n_patches;
        {
            let g = vit_global.forward(
                gpu,
                vit,
                student,
                batch.global,
                n_global,
                g_size,
                g_size,
                masks.map(|m| m.masks.as_slice()),
                reborrow(&mut drop_path),
            )?;
            n_patches = g.n_patches;
            student_heads
                .dino
                .forward(gpu, &mut ws.s_dino_global, student, &g.cls, n_global)?;
            ws.d_cls_global.resize(gpu, n_global * d)?;
            if use_koleo {
                if ws
                    .koleo
                    .as_ref()
                    .is_none_or(|s| s.norm.len() != b || s.xn.len() != b * d)
                {
                    super::buffers::count_allocations(5);
                    ws.koleo = Some(KoleoSaved::new(gpu, b, d)?);
                }
                let saved = ws
                    .koleo
                    .as_mut()
                    .ok_or_else(|| Error::Cuda("KoLeo buffers missing".into()))?;
                for crop in 0..2 {
                    let rows = crop * b * d..(crop + 1) * b * d;
                    let x = gpu.sub(&g.cls, rows.clone())?;
                    let mut loss =
                        gpu.sub_mut(readback, SLOT_KOLEO + crop..SLOT_KOLEO + crop + 1)?;
                    gpu.koleo_forward(&mut loss, saved, &x, b, d)?;
                    let mut dx = ws.d_cls_global.rows_mut(gpu, rows)?;
                    gpu.koleo_backward(&mut dx, saved, losses.koleo_loss_weight, b, d)?;
                }
            }
            if masks.is_some() && n_masked > 0 {
                gather_masked(
                    gpu,
                    &mut ws.s_masked,
                    &g.patch,
                    &ws.mask_indices,
                    &mask_host,
                    patch_layout(n_global, g.n_patches, d),
                )?;
                let s_masked = ws.s_masked.get(gpu)?;
                student_heads
                    .patch()
                    .forward(gpu, &mut ws.s_ibot, student, &s_masked, n_masked)?;
            }
        }

        // ---- Student, local crops.
        let mut local_patches = 0;
        if nl > 0 {
            let l = vit_local.forward(
                gpu,
                vit,
                student,
                batch.local,
                nl * b,
                l_size,
                l_size,
                None,
                reborrow(&mut drop_path),
            )?;
            local_patches = l.n_patches;
            student_heads
                .dino
                .forward(gpu, &mut ws.s_dino_local, student, &l.cls, nl * b)?;
        }

        // ---- Losses.
        ws.ds_global.resize(gpu, n_global * k)?;
        ws.ds_local.resize(gpu, nl * b * k)?;
        {
            let mut terms = gpu.sub_mut(readback, SLOT_DINO_GLOBAL..SLOT_DINO_LOCAL + 1)?;
            if nl == 0 {
                ws.s_dino_local.logits.resize(gpu, 0)?;
            }
            let s_local = ws.s_dino_local.logits.get(gpu)?;
            dino_loss_forward_backward(
                gpu,
                &mut ws.dino_pairs,
                &mut terms,
                &mut ws.row_loss,
                &mut *ws.ds_global.get_mut(gpu)?,
                &mut *ws.ds_local.get_mut(gpu)?,
                &*ws.s_dino_global.logits.get(gpu)?,
                &s_local,
                &*ws.dino_probs.get(gpu)?,
                b,
                nl,
                k,
                losses.student_temp,
                losses.dino_loss_weight,
            )?;
        }
        ws.ds_ibot.resize(gpu, n_masked * ki)?;
        if masks.is_some() && n_masked > 0 {
            let mut loss = gpu.sub_mut(readback, SLOT_IBOT..SLOT_IBOT + 1)?;
            ibot_loss_forward_backward(
                gpu,
                &ws.ibot_pairs,
                &mut loss,
                &mut ws.row_loss,
                &mut *ws.ds_ibot.get_mut(gpu)?,
                &*ws.s_ibot.logits.get(gpu)?,
                &*ws.ibot_probs.get(gpu)?,
                ki,
                losses.student_temp,
                losses.ibot_loss_weight,
            )?;
        }

        // ---- Backward: global crops (heads, then the backbone).
        {
            let ds = ws.ds_global.get(gpu)?;
            let mut d_cls = ws.d_cls_global.get_mut(gpu)?;
            let write = if use_koleo {
                Accumulate::Add
            } else {
                Accumulate::Overwrite
            };
            student_heads.dino.backward(
                gpu,
                &mut ws.head_scratch,
                grads,
                &mut d_cls,
                write,
                &ws.s_dino_global,
                student,
                &ds,
            )?;
        }
        ws.d_patch_global.resize(gpu, n_global * n_patches * d)?;
        zero(gpu, &mut *ws.d_patch_global.get_mut(gpu)?)?;
        if masks.is_some() && n_masked > 0 {
            ws.d_masked.resize(gpu, n_masked * d)?;
            {
                let ds = ws.ds_ibot.get(gpu)?;
                let mut d_masked = ws.d_masked.get_mut(gpu)?;
                student_heads.patch().backward(
                    gpu,
                    &mut ws.head_scratch,
                    grads,
                    &mut d_masked,
                    Accumulate::Overwrite,
                    &ws.s_ibot,
                    student,
                    &ds,
                )?;
            }
            let layout = patch_layout(n_global, n_patches, d);
            let mut d_patch = ws.d_patch_global.get_mut(gpu)?;
            let d_masked = ws.d_masked.get(gpu)?;
            let indices = ws.mask_indices.get(gpu)?;
            gpu.scatter_masked_patches_add(&mut d_patch, &d_masked, &indices, &mask_host, layout)?;
        }
        {
            let d_cls = ws.d_cls_global.get(gpu)?;
            let d_patch = ws.d_patch_global.get(gpu)?;
            vit_global.backward(
                gpu, vit, student, grads, n_global, g_size, g_size, &d_cls, &d_patch,
            )?;
        }

        // ---- Backward: local crops.
        if nl > 0 {
            ws.d_cls_local.resize(gpu, nl * b * d)?;
            let grow_zero = ws.d_patch_local.len() != nl * b * local_patches * d;
            ws.d_patch_local.resize(gpu, nl * b * local_patches * d)?;
            if grow_zero {
                zero(gpu, &mut *ws.d_patch_local.get_mut(gpu)?)?;
            }
            {
                let ds = ws.ds_local.get(gpu)?;
                let mut d_cls = ws.d_cls_local.get_mut(gpu)?;
                student_heads.dino.backward(
                    gpu,
                    &mut ws.head_scratch,
                    grads,
                    &mut d_cls,
                    Accumulate::Overwrite,
                    &ws.s_dino_local,
                    student,
                    &ds,
                )?;
            }
            let d_cls = ws.d_cls_local.get(gpu)?;
            let d_patch = ws.d_patch_local.get(gpu)?;
            vit_local.backward(
                gpu,
                vit,
                student,
                grads,
                nl * b,
                l_size,
                l_size,
                &d_cls,
                &d_patch,
            )?;
        }

        *queued = Queued {
            n_masked,
            use_koleo,
            losses: Some(LossConfigCopy {
                dino_loss_weight: losses.dino_loss_weight,
                koleo_loss_weight: losses.koleo_loss_weight,
                ibot_loss_weight: losses.ibot_loss_weight,
            }),
        };
        Ok(())
    }

    /// Downloads the loss terms of the step [`run`](Self::run) queued, with `norms` (e.g. the
    /// optimizer's gradient norms, at most [`MAX_NORMS`]) in the same copy; returns the step
    /// output and the norms.
    pub fn read(
        &mut self,
        gpu: &CudaBackend,
        norms: Option<&CudaSlice<f32>>,
        probs: TeacherProbs,
    ) -> Result<(StepOutput, Vec<f32>)> {
        let q = self.queued;
        let w = q
            .losses
            .ok_or_else(|| Error::Config("GpuStep::read before a step ran".into()))?;
        let readback = self
            .ws
            .readback
            .as_mut()
            .ok_or_else(|| Error::Cuda("read-back buffer missing".into()))?;
        let n_norms = norms.map_or(0, |n| n.len());
        if n_norms > MAX_NORMS {
            return Err(Error::shape(
                "GpuStep::read",
                format!("{n_norms} norms; room for {MAX_NORMS}"),
            ));
        }
        if let Some(n) = norms {
            let mut dst = gpu.sub_mut(readback, SLOT_NORMS..SLOT_NORMS + n_norms)?;
            gpu.stream()
                .memcpy_dtod(n, &mut *dst)
                .map_err(|e| cuda_error("cuMemcpyDtoD", e))?;
        }
        let host = gpu.download(readback)?;
        let global = host[SLOT_DINO_GLOBAL] as f64;
        let local = host[SLOT_DINO_LOCAL] as f64;
        let dino_total = w.dino_loss_weight as f64 * (local + global);
        let koleo_total = if q.use_koleo {
            w.koleo_loss_weight * host[SLOT_KOLEO] + w.koleo_loss_weight * host[SLOT_KOLEO + 1]
        } else {
            0.0
        };
        let ibot = host[SLOT_IBOT];
        let mut out = StepOutput {
            loss: dino_total as f32 + koleo_total + w.ibot_loss_weight * ibot,
            dino_local_crops_loss: local as f32,
            dino_global_crops_loss: global as f32,
            koleo_loss: koleo_total / 2.0,
            ibot_loss: ibot / 2.0,
            teacher_entropy: host[SLOT_ENTROPY],
            teacher_dino_probs: Vec::new(),
            teacher_ibot_probs: Vec::new(),
        };
        if probs == TeacherProbs::Download {
            out.teacher_dino_probs = gpu.download(&*self.ws.dino_probs.get(gpu)?)?;
            out.teacher_ibot_probs = if q.n_masked > 0 {
                gpu.download(&*self.ws.ibot_probs.get(gpu)?)?
            } else {
                Vec::new()
            };
        }
        Ok((out, host[SLOT_NORMS..SLOT_NORMS + n_norms].to_vec()))
    }
}

/// A fresh [`DropPath`] borrowing the step's generator, one per backbone call (as on the CPU).
fn reborrow<'a>(drop_path: &'a mut Option<(f32, &mut Rng)>) -> Option<DropPath<'a>> {
    drop_path
        .as_mut()
        .map(|(rate, rng)| DropPath { rate: *rate, rng })
}

/// The patch tokens of `crops` crops as the masked-patch kernels see them (`[crops, n, d]`,
/// patches only: the backbone's patch output holds no CLS or register rows).
fn patch_layout(crops: usize, n_patches: usize, d: usize) -> PatchLayout {
    PatchLayout {
        crops,
        tokens: n_patches,
        patches: n_patches,
        token_offset: 0,
        channels: d,
    }
}

/// `out [M, D]` = the masked rows of `patch [crops, N, D]` (flat indices `indices`, host copy
/// `indices_host` for the bounds check).
fn gather_masked(
    gpu: &CudaBackend,
    out: &mut Grow<f32>,
    patch: &CudaSlice<f32>,
    indices: &Grow<i64>,
    indices_host: &[i64],
    layout: PatchLayout,
) -> Result<()> {
    out.resize(gpu, indices_host.len() * layout.channels)?;
    let mut gathered = out.get_mut(gpu)?;
    let indices = indices.get(gpu)?;
    gpu.gather_masked_patches(&mut gathered, patch, &indices, indices_host, layout)
}
