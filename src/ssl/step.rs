//! One DINOv2 training step on a backend: teacher backbone (inference) and heads, teacher
//! targets (lagged softmax centering or Sinkhorn-Knopp), the student backbone on the masked
//! global crops and on the local crops (drop-path subsets drawn on the host in a fixed order),
//! heads, the DINO loss over the official crop pairs and the iBOT loss through the paired
//! cross-entropy, KoLeo on each global crop's backbone CLS tokens (before any head), and
//! backward into the flat student gradients (spec section 8; golden case `ssl_step`).
//!
//! Nothing is read back while the step runs: [`SslStep::run`] queues the work and
//! [`SslStep::read`] downloads the loss terms (a few floats, plus the gradient norms the caller
//! passes) in one copy. Optimizer, clipping and EMA are separate passes (`crate::optim`).
//!
//! Dimensions: `B` images, `G`/`Lc` global/local crop sizes, `nl` local crops per image, `N`
//! patches per global crop, `D` embed dim, `K`/`Ki` DINO/iBOT prototypes, `M` masked patches.

use super::centering::{Centering, TargetState};
use super::dino_loss::{
    dino_loss_forward_backward, dino_terms, DinoPairs, DinoStudent, STUDENT_TEMP,
};
use super::ibot_loss::{ibot_loss_forward_backward, IbotPairs};
use super::masking::MaskBatch;
pub use super::model::{HeadConfig, SslModel};
use super::Method;
use crate::backend::{
    check_lens, workspace, Accumulate, Backend, Grow, PatchLayout, Storage, WeightStore,
};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::nn::drop_path::{draw_subsets, Subset};
use crate::nn::{
    GivenSubsets, HeadCache, HeadScratch, ImageGrad, OutputGrads, Prototypes, VitWorkspaces,
};
use crate::rng::Rng;
use std::borrow::Cow;
use std::ops::Range;

/// The crops and masks of one batch, crop-major (all images' crop A, then crop B, then the
/// local crops in order).
#[derive(Clone, Copy, Debug)]
pub struct StepBatch<'a> {
    /// `[2B, 3, G, G]`
    pub global: &'a [f32],
    /// `[nl·B, 3, Lc, Lc]`
    pub local: &'a [f32],
    pub n_img: usize,
    pub n_local: usize,
    pub global_size: usize,
    pub local_size: usize,
    /// The student's global-crop masks; required when the method uses iBOT.
    pub masks: Option<&'a MaskBatch>,
    /// The student's drop-path subsets, given instead of drawn from
    /// [`StepInputs::drop_path`] (a replay of another run's draws).
    pub drop_path: Option<&'a GivenSubsets>,
}

/// Loss weights and the method stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    pub method: Method,
    pub dino_loss_weight: f32,
    pub koleo_loss_weight: f32,
    pub ibot_loss_weight: f32,
    pub student_temp: f32,
}

impl LossConfig {
    /// The official weights (1, 0.1, 1) and student temperature 0.1.
    pub fn official(method: Method) -> Self {
        LossConfig {
            method,
            dino_loss_weight: 1.0,
            koleo_loss_weight: super::koleo::KOLEO_LOSS_WEIGHT,
            ibot_loss_weight: 1.0,
            student_temp: STUDENT_TEMP,
        }
    }
}

/// The teacher-target state carried across steps: one [`Centering`] for the DINO CLS loss and
/// one for the iBOT loss.
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherTargets {
    pub dino: Centering,
    pub ibot: Centering,
}

/// What one step computed. `koleo_loss` and `ibot_loss` are the official *logged* values
/// (halved); `loss` is the back-propagated total.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub loss: f32,
    pub dino_local_crops_loss: f32,
    pub dino_global_crops_loss: f32,
    pub koleo_loss: f32,
    pub ibot_loss: f32,
    /// `[2B, K]` natural row order.
    pub teacher_dino_probs: Vec<f32>,
    /// `[M, Ki]`
    pub teacher_ibot_probs: Vec<f32>,
    /// Mean entropy (nats) of the teacher's DINO targets: a collapse signal (ln K = uniform).
    pub teacher_entropy: f32,
}

impl StepOutput {
    /// The named loss terms, for logs and the non-finite guard.
    pub fn terms(&self) -> [(&'static str, f32); 5] {
        [
            ("loss", self.loss),
            ("dino_local_crops_loss", self.dino_local_crops_loss),
            ("dino_global_crops_loss", self.dino_global_crops_loss),
            ("koleo_loss", self.koleo_loss),
            ("ibot_loss", self.ibot_loss),
        ]
    }
}

/// The teacher-target states of both losses on a backend.
pub struct Targets<B: Backend> {
    pub dino: TargetState<B>,
    pub ibot: TargetState<B>,
}

impl<B: Backend> Targets<B> {
    pub fn new(be: &mut B, host: &TeacherTargets) -> Result<Self> {
        Ok(Targets {
            dino: TargetState::new(be, &host.dino)?,
            ibot: TargetState::new(be, &host.ibot)?,
        })
    }

    pub fn to_host(&self, be: &mut B) -> Result<TeacherTargets> {
        Ok(TeacherTargets {
            dino: self.dino.to_host(be)?,
            ibot: self.ibot.to_host(be)?,
        })
    }

