//! bf16 GEMMs with f32 output and f32 accumulation on the tensor cores: cuBLASLt with fused
//! epilogues (`gemm_lt.rs`), or `cublasGemmStridedBatchedEx` where cuBLASLt has no algorithm.
//!
//! Row-major convention, the same as the CPU [`matmul`](crate::backend::cpu::matmul):
//! `C[m,n] (=|+=) op(A)[m,k] · op(B)[k,n]`, `a` holds `A` as `[m,k]` (or `[k,m]` with
//! `ta = Yes`), `b` holds `B` as `[k,n]` (or `[n,k]` with `tb = Yes`), `c` is `[m,n]`.
//! cuBLAS is column-major: a row-major `[r,s]` matrix is its column-major transpose, so the
//! row-major `C = A·B` is computed as the column-major `Cᵀ = Bᵀ·Aᵀ` (operands swapped, m and n
//! swapped, each operand's transpose flag kept).

use super::gemm_lt::{Epilogue, LtOutcome, LtProblem};
use super::launch::GradWrite;
use super::{bf16, cuda_error, CudaBackend};
use crate::backend::cpu::{Accumulate, Transpose};
use crate::backend::cuda::buffers::Slot;
use crate::backend::{Gemm, GemmBatch, GemmOps, InputGrad, LinearDims, LinearOut, Storage};
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublaslt::sys::cudaDataType as LtDataType;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::ffi::c_void;
use std::sync::atomic::Ordering;

/// Whether a GEMM's epilogue ran fused into it, or must still be applied by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpilogueRun {
    Fused,
    /// The GEMM ran without it (cuBLAS path): the caller runs the separate kernel.
    Separate,
}

/// Shape of one (possibly batched) GEMM; strides in elements between batch entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl GemmShape {
    /// A single (unbatched) product.
    pub fn single(m: usize, k: usize, n: usize) -> Self {
        GemmShape {
            m,
            k,
            n,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
        }
    }

    /// Elements each operand must hold.
    fn required(&self) -> (usize, usize, usize) {
        let last = self.batch.saturating_sub(1);
        (
            last * self.stride_a + self.m * self.k,
            last * self.stride_b + self.k * self.n,
            last * self.stride_c + self.m * self.n,
        )
    }
}

/// GEMM operand element types: bf16 (tensor cores) or f32.
trait GemmOperand {
    const CUDA_TYPE: cudaDataType;
    /// The same type in cuBLASLt's bindings.
    const LT_TYPE: LtDataType;
}
impl GemmOperand for bf16 {
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
    const LT_TYPE: LtDataType = LtDataType::CUDA_R_16BF;
}
impl GemmOperand for f32 {
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
    const LT_TYPE: LtDataType = LtDataType::CUDA_R_32F;
}

/// cuBLAS's operation for a transpose flag.
pub(super) fn operation(t: Transpose) -> cublasOperation_t {
    match t {
        Transpose::No => cublasOperation_t::CUBLAS_OP_N,
        Transpose::Yes => cublasOperation_t::CUBLAS_OP_T,
    }
}

/// Rows of the stored column-major matrix whose `op` is `[rows, cols]` (its leading
/// dimension, packed).
fn stored_rows(t: Transpose, rows: usize, cols: usize) -> usize {
    match t {
        Transpose::No => rows,
        Transpose::Yes => cols,
    }
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape("cuda gemm", format!("{what} = {v} exceeds i32")))
}

