//! The trainer: one full iteration (masks, schedules, the SSL step forward and backward,
//! gradient clipping per submodule, AdamW, the EMA teacher; spec section 8,
//! `train.py::do_train`) on the device the trainer was built for. The loop around it (data,
//! logs, checkpoints) is in `run.rs`.
//!
//! The state lives on the device ([`super::state::TrainState`]); [`Trainer::snapshot`] and
//! [`Trainer::restore`] move it to and from the host. Everything random is keyed by
//! (seed, step), so a run resumed from a checkpoint at step `s` computes exactly what the
//! uninterrupted run computed.

use super::state::{HostState, TrainState};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{GemmStats, ResolvedDevice};
use crate::backend::{Backend, Counters, Precision, WeightStore};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::eval::FeatureExtractor;
use crate::nn::{GivenSubsets, Vit, VitConfig};
use crate::optim::{
    ema_update, AdamHyper, GradClipper, LayerDecay, ParamGroups, ScheduledValues, Schedules,
    SubmoduleSpan,
};
use crate::rng::{keyed, stream, Rng};
use crate::ssl::step::{
    HeadConfig, LossConfig, SslModel, SslStep, StepBatch, StepInputs, StepOutput, TeacherProbs,
    TeacherTargets,
};
use crate::ssl::{collate_masks, Centering, MaskBatch, MaskingGenerator};
use crate::train::config::Centering as CenteringMode;
use std::path::Path;

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
    /// Images per micro-batch (`B`, the official `batch_size_per_gpu`).
    pub batch_size: usize,
    /// Micro-batches per step (1 = none): their gradients accumulate into one optimizer step
    /// with the semantics of as many data-parallel ranks (`--accumulate`).
    pub accumulate: usize,
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
    /// The precision the step runs in; `None` = the device's default (f32 on the CPU, bf16 on
    /// CUDA, the only precision the CUDA backend runs).
    pub precision: Option<Precision>,
}

impl TrainPlan {
    /// Images per optimizer step: the micro-batch size times the micro-batches per step.
    pub fn images_per_step(&self) -> usize {
        self.batch_size * self.accumulate
    }
}

/// The weights an evaluation reads.
#[derive(Clone, Copy, Debug)]
pub enum EvalWeights<'a> {
    /// The current teacher, read where it lives.
    Teacher,
    /// Host parameters of the whole model's layout (e.g. the initial weights), uploaded for
    /// the evaluation.
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
    /// Masked patches this step (M, over all micro-batches).
    pub n_masked: usize,
}

/// One micro-batch of a step: crop-major crops, global `[2B, 3, G, G]` and local
/// `[nl·B, 3, Lc, Lc]`, its iBOT masks (`Some` exactly when the method uses iBOT), and
/// optionally the student's drop-path subsets (`None`: drawn at the plan's rate).
#[derive(Clone, Copy, Debug)]
pub struct MicroBatch<'a> {
    pub global: &'a [f32],
    pub local: &'a [f32],
    pub masks: Option<&'a MaskBatch>,
    pub drop_path: Option<&'a GivenSubsets>,
}

/// What one iteration needs besides the model.
struct Iteration<'a, 'r> {
    batches: &'a [StepBatch<'a>],
    scheduled: &'a ScheduledValues,
    losses: &'a LossConfig,
    clip_grad: f32,
    drop_path: Option<(f32, &'r mut Rng)>,
}

/// A trainer's device side: the state, the step's workspaces and one iteration, over one
/// backend (object-safe, so [`Trainer`] is one type whatever the device).
trait Engine {
    /// One iteration of the step number `step`; returns the losses and the gradient norms per
    /// submodule (before clipping). A non-finite loss or norm stops before any update.
    fn iteration(
        &mut self,
        model: &SslModel,
        it: Iteration<'_, '_>,
        step: u64,
    ) -> Result<(StepOutput, Vec<f32>)>;
    fn snapshot(&mut self) -> Result<HostState>;
    fn restore(&mut self, model: &SslModel, host: &HostState) -> Result<()>;
    /// Joins a data-parallel group: from here on, every iteration exchanges the teacher
    /// logits and sums the gradients and logged losses with the other ranks.
    fn join(&mut self, dist: Box<dyn Collective>);
    fn dist(&self) -> Option<&dyn Collective>;
    fn step(&self) -> u64;
    fn span_names(&self) -> Vec<String>;
    fn features<'a>(
        &'a mut self,
        vit: &'a Vit,
        weights: EvalWeights<'_>,
    ) -> Result<FeatureExtractor<'a>>;
    fn describe(&self) -> String;
    fn counters(&self) -> Counters;
    fn peak_memory(&self) -> Option<u64>;
}

