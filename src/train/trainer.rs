//! The training state and one full iteration: masks, schedules, the SSL step (forward and
//! backward), gradient clipping per submodule, AdamW, and the EMA teacher (spec section 8,
//! `train.py::do_train`). The loop around it (data, logs, checkpoints) is in `run.rs`.
//!
//! Everything random is keyed by (seed, step), so a run resumed from a checkpoint at step `s`
//! computes exactly what the uninterrupted run computed.
//!
//! Built on a CUDA device ([`Trainer::new_on`]), the iteration runs there (`super::device`):
//! the same masks, drop-path draws and schedules, bf16 GEMMs. The host fields (`student`,
//! `teacher`, the optimizer moments, the centers) are then a copy that
//! [`Trainer::sync_to_host`] refreshes and [`Trainer::sync_to_device`] uploads.

use super::device::{DeviceTrainer, IterationInputs};
use crate::backend::cpu::optimizer::AdamHyper;
use crate::backend::cuda::ResolvedDevice;
use crate::error::{Error, Result};
use crate::eval::FeatureExtractor;
use crate::nn::VitConfig;
use crate::optim::{
    clip_grad_norms, ema_update, AdamW, LayerDecay, ParamGroups, ScheduledValues, Schedules,
    SubmoduleSpan,
};
use crate::rng::{keyed, stream};
use crate::ssl::step::{
    forward_backward, HeadConfig, LossConfig, SslModel, StepBatch, StepOutput, TeacherTargets,
};
use crate::ssl::{collate_masks, Centering, MaskingGenerator};
use crate::train::config::Centering as CenteringMode;

/// Everything one iteration needs, resolved from the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainPlan {
    pub vit: VitConfig,
    pub dino_head: HeadConfig,
    /// `Some` for a separate iBOT head.
    pub ibot_head: Option<HeadConfig>,
    pub losses: LossConfig,
    /// `train.centering`: softmax with the lagged center, or Sinkhorn-Knopp.
    pub centering: CenteringMode,
    /// Images per step (`B`).
    pub batch_size: usize,
    pub n_local_crops: usize,
    pub global_crop_size: usize,
    pub local_crop_size: usize,
    pub mask_probability: f32,
    pub mask_ratio_min_max: (f32, f32),
    /// Student stochastic depth (uniform over blocks); the teacher never drops.
    pub drop_path_rate: f32,
    /// lr, weight decay, teacher momentum and temperature, last-layer freeze, per iteration.
    pub schedules: Schedules,
    pub layer_decay: LayerDecay,
    pub adam: AdamHyper,
    pub clip_grad: f32,
    pub seed: u64,
}

/// The weights an evaluation reads.
#[derive(Clone, Copy, Debug)]
pub enum EvalWeights<'a> {
    /// The current teacher, wherever it lives.
    Teacher,
    /// Host parameters of the whole model's layout (e.g. the initial weights).
    Host(&'a [f32]),
}

/// What one iteration reports.
#[derive(Clone, Debug)]
pub struct StepRecord {
    /// The iteration that ran (0-based).
    pub step: u64,
    pub losses: StepOutput,
    pub scheduled: ScheduledValues,
    /// Gradient norm of each student submodule before clipping, in table order.
    pub grad_norms: Vec<(String, f32)>,
    /// Masked patches this step (M).
    pub n_masked: usize,
}

/// The model, its two parameter buffers, the optimizer and the teacher-target state.
pub struct Trainer {
    pub plan: TrainPlan,
    pub model: SslModel,
    /// `[P]` student parameters (trained by AdamW).
    pub student: Vec<f32>,
    /// `[P]` teacher parameters (EMA of the student).
    pub teacher: Vec<f32>,
    /// `[P]` student gradients of the current step.
    grads: Vec<f32>,
    pub optimizer: AdamW,
    pub targets: TeacherTargets,
    spans: Vec<SubmoduleSpan>,
    masking: MaskingGenerator,
    /// The next iteration to run.
    pub step: u64,
    /// The CUDA state when the trainer runs on a GPU.
    device: Option<Box<DeviceTrainer>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("device", &self.device_name())
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A fresh run: official initialisation of the student from the seed, teacher = student.
    pub fn new(plan: TrainPlan) -> Result<Self> {
        Self::new_on(plan, ResolvedDevice::Cpu)
    }

    /// A fresh run on `device` (the CPU, or a CUDA device the state is uploaded to).
    pub fn new_on(plan: TrainPlan, device: ResolvedDevice) -> Result<Self> {
        let model = SslModel::new(&plan.vit, plan.dino_head, plan.ibot_head)?;
        let student = model.table.init(&mut keyed(plan.seed, &[stream::INIT]));
        Self::from_parts_on(plan, model, student, device)
    }

