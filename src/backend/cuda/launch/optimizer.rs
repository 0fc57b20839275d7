//! Launchers of `kernels/optimizer.cu`: AdamW over the flat buffer with per-group lr / weight
//! decay, gradient clipping, the teacher EMA and the weight-normalised last layer.

use super::elementwise::{ReduceOp, SUM_GROUPS};
use super::{check_len, config, dim, grid_stride, launch};
use crate::backend::cuda::{CudaBackend, KernelFamily};
use crate::backend::AdamWStep;
use crate::backend::{AdamWBuffers, OptimizerOps};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// The static part of AdamW over a flat buffer: which group each parameter tensor belongs to.
/// Uploaded once; only the per-group lr / wd change per step.
#[derive(Debug)]
pub struct ParamSegments {
    /// `[S]` first flat index of each parameter tensor (strictly increasing, first 0).
    pub start: CudaSlice<i64>,
    /// `[S]` group of each tensor.
    pub group: CudaSlice<i32>,
    pub segments: usize,
    pub groups: usize,
    pub numel: usize,
}

impl OptimizerOps for CudaBackend {
    type Segments = ParamSegments;

    /// `starts[s]` is the offset of tensor s, `groups[s]` its group (< `n_groups`).
    fn segments(
        &mut self,
        starts: &[usize],
        groups: &[usize],
        n_groups: usize,
        numel: usize,
    ) -> Result<ParamSegments> {
        const OP: &str = "ParamSegments";
        self.allocations += 2;
        check_len(OP, "groups", groups.len(), starts.len())?;
        if starts.first() != Some(&0)
            || starts.windows(2).any(|w| w[0] >= w[1])
            || starts.last().is_some_and(|&s| s >= numel)
        {
            return Err(Error::shape(
                OP,
                "segment starts must begin at 0 and increase strictly below numel",
            ));
        }
        if let Some(&g) = groups.iter().find(|&&g| g >= n_groups) {
            return Err(Error::shape(OP, format!("group {g} out of {n_groups}")));
        }
        let start: Vec<i64> = starts.iter().map(|&s| s as i64).collect();
        let group: Vec<i32> = groups.iter().map(|&g| g as i32).collect();
        Ok(ParamSegments {
            start: self.upload(&start)?,
            group: self.upload(&group)?,
            segments: starts.len(),
            groups: n_groups,
            numel,
        })
    }

    /// One AdamW step over the flat buffers; `group_lr [G]` and `group_wd [G]` hold this step's
    /// lr and weight decay per group (schedules times multipliers, computed on the host).
    fn adamw_update(
        &mut self,
        bufs: AdamWBuffers<'_, Self>,
        segments: &ParamSegments,
        group_lr: &CudaSlice<f32>,
        group_wd: &CudaSlice<f32>,
        hp: AdamWStep,
    ) -> Result<()> {
        let AdamWBuffers {
            params,
            exp_avg,
            exp_avg_sq,
            grads,
        } = bufs;
        const OP: &str = "cuda adamw_update";
        let n = segments.numel;
        for (name, len) in [
            ("params", params.len()),
            ("exp_avg", exp_avg.len()),
            ("exp_avg_sq", exp_avg_sq.len()),
            ("grads", grads.len()),
        ] {
            check_len(OP, name, len, n)?;
        }
        check_len(OP, "group_lr", group_lr.len(), segments.groups)?;
        check_len(OP, "group_wd", group_wd.len(), segments.groups)?;
        if hp.step == 0 {
            return Err(Error::Config(format!("{OP}: step counts from 1")));
        }
        // Bias corrections in f64 on the host (beta^t underflows gracefully).
        let t = hp.step.min(i32::MAX as u64) as i32;
        let bc1 = (1.0 - hp.beta1.powi(t)) as f32;
        let bc2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt() as f32;
        let (beta1, beta2, eps) = (hp.beta1 as f32, hp.beta2 as f32, hp.eps as f32);
        // 1 - beta in f64, as torch forms its scalars (1.0f - 0.999f is off by 1.3e-5).
        let (one_minus_beta1, one_minus_beta2) = ((1.0 - hp.beta1) as f32, (1.0 - hp.beta2) as f32);
        let s = dim(OP, "segments", segments.segments)?;
        let n_i64 = n as i64;
        launch!(
            self,
            KernelFamily::Optimizer,
            "adamw_update",
            grid_stride(n),
            [
                params,
                exp_avg,
                exp_avg_sq,
                grads,
                &segments.start,
                &segments.group,
                group_lr,
                group_wd,
                &s,
                &n_i64,
                &beta1,
                &one_minus_beta1,
                &beta2,
                &one_minus_beta2,
                &eps,
                &bc1,
                &bc2_sqrt
            ]
        );
        Ok(())
    }

    /// `teacher = m · teacher + (1 - m) · student`; `1 - m` is formed in f64 (m is near 1).
    fn ema_update(
        &mut self,
        teacher: &mut CudaSlice<f32>,
        student: &CudaSlice<f32>,
        momentum: f64,
    ) -> Result<()> {
        check_len("cuda ema_update", "teacher", teacher.len(), student.len())?;
        let n = student.len() as i64;
        let (m, one_minus_m) = (momentum as f32, (1.0 - momentum) as f32);
        launch!(
            self,
            KernelFamily::Optimizer,
            "ema_update",
            grid_stride(student.len()),
            [teacher, student, &m, &one_minus_m, &n]
        );
        Ok(())
    }

    /// Clips `grads` (one submodule's contiguous range) to `max_norm`: writes the pre-clip
    /// norm into `norm [1]` and scales by `min(max_norm / (norm + 1e-6), 1)` without a host sync.
    fn clip_grad_norm(
        &mut self,
        grads: &mut CudaSlice<f32>,
        norm: &mut CudaSlice<f32>,
        max_norm: f32,
    ) -> Result<()> {
        const OP: &str = "cuda clip_grad_norm";
        check_len(OP, "norm", norm.len(), 1)?;
        // Scratch: [0, SUM_GROUPS) partials, then the sum of squares and the coefficient.
        self.reserve_scratch(SUM_GROUPS + 2)?;
        let partial = self.scratch_ptr(0);
        let sumsq = self.scratch_ptr(SUM_GROUPS);
        let coef = self.scratch_ptr(SUM_GROUPS + 1);
        let n = grads.len() as i64;
        self.sum_into(sumsq, partial, grads, ReduceOp::SumOfSquares, 1.0)?;
        launch!(
            self,
            KernelFamily::Optimizer,
            "clip_coef",
            config((1, 1, 1), 32),
            [&coef, norm, &sumsq, &max_norm]
        );
        let cfg = grid_stride(grads.len());
        launch!(
            self,
            KernelFamily::Optimizer,
            "scale_by_coef",
            cfg,
            [grads, &coef, &n]
        );
        Ok(())
    }
}