struct DeviceEngine<B: Backend> {
    be: B,
    state: TrainState<B>,
    step: SslStep<B>,
    clipper: GradClipper<B>,
    grads: B::BufF32, // [P] student gradients of the current step
    /// The other data-parallel ranks, if any.
    dist: Option<Box<dyn Collective>>,
    /// Largest device memory in use seen after an iteration, where the device reports it.
    peak_memory: Option<u64>,
}

impl<B: Backend> DeviceEngine<B> {
    fn new(mut be: B, model: &SslModel, plan: &TrainPlan, host: &HostState) -> Result<Self> {
        let groups = ParamGroups::from_table(&model.table, &plan.layer_decay)?;
        let spans = SubmoduleSpan::from_table(&model.table);
        let state = TrainState::new(&mut be, model, &groups, plan.adam, host)?;
        let mut engine = DeviceEngine {
            step: SslStep::new(&mut be, model)?,
            clipper: GradClipper::new(&mut be, &spans)?,
            grads: be.alloc_f32(model.table.len())?,
            dist: None,
            state,
            peak_memory: None,
            be,
        };
        engine.sample_memory();
        Ok(engine)
    }

    fn sample_memory(&mut self) {
        if let Some(now) = self.be.memory_in_use() {
            self.peak_memory = Some(self.peak_memory.unwrap_or(0).max(now));
        }
    }
}

impl<B: Backend> Engine for DeviceEngine<B> {
    fn iteration(
        &mut self,
        model: &SslModel,
        it: Iteration<'_, '_>,
        step: u64,
    ) -> Result<(StepOutput, Vec<f32>)> {
        let DeviceEngine {
            be,
            state,
            step: ssl,
            clipper,
            grads,
            dist,
            ..
        } = self;
        be.zero_f32(grads)?;
        let s = it.scheduled;
        // The step updates the softmax centers as it runs: a step that fails (a non-finite
        // value) restores them, so nothing of the training state changes.
        let targets_before = state.targets.to_host(be)?;
        let checked = (|| {
            let inputs = StepInputs {
                model,
                student: &state.student,
                teacher: &state.teacher,
                batches: it.batches,
                teacher_temp: s.teacher_temp as f32,
                losses: it.losses,
                drop_path: it.drop_path,
                dist: dist.as_deref_mut().map(|c| c as &mut dyn Collective),
            };
            ssl.run(be, inputs, grads, &mut state.targets)?;
            if let Some(c) = dist.as_deref_mut() {
                // Each rank's gradient is its share of the mean (the loss weights divide by
                // every rank's micro-batches): the sum is the step's gradient.
                let mut host = be.download_f32(grads)?;
                c.all_reduce_sum(&mut host)?;
                be.upload_f32(grads, &host)?;
            }
            clipper.clip(be, grads, it.clip_grad)?;
            let (mut losses, norms) = ssl.read(be, Some(clipper.norms()), TeacherProbs::Skip)?;
            if let Some(c) = dist.as_deref_mut() {
                mean_over_ranks(c, &mut losses)?;
            }
            let names = clipper.names().map(String::from).collect::<Vec<_>>();
            non_finite_check(&losses, &names, &norms, step)?;
            Ok::<_, Error>((losses, norms))
        })();
        let (losses, norms) = match checked {
            Ok(v) => v,
            Err(e) => {
                state.targets.restore(be, &targets_before)?;
                return Err(e);
            }
        };
        let lrs = (s.lr, s.last_layer_lr, s.wd);
        state
            .optimizer
            .step(be, state.student.f32_mut(), grads, lrs)?;
        ema_update(be, state.teacher.f32_mut(), state.student.f32(), s.momentum)?;
        be.refresh_weights(&mut state.student)?;
        be.refresh_weights(&mut state.teacher)?;
        state.step += 1;
        self.sample_memory();
        Ok((losses, norms))
    }

