//! Launchers of `kernels/loss.cu`: teacher softmax with centering, the centre EMA, and the
//! fused student log-softmax cross-entropy with its gradient (DINO and iBOT).

use super::elementwise::ReduceOp;
use super::{blocks, check_len, config, dim, launch, row_chunks, BLOCK};
use crate::backend::cuda::buffers::{rows_of, Slot};
use crate::backend::cuda::{CudaBackend, KernelFamily};
use crate::backend::{Buffers, LossOps, Storage};
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

impl LossOps for CudaBackend {
    type Pairs = CrossEntropyPairs;

    fn pairs(&mut self, capacity: usize, pairs: usize) -> Result<CrossEntropyPairs> {
        self.allocations += 2;
        let n = capacity.max(1) * pairs;
        let mut table =
            CrossEntropyPairs::new(self, capacity.max(1), pairs, &vec![-1; n], &vec![0.0; n])?;
        table.student_rows = 0;
        Ok(table)
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
        let rows = rows_of("cuda teacher_softmax", "logits", logits.len(), k)?;
        const OP: &str = "cuda teacher_softmax";
        if temp.is_nan() || temp <= 0.0 {
            return Err(Error::Config(format!(
                "{OP}: teacher temperature must be > 0"
            )));
        }
        check_len(OP, "probs", probs.len(), rows * k)?;
        check_len(OP, "teacher", logits.len(), rows * k)?;
        if let Some(c) = center {
            check_len(OP, "center", c.len(), k)?;
        }
        let center_ptr = self.optional_ptr(center);
        let (r, k) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", k)?);
        let inv_temp = 1.0 / temp;
        launch!(
            self,
            KernelFamily::Loss,
            "teacher_softmax",
            config((blocks(OP, rows)?, 1, 1), BLOCK),
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
        let rows = rows_of("cuda center_ema", "logits", logits.len(), k)?;
        const OP: &str = "cuda center_ema";
        if rows == 0 {
            return Err(Error::shape(OP, "no teacher rows"));
        }
        check_len(OP, "teacher", logits.len(), rows * k)?;
        check_len(OP, "center", center.len(), k)?;
        check_len(OP, "center_new", next.len(), k)?;
        let (r, ki) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", k)?);
        let (groups, per_chunk) = row_chunks(rows);
        self.reserve_scratch(groups * k)?;
        let partial = self.scratch_ptr(0);
        let per_chunk_i = dim(OP, "rows per chunk", per_chunk)?;
        let null = 0u64;
        let grid = (blocks(OP, k.div_ceil(BLOCK as usize))?, groups as u32, 1);
        launch!(
            self,
            KernelFamily::Elementwise,
            "column_sum_partial",
            config(grid, BLOCK),
            [&partial, logits, &null, &r, &ki, &per_chunk_i]
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
        let rows = table.student_rows;
        if rows == 0 {
            return self.zero_f32(loss);
        }
        let teacher_rows = rows_of("cuda softmax_cross_entropy", "probs", probs.len(), k)?;
        self.with_work(Slot::A, rows, |gpu, row_loss| {
            CudaBackend::softmax_cross_entropy(
                gpu,
                loss,
                row_loss,
                ds,
                s,
                probs,
                table,
                student_temp,
                grad_scale,
                teacher_rows,
                k,
            )
        })
    }

    fn mean_row_entropy(
        &mut self,
        out: &mut CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        k: usize,
    ) -> Result<()> {
        let rows = rows_of("cuda mean_row_entropy", "probs", probs.len(), k)?;
        self.with_work(Slot::A, rows, |gpu, row| {
            CudaBackend::mean_row_entropy(gpu, out, row, probs, rows, k)
        })
    }

    fn sinkhorn_knopp(
        &mut self,
        q: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        k: usize,
        temp: f32,
        iterations: usize,
    ) -> Result<()> {
        let rows = rows_of("cuda sinkhorn_knopp", "logits", logits.len(), k)?;
        let mut b = self.take_work(Slot::B, rows)?;
        let result = self.with_work(Slot::A, k, |gpu, a| {
            let mut b = b.window_mut(0..rows)?;
            CudaBackend::sinkhorn_knopp(gpu, q, a, &mut b, logits, rows, k, temp, rows, iterations)
        });
        self.put_work(Slot::B, b);
        result
    }
}
