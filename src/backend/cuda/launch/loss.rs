//! Launchers of `kernels/loss.cu`: teacher softmax with centering, the centre EMA, and the
//! fused student log-softmax cross-entropy with its gradient (DINO and iBOT).

use super::elementwise::ReduceOp;
use super::{blocks, check_len, config, dim, launch, row_chunks, BLOCK};
use crate::backend::cuda::{CudaBackend, KernelFamily};
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

impl CrossEntropyPairs {
    /// Uploads a host pairing table (`teacher[r * pairs + p]`, `weight[...]`).
    pub fn new(
        backend: &CudaBackend,
        student_rows: usize,
        pairs: usize,
        teacher: &[i32],
        weight: &[f32],
    ) -> Result<Self> {
        const OP: &str = "CrossEntropyPairs";
        if pairs == 0 || pairs > MAX_PAIRS {
            return Err(Error::Unsupported(format!(
                "{OP}: {pairs} pairs per row (1..={MAX_PAIRS})"
            )));
        }
        check_len(OP, "teacher", teacher.len(), student_rows * pairs)?;
        check_len(OP, "weight", weight.len(), student_rows * pairs)?;
        Ok(CrossEntropyPairs {
            student_rows,
            pairs,
            teacher: backend.upload(teacher)?,
            weight: backend.upload(weight)?,
        })
    }
}

impl CudaBackend {
    /// `probs [R, K] = softmax((teacher - center) / teacher_temp)` per row; no centering when
    /// `center` is `None`.
    pub fn teacher_softmax(
        &self,
        probs: &mut CudaSlice<f32>,
        teacher: &CudaSlice<f32>,
        center: Option<&CudaSlice<f32>>,
        teacher_temp: f32,
        rows: usize,
        prototypes: usize,
    ) -> Result<()> {
        const OP: &str = "cuda teacher_softmax";
        if teacher_temp.is_nan() || teacher_temp <= 0.0 {
            return Err(Error::Config(format!(
                "{OP}: teacher temperature must be > 0"
            )));
        }
        check_len(OP, "probs", probs.len(), rows * prototypes)?;
        check_len(OP, "teacher", teacher.len(), rows * prototypes)?;
        if let Some(c) = center {
            check_len(OP, "center", c.len(), prototypes)?;
        }
        let center_ptr = self.optional_ptr(center);
        let (r, k) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", prototypes)?);
        let inv_temp = 1.0 / teacher_temp;
        launch!(
            self,
            KernelFamily::Loss,
            "teacher_softmax",
            config((blocks(OP, rows)?, 1, 1), BLOCK),
            [probs, teacher, &center_ptr, &inv_temp, &r, &k]
        );
        Ok(())
    }

    /// `center_new = m · center + (1 - m) · mean_rows(teacher)`.
    pub fn center_ema(
        &mut self,
        center_new: &mut CudaSlice<f32>,
        teacher: &CudaSlice<f32>,
        center: &CudaSlice<f32>,
        momentum: f64,
        rows: usize,
        prototypes: usize,
    ) -> Result<()> {
        const OP: &str = "cuda center_ema";
        if rows == 0 {
            return Err(Error::shape(OP, "no teacher rows"));
        }
        check_len(OP, "teacher", teacher.len(), rows * prototypes)?;
        check_len(OP, "center", center.len(), prototypes)?;
        check_len(OP, "center_new", center_new.len(), prototypes)?;
        let (r, k) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", prototypes)?);
        let (groups, per_chunk) = row_chunks(rows);
        self.reserve_scratch(groups * prototypes)?;
        let partial = self.scratch_ptr(0);
        let null = 0u64;
        let per_chunk_i = dim(OP, "rows per chunk", per_chunk)?;
        let grid = (
            blocks(OP, prototypes.div_ceil(BLOCK as usize))?,
            groups as u32,
            1,
        );
        launch!(
            self,
            KernelFamily::Elementwise,
            "column_sum_partial",
            config(grid, BLOCK),
            [&partial, teacher, &null, &r, &k, &per_chunk_i]
        );
        let g = dim(OP, "groups", groups)?;
        let inv_rows = 1.0 / rows as f32;
        // 1 - m in f64 (m is near 1), as the CPU twin forms it.
        let (m, one_minus_m) = (momentum as f32, (1.0 - momentum) as f32);
        launch!(
            self,
            KernelFamily::Loss,
            "center_ema",
            config((grid.0, 1, 1), BLOCK),
            [
                center_new,
                &partial,
                center,
                &g,
                &k,
                &m,
                &one_minus_m,
                &inv_rows
            ]
        );
        Ok(())
    }