    fn snapshot(&mut self) -> Result<HostState> {
        self.state.snapshot(&mut self.be)
    }

    fn restore(&mut self, model: &SslModel, host: &HostState) -> Result<()> {
        self.state.restore(&mut self.be, model, host)
    }

    fn step(&self) -> u64 {
        self.state.step
    }

    fn join(&mut self, dist: Box<dyn Collective>) {
        self.dist = Some(dist);
    }

    fn dist(&self) -> Option<&dyn Collective> {
        self.dist.as_deref()
    }

    fn span_names(&self) -> Vec<String> {
        self.clipper.names().map(String::from).collect()
    }

    fn features<'a>(
        &'a mut self,
        vit: &'a Vit,
        weights: EvalWeights<'_>,
    ) -> Result<FeatureExtractor<'a>> {
        match weights {
            EvalWeights::Teacher => Ok(FeatureExtractor::borrowing(
                &mut self.be,
                vit,
                &self.state.teacher,
            )),
            EvalWeights::Host(params) => FeatureExtractor::uploading(&mut self.be, vit, params),
        }
    }

    fn describe(&self) -> String {
        self.be.describe()
    }

    fn counters(&self) -> Counters {
        self.be.counters()
    }

    fn peak_memory(&self) -> Option<u64> {
        self.peak_memory
    }
}

/// A folder to write every step's crops and masks to, for `tools/side-by-side.py
/// --official-batches` (the official code trained on dinotrain's batches: a diagnostic that
/// separates the data pipeline from the training).
pub const DUMP_BATCHES_ENV: &str = "DINOTRAIN_DUMP_BATCHES";

