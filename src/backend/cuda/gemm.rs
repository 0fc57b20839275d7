//! bf16 GEMMs with f32 output and f32 accumulation on the tensor cores: cuBLASLt with fused
//! epilogues (`gemm_lt.rs`), or `cublasGemmStridedBatchedEx` where cuBLASLt has no algorithm.
//!
//! Row-major convention, the same as the CPU [`matmul`](crate::backend::cpu::matmul), described
//! by the shared [`Gemm`] / [`GemmBatch`]: `C[m,n] (=|+=) op(A)[m,k] · op(B)[k,n]`, `a` holds `A`
//! as `[m,k]` (or `[k,m]` with `ta = Yes`), `b` holds `B` as `[k,n]` (or `[n,k]` with
//! `tb = Yes`), `c` is `[m,n]`. cuBLAS is column-major: a row-major `[r,s]` matrix is its
//! column-major transpose, so the row-major `C = A·B` is computed as the column-major
//! `Cᵀ = Bᵀ·Aᵀ` (operands swapped, m and n swapped, each operand's transpose flag kept; see
//! [`LtProblem::row_major`]).

use super::buffers::Slot;
use super::gemm_lt::{Epilogue, LtOutcome, LtProblem};
use super::{bf16, cuda_error, CudaBackend};
use crate::backend::{
    Accumulate, Buffers, ElementwiseOps, Gemm, GemmBatch, GemmOps, InputGrad, LinearDims,
    LinearOut, Storage, Transpose,
};
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
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

fn to_i32<T: TryInto<i32> + Copy + std::fmt::Display>(what: &str, v: T) -> Result<i32> {
    v.try_into()
        .map_err(|_| Error::shape("cuda gemm", format!("{what} = {v} exceeds i32")))
}

/// Checks the operand lengths (`a`, `b`, `c`) against `g`: exactly, or at least.
fn check_operands(op: &'static str, g: &GemmBatch, lens: [usize; 3], exact: bool) -> Result<()> {
    let Gemm { m, k, n, .. } = g.gemm;
    let last = g.batch.saturating_sub(1);
    let need = [
        last * g.stride_a + m * k,
        last * g.stride_b + k * n,
        last * g.stride_c + m * n,
    ];
    let fits = |(len, need): (&usize, &usize)| if exact { len == need } else { len >= need };
    if lens.iter().zip(&need).all(fits) {
        return Ok(());
    }
    Err(Error::shape(
        op,
        format!("{g:?} needs A, B, C of {need:?} elements; got {lens:?}"),
    ))
}

/// The bias an epilogue adds (`[n]`), `None` without one.
fn bias_epilogue<'e>(
    op: &'static str,
    bias: Option<&'e CudaSlice<f32>>,
    n: usize,
) -> Result<Epilogue<'e>> {
    match bias {
        Some(v) if v.len() != n => Err(Error::shape(op, format!("the bias must hold {n} values"))),
        Some(v) => Ok(Epilogue::AddColumnBias(v)),
        None => Ok(Epilogue::None),
    }
}

impl CudaBackend {
    /// `C[m,n] = bf16(op(A) · op(B) (+ bias[n]))`: bf16 output rounded once from the f32
    /// accumulator (plus the f32 bias), for a consumer that reads bf16 only (the attention's
    /// qkv). cuBLASLt only: [`LtOutcome::Unsupported`] (nothing ran) sends the caller to the
    /// f32 GEMM and a cast.
    pub fn matmul_to_bf16(
        &self,
        c: &mut CudaSlice<bf16>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        bias: Option<&CudaSlice<f32>>,
        g: Gemm,
    ) -> Result<LtOutcome> {
        const OP: &str = "cuda gemm to bf16";
        let g = GemmBatch::single(g);
        check_operands(OP, &g, [a.len(), b.len(), c.len()], true)?;
        let mut epilogue = bias_epilogue(OP, bias, g.gemm.n)?;
        if g.gemm.m == 0 || g.gemm.n == 0 || g.gemm.k == 0 {
            return Ok(LtOutcome::Unsupported);
        }
        let stream = self.stream.as_ref();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr(stream);
        let (c_ptr, _c_sync) = c.device_ptr(stream);
        let bf16 = LtDataType::CUDA_R_16BF;
        let problem = LtProblem::row_major(bf16, bf16, [a_ptr, b_ptr, c_ptr], g);
        self.matmul_lt(&problem, &mut epilogue)
    }

