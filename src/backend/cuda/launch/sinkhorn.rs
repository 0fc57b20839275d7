//! Launcher of `kernels/sinkhorn.cu`: Sinkhorn-Knopp teacher targets.

use super::elementwise::ReduceOp;
use super::{blocks, check_len, config, dim, grid_stride, launch, row_chunks, BLOCK};
use crate::backend::cuda::{CudaBackend, KernelFamily};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// Blocks of the global-max reduction.
const MAX_GROUPS: usize = 264;

impl CudaBackend {
    /// `q [R, K] = SK(teacher, teacher_temp, n_samples, iterations)` (the golden README's
    /// definition; each output row sums to 1). `a [K]` and `b [R]` are caller-owned scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn sinkhorn_knopp(
        &mut self,
        q: &mut CudaSlice<f32>,
        a: &mut CudaSlice<f32>,
        b: &mut CudaSlice<f32>,
        teacher: &CudaSlice<f32>,
        rows: usize,
        prototypes: usize,
        teacher_temp: f32,
        n_samples: usize,
        iterations: usize,
    ) -> Result<()> {
        const OP: &str = "cuda sinkhorn_knopp";
        if rows == 0 || prototypes == 0 || n_samples == 0 {
            return Err(Error::shape(
                OP,
                format!("empty problem: {rows} x {prototypes}, {n_samples} samples"),
            ));
        }
        if teacher_temp.is_nan() || teacher_temp <= 0.0 {
            return Err(Error::Config(format!(
                "{OP}: teacher temperature must be > 0, got {teacher_temp}"
            )));
        }
        let n = rows * prototypes;
        check_len(OP, "q", q.len(), n)?;
        check_len(OP, "teacher", teacher.len(), n)?;
        check_len(OP, "a", a.len(), prototypes)?;
        check_len(OP, "b", b.len(), rows)?;
        let (r, k) = (dim(OP, "rows", rows)?, dim(OP, "prototypes", prototypes)?);
        let n_i64 = n as i64;
        let (groups, per_chunk) = row_chunks(rows);
        // Scratch: [0, 2) scalars (max, total), [2, 2 + 264) reduction partials, then the
        // column partials [groups, K].
        let col_offset = 2 + MAX_GROUPS;
        self.reserve_scratch(col_offset + groups * prototypes)?;
        let scalar_max = self.scratch_ptr(0);
        let scalar_total = self.scratch_ptr(1);
        let partial = self.scratch_ptr(2);
        let col_partial = self.scratch_ptr(col_offset);

        let max_groups = MAX_GROUPS as i32;
        launch!(
            self,
            KernelFamily::Sinkhorn,
            "sinkhorn_max_partial",
            config((MAX_GROUPS as u32, 1, 1), BLOCK),
            [&partial, teacher, &n_i64]
        );
        launch!(
            self,
            KernelFamily::Sinkhorn,
            "sinkhorn_max_finalize",
            config((1, 1, 1), BLOCK),
            [&scalar_max, &partial, &max_groups]
        );
        let inv_temp = 1.0 / teacher_temp;
        launch!(
            self,
            KernelFamily::Sinkhorn,
            "sinkhorn_exp",
            grid_stride(n),
            [&mut *q, teacher, &scalar_max, &inv_temp, &n_i64]
        );
        // b = 1 / sum(E)
        {
            let code = ReduceOp::Sum.code();
            let one = 1.0f32;
            launch!(
                self,
                KernelFamily::Elementwise,
                "sum_partial",
                config((MAX_GROUPS as u32, 1, 1), BLOCK),
                [&partial, &*q, &n_i64, &code]
            );
            launch!(
                self,
                KernelFamily::Elementwise,
                "sum_finalize",
                config((1, 1, 1), BLOCK),
                [&scalar_total, &partial, &max_groups, &one]
            );
            launch!(
                self,
                KernelFamily::Sinkhorn,
                "sinkhorn_reciprocal",
                config((1, 1, 1), BLOCK),
                [&mut *b, &scalar_total, &r]
            );
        }
        let per_chunk_i = dim(OP, "rows per chunk", per_chunk)?;
        let g = dim(OP, "groups", groups)?;
        let samples = n_samples as f32;
        let col_grid = (
            blocks(OP, prototypes.div_ceil(BLOCK as usize))?,
            groups as u32,
            1,
        );
        let col_update_grid = (col_grid.0, 1, 1);
        let row_grid = (blocks(OP, rows)?, 1, 1);
        for _ in 0..iterations {
            launch!(
                self,
                KernelFamily::Sinkhorn,
                "sinkhorn_col_partial",
                config(col_grid, BLOCK),
                [&col_partial, &*q, &*b, &r, &k, &per_chunk_i]
            );
            launch!(
                self,
                KernelFamily::Sinkhorn,
                "sinkhorn_col_update",
                config(col_update_grid, BLOCK),
                [&mut *a, &col_partial, &g, &k]
            );
            launch!(
                self,
                KernelFamily::Sinkhorn,
                "sinkhorn_row_update",
                config(row_grid, BLOCK),
                [&mut *b, &*q, &*a, &r, &k, &samples]
            );
        }
        if iterations == 0 {
            // Q = E / sum(E) * n_samples with a = 1.
            let fill = 1.0f32;
            let k_i64 = prototypes as i64;
            launch!(
                self,
                KernelFamily::Sinkhorn,
                "sinkhorn_fill",
                grid_stride(prototypes),
                [&mut *a, &fill, &k_i64]
            );
        }
        let q_ptr = self.device_ptr_mut_raw(q);
        launch!(
            self,
            KernelFamily::Sinkhorn,
            "sinkhorn_finalize",
            grid_stride(n),
            [&q_ptr, &q_ptr, &*a, &*b, &r, &k, &samples]
        );
        Ok(())
    }
}
