//! The training state of a [`super::trainer::Trainer`] that runs on a CUDA device: both models'
//! flat parameters (f32 and their bf16 copies), the student gradients, the AdamW moments and the
//! teacher-target state, all on the device, and one iteration (step, clipping, AdamW, EMA) with
//! a single small download (loss terms and gradient norms).
//!
//! The trainer's host fields (student, teacher, moments, centers) are the checkpoint's view:
//! [`DeviceTrainer::sync_to_host`] refreshes them, [`DeviceTrainer::sync_to_device`] uploads them
//! (resume, pretrained starts).

use crate::backend::cuda::model::optim::{ema, GpuOptimizer};
use crate::backend::cuda::model::step::{GpuStep, TeacherProbs};
use crate::backend::cuda::model::targets::GpuTargets;
use crate::backend::cuda::model::DeviceWeights;
use crate::backend::cuda::{cuda_error, CudaBackend};
use crate::error::Result;
use crate::eval::FeatureExtractor;
use crate::nn::Vit;
use crate::optim::{AdamW, ParamGroups, ScheduledValues, SubmoduleSpan};
use crate::rng::Rng;
use crate::ssl::step::{LossConfig, SslModel, StepBatch, StepOutput, TeacherTargets};
use cudarc::driver::CudaSlice;

/// Everything one CUDA iteration needs, on the device.
pub struct DeviceTrainer {
    pub gpu: CudaBackend,
    pub student: DeviceWeights,
    pub teacher: DeviceWeights,
    grads: CudaSlice<f32>, // [P]
    optimizer: GpuOptimizer,
    targets: GpuTargets,
    step: GpuStep,
    /// Largest device memory in use seen after an iteration (bytes, all contexts).
    peak_memory: u64,
}

impl std::fmt::Debug for DeviceTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTrainer")
            .field("gpu", &self.gpu)
            .field("parameters", &self.student.len())
            .field("peak_memory", &self.peak_memory)
            .finish_non_exhaustive()
    }
}

/// What one device iteration reports back.
pub struct DeviceStepResult {
    pub losses: StepOutput,
    pub norms: Vec<f32>,
}

/// The scalars and configuration of one iteration.
pub struct IterationInputs<'a, 'r> {
    pub batch: StepBatch<'a>,
    pub scheduled: &'a ScheduledValues,
    pub losses: &'a LossConfig,
    pub clip_grad: f32,
    pub drop_path: Option<(f32, &'r mut Rng)>,
}

impl DeviceTrainer {
    /// Uploads the host state of a trainer.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: CudaBackend,
        model: &SslModel,
        groups: &ParamGroups,
        spans: &[SubmoduleSpan],
        student: &[f32],
        teacher: &[f32],
        optimizer: &AdamW,
        targets: &TeacherTargets,
    ) -> Result<Self> {
        let student_w = DeviceWeights::upload(&gpu, student)?;
        let teacher_w = DeviceWeights::upload(&gpu, teacher)?;
        let grads = gpu.alloc_zeros(student.len())?;
        let gpu_optimizer = GpuOptimizer::new(
            &gpu,
            &model.table,
            groups,
            spans,
            optimizer.hyper,
            &optimizer.state.exp_avg,
            &optimizer.state.exp_avg_sq,
        )?;
        let gpu_targets = GpuTargets::upload(&gpu, targets)?;
        let step = GpuStep::new(&gpu, model)?;
        let mut trainer = DeviceTrainer {
            gpu,
            student: student_w,
            teacher: teacher_w,
            grads,
            optimizer: gpu_optimizer,
            targets: gpu_targets,
            step,
            peak_memory: 0,
        };
        trainer.sample_memory();
        Ok(trainer)
    }

