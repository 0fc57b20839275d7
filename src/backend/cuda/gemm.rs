//! bf16 GEMMs with f32 output and f32 accumulation through cuBLAS (`cublasGemmStridedBatchedEx`,
//! tensor cores).
//!
//! Row-major convention, the same as the CPU [`matmul`](crate::backend::cpu::matmul):
//! `C[m,n] (=|+=) op(A)[m,k] · op(B)[k,n]`, `a` holds `A` as `[m,k]` (or `[k,m]` with
//! `ta = Yes`), `b` holds `B` as `[k,n]` (or `[n,k]` with `tb = Yes`), `c` is `[m,n]`.
//! cuBLAS is column-major: a row-major `[r,s]` matrix is its column-major transpose, so the
//! row-major `C = A·B` is computed as the column-major `Cᵀ = Bᵀ·Aᵀ` (operands swapped, m and n
//! swapped, each operand's transpose flag kept).

use super::{bf16, cuda_error, CudaBackend};
use crate::backend::cpu::{Accumulate, Transpose};
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::ffi::c_void;

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
}
impl GemmOperand for bf16 {
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}
impl GemmOperand for f32 {
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
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
        self.matmul_batched(c, a, ta, b, tb, shape, acc)
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
        self.matmul_batched(c, a, ta, b, tb, shape, acc)
    }

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
    ) -> Result<()> {
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
            return Ok(());
        }
        let GemmShape { m, k, n, .. } = shape;
        // Column-major view: C^T[n,m] = op(B)^T[n,k] · op(A)^T[k,m].
        let (op_b, ld_b) = match tb {
            Transpose::No => (cublasOperation_t::CUBLAS_OP_N, n),
            Transpose::Yes => (cublasOperation_t::CUBLAS_OP_T, k),
        };
        let (op_a, ld_a) = match ta {
            Transpose::No => (cublasOperation_t::CUBLAS_OP_N, k),
            Transpose::Yes => (cublasOperation_t::CUBLAS_OP_T, m),
        };
        let alpha: f32 = 1.0;
        let beta: f32 = match acc {
            Accumulate::Overwrite => 0.0,
            Accumulate::Add => 1.0,
        };
        let stream = self.stream.as_ref();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr(stream);
        let (c_ptr, _c_sync) = c.device_ptr_mut(stream);
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
        .map_err(|e| cuda_error("cublasGemmStridedBatchedEx", e))
    }
}
