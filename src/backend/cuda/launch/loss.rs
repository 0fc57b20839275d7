//! `LossOps` on CUDA: the launchers of `kernels/loss.cu` (teacher softmax with centering, the
//! centre EMA, the fused student log-softmax cross-entropy with its gradient, for DINO and
//! iBOT) and of `kernels/sinkhorn.cu` (Sinkhorn-Knopp teacher targets).

use super::elementwise::{ReduceOp, SUM_GROUPS};
use super::{check_len, column_chunks, config, dim, grid_stride, launch, per_row, BLOCK};
use crate::backend::cuda::buffers::{rows_of, Slot};
use crate::backend::cuda::{CudaBackend, KernelFamily};
use crate::backend::{check_lens, Buffers, LossOps};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// Most teacher rows one student row may be paired with (`MAX_PAIRS` in loss.cu).
pub const MAX_PAIRS: usize = 16;

/// Which teacher rows each student row is scored against, with weights: `[student_rows, pairs]`
/// (teacher index -1 = unused slot). Built once per crop layout on the host.
#[derive(Debug)]
pub struct CrossEntropyPairs {
    pub student_rows: usize,
    pub pairs: usize,
    pub teacher: CudaSlice<i32>,
    pub weight: CudaSlice<f32>,
}

impl LossOps for CudaBackend {
    type Pairs = CrossEntropyPairs;

    fn pairs(&mut self, capacity: usize, pairs: usize) -> Result<CrossEntropyPairs> {
        if pairs == 0 || pairs > MAX_PAIRS {
            return Err(Error::Unsupported(format!(
                "CrossEntropyPairs: {pairs} pairs per row (1..={MAX_PAIRS})"
            )));
        }
        self.allocations += 2;
        let n = capacity.max(1) * pairs;
        Ok(CrossEntropyPairs {
            student_rows: 0,
            pairs,
            teacher: self.upload(&vec![-1; n])?,
            weight: self.upload(&vec![0.0; n])?,
        })
    }

    fn set_pairs(
        &mut self,
        table: &mut CrossEntropyPairs,
        rows: usize,
        teacher: &[i32],
        weight: &[f32],
    ) -> Result<()> {
        const OP: &str = "cuda set_pairs";
        let n = rows * table.pairs;
        if teacher.len() != n || weight.len() != n || n > table.teacher.len() {
            return Err(Error::shape(
                OP,
                format!(
                    "{rows} rows of {} pairs ({} / {} values) for a table of {}",
                    table.pairs,
                    teacher.len(),
                    weight.len(),
                    table.teacher.len()
                ),
            ));
        }
        self.upload_prefix(&mut table.teacher, teacher)?;
        self.upload_prefix(&mut table.weight, weight)?;
        table.student_rows = rows;
        Ok(())
    }

    /// `probs [R, K] = softmax((teacher - center) / teacher_temp)` per row; no centering when
    /// `center` is `None`.
    fn teacher_softmax(
        &mut self,
        probs: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        center: Option<&CudaSlice<f32>>,
        temp: f32,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "cuda teacher_softmax";
        let rows = rows_of(OP, "logits", logits.len(), k)?;
        if temp.is_nan() || temp <= 0.0 {
            return Err(Error::Config(format!(
                "{OP}: teacher temperature must be > 0"
            )));
        }
        check_lens(
            OP,
            &[
                ("probs", probs.len(), rows * k),
                ("center", center.map_or(k, |c| c.len()), k),
            ],
        )?;
        let center_ptr = self.optional_ptr(center);
        let (r, k) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", k)?);
        let inv_temp = 1.0 / temp;
        launch!(
            self,
            KernelFamily::Loss,
            "teacher_softmax",
            per_row(OP, rows)?,
            [probs, logits, &center_ptr, &inv_temp, &r, &k]
        );
        Ok(())
    }

