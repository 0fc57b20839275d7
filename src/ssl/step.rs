//! One DINOv2 training step on the CPU: teacher forward (no gradient), student forward on the
//! masked global crops and the local crops, heads, the three losses, and backward into the
//! student's flat gradient buffer (spec section 8; golden case `ssl_step`).
//!
//! Optimizer, clipping and EMA are separate passes over the flat buffers (`crate::optim`), run by
//! the training loop after this function.
//!
//! Dimensions: `B` images, `G`/`Lc` global/local crop sizes, `nl` local crops per image, `N`/`Nl`
//! patches per global/local crop, `D` embed dim, `K`/`Ki` DINO/iBOT prototypes, `M` masked
//! patches.

use super::centering::Centering;
use super::dino_loss::{dino_loss_forward_backward, STUDENT_TEMP};
use super::ibot_loss::ibot_loss_forward_backward;
use super::koleo::koleo_loss_forward_backward;
use super::masking::MaskBatch;
use super::Method;
use crate::backend::cpu::Accumulate;
use crate::error::{Error, Result};
use crate::nn::params::ParamTable;
use crate::nn::{DinoHead, DropPath, Vit, VitConfig};
use crate::rng::Rng;

/// Sizes of one projection head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadConfig {
    pub hidden_dim: usize,
    pub bottleneck_dim: usize,
    pub n_prototypes: usize,
}

/// The student (or teacher) model: backbone, DINO head and an optional separate iBOT head, all
/// parameters in one [`ParamTable`] under the official prefixes `backbone.`, `dino_head.` and
/// `ibot_head.`. Student and teacher share this layout; each has its own flat buffer.
#[derive(Clone, Debug)]
pub struct SslModel {
    pub table: ParamTable,
    pub backbone: Vit,
    pub dino_head: DinoHead,
    /// `Some` when `ibot.separate_head` is true; otherwise the iBOT loss uses the DINO head.
    pub ibot_head: Option<DinoHead>,
}

impl SslModel {
    /// Declares every parameter (official names and initialisation).
    pub fn new(vit: &VitConfig, dino: HeadConfig, ibot: Option<HeadConfig>) -> Result<Self> {
        vit.validate()?;
        let mut table = ParamTable::new();
        let backbone = Vit::new(vit, &mut table, "backbone.");
        let head = |h: HeadConfig, table: &mut ParamTable, prefix: &str| {
            DinoHead::new(
                vit.embed_dim,
                h.hidden_dim,
                h.bottleneck_dim,
                h.n_prototypes,
                table,
                prefix,
            )
        };
        let dino_head = head(dino, &mut table, "dino_head.");
        let ibot_head = ibot.map(|h| head(h, &mut table, "ibot_head."));
        Ok(SslModel {
            table,
            backbone,
            dino_head,
            ibot_head,
        })
    }

    /// The head the iBOT loss runs through.
    pub fn patch_head(&self) -> &DinoHead {
        self.ibot_head.as_ref().unwrap_or(&self.dino_head)
    }
}

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
            koleo_loss_weight: 0.1,
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

/// Rows `indices` of `x [rows, d]`, gathered into `[indices.len(), d]`.
fn gather_rows(x: &[f32], d: usize, indices: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(indices.len() * d);
    for &i in indices {
        out.extend_from_slice(&x[i * d..(i + 1) * d]);
    }
    out
}

/// `dx[indices[j]] += dy[j]`, the backward of [`gather_rows`].
fn scatter_add_rows(dx: &mut [f32], dy: &[f32], d: usize, indices: &[usize]) {
    for (j, &i) in indices.iter().enumerate() {
        dx[i * d..(i + 1) * d]
            .iter_mut()
            .zip(&dy[j * d..(j + 1) * d])
            .for_each(|(a, &b)| *a += b);
    }
}

/// A fresh [`DropPath`] borrowing the step's generator, one per backbone call.
fn reborrow<'a>(drop_path: &'a mut Option<(f32, &mut Rng)>) -> Option<DropPath<'a>> {
    drop_path
        .as_mut()
        .map(|(rate, rng)| DropPath { rate: *rate, rng })
}

fn mean_entropy(probs: &[f32], k: usize) -> f32 {
    let rows = probs.len() / k.max(1);
    let total: f64 = probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -(p as f64) * (p as f64).ln())
        .sum();
    (total / rows.max(1) as f64) as f32
}