    /// [`Trainer::from_parts`] on `device`.
    pub fn from_parts_on(
        plan: TrainPlan,
        model: SslModel,
        student: Vec<f32>,
        device: ResolvedDevice,
    ) -> Result<Self> {
        let mut trainer = Self::from_parts(plan, model, student)?;
        if let ResolvedDevice::Cuda(gpu) = device {
            let groups = ParamGroups::from_table(&trainer.model.table, &trainer.plan.layer_decay)?;
            trainer.device = Some(Box::new(DeviceTrainer::new(
                *gpu,
                &trainer.model,
                &groups,
                &trainer.spans,
                &trainer.student,
                &trainer.teacher,
                &trainer.optimizer,
                &trainer.targets,
            )?));
        }
        Ok(trainer)
    }

    /// Where the iterations run (`cpu`, or the CUDA device's name).
    pub fn device_name(&self) -> String {
        match &self.device {
            Some(d) => d.device_name(),
            None => "cpu".to_string(),
        }
    }

    /// The most device memory seen in use after an iteration (bytes), on a CUDA device.
    pub fn peak_device_memory(&self) -> Option<u64> {
        self.device.as_ref().map(|d| d.peak_memory())
    }

    /// Device buffers allocated so far by the CUDA step (see `DeviceTrainer::allocations`);
    /// `None` on the CPU. A steady-state iteration leaves it unchanged.
    pub fn device_allocations(&self) -> Option<u64> {
        self.device.as_ref().map(|d| d.allocations())
    }

    /// Which library ran the GEMMs how often so far (cuBLASLt with fused epilogues, or cuBLAS);
    /// `None` on the CPU.
    pub fn gemm_stats(&self) -> Option<crate::backend::cuda::GemmStats> {
        self.device.as_ref().map(|d| d.gpu.gemm_stats())
    }

    /// Hand-written kernels launched so far on the CUDA device; `None` on the CPU.
    pub fn kernel_launches(&self) -> Option<u64> {
        self.device.as_ref().map(|d| d.gpu.kernel_launches())
    }