impl CudaBackend {
    /// `C (=|+=) op(A) · op(B)`, bf16 operands, f32 `C`, f32 accumulation (see module docs).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        ta: Transpose,
        b: &CudaSlice<bf16>,
        tb: Transpose,
        m: usize,
        k: usize,
        n: usize,
        acc: Accumulate,
    ) -> Result<()> {
        self.matmul_bf16_batched(c, a, ta, b, tb, GemmShape::single(m, k, n), acc)
    }

    /// Batched form of [`matmul_bf16`](Self::matmul_bf16): entry `i` uses `a[i*stride_a..]`,
    /// `b[i*stride_b..]`, `c[i*stride_c..]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_batched(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        ta: Transpose,
        b: &CudaSlice<bf16>,
        tb: Transpose,
        shape: GemmShape,
        acc: Accumulate,
    ) -> Result<()> {
        self.matmul_batched(c, a, ta, b, tb, shape, acc, &mut Epilogue::None)
            .map(drop)
    }

    /// `C[m,n] = A[m,k] · op(B) (+ bias[n])` (broadcast over rows), the bias fused into the GEMM
    /// when cuBLASLt can, else added by a separate pass.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_bias(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        tb: Transpose,
        bias: Option<&CudaSlice<f32>>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let run = self.matmul_bf16_try_bias(c, a, b, tb, bias, m, k, n)?;
        match (run, bias) {
            (EpilogueRun::Separate, Some(bias)) => self.add_bias(c, bias, m, n),
            _ => Ok(()),
        }
    }

    /// [`matmul_bf16_bias`](Self::matmul_bf16_bias) that leaves the bias to the caller when it
    /// cannot fuse it ([`EpilogueRun::Separate`]: `C` holds the product alone), for a caller
    /// whose next pass can add it for free (fc1's GELU).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_try_bias(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        tb: Transpose,
        bias: Option<&CudaSlice<f32>>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<EpilogueRun> {
        if bias.is_some_and(|v| v.len() != n) {
            return Err(Error::shape(
                "cuda gemm bias",
                format!("the bias must hold {n} values"),
            ));
        }
        let shape = GemmShape::single(m, k, n);
        let mut epilogue = match bias {
            Some(v) => Epilogue::AddColumnBias(v),
            None => Epilogue::None,
        };
        let overwrite = Accumulate::Overwrite;
        self.matmul_batched(c, a, Transpose::No, b, tb, shape, overwrite, &mut epilogue)
    }

    /// `C (=|+=) op(A)[m,k] · op(B)` and, when given, `sums[i] += Σ_p op(A)[i, p]` (the bias
    /// gradient of a linear layer from its weight-gradient GEMM, `dW = doutᵀ · inp`,
    /// `db += Σ_rows dout`), fused when cuBLASLt can. Returns [`EpilogueRun::Separate`] when it
    /// could not: the GEMM ran and `sums` is untouched, for the caller to update from its f32
    /// copy of `A`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_with_row_sums(
        &mut self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        ta: Transpose,
        b: &CudaSlice<bf16>,
        tb: Transpose,
        m: usize,
        k: usize,
        n: usize,
        acc: Accumulate,
        sums: Option<&mut CudaSlice<f32>>,
    ) -> Result<EpilogueRun> {
        let shape = GemmShape::single(m, k, n);
        let Some(sums) = sums else {
            self.matmul_batched(c, a, ta, b, tb, shape, acc, &mut Epilogue::None)?;
            return Ok(EpilogueRun::Fused);
        };
        if sums.len() != m {
            return Err(Error::shape(
                "cuda gemm row sums",
                format!("sums hold {} values, expected {m}", sums.len()),
            ));
        }
        // cuBLASLt writes the sums; they are accumulated into `sums` from a buffer of its own.
        let mut written = match self.lt_sums.take() {
            Some(buf) if buf.len() >= m => buf,
            _ => self.alloc_zeros::<f32>(m.next_power_of_two())?,
        };
        let run = {
            let mut window = written.window_mut(0..m)?;
            let mut epilogue = Epilogue::RowSumsOfA(&mut window);
            self.matmul_batched(c, a, ta, b, tb, shape, acc, &mut epilogue)
        };
        let run = match run {
            Ok(EpilogueRun::Fused) => {
                let (ptr, _sync) = written.device_ptr(self.stream.as_ref());
                self.column_partial_reduce_raw(sums, ptr, 1, m, 1.0, GradWrite::Accumulate)
                    .map(|()| EpilogueRun::Fused)
            }
            other => other,
        };
        self.lt_sums = Some(written);
        run
    }

    /// `C[m,n] = bf16(A[m,k] · op(B) (+ bias[n]))`: bf16 output rounded once from the f32
    /// accumulator (plus the f32 bias), for a consumer that reads bf16 only (the attention's
    /// qkv). cuBLASLt only: [`LtOutcome::Unsupported`] (nothing ran) sends the caller to the
    /// f32 GEMM and a cast.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_to_bf16(
        &self,
        c: &mut CudaSlice<bf16>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        tb: Transpose,
        bias: Option<&CudaSlice<f32>>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<LtOutcome> {
        let shape = GemmShape::single(m, k, n);
        let (need_a, need_b, need_c) = shape.required();
        if a.len() != need_a || b.len() != need_b || c.len() != need_c {
            return Err(Error::shape(
                "cuda gemm to bf16",
                format!(
                    "{shape:?} needs A {need_a}, B {need_b}, C {need_c} elements; got {}, {}, {}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        if bias.is_some_and(|v| v.len() != n) {
            return Err(Error::shape(
                "cuda gemm to bf16",
                format!("the bias must hold {n} values"),
            ));
        }
        if m == 0 || n == 0 || k == 0 {
            return Ok(LtOutcome::Unsupported);
        }
        let stream = self.stream.as_ref();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr(stream);
        let (c_ptr, _c_sync) = c.device_ptr(stream);
        let problem = LtProblem::row_major(
            LtDataType::CUDA_R_16BF,
            LtDataType::CUDA_R_16BF,
            (a_ptr, Transpose::No),
            (b_ptr, tb),
            c_ptr,
            shape,
            Accumulate::Overwrite,
        );
        let mut epilogue = match bias {
            Some(v) => Epilogue::AddColumnBias(v),
            None => Epilogue::None,
        };
        self.matmul_lt(&problem, &mut epilogue)
    }

    /// [`matmul_bf16_batched`](Self::matmul_bf16_batched) with f32 operands and plain f32
    /// arithmetic (no TF32): for the small products that must stay exact, such as resampling
    /// the position embedding.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_f32_batched(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        ta: Transpose,
        b: &CudaSlice<f32>,
        tb: Transpose,
        shape: GemmShape,
        acc: Accumulate,
    ) -> Result<()> {
        self.matmul_batched(c, a, ta, b, tb, shape, acc, &mut Epilogue::None)
            .map(drop)
    }

    /// cuBLASLt (with `epilogue` fused) when it has an algorithm, else cuBLAS without it.
    #[allow(clippy::too_many_arguments)]
    fn matmul_batched<T: GemmOperand>(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<T>,
        ta: Transpose,
        b: &CudaSlice<T>,
        tb: Transpose,
        shape: GemmShape,
        acc: Accumulate,
        epilogue: &mut Epilogue<'_>,
    ) -> Result<EpilogueRun> {
        let (need_a, need_b, need_c) = shape.required();
        if a.len() < need_a || b.len() < need_b || c.len() < need_c {
            return Err(Error::shape(
                "cuda gemm",
                format!(
                    "{shape:?} needs A {need_a}, B {need_b}, C {need_c} elements; got {}, {}, {}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        if shape.m == 0 || shape.n == 0 || shape.batch == 0 {
            return Ok(EpilogueRun::Separate);
        }
        let GemmShape { m, k, n, .. } = shape;
        // Column-major view: C^T[n,m] = op(B)^T[n,k] · op(A)^T[k,m].
        let (op_b, ld_b) = (operation(tb), stored_rows(tb, n, k));
        let (op_a, ld_a) = (operation(ta), stored_rows(ta, k, m));
        let alpha: f32 = 1.0;
        let beta: f32 = match acc {
            Accumulate::Overwrite => 0.0,
            Accumulate::Add => 1.0,
        };
        let stream = self.stream.as_ref();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr(stream);
        let (c_ptr, _c_sync) = c.device_ptr_mut(stream);
        if k > 0 {
            let problem = LtProblem::row_major(
                T::LT_TYPE,
                LtDataType::CUDA_R_32F,
                (a_ptr, ta),
                (b_ptr, tb),
                c_ptr,
                shape,
                acc,
            );
            if self.matmul_lt(&problem, epilogue)? == LtOutcome::Done {
                return Ok(EpilogueRun::Fused);
            }
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        self.lt.cublas.fetch_add(1, Ordering::Relaxed);
        if !matches!(epilogue, Epilogue::None) {
            self.lt.separate.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the lengths were checked against the shape and strides above; the pointers
        // are live device allocations of this context; alpha/beta are f32 as the compute type
        // CUBLAS_COMPUTE_32F requires.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op_b,
                op_a,
                to_i32("n", n)?,
                to_i32("m", m)?,
                to_i32("k", k)?,
                (&alpha) as *const f32 as *const c_void,
                b_ptr as *const c_void,
                T::CUDA_TYPE,
                to_i32("ldb", ld_b)?,
                shape.stride_b as i64,
                a_ptr as *const c_void,
                T::CUDA_TYPE,
                to_i32("lda", ld_a)?,
                shape.stride_a as i64,
                (&beta) as *const f32 as *const c_void,
                c_ptr as *mut c_void,
                cudaDataType::CUDA_R_32F,
                to_i32("ldc", n)?,
                shape.stride_c as i64,
                to_i32("batch", shape.batch)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_error("cublasGemmStridedBatchedEx", e))?;
        Ok(EpilogueRun::Separate)
    }
}

impl GemmOps for CudaBackend {
    fn matmul(
        &mut self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<()> {
        self.matmul_bf16(c, a, g.ta, b, g.tb, g.m, g.k, g.n, g.acc)
    }

    fn matmul_f32(
        &mut self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        g: GemmBatch,
    ) -> Result<()> {
        let shape = GemmShape {
            m: g.gemm.m,
            k: g.gemm.k,
            n: g.gemm.n,
            batch: g.batch,
            stride_a: g.stride_a,
            stride_b: g.stride_b,
            stride_c: g.stride_c,
        };
        self.matmul_f32_batched(c, a, g.gemm.ta, b, g.gemm.tb, shape, g.gemm.acc)
    }

    fn linear_forward(
        &mut self,
        out: LinearOut<'_, Self>,
        inp: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        bias: Option<&CudaSlice<f32>>,
        dims: LinearDims,
    ) -> Result<()> {
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        let yes = Transpose::Yes;
        match out {
            LinearOut::F32(y) => self.matmul_bf16_bias(y, inp, weight, yes, bias, rows, k, n),
            LinearOut::Half(y) => {
                let direct = self.matmul_bf16_to_bf16(y, inp, weight, yes, bias, rows, k, n)?;
                if direct == LtOutcome::Unsupported {
                    // f32 result (bias included) rounded once, through a work buffer.
                    self.with_work(Slot::A, rows * n, |gpu, f32_out| {
                        gpu.matmul_bf16_bias(f32_out, inp, weight, yes, bias, rows, k, n)?;
                        gpu.cast_f32_to_bf16(y, f32_out)
                    })?;
                }
                Ok(())
            }
            LinearOut::Gelu { pre, act } => {
                let run = self.matmul_bf16_try_bias(pre, inp, weight, yes, bias, rows, k, n)?;
                let left = match run {
                    EpilogueRun::Fused => None,
                    EpilogueRun::Separate => bias,
                };
                self.bias_gelu_forward(pre, act, left, rows, n)
            }
        }
    }

    fn linear_input_grad(
        &mut self,
        dinp: InputGrad<'_, Self>,
        dout: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        dims: LinearDims,
    ) -> Result<()> {
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        let no = Transpose::No;
        match dinp {
            InputGrad::F32(dx, acc) => self.matmul_bf16(dx, dout, no, weight, no, rows, n, k, acc),
            InputGrad::Half(dx) => {
                let direct = self.matmul_bf16_to_bf16(dx, dout, weight, no, None, rows, n, k)?;
                if direct == LtOutcome::Unsupported {
                    self.with_work(Slot::A, rows * k, |gpu, f32_out| {
                        let acc = Accumulate::Overwrite;
                        gpu.matmul_bf16(f32_out, dout, no, weight, no, rows, n, k, acc)?;
                        gpu.cast_f32_to_bf16(dx, f32_out)
                    })?;
                }
                Ok(())
            }
        }
    }

    fn linear_param_grads(
        &mut self,
        dweight: &mut CudaSlice<f32>,
        dbias: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<bf16>,
        dout_f32: Option<&CudaSlice<f32>>,
        inp: &CudaSlice<bf16>,
        dims: LinearDims,
    ) -> Result<()> {
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        let (yes, no, add) = (Transpose::Yes, Transpose::No, Accumulate::Add);
        let Some(db) = dbias else {
            self.matmul_bf16_with_row_sums(dweight, dout, yes, inp, no, n, rows, k, add, None)?;
            return Ok(());
        };
        let run =
            self.matmul_bf16_with_row_sums(dweight, dout, yes, inp, no, n, rows, k, add, Some(db))?;
        if run == EpilogueRun::Separate {
            match dout_f32 {
                Some(ready) => self.bias_backward(db, ready, rows, n)?,
                None => self.with_work(Slot::A, rows * n, |gpu, wide| {
                    gpu.cast_bf16_to_f32(wide, dout)?;
                    gpu.bias_backward(db, wide, rows, n)
                })?,
            }
        }
        Ok(())
    }
}