    pub fn restore(&mut self, be: &mut B, host: &TeacherTargets) -> Result<()> {
        self.dino.restore(be, &host.dino)?;
        self.ibot.restore(be, &host.ibot)
    }
}

/// Slots of the read-back buffer: the teacher targets' entropy, the gradient norms the caller
/// passes, then five loss terms per micro-batch.
const SLOT_ENTROPY: usize = 0;
const SLOT_NORMS: usize = 1;
/// Gradient norms the read-back buffer has room for.
pub const MAX_NORMS: usize = 24;
const SLOT_MICRO: usize = SLOT_NORMS + MAX_NORMS;
/// A micro-batch's terms, from `SLOT_MICRO + i · MICRO_SLOTS`: the DINO global and local terms,
/// KoLeo of each global crop, iBOT.
const MICRO_DINO: usize = 0;
const MICRO_KOLEO: usize = 2;
const MICRO_IBOT: usize = 4;
const MICRO_SLOTS: usize = 5;

/// Whether [`SslStep::read`] downloads the teacher targets (large: `[2B, K]` and `[M, Ki]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeacherProbs {
    Download,
    Skip,
}

/// Everything one step reads: the model, both models' weights, the batches, this step's
/// scheduled teacher temperature, the loss configuration and the student's drop path
/// (`None` = off; the teacher never drops).
///
/// `batches` holds one batch, or several micro-batches of one shape whose gradients accumulate
/// into one step (`--accumulate`) with the semantics of as many data-parallel ranks: the
/// teacher targets over all of them (Sinkhorn-Knopp jointly, softmax centers updated from all),
/// KoLeo and the loss normalisations per micro-batch, and the gradient the mean of theirs.
pub struct StepInputs<'a, 'r, B: Backend> {
    pub model: &'a SslModel,
    pub student: &'a B::Weights,
    pub teacher: &'a B::Weights,
    pub batches: &'a [StepBatch<'a>],
    pub teacher_temp: f32,
    pub losses: &'a LossConfig,
    pub drop_path: Option<(f32, &'r mut Rng)>,
    /// The other data-parallel ranks, each with micro-batches of this shape (as many as
    /// here): the teacher logits are exchanged so that the targets are the whole global
    /// batch's, and the loss weights divide by every rank's micro-batches. The gradients and
    /// the logged losses are left for the caller to sum (`None` = one rank).
    pub dist: Option<&'r mut dyn Collective>,
}

/// Where the step's targets come from: every micro-batch of every rank.
#[derive(Clone, Debug, Default)]
struct TargetLayout {
    /// Micro-batches over all ranks.
    micro_batches: usize,
    /// Masked patches of each of them, in rank order.
    masked: Vec<usize>,
}

/// The sizes of one micro-batch of the step [`SslStep::run`] queued.
#[derive(Clone, Debug, Default)]
struct Shape {
    b: usize,
    nl: usize,
    d: usize,
    k: usize,
    ki: usize,
    /// Patches per global / local crop.
    n: usize,
    n_local: usize,
    /// `[M]` flat `crop·N + patch` indices of the masked patches (empty without masks).
    mask_host: Vec<i64>,
    /// The first of its masked patches in the step-wide buffers (mask indices, teacher iBOT
    /// logits and targets): the masked patches of the micro-batches before it.
    mask_offset: usize,
    /// Its place among this rank's micro-batches (its read-back slots).
    index: usize,
    /// Its place among every rank's micro-batches (its DINO target rows).
    target_index: usize,
    /// The first of its masked patches in the step-wide teacher iBOT logits and targets: the
    /// masked patches of every micro-batch before it, of this rank and those before it.
    target_mask_offset: usize,
    use_koleo: bool,
}

impl Shape {
    fn n_global(&self) -> usize {
        2 * self.b
    }

    fn n_masked(&self) -> usize {
        self.mask_host.len()
    }

    fn ibot(&self) -> bool {
        !self.mask_host.is_empty()
    }

    /// Its DINO targets in the step-wide `[n·2B, K]` buffer.
    fn dino_target_values(&self) -> Range<usize> {
        let len = self.n_global() * self.k;
        self.target_index * len..(self.target_index + 1) * len
    }

    /// Its masked patches in the step-wide `[ΣM]` index buffer.
    fn masked_rows(&self) -> Range<usize> {
        self.mask_offset..self.mask_offset + self.n_masked()
    }

    /// Its iBOT targets in the step-wide `[ΣM, Ki]` buffer.
    fn ibot_target_values(&self) -> Range<usize> {
        let start = self.target_mask_offset;
        start * self.ki..(start + self.n_masked()) * self.ki
    }

    /// Read-back slots `first..first + len` of its terms.
    fn slots(&self, first: usize, len: usize) -> Range<usize> {
        let start = SLOT_MICRO + self.index * MICRO_SLOTS + first;
        start..start + len
    }

    /// The patch tokens of the global crops as the row gathers see them (`[2B, N, D]`).
    fn patches(&self) -> PatchLayout {
        PatchLayout {
            crops: self.n_global(),
            tokens: self.n,
            patches: self.n,
            token_offset: 0,
            channels: self.d,
        }
    }
}

/// What [`SslStep::read`] needs of the step [`SslStep::run`] queued.
#[derive(Clone, Debug, Default)]
struct Queued {
    shapes: Vec<Shape>,
    /// The loss weights as configured (`None` before a step ran).
    weights: Option<LossConfig>,
}