    /// `C (=|+=) op(A)[m,k] · op(B)` and `sums[i] += Σ_p op(A)[i, p]` (the bias gradient of a
    /// linear layer from its weight-gradient GEMM, `dW = doutᵀ · inp`, `db += Σ_rows dout`),
    /// fused when cuBLASLt can. Returns [`EpilogueRun::Separate`] when it could not: the GEMM
    /// ran and `sums` is untouched, for the caller to update from its f32 copy of `A`.
    pub fn matmul_with_row_sums(
        &mut self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        sums: &mut CudaSlice<f32>,
        g: Gemm,
    ) -> Result<EpilogueRun> {
        let m = g.m;
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
            self.gemm(c, a, b, GemmBatch::single(g), &mut epilogue)
        };
        let run = match run {
            Ok(EpilogueRun::Fused) => {
                let (ptr, _sync) = written.device_ptr(self.stream.as_ref());
                self.column_partial_reduce_raw(sums, ptr, 1, m, 1.0, Accumulate::Add)
                    .map(|()| EpilogueRun::Fused)
            }
            other => other,
        };
        self.lt_sums = Some(written);
        run
    }

    /// `C = op(A) · op(B) (+ bias[n])`, the bias fused when cuBLASLt can; else
    /// ([`EpilogueRun::Separate`]) `C` holds the product alone and the caller adds the bias.
    fn matmul_bias(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        bias: Option<&CudaSlice<f32>>,
        g: Gemm,
    ) -> Result<EpilogueRun> {
        let mut epilogue = bias_epilogue("cuda gemm bias", bias, g.n)?;
        self.gemm(c, a, b, GemmBatch::single(g), &mut epilogue)
    }

    /// cuBLASLt (with `epilogue` fused) when it has an algorithm, else cuBLAS without it.
    fn gemm<T: GemmOperand>(
        &self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        g: GemmBatch,
        epilogue: &mut Epilogue<'_>,
    ) -> Result<EpilogueRun> {
        check_operands("cuda gemm", &g, [a.len(), b.len(), c.len()], false)?;
        if g.gemm.m == 0 || g.gemm.n == 0 || g.batch == 0 {
            return Ok(EpilogueRun::Separate);
        }
        let stream = self.stream.as_ref();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr(stream);
        let (c_ptr, _c_sync) = c.device_ptr_mut(stream);
        let f32_type = LtDataType::CUDA_R_32F;
        let p = LtProblem::row_major(T::LT_TYPE, f32_type, [a_ptr, b_ptr, c_ptr], g);
        if g.gemm.k > 0 && self.matmul_lt(&p, epilogue)? == LtOutcome::Done {
            return Ok(EpilogueRun::Fused);
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        self.lt.cublas.fetch_add(1, Ordering::Relaxed);
        if !matches!(epilogue, Epilogue::None) {
            self.lt.separate.fetch_add(1, Ordering::Relaxed);
        }
        let (alpha, beta) = (1.0f32, p.beta());
        // SAFETY: the lengths were checked against the shape and strides above; the pointers
        // are live device allocations of this context; alpha/beta are f32 as the compute type
        // CUBLAS_COMPUTE_32F requires. The column-major problem `p` is cuBLAS's as well.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                p.op_a,
                p.op_b,
                to_i32("n", p.rows)?,
                to_i32("m", p.cols)?,
                to_i32("k", p.depth)?,
                (&alpha) as *const f32 as *const c_void,
                p.ptrs[0] as *const c_void,
                T::CUDA_TYPE,
                to_i32("ldb", p.a.2)?,
                p.a.3,
                p.ptrs[1] as *const c_void,
                T::CUDA_TYPE,
                to_i32("lda", p.b.2)?,
                p.b.3,
                (&beta) as *const f32 as *const c_void,
                p.ptrs[2] as *mut c_void,
                cudaDataType::CUDA_R_32F,
                to_i32("ldc", p.c.2)?,
                p.c.3,
                to_i32("batch", p.batch)?,
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
        self.gemm(c, a, b, GemmBatch::single(g), &mut Epilogue::None)
            .map(drop)
    }

    /// f32 operands and plain f32 arithmetic (no TF32): for the small products that must stay
    /// exact, such as resampling the position embedding.
    fn matmul_f32(
        &mut self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        g: GemmBatch,
    ) -> Result<()> {
        self.gemm(c, a, b, g, &mut Epilogue::None).map(drop)
    }

    fn linear_forward(
        &mut self,
        out: LinearOut<'_, Self>,
        inp: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        bias: Option<&CudaSlice<f32>>,
        dims: LinearDims,
    ) -> Result<()> {
        let (rows, n) = (dims.rows, dims.out_dim);
        let g = Gemm::nn(rows, dims.in_dim, n).t(Transpose::No, Transpose::Yes);
        // The biased f32 product, the bias added by a separate pass where it could not fuse.
        let biased = |gpu: &mut Self, y: &mut CudaSlice<f32>| match (
            gpu.matmul_bias(y, inp, weight, bias, g)?,
            bias,
        ) {
            (EpilogueRun::Separate, Some(v)) => gpu.add_bias(y, v, rows, n),
            _ => Ok(()),
        };
        match out {
            LinearOut::F32(y) => biased(self, y),
            LinearOut::Half(y) => {
                if self.matmul_to_bf16(y, inp, weight, bias, g)? == LtOutcome::Unsupported {
                    // f32 result (bias included) rounded once, through a work buffer.
                    self.with_work(Slot::A, rows * n, |gpu, f32_out| {
                        biased(gpu, f32_out)?;
                        gpu.cast_to_half(y, f32_out)
                    })?;
                }
                Ok(())
            }
            LinearOut::Gelu { pre, act } => {
                // A bias that did not fuse is added by the GELU pass, for free.
                let left = match self.matmul_bias(pre, inp, weight, bias, g)? {
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
        let g = Gemm::nn(dims.rows, dims.out_dim, dims.in_dim);
        match dinp {
            InputGrad::F32(dx, acc) => self.matmul(dx, dout, weight, g.acc(acc)),
            InputGrad::Half(dx) => {
                if self.matmul_to_bf16(dx, dout, weight, None, g)? == LtOutcome::Unsupported {
                    self.with_work(Slot::A, dims.rows * dims.in_dim, |gpu, f32_out| {
                        gpu.matmul(f32_out, dout, weight, g)?;
                        gpu.cast_to_half(dx, f32_out)
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
            in_dim,
            out_dim,
        } = dims;
        let g = Gemm::nn(out_dim, rows, in_dim)
            .t(Transpose::Yes, Transpose::No)
            .acc(Accumulate::Add);
        let Some(db) = dbias else {
            return self.matmul(dweight, dout, inp, g);
        };
        if self.matmul_with_row_sums(dweight, dout, inp, db, g)? == EpilogueRun::Separate {
            let add = Accumulate::Add;
            match dout_f32 {
                Some(ready) => self.column_sum(db, ready, rows, add)?,
                None => self.with_work(Slot::A, rows * out_dim, |gpu, wide| {
                    gpu.cast_to_f32(wide, dout)?;
                    gpu.column_sum(db, wide, rows, add)
                })?,
            }
        }
        Ok(())
    }
}