    /// A feature extractor of the backbone with `weights`, on the trainer's device. On CUDA the
    /// teacher is read where it lives (no [`Trainer::sync_to_host`] needed) and host weights
    /// are uploaded for the extractor's lifetime.
    pub fn feature_extractor<'a>(
        &'a mut self,
        weights: EvalWeights<'a>,
    ) -> Result<FeatureExtractor<'a>> {
        let vit = &self.model.backbone;
        match (&mut self.device, weights) {
            (Some(d), EvalWeights::Teacher) => Ok(d.teacher_features(vit)),
            (Some(d), EvalWeights::Host(params)) => d.host_features(vit, params),
            (None, EvalWeights::Teacher) => Ok(FeatureExtractor::cpu(vit, &self.teacher)),
            (None, EvalWeights::Host(params)) => Ok(FeatureExtractor::cpu(vit, params)),
        }
    }

    /// Refreshes the host copies (student, teacher, AdamW moments, centers) from the device;
    /// call before reading them (checkpoint, export, k-NN). Nothing to do on the CPU.
    pub fn sync_to_host(&mut self) -> Result<()> {
        match &self.device {
            Some(d) => d.sync_to_host(
                &mut self.student,
                &mut self.teacher,
                &mut self.optimizer,
                &mut self.targets,
            ),
            None => Ok(()),
        }
    }

    /// Uploads the host copies to the device after they were replaced (resume, pretrained
    /// weights). Nothing to do on the CPU.
    pub fn sync_to_device(&mut self) -> Result<()> {
        match &mut self.device {
            Some(d) => {
                d.sync_to_device(&self.student, &self.teacher, &self.optimizer, &self.targets)
            }
            None => Ok(()),
        }
    }

    /// A run starting from given student weights (pretrained backbone, fresh heads, ...); the
    /// teacher starts as a copy, as in the official code.
    pub fn from_parts(plan: TrainPlan, model: SslModel, student: Vec<f32>) -> Result<Self> {
        if student.len() != model.table.len() {
            return Err(Error::shape(
                "Trainer",
                format!(
                    "{} parameter values for a model of {}",
                    student.len(),
                    model.table.len()
                ),
            ));
        }
        if plan.batch_size < 2 && plan.losses.method.uses_koleo() {
            return Err(Error::Config(
                "KoLeo needs at least 2 images per batch (set a larger batch size or --method ibot)"
                    .into(),
            ));
        }
        let groups = ParamGroups::from_table(&model.table, &plan.layer_decay)?;
        let optimizer = AdamW::new(&model.table, &groups, plan.adam)?;
        let spans = SubmoduleSpan::from_table(&model.table);
        let masking = MaskingGenerator::official(plan.global_crop_size, plan.vit.patch_size)?;
        let centering = |k: usize| match plan.centering {
            CenteringMode::Softmax => Centering::softmax(k),
            CenteringMode::SinkhornKnopp => Centering::sinkhorn_knopp(),
        };
        let k_ibot = plan
            .ibot_head
            .map_or(plan.dino_head.n_prototypes, |h| h.n_prototypes);
        let targets = TeacherTargets {
            dino: centering(plan.dino_head.n_prototypes),
            ibot: centering(k_ibot),
        };
        let grads = vec![0f32; student.len()];
        Ok(Trainer {
            teacher: student.clone(),
            student,
            grads,
            optimizer,
            targets,
            spans,
            masking,
            model,
            plan,
            step: 0,
            device: None,
        })
    }

    /// Floats in one global-crop batch `[2B, 3, G, G]`.
    pub fn global_len(&self) -> usize {
        2 * self.plan.batch_size * 3 * self.plan.global_crop_size.pow(2)
    }

    /// Floats in one local-crop batch `[nl·B, 3, Lc, Lc]`.
    pub fn local_len(&self) -> usize {
        self.plan.n_local_crops * self.plan.batch_size * 3 * self.plan.local_crop_size.pow(2)
    }

    /// One iteration on crop-major crops: global `[2B, 3, G, G]`, local `[nl·B, 3, Lc, Lc]`.
    /// A non-finite loss or gradient norm stops with an error naming the step and the term,
    /// before any parameter changes.
    pub fn train_step(&mut self, global: &[f32], local: &[f32]) -> Result<StepRecord> {
        let step = self.step;
        let plan = &self.plan;
        if global.len() != self.global_len() || local.len() != self.local_len() {
            return Err(Error::shape(
                "train step",
                format!(
                    "crops hold {} + {} values, expected {} + {}",
                    global.len(),
                    local.len(),
                    self.global_len(),
                    self.local_len()
                ),
            ));
        }
        let scheduled = plan.schedules.at(step);
        let masks = if plan.losses.method.uses_ibot() {
            Some(collate_masks(
                &mut keyed(plan.seed, &[stream::MASKS, step]),
                &self.masking,
                2 * plan.batch_size,
                plan.mask_probability,
                plan.mask_ratio_min_max,
            )?)
        } else {
            None
        };
        let batch = StepBatch {
            global,
            local,
            n_img: plan.batch_size,
            n_local: plan.n_local_crops,
            global_size: plan.global_crop_size,
            local_size: plan.local_crop_size,
            masks: masks.as_ref(),
        };
        let mut drop_rng = keyed(plan.seed, &[stream::DROP_PATH, step]);
        let drop_path = (plan.drop_path_rate > 0.0).then_some((plan.drop_path_rate, &mut drop_rng));

        if let Some(device) = &mut self.device {
            let inputs = IterationInputs {
                batch,
                scheduled: &scheduled,
                losses: &plan.losses,
                clip_grad: plan.clip_grad,
                drop_path,
            };
            let names = device.span_names();
            let adam_step = self.optimizer.state.step + 1;
            let result = device.iteration(&self.model, inputs, adam_step, |r| {
                non_finite_check(&r.losses, &names, &r.norms, step)
            })?;
            self.optimizer.state.step = adam_step;
            self.step += 1;
            return Ok(StepRecord {
                step,
                n_masked: masks.as_ref().map_or(0, |m| m.n_masked()),
                losses: result.losses,
                scheduled,
                grad_norms: names.into_iter().zip(result.norms).collect(),
            });
        }

        self.grads.fill(0.0);
        let losses = forward_backward(
            &self.model,
            &self.student,
            &self.teacher,
            &mut self.grads,
            &batch,
            &mut self.targets,
            scheduled.teacher_temp as f32,
            &plan.losses,
            drop_path,
        )?;
        if let Some((name, _)) = losses.terms().into_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: name.to_string(),
                step,
            });
        }
        let norms = clip_grad_norms(&mut self.grads, &self.spans, plan.clip_grad)?;
        let grad_norms: Vec<(String, f32)> = self
            .spans
            .iter()
            .map(|s| s.name.clone())
            .zip(norms)
            .collect();
        if let Some((name, _)) = grad_norms.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("{name} gradient norm"),
                step,
            });
        }
        self.optimizer.step(
            &mut self.student,
            &self.grads,
            scheduled.lr,
            scheduled.last_layer_lr,
            scheduled.wd,
        )?;
        ema_update(&mut self.teacher, &self.student, scheduled.momentum)?;
        self.step += 1;
        Ok(StepRecord {
            step,
            n_masked: masks.as_ref().map_or(0, |m| m.n_masked()),
            losses,
            scheduled,
            grad_norms,
        })
    }
}

/// The error a non-finite loss term or gradient norm stops the run with (before any update).
fn non_finite_check(losses: &StepOutput, names: &[String], norms: &[f32], step: u64) -> Result<()> {
    if let Some((name, _)) = losses.terms().into_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: name.to_string(),
            step,
        });
    }
    if let Some((name, _)) = names.iter().zip(norms).find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("{name} gradient norm"),
            step,
        });
    }
    Ok(())
}
