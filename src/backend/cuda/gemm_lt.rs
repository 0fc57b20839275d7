//! The cuBLASLt path of the GEMMs: the same row-major products as [`super::gemm`], with the
//! epilogues that save a pass over the output fused into the GEMM kernel:
//!
//! - [`Epilogue::AddColumnBias`]: `C[i, j] += bias[j]` (cuBLASLt `BIAS`), the linear layers'
//!   forward bias, instead of a separate read-modify-write of `C`;
//! - [`Epilogue::RowSumsOfA`]: `sums[i] = Σ_p op(A)[i, p]` (cuBLASLt `BGRADB`), the bias
//!   gradient computed while the weight-gradient GEMM reads `dout`, instead of a separate
//!   column-sum pass over `dout`.
//!
//! cuBLASLt's GELU epilogues use the tanh approximation; DINOv2 uses the exact erf GELU, so
//! GELU stays in its own kernel (`bias_gelu_forward`, which also adds fc1's bias).
//!
//! Each distinct problem (shapes, transposes, types, epilogue, accumulation and the pointers'
//! alignments) asks the heuristic once; the answer, an algorithm or "not supported", is cached.
//! When cuBLASLt has no algorithm (an unusual alignment, a combination the library lacks), the
//! caller falls back to `cublasGemmStridedBatchedEx` plus the separate epilogue kernel, and the
//! fallback is counted ([`GemmStats`]) so a run can say which path it took.
//!
//! Column-major mapping (see `gemm.rs`): the row-major `C[m,n] = op(A)·op(B)` is the
//! column-major `Cᵀ[n,m] = op(B)ᵀ·op(A)ᵀ`, so cuBLASLt's `A` is our `B`, its `B` is our `A`, and
//! its `D` has `n` rows and `m` columns. Its `BIAS` vector (one per row of `D`) is therefore one
//! per column `j` of our `C`, and its `BGRADB` (one per column of `D`, reduced over `k` from its
//! `B`) is the row sums of our `op(A)`.

use super::{cuda_error, CudaBackend};
use crate::backend::{Accumulate, Gemm, GemmBatch, Transpose};
use crate::error::{Error, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    cublasComputeType_t, cublasLtEpilogue_t, cublasLtHandle_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDescAttributes_t as DescAttr, cublasLtMatmulDesc_t,
    cublasLtMatmulPreferenceAttributes_t as PrefAttr, cublasLtMatmulPreference_t,
    cublasLtMatrixLayoutAttribute_t as LayoutAttr, cublasLtMatrixLayout_t, cublasStatus_t,
    cudaDataType,
};
use cudarc::driver::CudaSlice;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Which library runs the GEMMs. `DINOTRAIN_GEMM=cublas` selects [`GemmPath::Cublas`] for a
/// whole process (to rule cuBLASLt in or out when diagnosing a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// cuBLASLt with fused epilogues, falling back to cuBLAS where it has no algorithm.
    CublasLt,
    /// `cublasGemmStridedBatchedEx` and separate epilogue kernels.
    Cublas,
}

impl GemmPath {
    /// The path named by `DINOTRAIN_GEMM` (`cublaslt`, the default, or `cublas`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("DINOTRAIN_GEMM") {
            Err(_) => Ok(GemmPath::CublasLt),
            Ok(v) => match v.as_str() {
                "" | "cublaslt" => Ok(GemmPath::CublasLt),
                "cublas" => Ok(GemmPath::Cublas),
                other => Err(Error::Config(format!(
                    "DINOTRAIN_GEMM={other}: expected cublaslt or cublas"
                ))),
            },
        }
    }
}