    /// Fused cross-entropy: for each student row r, `row_loss[r] = Σ_p w_p CE(probs[t_p], s_r;
    /// ts)` and `dstudent[r] = grad_scale · dΣ/ds_r`; `loss [1] = Σ_r row_loss[r]`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_cross_entropy(
        &mut self,
        loss: &mut CudaSlice<f32>,
        row_loss: &mut CudaSlice<f32>,
        dstudent: &mut CudaSlice<f32>,
        student: &CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        pairs: &CrossEntropyPairs,
        student_temp: f32,
        grad_scale: f32,
        teacher_rows: usize,
        prototypes: usize,
    ) -> Result<()> {
        const OP: &str = "cuda softmax_cross_entropy";
        if student_temp.is_nan() || student_temp <= 0.0 {
            return Err(Error::Config(format!(
                "{OP}: student temperature must be > 0"
            )));
        }
        let rs = pairs.student_rows;
        check_len(OP, "loss", loss.len(), 1)?;
        check_len(OP, "row_loss", row_loss.len(), rs)?;
        check_len(OP, "student", student.len(), rs * prototypes)?;
        check_len(OP, "dstudent", dstudent.len(), rs * prototypes)?;
        check_len(OP, "probs", probs.len(), teacher_rows * prototypes)?;
        let (rs_i, rt_i, k) = (
            dim(OP, "student rows", rs)?,
            dim(OP, "teacher rows", teacher_rows)?,
            dim(OP, "prototypes", prototypes)?,
        );
        let n_pairs = pairs.pairs as i32;
        let inv_ts = 1.0 / student_temp;
        launch!(
            self,
            KernelFamily::Loss,
            "softmax_cross_entropy",
            config((blocks(OP, rs)?, 1, 1), BLOCK),
            [
                &mut *row_loss,
                dstudent,
                student,
                probs,
                &pairs.teacher,
                &pairs.weight,
                &n_pairs,
                &inv_ts,
                &grad_scale,
                &rs_i,
                &rt_i,
                &k
            ]
        );
        self.sum(loss, row_loss, ReduceOp::Sum, 1.0)
    }
}

impl CudaBackend {
    /// `mean_entropy [1] = (1/R) Σ_r −Σ_k p log p` of `probs [R, K]`; `row_entropy [R]` is the
    /// caller's per-row scratch.
    pub fn mean_row_entropy(
        &mut self,
        mean_entropy: &mut CudaSlice<f32>,
        row_entropy: &mut CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        rows: usize,
        prototypes: usize,
    ) -> Result<()> {
        const OP: &str = "cuda mean_row_entropy";
        if rows == 0 {
            return Err(Error::shape(OP, "no rows"));
        }
        check_len(OP, "mean_entropy", mean_entropy.len(), 1)?;
        check_len(OP, "row_entropy", row_entropy.len(), rows)?;
        check_len(OP, "probs", probs.len(), rows * prototypes)?;
        let (r, k) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", prototypes)?);
        launch!(
            self,
            KernelFamily::Loss,
            "row_entropy",
            config((blocks(OP, rows)?, 1, 1), BLOCK),
            [&mut *row_entropy, probs, &r, &k]
        );
        self.sum(mean_entropy, row_entropy, ReduceOp::Sum, 1.0 / rows as f32)
    }
}