/// One model's effective prototypes: the DINO head's and, with a separate iBOT head, its.
struct Heads<B: Backend> {
    dino: Prototypes<B>,
    ibot: Option<Prototypes<B>>,
}

impl<B: Backend> Heads<B> {
    fn new(be: &mut B, model: &SslModel) -> Result<Self> {
        Ok(Heads {
            dino: Prototypes::new(be, &model.dino_head)?,
            ibot: model
                .ibot_head
                .as_ref()
                .map(|h| Prototypes::new(be, h))
                .transpose()?,
        })
    }

    fn prepare(&mut self, be: &mut B, model: &SslModel, w: &B::Weights) -> Result<()> {
        self.dino.prepare(be, &model.dino_head, w)?;
        if let (Some(p), Some(h)) = (&mut self.ibot, &model.ibot_head) {
            p.prepare(be, h, w)?;
        }
        Ok(())
    }

    /// The prototypes the iBOT loss runs through.
    fn patch(&self) -> &Prototypes<B> {
        self.ibot.as_ref().unwrap_or(&self.dino)
    }
}

workspace! {
    /// Every buffer of the step, grown on the first step of a size and reused after. Buffers
    /// marked "step-wide" hold every micro-batch's rows; the others one micro-batch's.
    struct Workspace<B: Backend> {
        t_dino: HeadCache<B>,
        t_ibot: HeadCache<B>,
        s_dino_global: HeadCache<B>,
        s_dino_local: HeadCache<B>,
        s_ibot: HeadCache<B>,
        head_scratch: HeadScratch<B>,
        t_dino_logits: Grow<B::BufF32>,   // step-wide [n·2B, K]
        t_ibot_logits: Grow<B::BufF32>,   // step-wide [ΣM, Ki]
        dino_probs: Grow<B::BufF32>,      // step-wide [n·2B, K]
        ibot_probs: Grow<B::BufF32>,      // step-wide [ΣM, Ki]
        mask_indices: Grow<B::BufI64>,    // step-wide [ΣM]
        t_masked: Grow<B::BufF32>,        // [M, D] teacher patch tokens of the masked patches
        s_masked: Grow<B::BufF32>,        // [M, D] student ones
        ds_global: Grow<B::BufF32>,       // [2B, K]
        ds_local: Grow<B::BufF32>,        // [nl·B, K]
        ds_ibot: Grow<B::BufF32>,         // [M, Ki]
        d_cls_global: Grow<B::BufF32>,    // [2B, D]
        d_patch_global: Grow<B::BufF32>,  // [2B, N, D]
        d_masked: Grow<B::BufF32>,        // [M, D]
        d_cls_local: Grow<B::BufF32>,     // [nl·B, D]
        // [nl·B, Nl, D], always zero (no patch loss on local crops)
        d_patch_local: Grow<B::BufF32>,
        koleo: Option<(usize, B::Koleo)>, // (B, state)
        dino_pairs: DinoPairs<B>,
        ibot_pairs: IbotPairs<B>,
        readback: Grow<B::BufF32>,        // [SLOT_MICRO + n · MICRO_SLOTS]
    }
}

/// An f32 buffer of `len` values, grown only beyond its capacity.
fn grow<B: Backend>(be: &mut B, g: &mut Grow<B::BufF32>, len: usize) -> Result<()> {
    g.resize(len, |l| be.alloc_f32(l))
}

/// The training step of one model layout: backbone workspaces (one per crop size), both
/// models' head prototypes, and every activation buffer.
pub struct SslStep<B: Backend> {
    /// Teacher inference and the student's global crops.
    vit_global: VitWorkspaces<B>,
    /// The student's local crops (a separate workspace, so the global backward cache survives
    /// the local forward even when both crops have the same size).
    vit_local: VitWorkspaces<B>,
    student_heads: Heads<B>,
    teacher_heads: Heads<B>,
    ws: Workspace<B>,
    queued: Queued,
}

impl<B: Backend> SslStep<B> {
    /// The step of `model` (allocates the heads' prototype buffers; activations grow on the
    /// first step of each size).
    pub fn new(be: &mut B, model: &SslModel) -> Result<Self> {
        Ok(SslStep {
            vit_global: VitWorkspaces::new(&model.backbone),
            vit_local: VitWorkspaces::new(&model.backbone),
            student_heads: Heads::new(be, model)?,
            teacher_heads: Heads::new(be, model)?,
            ws: Workspace::default(),
            queued: Queued::default(),
        })
    }

    /// Forward and backward of one step, then one read-back of the loss terms. Student
    /// gradients **accumulate** into `grads [P]` (zero it first).
    pub fn forward_backward(
        &mut self,
        be: &mut B,
        inp: StepInputs<'_, '_, B>,
        grads: &mut B::F32,
        targets: &mut Targets<B>,
        probs: TeacherProbs,
    ) -> Result<StepOutput> {
        self.run(be, inp, grads, targets)?;
        Ok(self.read(be, None, probs)?.0)
    }