    /// `center_new = m · center + (1 - m) · mean_rows(teacher)`.
    fn center_ema(
        &mut self,
        next: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        center: &CudaSlice<f32>,
        momentum: f64,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "cuda center_ema";
        let rows = rows_of(OP, "logits", logits.len(), k)?;
        if rows == 0 {
            return Err(Error::shape(OP, "no teacher rows"));
        }
        check_lens(
            OP,
            &[("center", center.len(), k), ("center_new", next.len(), k)],
        )?;
        let (r, ki) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", k)?);
        let chunks = column_chunks(OP, rows, k)?;
        self.reserve_scratch(chunks.groups * k)?;
        let partial = self.scratch_ptr(0);
        let null = 0u64;
        launch!(
            self,
            KernelFamily::Elementwise,
            "column_sum_partial",
            config(chunks.grid, BLOCK),
            [&partial, logits, &null, &r, &ki, &chunks.per_chunk]
        );
        let g = dim(OP, "groups", chunks.groups)?;
        let inv_rows = 1.0 / rows as f32;
        // 1 - m in f64 (m is near 1), as the CPU twin forms it.
        let (m, one_minus_m) = (momentum as f32, (1.0 - momentum) as f32);
        launch!(
            self,
            KernelFamily::Loss,
            "center_ema",
            config((chunks.grid.0, 1, 1), BLOCK),
            [next, &partial, center, &g, &ki, &m, &one_minus_m, &inv_rows]
        );
        Ok(())
    }

    fn softmax_cross_entropy(
        &mut self,
        loss: &mut CudaSlice<f32>,
        ds: &mut CudaSlice<f32>,
        s: &CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        table: &CrossEntropyPairs,
        student_temp: f32,
        grad_scale: f32,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "cuda softmax_cross_entropy";
        let rows = table.student_rows;
        if rows == 0 {
            return self.zero_f32(loss);
        }
        let teacher_rows = rows_of(OP, "probs", probs.len(), k)?;
        if student_temp.is_nan() || student_temp <= 0.0 {
            return Err(Error::Config(format!(
                "{OP}: student temperature must be > 0"
            )));
        }
        check_lens(
            OP,
            &[
                ("loss", loss.len(), 1),
                ("student", s.len(), rows * k),
                ("dstudent", ds.len(), rows * k),
            ],
        )?;
        let (rs, rt, ki) = (
            dim(OP, "student rows", rows)?,
            dim(OP, "teacher rows", teacher_rows)?,
            dim(OP, "prototypes", k)?,
        );
        let n_pairs = table.pairs as i32;
        let inv_ts = 1.0 / student_temp;
        // Per-row losses into a work buffer, then their sum.
        self.with_work(Slot::A, rows, |gpu, row_loss| {
            launch!(
                gpu,
                KernelFamily::Loss,
                "softmax_cross_entropy",
                per_row(OP, rows)?,
                [
                    &mut *row_loss,
                    ds,
                    s,
                    probs,
                    &table.teacher,
                    &table.weight,
                    &n_pairs,
                    &inv_ts,
                    &grad_scale,
                    &rs,
                    &rt,
                    &ki
                ]
            );
            gpu.sum(loss, row_loss, ReduceOp::Sum, 1.0)
        })
    }

    fn mean_row_entropy(
        &mut self,
        out: &mut CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "cuda mean_row_entropy";
        let rows = rows_of(OP, "probs", probs.len(), k)?;
        if rows == 0 {
            return Err(Error::shape(OP, "no rows"));
        }
        check_len(OP, "mean_entropy", out.len(), 1)?;
        let (r, ki) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", k)?);
        self.with_work(Slot::A, rows, |gpu, row_entropy| {
            launch!(
                gpu,
                KernelFamily::Loss,
                "row_entropy",
                per_row(OP, rows)?,
                [&mut *row_entropy, probs, &r, &ki]
            );
            gpu.sum(out, row_entropy, ReduceOp::Sum, 1.0 / rows as f32)
        })
    }