/// What a GEMM does besides writing `C` (row-major terms).
pub enum Epilogue<'e> {
    None,
    /// `C[i, j] += bias[j]`, `bias` `[n]` f32.
    AddColumnBias(&'e CudaSlice<f32>),
    /// `sums[i] = Σ_p op(A)[i, p]` (written, not accumulated), `sums` `[m]` f32: the bias
    /// gradient of a linear layer from the weight-gradient GEMM `dW = doutᵀ · inp`.
    RowSumsOfA(&'e mut CudaSlice<f32>),
}

impl Epilogue<'_> {
    fn kind(&self) -> EpilogueKind {
        match self {
            Epilogue::None => EpilogueKind::None,
            Epilogue::AddColumnBias(_) => EpilogueKind::Bias,
            Epilogue::RowSumsOfA(_) => EpilogueKind::RowSums,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum EpilogueKind {
    None,
    Bias,
    RowSums,
}

/// Whether a GEMM ran on cuBLASLt with its epilogue, or the caller must take the other path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LtOutcome {
    Done,
    Unsupported,
}

/// How many GEMMs took each path since the backend was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GemmStats {
    /// GEMMs run by cuBLASLt.
    pub cublaslt: u64,
    /// ... of which with a fused epilogue (bias, bias gradient).
    pub fused_epilogues: u64,
    /// GEMMs run by `cublasGemmStridedBatchedEx` (path chosen, or no cuBLASLt algorithm).
    pub cublas: u64,
    /// Epilogues run as separate kernels because cuBLASLt had no algorithm for them.
    pub separate_epilogues: u64,
    /// Distinct problems whose algorithm `cublasLtMatmul` then declined (they run on cuBLAS).
    pub refused_problems: u64,
}

impl GemmStats {
    /// The counts since `earlier` (a snapshot of the same backend).
    pub fn since(&self, earlier: &GemmStats) -> GemmStats {
        GemmStats {
            cublaslt: self.cublaslt.saturating_sub(earlier.cublaslt),
            fused_epilogues: self.fused_epilogues.saturating_sub(earlier.fused_epilogues),
            cublas: self.cublas.saturating_sub(earlier.cublas),
            separate_epilogues: self
                .separate_epilogues
                .saturating_sub(earlier.separate_epilogues),
            refused_problems: self
                .refused_problems
                .saturating_sub(earlier.refused_problems),
        }
    }
}

impl std::fmt::Display for GemmStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cuBLASLt ({} with fused bias/bias-gradient epilogue), {} cuBLAS, {} epilogues as separate kernels",
            self.cublaslt, self.fused_epilogues, self.cublas, self.separate_epilogues
        )?;
        if self.refused_problems > 0 {
            write!(
                f,
                ", {} problems refused by cuBLASLt",
                self.refused_problems
            )?;
        }
        Ok(())
    }
}

/// One GEMM problem in column-major cuBLASLt terms (the cuBLAS fallback's as well), with its
/// operand pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct LtProblem {
    pub data_type: cudaDataType,
    /// The type of C and D (f32, or bf16 for a bf16 output).
    pub c_type: cudaDataType,
    pub op_a: cublasOperation_t,
    pub op_b: cublasOperation_t,
    /// Rows and columns of `D`, and the reduction length.
    pub rows: u64,
    pub cols: u64,
    pub depth: u64,
    pub batch: usize,
    /// Stored layouts `(rows, cols, ld)` and batch strides (elements) of A, B and C = D.
    pub a: (u64, u64, i64, i64),
    pub b: (u64, u64, i64, i64),
    pub c: (u64, u64, i64, i64),
    /// `C += A·B` (beta 1) rather than `C = A·B`.
    pub beta_one: bool,
    /// Device addresses of A, B and C = D.
    pub ptrs: [u64; 3],
}

impl LtProblem {
    /// The row-major `C[m,n] (=|+=) op(A)[m,k] · op(B)[k,n]` (the convention of `gemm.rs`) at
    /// `[a, b, c]` as cuBLASLt's column-major `Cᵀ = op(B)ᵀ · op(A)ᵀ`: its A is our B, its B our A.
    pub fn row_major(
        data_type: cudaDataType,
        c_type: cudaDataType,
        [ptr_a, ptr_b, ptr_c]: [u64; 3],
        g: GemmBatch,
    ) -> Self {
        let Gemm {
            m,
            k,
            n,
            ta,
            tb,
            acc,
        } = g.gemm;
        // The stored matrix of an operand whose op is [rows, cols]: op N stores it as is,
        // op T its transpose; packed, so the leading dimension is its row count.
        let stored = |t: Transpose, rows: usize, cols: usize, stride: usize| {
            let (r, c) = match t {
                Transpose::No => (rows, cols),
                Transpose::Yes => (cols, rows),
            };
            (r as u64, c as u64, r as i64, stride as i64)
        };
        let operation = |t| match t {
            Transpose::No => cublasOperation_t::CUBLAS_OP_N,
            Transpose::Yes => cublasOperation_t::CUBLAS_OP_T,
        };
        LtProblem {
            data_type,
            c_type,
            op_a: operation(tb),
            op_b: operation(ta),
            rows: n as u64,
            cols: m as u64,
            depth: k as u64,
            batch: g.batch,
            a: stored(tb, n, k, g.stride_b),
            b: stored(ta, k, m, g.stride_a),
            c: (n as u64, m as u64, n as i64, g.stride_c as i64),
            beta_one: acc == Accumulate::Add,
            ptrs: [ptr_b, ptr_a, ptr_c],
        }
    }