    /// Queues the forward and backward of one step (see [`SslStep::forward_backward`]):
    /// the teacher on every micro-batch and the targets over all of them, then per
    /// micro-batch the student, its losses (weights divided by the micro-batch count, so the
    /// gradient is the mean of theirs) and backward. Nothing is read back.
    pub fn run(
        &mut self,
        be: &mut B,
        mut inp: StepInputs<'_, '_, B>,
        grads: &mut B::F32,
        targets: &mut Targets<B>,
    ) -> Result<()> {
        self.queued = Queued::default();
        let mut dist = inp.dist.take();
        let (shapes, layout) = self.prepare(be, &inp, grads, dist.as_deref_mut())?;
        self.teacher(be, &inp, targets, (&shapes, &layout), dist)?;
        let configured = *inp.losses;
        let n = layout.micro_batches as f32;
        let weights = LossConfig {
            dino_loss_weight: configured.dino_loss_weight / n,
            koleo_loss_weight: configured.koleo_loss_weight / n,
            ibot_loss_weight: configured.ibot_loss_weight / n,
            ..configured
        };
        let batches = inp.batches;
        for (batch, s) in batches.iter().zip(&shapes) {
            if let Some(m) = batch.masks.filter(|_| s.ibot()) {
                let ws = &mut self.ws;
                ws.ibot_pairs
                    .set(be, &m.masks_weight, s.n_global(), m.upperbound)?;
            }
            self.student_global(be, &mut inp, batch, &weights, s)?;
            self.student_local(be, &mut inp, batch, s)?;
            self.losses(be, &weights, s)?;
            self.backward_global(be, &inp, batch, grads, s)?;
            self.backward_local(be, &inp, batch, grads, s)?;
        }
        self.queued = Queued {
            shapes,
            weights: Some(configured),
        };
        Ok(())
    }