    /// The official algorithm with `n_samples = R`; each output row sums to 1. The scaling
    /// vectors `a [K]` and `b [R]` live in work buffers.
    fn sinkhorn_knopp(
        &mut self,
        q: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        k: usize,
        temp: f32,
        iterations: usize,
    ) -> Result<()> {
        const OP: &str = "cuda sinkhorn_knopp";
        let rows = rows_of(OP, "logits", logits.len(), k)?;
        if rows == 0 {
            return Err(Error::shape(
                OP,
                format!("empty problem: {rows} x {k}, {rows} samples"),
            ));
        }
        if temp.is_nan() || temp <= 0.0 {
            return Err(Error::Config(format!(
                "{OP}: teacher temperature must be > 0, got {temp}"
            )));
        }
        let n = rows * k;
        check_len(OP, "q", q.len(), n)?;
        let (r, ki) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", k)?);
        let n_i64 = n as i64;
        let chunks = column_chunks(OP, rows, k)?;
        // Scratch: [0, 2) scalars (max, total), [2, 2 + SUM_GROUPS) reduction partials, then
        // the column partials [groups, K].
        let col_offset = 2 + SUM_GROUPS;
        self.reserve_scratch(col_offset + chunks.groups * k)?;
        let scalar_max = self.scratch_ptr(0);
        let scalar_total = self.scratch_ptr(1);
        let partial = self.scratch_ptr(2);
        let col_partial = self.scratch_ptr(col_offset);
        let max_groups = SUM_GROUPS as i32;
        let g = dim(OP, "groups", chunks.groups)?;
        let samples = rows as f32;
        let inv_temp = 1.0 / temp;
        let col_update_grid = (chunks.grid.0, 1, 1);
        let row_cfg = per_row(OP, rows)?;
        let mut b = self.take_work(Slot::B, rows)?;
        let result = self.with_work(Slot::A, k, |gpu, a| {
            launch!(
                gpu,
                KernelFamily::Sinkhorn,
                "sinkhorn_max_partial",
                config((SUM_GROUPS as u32, 1, 1), BLOCK),
                [&partial, logits, &n_i64]
            );
            launch!(
                gpu,
                KernelFamily::Sinkhorn,
                "sinkhorn_max_finalize",
                config((1, 1, 1), BLOCK),
                [&scalar_max, &partial, &max_groups]
            );
            launch!(
                gpu,
                KernelFamily::Sinkhorn,
                "sinkhorn_exp",
                grid_stride(n),
                [&mut *q, logits, &scalar_max, &inv_temp, &n_i64]
            );
            // b = 1 / sum(E)
            gpu.sum_into(scalar_total, partial, q, ReduceOp::Sum, 1.0)?;
            launch!(
                gpu,
                KernelFamily::Sinkhorn,
                "sinkhorn_reciprocal",
                config((1, 1, 1), BLOCK),
                [&mut b, &scalar_total, &r]
            );
            for _ in 0..iterations {
                launch!(
                    gpu,
                    KernelFamily::Sinkhorn,
                    "sinkhorn_col_partial",
                    config(chunks.grid, BLOCK),
                    [&col_partial, &*q, &b, &r, &ki, &chunks.per_chunk]
                );
                launch!(
                    gpu,
                    KernelFamily::Sinkhorn,
                    "sinkhorn_col_update",
                    config(col_update_grid, BLOCK),
                    [&mut *a, &col_partial, &g, &ki]
                );
                launch!(
                    gpu,
                    KernelFamily::Sinkhorn,
                    "sinkhorn_row_update",
                    row_cfg,
                    [&mut b, &*q, &*a, &r, &ki, &samples]
                );
            }
            if iterations == 0 {
                // Q = E / sum(E) * n_samples with a = 1.
                let (fill, k_i64) = (1.0f32, k as i64);
                launch!(
                    gpu,
                    KernelFamily::Sinkhorn,
                    "sinkhorn_fill",
                    grid_stride(k),
                    [&mut *a, &fill, &k_i64]
                );
            }
            let q_ptr = gpu.device_ptr_mut_raw(q);
            launch!(
                gpu,
                KernelFamily::Sinkhorn,
                "sinkhorn_finalize",
                grid_stride(n),
                [&q_ptr, &q_ptr, &*a, &b, &r, &ki, &samples]
            );
            Ok(())
        });
        self.put_work(Slot::B, b);
        result
    }
}