/// `step_NNNNNN.bin` in `dir`: the global then the local crops (f32, little-endian, crop-major),
/// then, with masks, their upper bound (u64) and the masks (`[2B, N]` u8); one micro-batch
/// after the other. Written atomically.
fn dump_batches(
    dir: &Path,
    step: u64,
    crops: &[(&[f32], &[f32])],
    masks: &[MaskBatch],
) -> Result<()> {
    let mut bytes = Vec::new();
    for (i, (global, local)) in crops.iter().enumerate() {
        for v in global.iter().chain(local.iter()) {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        if let Some(m) = masks.get(i) {
            bytes.extend_from_slice(&(m.upperbound as u64).to_le_bytes());
            bytes.extend(m.masks.iter().map(|&b| b as u8));
        }
    }
    let path = dir.join(format!("step_{step:06}.bin"));
    let tmp = dir.join(format!(".step_{step:06}.bin.tmp"));
    std::fs::write(&tmp, &bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// The generator of stream `kind` for micro-batch `index` of `step`, keyed by its place among
/// every rank's micro-batches (micro-batch 0 keeps the key of a step on one rank without
/// accumulation): R ranks of A micro-batches draw what one rank accumulating R·A does.
fn micro_batch_rng(seed: u64, kind: u64, step: u64, index: usize) -> Rng {
    let key = [kind, step, index as u64];
    keyed(seed, if index == 0 { &key[..2] } else { &key[..] })
}

/// The logged losses averaged over the ranks (each rank's are the mean of its micro-batches).
fn mean_over_ranks(c: &mut dyn Collective, losses: &mut StepOutput) -> Result<()> {
    let n = c.world_size() as f32;
    let mut fields = [
        &mut losses.loss,
        &mut losses.dino_local_crops_loss,
        &mut losses.dino_global_crops_loss,
        &mut losses.koleo_loss,
        &mut losses.ibot_loss,
    ];
    let mut terms = fields.each_ref().map(|v| **v);
    c.all_reduce_sum(&mut terms)?;
    for (field, sum) in fields.iter_mut().zip(terms) {
        **field = sum / n;
    }
    Ok(())
}

/// The model, its layout, the masking generator and the device engine holding the state.
pub struct Trainer {
    pub plan: TrainPlan,
    pub model: SslModel,
    masking: MaskingGenerator,
    engine: Box<dyn Engine>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step())
            .field("device", &self.device_name())
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A fresh run on the CPU: official initialisation of the student from the seed, teacher =
    /// student.
    pub fn new(plan: TrainPlan) -> Result<Self> {
        Self::new_on(plan, ResolvedDevice::cpu())
    }

    /// A fresh run on `device`.
    pub fn new_on(plan: TrainPlan, device: ResolvedDevice) -> Result<Self> {
        let model = SslModel::new(&plan.vit, plan.dino_head, plan.ibot_head)?;
        let student = model.table.init(&mut keyed(plan.seed, &[stream::INIT]));
        Self::from_parts_on(plan, model, student, device)
    }

    /// A run starting from given student weights (pretrained backbone, fresh heads, ...) on the
    /// CPU; the teacher starts as a copy, as in the official code.
    pub fn from_parts(plan: TrainPlan, model: SslModel, student: Vec<f32>) -> Result<Self> {
        Self::from_parts_on(plan, model, student, ResolvedDevice::cpu())
    }

    /// [`Trainer::from_parts`] on `device`.
    pub fn from_parts_on(
        plan: TrainPlan,
        model: SslModel,
        student: Vec<f32>,
        device: ResolvedDevice,
    ) -> Result<Self> {
        let host = HostState::fresh(student, fresh_targets(&plan));
        Self::from_state_on(plan, model, &host, device)
    }

    /// A trainer holding `host` (a checkpoint's state) on `device`.
    pub fn from_state_on(
        plan: TrainPlan,
        model: SslModel,
        host: &HostState,
        device: ResolvedDevice,
    ) -> Result<Self> {
        if host.student.len() != model.table.len() {
            return Err(Error::shape(
                "Trainer",
                format!(
                    "{} parameter values for a model of {}",
                    host.student.len(),
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
        let masking = MaskingGenerator::official(plan.global_crop_size, plan.vit.patch_size)?;
        let engine: Box<dyn Engine> = match device {
            ResolvedDevice::Cpu(_) => {
                let precision = plan.precision.unwrap_or(Precision::F32);
                let be = CpuBackend::new(precision);
                Box::new(DeviceEngine::new(be, &model, &plan, host)?)
            }
            ResolvedDevice::Cuda(gpu) => {
                if plan.precision == Some(Precision::F32) {
                    return Err(Error::Unsupported(
                        "f32 precision on CUDA: the CUDA backend runs bf16 GEMM operands \
                         (use --device cpu for an f32 run)"
                            .into(),
                    ));
                }
                Box::new(DeviceEngine::new(*gpu, &model, &plan, host)?)
            }
        };
        Ok(Trainer {
            plan,
            model,
            masking,
            engine,
        })
    }

    /// The next iteration to run.
    pub fn step(&self) -> u64 {
        self.engine.step()
    }

    /// This trainer's rank in its data-parallel group (0 alone).
    pub fn rank(&self) -> usize {
        self.engine.dist().map_or(0, |c| c.rank())
    }

    /// Ranks in the data-parallel group (1 alone).
    pub fn world_size(&self) -> usize {
        self.engine.dist().map_or(1, |c| c.world_size())
    }

    /// Joins a data-parallel group: the training state becomes rank 0's (weights, optimizer
    /// moments, centers, step), and every later step trains on this rank's micro-batches with
    /// the targets, gradients and logged losses of the whole group, the official cross-rank
    /// semantics. Every rank passes the same plan; each feeds its own crops.
    pub fn join(&mut self, mut dist: Box<dyn Collective>) -> Result<()> {
        let mut host = self.snapshot()?;
        let c = dist.as_mut();
        for v in [&mut host.student, &mut host.teacher] {
            c.broadcast(v, 0)?;
        }
        let moments = &mut host.optimizer;
        for v in [&mut moments.exp_avg, &mut moments.exp_avg_sq] {
            c.broadcast(v, 0)?;
        }
        for centering in [&mut host.targets.dino, &mut host.targets.ibot] {
            if let Centering::Softmax { center, .. } = centering {
                c.broadcast(center, 0)?;
            }
        }
        // Step counters in 16-bit pieces (exact in f32).
        let pieces =
            |v: u64| -> Vec<f32> { (0..4).map(|i| (v >> (16 * i) & 0xffff) as f32).collect() };
        let whole = |p: &[f32]| p.iter().rev().fold(0u64, |acc, &x| acc << 16 | x as u64);
        let mut steps = [pieces(host.step), pieces(moments.step)].concat();
        c.broadcast(&mut steps, 0)?;
        (host.step, moments.step) = (whole(&steps[..4]), whole(&steps[4..]));
        self.engine.restore(&self.model, &host)?;
        self.engine.join(dist);
        Ok(())
    }

    /// The drop-path subsets of the micro-batches that do not bring their own, each drawn from
    /// a stream keyed by its place among every rank's micro-batches (as the masks are).
    fn draw_drop_path(&self, micro: &[MicroBatch<'_>]) -> Result<Vec<Option<GivenSubsets>>> {
        let plan = &self.plan;
        let (step, first) = (self.step(), self.rank() * plan.accumulate);
        let sets = (2 * plan.batch_size, plan.n_local_crops * plan.batch_size);
        let branches = 2 * plan.vit.depth;
        (micro.iter().enumerate())
            .map(|(i, mb)| {
                if mb.drop_path.is_some() || plan.drop_path_rate <= 0.0 {
                    return Ok(None);
                }
                let rng = &mut micro_batch_rng(plan.seed, stream::DROP_PATH, step, first + i);
                GivenSubsets::draw(plan.drop_path_rate, branches, sets, rng).map(Some)
            })
            .collect()
    }

    /// The whole training state read back to the host (checkpoints, export).
    pub fn snapshot(&mut self) -> Result<HostState> {
        self.engine.snapshot()
    }

    /// Replaces the training state (resume, a pretrained start).
    pub fn restore(&mut self, host: &HostState) -> Result<()> {
        self.engine.restore(&self.model, host)
    }

    /// Where the iterations run (`cpu (2 threads, f32)`, or the CUDA device's name).
    pub fn device_name(&self) -> String {
        self.engine.describe()
    }

    /// The backend's counters (allocations, kernel launches, GEMM paths).
    pub fn counters(&self) -> Counters {
        self.engine.counters()
    }

    /// The most device memory seen in use after an iteration (bytes), on a CUDA device.
    pub fn peak_device_memory(&self) -> Option<u64> {
        self.engine.peak_memory()
    }

    /// Buffers the backend allocated so far; a steady-state iteration leaves it unchanged.
    pub fn device_allocations(&self) -> u64 {
        self.counters().allocations
    }

    /// Which library ran the GEMMs how often so far (CUDA); `None` on the CPU.
    pub fn gemm_stats(&self) -> Option<GemmStats> {
        self.counters().gemms
    }

    /// Hand-written kernels launched so far (CUDA); `None` on the CPU.
    pub fn kernel_launches(&self) -> Option<u64> {
        self.counters().kernel_launches
    }

    /// A feature extractor of the backbone with `weights`, on the trainer's device. The
    /// teacher is read where it lives; host weights are uploaded for the extractor's lifetime.
    pub fn feature_extractor(&mut self, weights: EvalWeights<'_>) -> Result<FeatureExtractor<'_>> {
        self.engine.features(&self.model.backbone, weights)
    }

    /// Floats in one micro-batch's global crops `[2B, 3, G, G]`.
    pub fn global_len(&self) -> usize {
        2 * self.plan.batch_size * 3 * self.plan.global_crop_size.pow(2)
    }

    /// Floats in one micro-batch's local crops `[nl·B, 3, Lc, Lc]`.
    pub fn local_len(&self) -> usize {
        self.plan.n_local_crops * self.plan.batch_size * 3 * self.plan.local_crop_size.pow(2)
    }

    /// One iteration on crop-major crops: global `[2B, 3, G, G]`, local `[nl·B, 3, Lc, Lc]`
    /// (a plan without accumulation). A non-finite loss or gradient norm stops with an error
    /// naming the step and the term, before any parameter changes.
    pub fn train_step(&mut self, global: &[f32], local: &[f32]) -> Result<StepRecord> {
        self.train_micro_batches(&[(global, local)])
    }

    /// One iteration of `plan.accumulate` micro-batches of crops (global, local), their iBOT
    /// masks drawn from the seed and the step.
    pub fn train_micro_batches(&mut self, crops: &[(&[f32], &[f32])]) -> Result<StepRecord> {
        let plan = &self.plan;
        let step = self.step();
        let first = self.rank() * plan.accumulate;
        let masks = (0..crops.len())
            .filter(|_| plan.losses.method.uses_ibot())
            .map(|i| {
                collate_masks(
                    &mut micro_batch_rng(plan.seed, stream::MASKS, step, first + i),
                    &self.masking,
                    2 * plan.batch_size,
                    plan.mask_probability,
                    plan.mask_ratio_min_max,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(dir) = std::env::var_os(DUMP_BATCHES_ENV) {
            dump_batches(Path::new(&dir), step, crops, &masks)?;
        }
        let micro: Vec<MicroBatch> = (crops.iter().enumerate())
            .map(|(i, &(global, local))| MicroBatch {
                global,
                local,
                masks: masks.get(i),
                drop_path: None,
            })
            .collect();
        self.train_step_with_masks(&micro)
    }

    /// One iteration of `plan.accumulate` micro-batches with their iBOT masks given instead of
    /// drawn (`[2B, N]` for each micro-batch's global crops), and their drop-path subsets where
    /// given: for crops, masks and draws that another pipeline produced, as the multi-step
    /// parity check against the official code does.
    pub fn train_step_with_masks(&mut self, micro: &[MicroBatch<'_>]) -> Result<StepRecord> {
        let step = self.step();
        let plan = &self.plan;
        if micro.len() != plan.accumulate {
            return Err(Error::shape(
                "train step",
                format!(
                    "{} micro-batches for a plan that accumulates {}",
                    micro.len(),
                    plan.accumulate
                ),
            ));
        }
        let n_patches = (plan.global_crop_size / plan.vit.patch_size).pow(2);
        let uses_ibot = plan.losses.method.uses_ibot();
        for (i, mb) in micro.iter().enumerate() {
            let (global, local) = (mb.global.len(), mb.local.len());
            if global != self.global_len() || local != self.local_len() {
                return Err(Error::shape(
                    "train step",
                    format!(
                        "micro-batch {i}: crops hold {global} + {local} values, expected {} + {}",
                        self.global_len(),
                        self.local_len()
                    ),
                ));
            }
            let fits = |m: &MaskBatch| m.n_crops == 2 * plan.batch_size && m.n_patches == n_patches;
            let problem = match (mb.masks, uses_ibot) {
                (Some(m), true) if !fits(m) => Some(format!(
                    "masks for {} crops of {} patches, expected {} of {n_patches}",
                    m.n_crops,
                    m.n_patches,
                    2 * plan.batch_size
                )),
                (None, true) => Some("the method uses iBOT: masks are required".into()),
                (Some(_), false) => Some("the method does not use iBOT: no masks apply".into()),
                _ => None,
            };
            if let Some(problem) = problem {
                return Err(Error::shape(
                    "train step masks",
                    format!("micro-batch {i}: {problem}"),
                ));
            }
        }
        let scheduled = plan.schedules.at(step);
        let drawn = self.draw_drop_path(micro)?;
        let plan = &self.plan;
        let batches: Vec<StepBatch> = (micro.iter().zip(&drawn))
            .map(|(mb, drawn)| StepBatch {
                global: mb.global,
                local: mb.local,
                n_img: plan.batch_size,
                n_local: plan.n_local_crops,
                global_size: plan.global_crop_size,
                local_size: plan.local_crop_size,
                masks: mb.masks,
                drop_path: mb.drop_path.or(drawn.as_ref()),
            })
            .collect();
        let it = Iteration {
            batches: &batches,
            scheduled: &scheduled,
            losses: &plan.losses,
            clip_grad: plan.clip_grad,
            drop_path: None,
        };
        let (losses, norms) = self.engine.iteration(&self.model, it, step)?;
        Ok(StepRecord {
            step,
            n_masked: micro
                .iter()
                .filter_map(|mb| mb.masks)
                .map(MaskBatch::n_masked)
                .sum(),
            losses,
            scheduled,
            grad_norms: self.engine.span_names().into_iter().zip(norms).collect(),
        })
    }
}

/// The teacher-target state of a fresh run.
fn fresh_targets(plan: &TrainPlan) -> TeacherTargets {
    let centering = |k: usize| match plan.centering {
        CenteringMode::Softmax => Centering::softmax(k),
        CenteringMode::SinkhornKnopp => Centering::sinkhorn_knopp(),
    };
    let k_ibot = plan
        .ibot_head
        .map_or(plan.dino_head.n_prototypes, |h| h.n_prototypes);
    TeacherTargets {
        dino: centering(plan.dino_head.n_prototypes),
        ibot: centering(k_ibot),
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