    /// Checks the inputs (micro-batches of one shape), prepares both models' prototypes,
    /// uploads every micro-batch's mask indices and sizes the buffers whose length follows the
    /// masks or the micro-batch count.
    fn prepare(
        &mut self,
        be: &mut B,
        inp: &StepInputs<'_, '_, B>,
        grads: &B::F32,
        dist: Option<&mut (dyn Collective + '_)>,
    ) -> Result<(Vec<Shape>, TargetLayout)> {
        const OP: &str = "ssl step";
        let (model, batches) = (inp.model, inp.batches);
        let first = batches
            .first()
            .ok_or_else(|| Error::shape(OP, "a step needs at least one batch"))?;
        let p = model.table.len();
        let lens = [
            ("grads", grads.len(), p),
            ("student", inp.student.f32().len(), p),
            ("teacher", inp.teacher.f32().len(), p),
        ];
        check_lens(OP, &lens)?;
        let cfg = &model.backbone.cfg;
        let patches = |size: usize| (size / cfg.patch_size).pow(2);
        let sizes = |b: &StepBatch| (b.n_img, b.n_local, b.global_size, b.local_size);
        let (mut shapes, mut mask_offset) = (Vec::with_capacity(batches.len()), 0);
        // Per-micro-batch and step-wide upper bounds of the masked patches.
        let (mut cap_one, mut cap_all) = (0, 0);
        for (index, batch) in batches.iter().enumerate() {
            if sizes(batch) != sizes(first) {
                return Err(Error::shape(
                    OP,
                    format!("micro-batch {index} has another shape than micro-batch 0"),
                ));
            }
            let masks = step_masks(inp.losses.method, batch)?;
            let shape = Shape {
                b: batch.n_img,
                nl: batch.n_local,
                d: cfg.embed_dim,
                k: model.dino_head.out_dim,
                ki: model.patch_head().out_dim,
                n: patches(batch.global_size),
                n_local: patches(batch.local_size),
                mask_host: masks.map_or_else(Vec::new, |m| {
                    m.mask_indices.iter().map(|&i| i as i64).collect()
                }),
                mask_offset,
                index,
                target_index: index,
                target_mask_offset: mask_offset,
                use_koleo: inp.losses.method.uses_koleo(),
            };
            if let Some(m) = masks {
                // Buffers sized by M reserve the masks' upper bound once: M changes every step.
                let cap = m.upperbound.max(shape.n_masked());
                (cap_one, cap_all) = (cap_one.max(cap), cap_all + cap);
            }
            mask_offset += shape.n_masked();
            shapes.push(shape);
        }
        let layout = target_layout(&mut shapes, dist)?;
        let ws = &mut self.ws;
        self.student_heads.prepare(be, model, inp.student)?;
        self.teacher_heads.prepare(be, model, inp.teacher)?;
        if cap_all > 0 {
            let (d, ki) = (shapes[0].d, shapes[0].ki);
            let patch_head = model.patch_head();
            for buf in [&mut ws.t_masked, &mut ws.s_masked, &mut ws.d_masked] {
                buf.reserve(cap_one * d, |l| be.alloc_f32(l))?;
            }
            ws.ds_ibot.reserve(cap_one * ki, |l| be.alloc_f32(l))?;
            for buf in [&mut ws.ibot_probs, &mut ws.t_ibot_logits] {
                buf.reserve(cap_all * ki, |l| be.alloc_f32(l))?;
            }
            ws.t_ibot.reserve(be, patch_head, cap_one)?;
            ws.s_ibot.reserve(be, patch_head, cap_one)?;
            ws.head_scratch.reserve(be, patch_head, cap_one)?;
            ws.mask_indices.reserve(cap_all, |l| be.alloc_i64(l))?;
            let all: Vec<i64> = (shapes.iter())
                .flat_map(|s| s.mask_host.iter().copied())
                .collect();
            ws.mask_indices.resize(all.len(), |l| be.alloc_i64(l))?;
            be.upload_i64(&mut *ws.mask_indices.get_mut()?, &all)?;
        }
        grow(
            be,
            &mut ws.readback,
            SLOT_MICRO + shapes.len() * MICRO_SLOTS,
        )?;
        be.zero_f32(&mut *ws.readback.get_mut()?)?;
        Ok((shapes, layout))
    }

    /// The teacher on every micro-batch (no gradient, no masks, no drop path): its DINO
    /// logits and the masked patches' iBOT logits, then the targets of all of them jointly,
    /// and the DINO targets' entropy.
    fn teacher(
        &mut self,
        be: &mut B,
        inp: &StepInputs<'_, '_, B>,
        targets: &mut Targets<B>,
        (shapes, layout): (&[Shape], &TargetLayout),
        dist: Option<&mut (dyn Collective + '_)>,
    ) -> Result<()> {
        let (model, w) = (inp.model, inp.teacher);
        let ws = &mut self.ws;
        let (rows, k, ki) = (shapes[0].n_global(), shapes[0].k, shapes[0].ki);
        let all_rows = rows * layout.micro_batches;
        let groups = &layout.masked;
        let all_masked: usize = groups.iter().sum();
        grow(be, &mut ws.t_dino_logits, all_rows * k)?;
        grow(be, &mut ws.t_ibot_logits, all_masked * ki)?;
        for (batch, s) in inp.batches.iter().zip(shapes) {
            let g = batch.global_size;
            let t_out = self.vit_global.forward_inference(
                be,
                &model.backbone,
                w,
                batch.global,
                (rows, g, g),
            )?;
            let heads = &self.teacher_heads;
            model
                .dino_head
                .forward(be, &mut ws.t_dino, &heads.dino, w, &t_out.cls, rows)?;
            let mut logits = ws.t_dino_logits.rows_mut(s.dino_target_values())?;
            be.copy_f32(&mut logits, &*ws.t_dino.logits.get()?)?;
            if s.ibot() {
                let indices = ws.mask_indices.rows(s.masked_rows())?;
                gather_masked(be, &mut ws.t_masked, &t_out.patch, &indices, s)?;
                let t_masked = ws.t_masked.get()?;
                let head = model.patch_head();
                head.forward(
                    be,
                    &mut ws.t_ibot,
                    heads.patch(),
                    w,
                    &t_masked,
                    s.n_masked(),
                )?;
                let mut logits = ws.t_ibot_logits.rows_mut(s.ibot_target_values())?;
                be.copy_f32(&mut logits, &*ws.t_ibot.logits.get()?)?;
            }
        }
        if let Some(c) = dist {
            // This rank's micro-batches are contiguous in both buffers.
            let (first, last) = (&shapes[0], &shapes[shapes.len() - 1]);
            let dino = first.dino_target_values().start..last.dino_target_values().end;
            exchange(be, c, &mut ws.t_dino_logits, dino)?;
            if all_masked > 0 {
                let ibot = first.ibot_target_values().start..last.ibot_target_values().end;
                exchange(be, c, &mut ws.t_ibot_logits, ibot)?;
            }
        }
        let temp = inp.teacher_temp;
        grow(be, &mut ws.dino_probs, all_rows * k)?;
        {
            let (mut probs, logits) = (ws.dino_probs.get_mut()?, ws.t_dino_logits.get()?);
            // One group: the official DINO center is the mean over every rank's rows.
            let dims = (all_rows, k);
            targets
                .dino
                .teacher_probs(be, &mut probs, &logits, dims, temp)?;
        }
        grow(be, &mut ws.ibot_probs, all_masked * ki)?;
        if all_masked > 0 {
            let (mut probs, logits) = (ws.ibot_probs.get_mut()?, ws.t_ibot_logits.get()?);
            targets
                .ibot
                .teacher_probs_grouped(be, &mut probs, &logits, groups, ki, temp)?;
        }
        let mut entropy = ws.readback.rows_mut(SLOT_ENTROPY..SLOT_ENTROPY + 1)?;
        be.mean_row_entropy(&mut entropy, &*ws.dino_probs.get()?, k)
    }

    /// The student on one micro-batch's (masked) global crops: its DINO head, KoLeo on each
    /// crop's backbone CLS tokens, and the masked patches through the iBOT head, while the
    /// output is at hand.
    fn student_global(
        &mut self,
        be: &mut B,
        inp: &mut StepInputs<'_, '_, B>,
        batch: &StepBatch<'_>,
        weights: &LossConfig,
        s: &Shape,
    ) -> Result<()> {
        let (model, w) = (inp.model, inp.student);
        let ws = &mut self.ws;
        let (b, d, n_global, g) = (s.b, s.d, s.n_global(), batch.global_size);
        let masks = batch.masks.filter(|_| inp.losses.method.uses_ibot());
        let masks = masks.map(|m| m.masks.as_slice());
        let given = batch.drop_path.map(|d| d.global.as_slice());
        let subsets = student_subsets(given, &mut inp.drop_path, model, n_global)?;
        let out = self.vit_global.forward_with_subsets(
            be,
            &model.backbone,
            w,
            batch.global,
            (n_global, g, g),
            masks,
            &subsets,
        )?;
        let heads = &self.student_heads;
        model.dino_head.forward(
            be,
            &mut ws.s_dino_global,
            &heads.dino,
            w,
            &out.cls,
            n_global,
        )?;
        grow(be, &mut ws.d_cls_global, n_global * d)?;
        if s.use_koleo {
            if ws.koleo.as_ref().is_none_or(|(kb, _)| *kb != b) {
                ws.koleo = Some((b, be.koleo_state(b, d)?));
            }
            let state = ws.koleo.as_mut().map(|(_, st)| st);
            let state = state.ok_or_else(|| Error::Unsupported("KoLeo state missing".into()))?;
            for crop in 0..2 {
                let rows = crop * b * d..(crop + 1) * b * d;
                let x = out.cls.window(rows.clone())?;
                let mut loss = ws.readback.rows_mut(s.slots(MICRO_KOLEO + crop, 1))?;
                be.koleo_forward(&mut loss, state, &x, b, d)?;
                let mut dx = ws.d_cls_global.rows_mut(rows)?;
                be.koleo_backward(&mut dx, state, weights.koleo_loss_weight, b, d)?;
            }
        }
        if s.ibot() {
            let indices = ws.mask_indices.rows(s.masked_rows())?;
            gather_masked(be, &mut ws.s_masked, &out.patch, &indices, s)?;
            let s_masked = ws.s_masked.get()?;
            let head = model.patch_head();
            head.forward(
                be,
                &mut ws.s_ibot,
                heads.patch(),
                w,
                &s_masked,
                s.n_masked(),
            )?;
        }
        Ok(())
    }

    /// The student on one micro-batch's local crops and its DINO head.
    fn student_local(
        &mut self,
        be: &mut B,
        inp: &mut StepInputs<'_, '_, B>,
        batch: &StepBatch<'_>,
        s: &Shape,
    ) -> Result<()> {
        let (model, w) = (inp.model, inp.student);
        let rows = s.nl * s.b;
        if rows == 0 {
            return self.ws.s_dino_local.logits.resize(0, |l| be.alloc_f32(l));
        }
        let l = batch.local_size;
        let given = batch.drop_path.map(|d| d.local.as_slice());
        let subsets = student_subsets(given, &mut inp.drop_path, model, rows)?;
        let out = self.vit_local.forward_with_subsets(
            be,
            &model.backbone,
            w,
            batch.local,
            (rows, l, l),
            None,
            &subsets,
        )?;
        let protos = &self.student_heads.dino;
        model
            .dino_head
            .forward(be, &mut self.ws.s_dino_local, protos, w, &out.cls, rows)
    }

    /// One micro-batch's DINO loss over the official crop pairs and iBOT loss, with the
    /// gradients of the student logits.
    fn losses(&mut self, be: &mut B, weights: &LossConfig, s: &Shape) -> Result<()> {
        let ws = &mut self.ws;
        let (b, nl, k, ki) = (s.b, s.nl, s.k, s.ki);
        grow(be, &mut ws.ds_global, 2 * b * k)?;
        grow(be, &mut ws.ds_local, nl * b * k)?;
        {
            let mut terms = ws.readback.rows_mut(s.slots(MICRO_DINO, 2))?;
            let (s_global, s_local) = (
                ws.s_dino_global.logits.get()?,
                ws.s_dino_local.logits.get()?,
            );
            let (mut d_global, mut d_local) = (ws.ds_global.get_mut()?, ws.ds_local.get_mut()?);
            let student = DinoStudent::<B> {
                global: &s_global,
                local: &s_local,
                d_global: &mut d_global,
                d_local: &mut d_local,
            };
            let probs = ws.dino_probs.rows(s.dino_target_values())?;
            let (temp, weight) = (weights.student_temp, weights.dino_loss_weight);
            let (pairs, dims) = (&mut ws.dino_pairs, (b, nl, k));
            dino_loss_forward_backward(be, pairs, &mut terms, student, &probs, dims, temp, weight)?;
        }
        grow(be, &mut ws.ds_ibot, s.n_masked() * ki)?;
        if s.ibot() {
            let mut loss = ws.readback.rows_mut(s.slots(MICRO_IBOT, 1))?;
            let (mut ds, logits) = (ws.ds_ibot.get_mut()?, ws.s_ibot.logits.get()?);
            let probs = ws.ibot_probs.rows(s.ibot_target_values())?;
            let temps = (weights.student_temp, weights.ibot_loss_weight);
            let pairs = &ws.ibot_pairs;
            ibot_loss_forward_backward(be, pairs, &mut loss, &mut ds, &logits, &probs, ki, temps)?;
        }
        Ok(())
    }

    /// Backward of one micro-batch's global crops: the DINO head (its input gradient added to
    /// KoLeo's), the iBOT head scattered back to the masked patches, then the backbone.
    fn backward_global(
        &mut self,
        be: &mut B,
        inp: &StepInputs<'_, '_, B>,
        batch: &StepBatch<'_>,
        grads: &mut B::F32,
        s: &Shape,
    ) -> Result<()> {
        let (model, w) = (inp.model, inp.student);
        let (ws, heads) = (&mut self.ws, &self.student_heads);
        let (n_global, d, g) = (s.n_global(), s.d, batch.global_size);
        {
            let (ds, mut d_cls) = (ws.ds_global.get()?, ws.d_cls_global.get_mut()?);
            let write = if s.use_koleo {
                Accumulate::Add
            } else {
                Accumulate::Overwrite
            };
            let saved = (&ws.s_dino_global, &heads.dino);
            let scratch = &mut ws.head_scratch;
            let dx = (&mut *d_cls, write);
            model
                .dino_head
                .backward(be, scratch, grads, dx, saved, w, &ds)?;
        }
        grow(be, &mut ws.d_patch_global, n_global * s.n * d)?;
        be.zero_f32(&mut *ws.d_patch_global.get_mut()?)?;
        if s.ibot() {
            grow(be, &mut ws.d_masked, s.n_masked() * d)?;
            {
                let (ds, mut d_masked) = (ws.ds_ibot.get()?, ws.d_masked.get_mut()?);
                let saved = (&ws.s_ibot, heads.patch());
                let dx = (&mut *d_masked, Accumulate::Overwrite);
                let scratch = &mut ws.head_scratch;
                model
                    .patch_head()
                    .backward(be, scratch, grads, dx, saved, w, &ds)?;
            }
            let (mut d_patch, d_masked) = (ws.d_patch_global.get_mut()?, ws.d_masked.get()?);
            let indices = ws.mask_indices.rows(s.masked_rows())?;
            be.scatter_rows_add(&mut d_patch, &d_masked, &indices, &s.mask_host, s.patches())?;
        }
        let (d_cls, d_patch) = (ws.d_cls_global.get()?, ws.d_patch_global.get()?);
        let d = OutputGrads {
            cls: &*d_cls,
            patch: &*d_patch,
            reg: None,
        };
        let key = (n_global, g, g);
        self.vit_global
            .backward(be, &model.backbone, w, grads, key, d, ImageGrad::Skip)
            .map(drop)
    }

    /// Backward of one micro-batch's local crops: the DINO head, then the backbone (no patch
    /// gradient).
    fn backward_local(
        &mut self,
        be: &mut B,
        inp: &StepInputs<'_, '_, B>,
        batch: &StepBatch<'_>,
        grads: &mut B::F32,
        s: &Shape,
    ) -> Result<()> {
        let rows = s.nl * s.b;
        if rows == 0 {
            return Ok(());
        }
        let (model, w) = (inp.model, inp.student);
        let (ws, heads) = (&mut self.ws, &self.student_heads);
        let (d, l) = (s.d, batch.local_size);
        grow(be, &mut ws.d_cls_local, rows * d)?;
        let patch_len = rows * s.n_local * d;
        let fresh = ws.d_patch_local.len() != patch_len;
        grow(be, &mut ws.d_patch_local, patch_len)?;
        if fresh {
            be.zero_f32(&mut *ws.d_patch_local.get_mut()?)?;
        }
        {
            let (ds, mut d_cls) = (ws.ds_local.get()?, ws.d_cls_local.get_mut()?);
            let saved = (&ws.s_dino_local, &heads.dino);
            let dx = (&mut *d_cls, Accumulate::Overwrite);
            let scratch = &mut ws.head_scratch;
            model
                .dino_head
                .backward(be, scratch, grads, dx, saved, w, &ds)?;
        }
        let (d_cls, d_patch) = (ws.d_cls_local.get()?, ws.d_patch_local.get()?);
        let d = OutputGrads {
            cls: &*d_cls,
            patch: &*d_patch,
            reg: None,
        };
        self.vit_local
            .backward(
                be,
                &model.backbone,
                w,
                grads,
                (rows, l, l),
                d,
                ImageGrad::Skip,
            )
            .map(drop)
    }

    /// Reads back the loss terms of the step [`SslStep::run`] queued, with `norms` (e.g. the
    /// optimizer's gradient norms, at most [`MAX_NORMS`]) in the same copy; returns the step
    /// output (each term the mean over the micro-batches, as data-parallel ranks log it) and
    /// the norms.
    pub fn read(
        &mut self,
        be: &mut B,
        norms: Option<&B::F32>,
        probs: TeacherProbs,
    ) -> Result<(StepOutput, Vec<f32>)> {
        let q = &self.queued;
        let w = q
            .weights
            .ok_or_else(|| Error::Config("SslStep::read before a step ran".into()))?;
        let ws = &mut self.ws;
        let n_norms = norms.map_or(0, |n| n.len());
        if n_norms > MAX_NORMS {
            return Err(Error::shape(
                "SslStep::read",
                format!("{n_norms} norms; room for {MAX_NORMS}"),
            ));
        }
        if let Some(n) = norms {
            be.copy_f32(
                &mut *ws.readback.rows_mut(SLOT_NORMS..SLOT_NORMS + n_norms)?,
                n,
            )?;
        }
        let host = be.download_f32(&*ws.readback.get()?)?;
        let mut out = StepOutput {
            teacher_entropy: host[SLOT_ENTROPY],
            ..StepOutput::default()
        };
        let n = q.shapes.len() as f32;
        for s in &q.shapes {
            let terms = |first, len| &host[s.slots(first, len)];
            let dino = dino_terms(terms(MICRO_DINO, 2), w.dino_loss_weight);
            let koleo = terms(MICRO_KOLEO, 2);
            let koleo_total = if s.use_koleo {
                w.koleo_loss_weight * koleo[0] + w.koleo_loss_weight * koleo[1]
            } else {
                0.0
            };
            let ibot = terms(MICRO_IBOT, 1)[0];
            out.loss += (dino.total + koleo_total + w.ibot_loss_weight * ibot) / n;
            out.dino_local_crops_loss += dino.local / n;
            out.dino_global_crops_loss += dino.global / n;
            out.koleo_loss += koleo_total / 2.0 / n;
            out.ibot_loss += ibot / 2.0 / n;
        }
        if probs == TeacherProbs::Download {
            out.teacher_dino_probs = be.download_f32(&*ws.dino_probs.get()?)?;
            if q.shapes.iter().any(Shape::ibot) {
                out.teacher_ibot_probs = be.download_f32(&*ws.ibot_probs.get()?)?;
            }
        }
        Ok((out, host[SLOT_NORMS..SLOT_NORMS + n_norms].to_vec()))
    }
}

/// The masks a step needs: the batch's when the method uses iBOT (an error if it has none),
/// else none; checked against the batch.
fn step_masks<'a>(method: Method, batch: &StepBatch<'a>) -> Result<Option<&'a MaskBatch>> {
    let masks = match (method.uses_ibot(), batch.masks) {
        (true, Some(m)) => Some(m),
        (true, None) => {
            return Err(Error::Config(format!(
                "method {method} needs global-crop masks"
            )))
        }
        (false, _) => None,
    };
    if batch.n_img == 0 {
        return Err(Error::shape("ssl step", "a batch needs at least one image"));
    }
    if let Some(m) = masks {
        if m.n_crops != 2 * batch.n_img {
            return Err(Error::shape(
                "ssl step",
                format!(
                    "masks cover {} crops, the batch has {}",
                    m.n_crops,
                    2 * batch.n_img
                ),
            ));
        }
    }
    Ok(masks)
}