/// Forward and backward of one DINOv2 step. Student parameter gradients **accumulate** into
/// `grads` (zero it first). `drop_path` is the student's stochastic-depth rate and generator
/// (`None` = off); the teacher never drops.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &SslModel,
    student: &[f32],
    teacher: &[f32],
    grads: &mut [f32],
    batch: &StepBatch<'_>,
    targets: &mut TeacherTargets,
    teacher_temp: f32,
    losses: &LossConfig,
    mut drop_path: Option<(f32, &mut Rng)>,
) -> Result<StepOutput> {
    let (b, nl) = (batch.n_img, batch.n_local);
    let (g_size, l_size) = (batch.global_size, batch.local_size);
    let d = model.backbone.cfg.embed_dim;
    let k = model.dino_head.out_dim;
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
    if let Some(m) = masks {
        if m.n_crops != 2 * b {
            return Err(Error::shape(
                "ssl step",
                format!("masks cover {} crops, the batch has {}", m.n_crops, 2 * b),
            ));
        }
    }
    let n_global = 2 * b;

    // ---- Teacher: no gradient, no masks, no drop path.
    let t_out =
        model
            .backbone
            .forward_inference(teacher, batch.global, n_global, g_size, g_size, None)?;
    let (t_cls_logits, _) = model.dino_head.forward(teacher, &t_out.cls, n_global); // [2B, K]
    let mut teacher_dino_probs = vec![0f32; n_global * k]; // [2B, K]
    targets.dino.teacher_probs(
        &mut teacher_dino_probs,
        &t_cls_logits,
        n_global,
        k,
        teacher_temp,
    )?;
    let patch_head = model.patch_head();
    let ki = patch_head.out_dim;
    let mut teacher_ibot_probs = Vec::new(); // [M, Ki]
    if let Some(m) = masks {
        let t_masked = gather_rows(&t_out.patch, d, &m.mask_indices); // [M, D]
        let (t_patch_logits, _) = patch_head.forward(teacher, &t_masked, m.n_masked());
        teacher_ibot_probs = vec![0f32; m.n_masked() * ki];
        targets.ibot.teacher_probs(
            &mut teacher_ibot_probs,
            &t_patch_logits,
            m.n_masked(),
            ki,
            teacher_temp,
        )?;
    }
    drop(t_out);

    // ---- Student forward: masked global crops, then local crops (separate drop-path draws,
    // as the official list forward draws per list element).
    let (g, g_cache) = model.backbone.forward(
        student,
        batch.global,
        n_global,
        g_size,
        g_size,
        masks.map(|m| m.masks.as_slice()),
        reborrow(&mut drop_path),
    )?;
    let local = if nl > 0 {
        Some(model.backbone.forward(
            student,
            batch.local,
            nl * b,
            l_size,
            l_size,
            None,
            reborrow(&mut drop_path),
        )?)
    } else {
        None
    };

    // ---- Heads and losses.
    let (s_global, h_global) = model.dino_head.forward(student, &g.cls, n_global); // [2B, K]
    let (s_local, h_local) = match &local {
        Some((l, _)) => {
            let (s, h) = model.dino_head.forward(student, &l.cls, nl * b);
            (s, Some(h))
        }
        None => (Vec::new(), None),
    };
    let mut ds_global = vec![0f32; n_global * k];
    let mut ds_local = vec![0f32; nl * b * k];
    let dino = dino_loss_forward_backward(
        &mut ds_global,
        &mut ds_local,
        &s_global,
        &s_local,
        &teacher_dino_probs,
        b,
        nl,
        k,
        losses.student_temp,
        losses.dino_loss_weight,
    )?;

    // d loss / d (student global CLS tokens), [2B, D]: the head's part plus KoLeo's.
    let mut d_cls_global = model
        .dino_head
        .backward(student, grads, &h_global, &ds_global);
    let mut koleo_total = 0f32;
    if use_koleo {
        for crop in 0..2 {
            let rows = crop * b * d..(crop + 1) * b * d;
            let kl = koleo_loss_forward_backward(
                &mut d_cls_global[rows.clone()],
                &g.cls[rows],
                b,
                d,
                losses.koleo_loss_weight,
                Accumulate::Add,
            )?;
            koleo_total += losses.koleo_loss_weight * kl;
        }
    }

    let n_patches = g.n_patches;
    let mut d_patch_global = vec![0f32; n_global * n_patches * d]; // [2B, N, D]
    let mut ibot = 0f32;
    if let Some(m) = masks {
        let s_masked_in = gather_rows(&g.patch, d, &m.mask_indices); // [M, D]
        let (s_patch, h_patch) = patch_head.forward(student, &s_masked_in, m.n_masked());
        let mut ds_patch = vec![0f32; m.n_masked() * ki];
        ibot = ibot_loss_forward_backward(
            &mut ds_patch,
            &s_patch,
            &teacher_ibot_probs,
            &m.masks_weight,
            n_global,
            m.n_masked(),
            ki,
            losses.student_temp,
            losses.ibot_loss_weight,
        )?;
        let d_masked = patch_head.backward(student, grads, &h_patch, &ds_patch);
        scatter_add_rows(&mut d_patch_global, &d_masked, d, &m.mask_indices);
    }

    // ---- Backbone backward.
    model.backbone.backward(
        student,
        grads,
        &g_cache,
        &d_cls_global,
        &d_patch_global,
        None,
    )?;
    drop(g_cache);
    if let (Some((l, l_cache)), Some(h_local)) = (local, h_local) {
        let d_cls_local = model
            .dino_head
            .backward(student, grads, &h_local, &ds_local);
        let d_patch_local = vec![0f32; l.cls.len() / d * l.n_patches * d];
        model
            .backbone
            .backward(student, grads, &l_cache, &d_cls_local, &d_patch_local, None)?;
    }

    let loss = dino.total + koleo_total + losses.ibot_loss_weight * ibot;
    Ok(StepOutput {
        loss,
        dino_local_crops_loss: dino.local,
        dino_global_crops_loss: dino.global,
        koleo_loss: koleo_total / 2.0,
        ibot_loss: ibot / 2.0,
        teacher_entropy: mean_entropy(&teacher_dino_probs, k),
        teacher_dino_probs,
        teacher_ibot_probs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_and_scatter_are_adjoint() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect(); // [4, 3]
        let idx = [2, 0, 2];
        let g = gather_rows(&x, 3, &idx);
        assert_eq!(g, vec![6., 7., 8., 0., 1., 2., 6., 7., 8.]);
        let mut dx = vec![0f32; 12];
        scatter_add_rows(&mut dx, &[1.0; 9], 3, &idx);
        assert_eq!(dx, vec![1., 1., 1., 0., 0., 0., 2., 2., 2., 0., 0., 0.]);
    }
}