    /// The GEMM's beta: 0 overwrites C, 1 accumulates into it.
    pub fn beta(&self) -> f32 {
        if self.beta_one {
            1.0
        } else {
            0.0
        }
    }
}

/// The heuristic's answer for one problem: the algorithm and its workspace, or none.
type Choice = Option<(cublasLtMatmulAlgo_t, usize)>;

/// What the heuristic's answer depends on: the problem without its pointers, the epilogue, and
/// the alignments of A, B, C and the epilogue vector.
type ProblemKey = (LtProblem, EpilogueKind, [u32; 4]);

/// The cuBLASLt handle, its workspace, the heuristic cache and the path counters.
pub(super) struct LtGemm {
    handle: cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    pub path: GemmPath,
    choices: Mutex<HashMap<ProblemKey, Choice>>,
    pub cublaslt: AtomicU64,
    pub fused: AtomicU64,
    pub cublas: AtomicU64,
    pub separate: AtomicU64,
    pub refused: AtomicU64,
}

// SAFETY: the handle is only used on the backend's single stream, under `&CudaBackend`; the
// cache is behind a mutex and the counters are atomics.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once, here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// NVIDIA's recommended cuBLASLt workspace: 32 MiB on Hopper and later, 4 MiB before.
pub(super) fn workspace_bytes(compute_major: i32) -> usize {
    if compute_major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// The largest power of two (at most 256, cuBLASLt's default requirement) dividing `ptr`.
pub(super) fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    1u32 << ptr.trailing_zeros().min(8)
}

/// The epilogue vector must be 16-byte aligned for the fused path (the vectorised epilogue
/// loads); a less aligned one takes the separate kernel.
const EPILOGUE_VECTOR_ALIGNMENT: u32 = 16;

