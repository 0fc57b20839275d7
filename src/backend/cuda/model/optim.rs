//! The optimizer passes of a training step on the GPU, mirroring `crate::optim`: gradient
//! clipping per student submodule, AdamW over the flat buffer with per-parameter lr / weight
//! decay multipliers and the last-layer lr (frozen = lr 0, moments still move), and the
//! teacher EMA. Scheduled scalars are computed on the host, as the CPU optimizer does.

use super::buffers::{alloc_counted, upload_into};
use crate::backend::cpu::optimizer::AdamHyper;
use crate::backend::cuda::{AdamWStep, CudaBackend, ParamSegments};
use crate::error::{Error, Result};
use crate::nn::params::{ParamRef, ParamTable};
use crate::optim::{GroupSettings, ParamGroups, SubmoduleSpan};
use cudarc::driver::CudaSlice;
use std::ops::Range;

/// AdamW state and clipping spans of one student on the device.
#[derive(Debug)]
pub struct GpuOptimizer {
    pub hyper: AdamHyper,
    segments: ParamSegments,
    /// The distinct settings, one per device group.
    groups: Vec<GroupSettings>,
    group_lr: CudaSlice<f32>,       // [G]
    group_wd: CudaSlice<f32>,       // [G]
    pub exp_avg: CudaSlice<f32>,    // [P]
    pub exp_avg_sq: CudaSlice<f32>, // [P]
    /// One contiguous range per submodule, in table order.
    spans: Vec<(String, Range<usize>)>,
    /// `[S]` gradient norms of the last [`clip`](Self::clip), before clipping.
    pub norms: CudaSlice<f32>,
}

/// The device groups (distinct settings, first-appearance order) and one segment per run of
/// consecutive parameters sharing a group (empty tensors skipped). `params` must tile the flat
/// buffer in order.
fn segments_of(
    params: &[(ParamRef, GroupSettings)],
) -> Result<(Vec<usize>, Vec<usize>, Vec<GroupSettings>)> {
    let mut distinct: Vec<GroupSettings> = Vec::new();
    let (mut starts, mut seg_groups) = (Vec::new(), Vec::new());
    let mut expected_start = 0;
    for (at, settings) in params {
        if at.offset != expected_start {
            return Err(Error::shape(
                "GpuOptimizer",
                format!(
                    "parameter at {}..{} does not follow the previous one (ends at {expected_start})",
                    at.offset,
                    at.offset + at.len
                ),
            ));
        }
        expected_start = at.offset + at.len;
        if at.len == 0 {
            continue;
        }
        let g = match distinct.iter().position(|s| s == settings) {
            Some(g) => g,
            None => {
                distinct.push(*settings);
                distinct.len() - 1
            }
        };
        if seg_groups.last() != Some(&g) {
            starts.push(at.offset);
            seg_groups.push(g);
        }
    }
    Ok((starts, seg_groups, distinct))
}

impl GpuOptimizer {
    /// Device state for `table` with the settings of `groups`, starting from the host moments
    /// `exp_avg`, `exp_avg_sq` (`[P]` each) and clipping per `spans` (one contiguous range each:
    /// the model registers its submodules one after the other).
    pub fn new(
        gpu: &CudaBackend,
        table: &ParamTable,
        groups: &ParamGroups,
        spans: &[SubmoduleSpan],
        hyper: AdamHyper,
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
    ) -> Result<Self> {
        if groups.per_param.len() != table.specs().len() {
            return Err(Error::shape(
                "GpuOptimizer",
                format!(
                    "{} group settings for {} parameters",
                    groups.per_param.len(),
                    table.specs().len()
                ),
            ));
        }
        let params: Vec<(ParamRef, GroupSettings)> = table
            .specs()
            .iter()
            .map(|s| s.at)
            .zip(groups.per_param.iter().copied())
            .collect();
        Self::from_parts(gpu, &params, table.len(), spans, hyper, exp_avg, exp_avg_sq)
    }