/// The targets' layout over every rank, and each local micro-batch's place in it: the ranks
/// exchange their masked-patch counts.
fn target_layout(
    shapes: &mut [Shape],
    dist: Option<&mut (dyn Collective + '_)>,
) -> Result<TargetLayout> {
    let local: Vec<usize> = shapes.iter().map(Shape::n_masked).collect();
    let Some(c) = dist else {
        return Ok(TargetLayout {
            micro_batches: shapes.len(),
            masked: local,
        });
    };
    let counts: Vec<f32> = local.iter().map(|&m| m as f32).collect();
    let all = c.all_gather(&counts)?;
    if let Some(r) = all.iter().position(|v| v.len() != shapes.len()) {
        return Err(Error::shape(
            "ssl step",
            format!(
                "rank {r} has {} micro-batches, rank {} {}: every rank needs as many",
                all[r].len(),
                c.rank(),
                shapes.len()
            ),
        ));
    }
    let masked: Vec<usize> = all.concat().into_iter().map(|m| m as usize).collect();
    let first = c.rank() * shapes.len();
    for s in shapes.iter_mut() {
        s.target_index = first + s.index;
        s.target_mask_offset = masked[..s.target_index].iter().sum();
    }
    Ok(TargetLayout {
        micro_batches: masked.len(),
        masked,
    })
}

/// Replaces `buf` by the concatenation, in rank order, of every rank's values `mine` of it.
fn exchange<B: Backend>(
    be: &mut B,
    c: &mut (dyn Collective + '_),
    buf: &mut Grow<B::BufF32>,
    mine: Range<usize>,
) -> Result<()> {
    let host = be.download_f32(&*buf.rows(mine)?)?;
    let all = c.all_gather(&host)?.concat();
    let mut whole = buf.get_mut()?;
    if all.len() != whole.len() {
        return Err(Error::shape(
            "ssl step",
            format!(
                "the ranks' teacher logits hold {} values, expected {}",
                all.len(),
                whole.len()
            ),
        ));
    }
    be.upload_f32(&mut whole, &all)
}

/// The drop-path subsets of one student forward over `b` samples: the batch's given ones, else
/// drawn from the step's stream (each forward continues it), else none.
fn student_subsets<'g>(
    given: Option<&'g [Option<Subset>]>,
    drop_path: &mut Option<(f32, &mut Rng)>,
    model: &SslModel,
    b: usize,
) -> Result<Cow<'g, [Option<Subset>]>> {
    Ok(match (given, drop_path) {
        (Some(given), _) => Cow::Borrowed(given),
        (None, Some((rate, rng))) => {
            let branches = 2 * model.backbone.blocks.len();
            Cow::Owned(draw_subsets(b, *rate, branches, rng)?)
        }
        (None, None) => Cow::Borrowed(&[]),
    })
}

/// `out [M, D]` = the masked rows of `patch [2B, N, D]` (`indices [M]`: this micro-batch's).
fn gather_masked<B: Backend>(
    be: &mut B,
    out: &mut Grow<B::BufF32>,
    patch: &B::F32,
    indices: &B::I64,
    s: &Shape,
) -> Result<()> {
    grow(be, out, s.n_masked() * s.d)?;
    be.gather_rows(
        &mut *out.get_mut()?,
        patch,
        indices,
        &s.mask_host,
        s.patches(),
    )
}