impl LtGemm {
    pub fn new(workspace: CudaSlice<u8>, path: GemmPath) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| cuda_error("cublasLtCreate", e))?;
        Ok(LtGemm {
            handle,
            workspace,
            path,
            choices: Mutex::new(HashMap::new()),
            cublaslt: AtomicU64::new(0),
            fused: AtomicU64::new(0),
            cublas: AtomicU64::new(0),
            separate: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// The heuristic's answers so far.
    fn choices(&self) -> Result<MutexGuard<'_, HashMap<ProblemKey, Choice>>> {
        self.choices
            .lock()
            .map_err(|_| Error::Cuda("cuBLASLt heuristic cache poisoned".into()))
    }

    pub fn stats(&self) -> GemmStats {
        GemmStats {
            cublaslt: self.cublaslt.load(Ordering::Relaxed),
            fused_epilogues: self.fused.load(Ordering::Relaxed),
            cublas: self.cublas.load(Ordering::Relaxed),
            separate_epilogues: self.separate.load(Ordering::Relaxed),
            refused_problems: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// An owned cuBLASLt descriptor with its attribute setter, destroyed on drop.
struct Descriptor<H: Copy, A> {
    raw: H,
    set: unsafe fn(H, A, *const c_void, usize) -> std::result::Result<(), lt::CublasError>,
    destroy: unsafe fn(H) -> std::result::Result<(), lt::CublasError>,
}
type Desc = Descriptor<cublasLtMatmulDesc_t, DescAttr>;
type Layout = Descriptor<cublasLtMatrixLayout_t, LayoutAttr>;
type Pref = Descriptor<cublasLtMatmulPreference_t, PrefAttr>;

impl<H: Copy, A> Drop for Descriptor<H, A> {
    fn drop(&mut self) {
        // SAFETY: created by the matching create call, destroyed once, here.
        let _ = unsafe { (self.destroy)(self.raw) };
    }
}

impl<H: Copy, A> Descriptor<H, A> {
    /// Sets one attribute from a plain value.
    ///
    /// SAFETY (for the callers): `T` must be the attribute's documented type.
    unsafe fn set<T>(&self, attr: A, value: &T) -> Result<()> {
        let size = std::mem::size_of::<T>();
        (self.set)(self.raw, attr, value as *const T as *const c_void, size)
            .map_err(lt_error("cublasLt attribute"))
    }
}

fn lt_error(op: &str) -> impl Fn(lt::CublasError) -> Error + '_ {
    move |e| cuda_error(op, e)
}

fn layout(
    data_type: cudaDataType,
    (rows, cols, ld, stride): (u64, u64, i64, i64),
    batch: usize,
) -> Result<Layout> {
    let l = Layout {
        raw: lt::create_matrix_layout(data_type, rows, cols, ld)
            .map_err(lt_error("cublasLtMatrixLayoutCreate"))?,
        set: lt::set_matrix_layout_attribute,
        destroy: lt::destroy_matrix_layout,
    };
    if batch > 1 {
        let count = i32::try_from(batch)
            .map_err(|_| Error::shape("cuda gemm", format!("batch {batch} exceeds i32")))?;
        // SAFETY: BATCH_COUNT is an int32_t, STRIDED_BATCH_OFFSET an int64_t.
        unsafe {
            l.set(LayoutAttr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count)?;
            l.set(
                LayoutAttr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride,
            )?;
        }
    }
    Ok(l)
}

impl CudaBackend {
    /// The GEMM counters since this backend was made (which path ran how often).
    pub fn gemm_stats(&self) -> GemmStats {
        self.lt.stats()
    }

    /// The library the GEMMs use from now on (tests compare both paths).
    pub fn set_gemm_path(&mut self, path: GemmPath) {
        self.lt.path = path;
    }

    /// Runs `problem` with `epilogue` on cuBLASLt, or says it cannot (path set to cuBLAS, no
    /// algorithm, or an epilogue vector too little aligned); nothing is queued then.
    pub(super) fn matmul_lt(
        &self,
        problem: &LtProblem,
        epilogue: &mut Epilogue<'_>,
    ) -> Result<LtOutcome> {
        if self.lt.path == GemmPath::Cublas {
            return Ok(LtOutcome::Unsupported);
        }
        let stream = self.stream.as_ref();
        let vector_ptr = match epilogue {
            Epilogue::None => None,
            Epilogue::AddColumnBias(bias) => Some(device_address(*bias, stream)),
            Epilogue::RowSumsOfA(sums) => Some(device_address(*sums, stream)),
        };
        if let Some(ptr) = vector_ptr {
            if alignment(ptr) < EPILOGUE_VECTOR_ALIGNMENT || problem.batch > 1 {
                return Ok(LtOutcome::Unsupported);
            }
        }
        // cuBLASLt works on the calling thread's current context (the cudarc calls around it
        // bind theirs themselves).
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        let kind = epilogue.kind();
        let [ptr_a, ptr_b, ptr_c] = problem.ptrs;
        let alignments = [
            alignment(ptr_a),
            alignment(ptr_b),
            alignment(ptr_c),
            vector_ptr.map_or(256, alignment),
        ];
        let key = (
            LtProblem {
                ptrs: [0; 3],
                ..*problem
            },
            kind,
            alignments,
        );
        let desc = self.describe_problem(problem, kind, vector_ptr)?;
        let a = layout(problem.data_type, problem.a, problem.batch)?;
        let b = layout(problem.data_type, problem.b, problem.batch)?;
        let c = layout(problem.c_type, problem.c, problem.batch)?;
        let choice = {
            let mut choices = self.lt.choices()?;
            match choices.get(&key) {
                Some(choice) => *choice,
                None => {
                    let choice = self.ask_heuristic(&desc, [&a, &b, &c], alignments)?;
                    choices.insert(key, choice);
                    choice
                }
            }
        };
        let Some((algo, workspace_size)) = choice else {
            return Ok(LtOutcome::Unsupported);
        };
        let (alpha, beta) = (1.0f32, problem.beta());
        let workspace = device_address(&self.lt.workspace, stream);
        // SAFETY: the descriptors describe the operands' checked lengths (the caller verified
        // them against the shape); C and D are the same buffer with the same layout, which
        // cuBLASLt allows in place; the workspace holds at least `workspace_size` bytes (the
        // heuristic was told the maximum); alpha/beta are f32 as the f32 scale type requires.
        let launched = unsafe {
            lt::matmul(
                self.lt.handle,
                desc.raw,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                ptr_a as *const c_void,
                a.raw,
                ptr_b as *const c_void,
                b.raw,
                ptr_c as *const c_void,
                c.raw,
                ptr_c as *mut c_void,
                c.raw,
                &algo,
                workspace as *mut c_void,
                workspace_size,
                stream.cu_stream() as _,
            )
        };
        if let Err(e) = launched {
            if !is_refusal(e.0) {
                return Err(cuda_error("cublasLtMatmul", e));
            }
            // A refusal launches nothing: remember it for this problem, say so once, and let
            // the caller take cuBLAS (counted there).
            self.lt.choices()?.insert(key, None);
            if self.lt.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!(
                    "cuBLASLt refused a {}x{}x{} GEMM ({kind:?} epilogue, batch {}): \
                     {e}; such problems run on cuBLAS (further refusals are only counted)",
                    problem.cols,
                    problem.depth,
                    problem.rows,
                    problem.batch
                );
            }
            return Ok(LtOutcome::Unsupported);
        }
        self.lt.cublaslt.fetch_add(1, Ordering::Relaxed);
        if kind != EpilogueKind::None {
            self.lt.fused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(LtOutcome::Done)
    }

    /// The matmul descriptor: f32 compute and scale, the operations, the epilogue.
    fn describe_problem(
        &self,
        problem: &LtProblem,
        kind: EpilogueKind,
        vector_ptr: Option<u64>,
    ) -> Result<Desc> {
        let desc = Desc {
            raw: lt::create_matmul_desc(
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cudaDataType::CUDA_R_32F,
            )
            .map_err(lt_error("cublasLtMatmulDescCreate"))?,
            set: lt::set_matmul_desc_attribute,
            destroy: lt::destroy_matmul_desc,
        };
        let epilogue = match kind {
            EpilogueKind::None => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            EpilogueKind::Bias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            EpilogueKind::RowSums => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
        };
        // SAFETY: TRANSA/TRANSB are cublasOperation_t, EPILOGUE a cublasLtEpilogue_t,
        // BIAS_POINTER a device pointer, BIAS_DATA_TYPE a cudaDataType (int32).
        unsafe {
            desc.set(DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &problem.op_a)?;
            desc.set(DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &problem.op_b)?;
            desc.set(DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
            if let Some(ptr) = vector_ptr {
                let ptr = ptr as *const c_void;
                desc.set(DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr)?;
                let f32_type = cudaDataType::CUDA_R_32F;
                desc.set(DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &f32_type)?;
            }
        }
        Ok(desc)
    }

    /// The heuristic's best algorithm under this problem's alignments and the workspace, or
    /// `None` when it has none.
    fn ask_heuristic(
        &self,
        desc: &Desc,
        [a, b, c]: [&Layout; 3],
        [align_a, align_b, align_c, _]: [u32; 4],
    ) -> Result<Choice> {
        let pref = Pref {
            raw: lt::create_matmul_pref().map_err(lt_error("cublasLtMatmulPreferenceCreate"))?,
            set: lt::set_matmul_pref_attribute,
            destroy: lt::destroy_matmul_pref,
        };
        let max_workspace = self.lt.workspace.len() as u64;
        // SAFETY: MAX_WORKSPACE_BYTES is a uint64_t, the MIN_ALIGNMENT_*_BYTES uint32_t.
        unsafe {
            pref.set(
                PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &max_workspace,
            )?;
            for (attr, align) in [
                (
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    align_a,
                ),
                (
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    align_b,
                ),
                (
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    align_c,
                ),
                (
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    align_c,
                ),
            ] {
                pref.set(attr, &align)?;
            }
        }
        // SAFETY: every descriptor is live for the call.
        let answer = unsafe {
            lt::get_matmul_algo_heuristic(
                self.lt.handle,
                desc.raw,
                a.raw,
                b.raw,
                c.raw,
                c.raw,
                pref.raw,
            )
        };
        Ok(match answer {
            Ok(result) if result.workspaceSize as u64 <= max_workspace => {
                Some((result.algo, result.workspaceSize))
            }
            // No algorithm (NOT_SUPPORTED) or one needing more workspace: take cuBLAS.
            _ => None,
        })
    }
}

/// Statuses with which `cublasLtMatmul` declines a problem before launching anything (the
/// heuristic's algorithm does not fit after all): the cuBLAS path can take it instead. Other
/// failures (execution, allocation, internal errors) are real errors.
fn is_refusal(status: cublasStatus_t) -> bool {
    matches!(
        status,
        cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE
            | cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED
            | cublasStatus_t::CUBLAS_STATUS_ARCH_MISMATCH
    )
}

/// The device address of a buffer (all work is on the backend's one stream).
fn device_address<T>(buf: &CudaSlice<T>, stream: &cudarc::driver::CudaStream) -> u64 {
    use cudarc::driver::DevicePtr;
    let (ptr, _sync) = buf.device_ptr(stream);
    ptr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1001), 1);
        assert_eq!(alignment(0x1180), 128);
    }

    #[test]
    fn only_refusals_fall_back_to_cublas() {
        assert!(is_refusal(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED));
        assert!(is_refusal(cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE));
        assert!(!is_refusal(cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED));
        assert!(!is_refusal(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED));
        assert!(!is_refusal(cublasStatus_t::CUBLAS_STATUS_INTERNAL_ERROR));
    }

    #[test]
    fn workspace_follows_the_architecture() {
        assert_eq!(workspace_bytes(9), 32 << 20);
        assert_eq!(workspace_bytes(10), 32 << 20);
        assert_eq!(workspace_bytes(8), 4 << 20);
    }
}
