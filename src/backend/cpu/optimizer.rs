//! `OptimizerOps` on the CPU: the reference of the fused CUDA AdamW, EMA and clipping kernels.
//!
//! AdamW follows `torch.optim.AdamW`; the scalars that depend only on the step are computed
//! once in f64 on the host, as the CUDA launcher does.

use super::backend::{one_scalar, CpuBackend, CpuSegments};
use crate::backend::{check_len, check_lens, AdamWBuffers, AdamWStep, OptimizerOps};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise the hand-off, small enough to balance.
const CHUNK: usize = 1 << 15;

/// The per-step scalars of one segment, in f32 as the kernel uses them.
#[derive(Clone, Copy, Debug)]
struct StepScalars {
    decay: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
}

/// The step's scalars, formed in f64 like PyTorch's Python floats: `1 − β` and the bias
/// corrections are only then rounded (`1 − 0.999f32` is off by 1.3e-5 relative, which the
/// golden `exp_avg_sq` would see).
fn step_scalars(lr: f32, weight_decay: f32, hp: &AdamWStep) -> StepScalars {
    let t = hp.step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - hp.beta1.powi(t);
    let bc2 = 1.0 - hp.beta2.powi(t);
    StepScalars {
        decay: (1.0 - lr as f64 * weight_decay as f64) as f32,
        step_size: (lr as f64 / bc1) as f32,
        inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
        one_minus_beta1: (1.0 - hp.beta1) as f32,
        beta2: hp.beta2 as f32,
        one_minus_beta2: (1.0 - hp.beta2) as f32,
        eps: hp.eps as f32,
    }
}

#[inline]
fn adamw_inner(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: StepScalars) {
    let (b1c, b2, b2c, eps) = (s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps);
    for (((pv, &gv), mv), vv) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *pv *= s.decay;
        *mv += b1c * (gv - *mv);
        *vv = *vv * b2 + b2c * gv * gv;
        let denom = vv.sqrt() * s.inv_bc2_sqrt + eps;
        *pv -= s.step_size * *mv / denom;
    }
}

impl OptimizerOps for CpuBackend {
    type Segments = CpuSegments;

    fn segments(
        &mut self,
        starts: &[usize],
        groups: &[usize],
        n_groups: usize,
        numel: usize,
    ) -> Result<CpuSegments> {
        const OP: &str = "cpu segments";
        check_len(OP, "groups", groups.len(), starts.len())?;
        let ok = starts.first().is_none_or(|&s| s == 0)
            && starts.windows(2).all(|w| w[0] < w[1])
            && starts.last().is_none_or(|&s| s < numel.max(1))
            && groups.iter().all(|&g| g < n_groups);
        if !ok {
            return Err(Error::shape(
                OP,
                format!("segments {starts:?} / groups {groups:?} do not tile {numel} values in {n_groups} groups"),
            ));
        }
        let segments = starts
            .iter()
            .zip(groups)
            .enumerate()
            .map(|(i, (&s, &g))| {
                let end = starts.get(i + 1).copied().unwrap_or(numel);
                (s, end - s, g)
            })
            .collect();
        Ok(CpuSegments {
            segments,
            groups: n_groups,
            numel,
        })
    }

    /// One AdamW step, each segment with its group's lr and weight decay (the fused-kernel
    /// form: one pass, one launch on the GPU); `torch.optim.AdamW`'s order: decoupled weight
    /// decay first, then the Adam step with bias corrections. `hp.step` counts from 1.
    fn adamw_update(
        &mut self,
        bufs: AdamWBuffers<'_, Self>,
        segments: &CpuSegments,
        group_lr: &[f32],
        group_wd: &[f32],
        hp: AdamWStep,
    ) -> Result<()> {
        const OP: &str = "cpu adamw_update";
        let (n, groups) = (segments.numel, segments.groups);
        check_lens(
            OP,
            &[
                ("params", bufs.params.len(), n),
                ("grads", bufs.grads.len(), n),
                ("exp_avg", bufs.exp_avg.len(), n),
                ("exp_avg_sq", bufs.exp_avg_sq.len(), n),
                ("group_lr", group_lr.len(), groups),
                ("group_wd", group_wd.len(), groups),
            ],
        )?;
        if hp.step == 0 {
            return Err(Error::Config(format!("{OP}: the step number starts at 1")));
        }
        // The segments tile the buffers in order (checked by `segments`): split them without
        // copying.
        let mut tasks = Vec::with_capacity(segments.segments.len());
        let (mut p, mut m, mut v, mut g) = (bufs.params, bufs.exp_avg, bufs.exp_avg_sq, bufs.grads);
        for &(_, len, group) in &segments.segments {
            let (p_seg, p_tail) = std::mem::take(&mut p).split_at_mut(len);
            let (m_seg, m_tail) = std::mem::take(&mut m).split_at_mut(len);
            let (v_seg, v_tail) = std::mem::take(&mut v).split_at_mut(len);
            let (g_seg, g_tail) = g.split_at(len);
            (p, m, v, g) = (p_tail, m_tail, v_tail, g_tail);
            let s = step_scalars(group_lr[group], group_wd[group], &hp);
            tasks.push((p_seg, g_seg, m_seg, v_seg, s));
        }
        // Chunk every segment so small and large segments balance across threads.
        tasks.into_par_iter().for_each(|(p, g, m, v, s)| {
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| adamw_inner(p, g, m, v, s));
        });
        Ok(())
    }

    /// `teacher = momentum · teacher + (1 − momentum) · student`, elementwise (`1 − momentum`
    /// formed in f64, as PyTorch does with the Python float).
    fn ema_update(&mut self, teacher: &mut [f32], student: &[f32], momentum: f64) -> Result<()> {
        check_len("cpu ema_update", "student", student.len(), teacher.len())?;
        let m = momentum as f32;
        let one_minus = (1.0 - momentum) as f32;
        teacher
            .par_chunks_mut(CHUNK)
            .zip(student.par_chunks(CHUNK))
            .for_each(|(t, s)| {
                for (tv, &sv) in t.iter_mut().zip(s) {
                    *tv = *tv * m + sv * one_minus;
                }
            });
        Ok(())
    }

    fn clip_grad_norm(&mut self, grads: &mut [f32], norm: &mut [f32], max_norm: f32) -> Result<()> {
        let sum_sq: f64 = grads
            .par_chunks(1 << 15)
            .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
            .sum();
        let n = sum_sq.sqrt();
        one_scalar("cpu clip_grad_norm", norm, n as f32)?;
        if !n.is_finite() {
            return Ok(());
        }
        let coef = (max_norm as f64 / (n + crate::backend::CLIP_EPS)).min(1.0) as f32;
        if coef < 1.0 {
            grads.par_iter_mut().for_each(|g| *g *= coef);
        }
        Ok(())
    }
}