    /// As [`new`](Self::new) from explicit `(range, settings)` pairs tiling `n` flat values.
    pub fn from_parts(
        gpu: &CudaBackend,
        params: &[(ParamRef, GroupSettings)],
        n: usize,
        spans: &[SubmoduleSpan],
        hyper: AdamHyper,
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
    ) -> Result<Self> {
        if exp_avg.len() != n || exp_avg_sq.len() != n {
            return Err(Error::shape(
                "GpuOptimizer",
                format!(
                    "moments hold {} and {} values for {n} parameters",
                    exp_avg.len(),
                    exp_avg_sq.len()
                ),
            ));
        }
        let (starts, seg_groups, distinct) = segments_of(params)?;
        let segments = ParamSegments::new(gpu, &starts, &seg_groups, distinct.len(), n)?;
        let spans = spans
            .iter()
            .map(|s| match s.ranges.as_slice() {
                [r] if r.end <= n => Ok((s.name.clone(), r.clone())),
                _ => Err(Error::Unsupported(format!(
                    "GPU gradient clipping needs each submodule in one range of the flat \
                     buffer; {} has {:?}",
                    s.name, s.ranges
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut exp_avg_d = alloc_counted(gpu, n)?;
        upload_into(gpu, &mut exp_avg_d, exp_avg)?;
        let mut exp_avg_sq_d = alloc_counted(gpu, n)?;
        upload_into(gpu, &mut exp_avg_sq_d, exp_avg_sq)?;
        Ok(GpuOptimizer {
            hyper,
            segments,
            group_lr: alloc_counted(gpu, distinct.len())?,
            group_wd: alloc_counted(gpu, distinct.len())?,
            groups: distinct,
            exp_avg: exp_avg_d,
            exp_avg_sq: exp_avg_sq_d,
            norms: alloc_counted(gpu, spans.len().max(1))?,
            spans,
        })
    }

    /// The submodule names, in the order of [`norms`](Self::norms).
    pub fn span_names(&self) -> impl Iterator<Item = &str> {
        self.spans.iter().map(|(name, _)| name.as_str())
    }

    /// Number of clipping spans.
    pub fn n_spans(&self) -> usize {
        self.spans.len()
    }

    /// Clips each submodule's gradients to `max_norm` (norm written to `norms`, scaled by
    /// `min(max_norm / (norm + 1e-6), 1)`; a non-finite norm leaves them unscaled), no host sync.
    pub fn clip(
        &mut self,
        gpu: &mut CudaBackend,
        grads: &mut CudaSlice<f32>,
        max_norm: f32,
    ) -> Result<()> {
        if max_norm.is_nan() || max_norm <= 0.0 {
            return Err(Error::Config(format!(
                "clip_grad must be positive, got {max_norm}"
            )));
        }
        for (i, (_, range)) in self.spans.iter().enumerate() {
            let mut g = gpu.sub_mut(grads, range.clone())?;
            let mut norm = gpu.sub_mut(&mut self.norms, i..i + 1)?;
            gpu.clip_grad_norm(&mut g, &mut norm, max_norm)?;
        }
        Ok(())
    }

    /// One AdamW step number `step` (counted from 1) with this iteration's scheduled values:
    /// group lr = (`last_layer_lr` for the last layer, else `lr`) × multiplier, wd × multiplier.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        gpu: &CudaBackend,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        lr: f64,
        last_layer_lr: f64,
        wd: f64,
        step: u64,
    ) -> Result<()> {
        let lrs: Vec<f32> = self
            .groups
            .iter()
            .map(|g| ((if g.is_last_layer { last_layer_lr } else { lr }) * g.lr_multiplier) as f32)
            .collect();
        let wds: Vec<f32> = self
            .groups
            .iter()
            .map(|g| (wd * g.wd_multiplier) as f32)
            .collect();
        upload_into(gpu, &mut self.group_lr, &lrs)?;
        upload_into(gpu, &mut self.group_wd, &wds)?;
        gpu.adamw_update(
            params,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            grads,
            &self.segments,
            &self.group_lr,
            &self.group_wd,
            AdamWStep {
                beta1: self.hyper.beta1,
                beta2: self.hyper.beta2,
                eps: self.hyper.eps,
                step,
            },
        )
    }

    /// Replaces the device moments with host values (resume).
    pub fn upload_moments(
        &mut self,
        gpu: &CudaBackend,
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
    ) -> Result<()> {
        let n = self.segments.numel;
        if exp_avg.len() != n || exp_avg_sq.len() != n {
            return Err(Error::shape(
                "GpuOptimizer::upload_moments",
                format!(
                    "moments of {} / {} values for {n}",
                    exp_avg.len(),
                    exp_avg_sq.len()
                ),
            ));
        }
        upload_into(gpu, &mut self.exp_avg, exp_avg)?;
        upload_into(gpu, &mut self.exp_avg_sq, exp_avg_sq)
    }
}

/// `teacher = m · teacher + (1 − m) · student` over the flat buffers, `m ∈ [0, 1]`.
pub fn ema(
    gpu: &CudaBackend,
    teacher: &mut CudaSlice<f32>,
    student: &CudaSlice<f32>,
    momentum: f64,
) -> Result<()> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::Config(format!(
            "teacher momentum must lie in [0, 1], got {momentum}"
        )));
    }
    gpu.ema_update(teacher, student, momentum)
}