    /// One iteration: zero the gradients, the step, clipping, then (if every loss term and norm
    /// is finite, which the caller checks through `on_read`) AdamW step `adam_step` and the EMA.
    /// `on_read` sees the downloaded losses and norms and may refuse the update with an error.
    pub fn iteration(
        &mut self,
        model: &SslModel,
        inputs: IterationInputs<'_, '_>,
        adam_step: u64,
        on_read: impl FnOnce(&DeviceStepResult) -> Result<()>,
    ) -> Result<DeviceStepResult> {
        let gpu = &mut self.gpu;
        gpu.stream()
            .memset_zeros(&mut self.grads)
            .map_err(|e| cuda_error("cuMemsetD8", e))?;
        self.step.run(
            gpu,
            model,
            &self.student,
            &self.teacher,
            &mut self.grads,
            &inputs.batch,
            &mut self.targets,
            inputs.scheduled.teacher_temp as f32,
            inputs.losses,
            inputs.drop_path,
        )?;
        self.optimizer
            .clip(gpu, &mut self.grads, inputs.clip_grad)?;
        let (losses, norms) =
            self.step
                .read(gpu, Some(&self.optimizer.norms), TeacherProbs::Skip)?;
        let result = DeviceStepResult { losses, norms };
        on_read(&result)?;
        let s = inputs.scheduled;
        self.optimizer.step(
            gpu,
            &mut self.student.f32,
            &self.grads,
            s.lr,
            s.last_layer_lr,
            s.wd,
            adam_step,
        )?;
        ema(gpu, &mut self.teacher.f32, &self.student.f32, s.momentum)?;
        self.student.refresh_bf16(gpu)?;
        self.teacher.refresh_bf16(gpu)?;
        self.sample_memory();
        Ok(result)
    }

    /// Device buffers allocated by the step so far: the workspaces of this thread (heads,
    /// losses, targets, optimizer) and the backbone's. Constant once the step is warm.
    pub fn allocations(&self) -> u64 {
        crate::backend::cuda::model::buffers::allocation_count()
            + self.step.backbone_allocations() as u64
    }

    /// The submodule names of the gradient norms, in order.
    pub fn span_names(&self) -> Vec<String> {
        self.optimizer.span_names().map(String::from).collect()
    }

    /// Downloads parameters, moments and the teacher-target state into the host copies.
    pub fn sync_to_host(
        &self,
        student: &mut Vec<f32>,
        teacher: &mut Vec<f32>,
        optimizer: &mut AdamW,
        targets: &mut TeacherTargets,
    ) -> Result<()> {
        *student = self.gpu.download(&self.student.f32)?;
        *teacher = self.gpu.download(&self.teacher.f32)?;
        optimizer.state.exp_avg = self.gpu.download(&self.optimizer.exp_avg)?;
        optimizer.state.exp_avg_sq = self.gpu.download(&self.optimizer.exp_avg_sq)?;
        self.targets.download_into(&self.gpu, targets)
    }

    /// Uploads the host copies (resume, a pretrained start) over the device state.
    pub fn sync_to_device(
        &mut self,
        student: &[f32],
        teacher: &[f32],
        optimizer: &AdamW,
        targets: &TeacherTargets,
    ) -> Result<()> {
        let gpu = &self.gpu;
        for (w, host) in [(&mut self.student, student), (&mut self.teacher, teacher)] {
            crate::backend::cuda::model::buffers::upload_exact(gpu, &mut w.f32, host)?;
            w.refresh_bf16(gpu)?;
        }
        self.optimizer.upload_moments(
            gpu,
            &optimizer.state.exp_avg,
            &optimizer.state.exp_avg_sq,
        )?;
        self.targets.upload_from(gpu, targets)
    }

    /// Evaluation features of the device teacher, read in place (no parameter download). The
    /// extractor runs its own backbone workspace, dropped with it, so an evaluation leaves
    /// neither memory nor allocations behind ([`DeviceTrainer::allocations`] does not count it).
    pub fn teacher_features<'a>(&'a mut self, vit: &'a Vit) -> FeatureExtractor<'a> {
        FeatureExtractor::cuda(&mut self.gpu, vit, &self.teacher)
    }

    /// Evaluation features of host parameters (the initial weights of a resumed run), uploaded
    /// for the extractor and freed with it.
    pub fn host_features<'a>(
        &'a mut self,
        vit: &'a Vit,
        params: &[f32],
    ) -> Result<FeatureExtractor<'a>> {
        FeatureExtractor::cuda_uploading(&mut self.gpu, vit, params)
    }

    /// The device's name for logs.
    pub fn device_name(&self) -> String {
        self.gpu
            .describe()
            .map(|d| format!("cuda ({d})"))
            .unwrap_or_else(|_| "cuda".to_string())
    }

    /// The largest device memory in use seen after an iteration (bytes).
    pub fn peak_memory(&self) -> u64 {
        self.peak_memory
    }

    /// Samples `total - free` device memory (this process's buffers and cuBLAS workspaces, plus
    /// any other process on the device: the driver reports no per-process peak).
    fn sample_memory(&mut self) {
        if let Ok((free, total)) = self.gpu.stream().context().mem_get_info() {
            self.peak_memory = self.peak_memory.max(total.saturating_sub(free) as u64);
        }
    }
}
