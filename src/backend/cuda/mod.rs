//! The CUDA backend: a cudarc context and stream, the hand-written kernels of `kernels/*.cu`
//! (fatbins embedded by `build.rs`, or NVRTC-compiled from the embedded sources), cuBLAS for
//! bf16 GEMMs with f32 accumulation (cuBLASLt with fused epilogues, cuBLAS where it has no
//! algorithm), and one launcher per kernel with shape checks.
//!
//! Everything here is compiled in every build (no `cfg`): the CUDA libraries are loaded at run
//! time, so a machine without them gets a typed [`Error::Cuda`] from [`CudaBackend::new`],
//! never a panic. [`resolve_device`] turns the user's `--device` into a backend.
//!
//! Conventions: bf16 buffers are `CudaSlice<bf16>`, everything else f32 unless named. Launchers
//! follow llm.c's argument order (outputs, saved statistics, inputs, weights, dimensions) and
//! check every buffer length against the dimensions before launching. All work is queued on
//! one stream; reductions are deterministic (no atomics), so results repeat bit for bit.

mod buffers;
mod device;
mod gemm;
mod gemm_lt;
mod kernels;
mod launch;
mod nccl;
mod view;

pub use buffers::CudaWeights;
pub use device::{resolve_device, ResolvedDevice};
pub use gemm::EpilogueRun;
pub use gemm_lt::{GemmPath, GemmStats, LtOutcome};
pub use half::bf16;
pub use kernels::{all_precompiled, compile_source_with_nvrtc, EmbeddedKernel, KernelFamily};
pub use launch::attention::{AttentionKernels, GENERAL_MAX_HEAD_DIM};
pub use launch::elementwise::ReduceOp;
pub use launch::koleo::{KoleoSaved, KOLEO_MAX_DIM};
pub use launch::loss::{CrossEntropyPairs, MAX_PAIRS};
pub use launch::optimizer::ParamSegments;
pub use nccl::{check_nccl, nccl_unique_id, NcclCollective, NCCL_ID_BYTES};
pub use view::{DevBuf, SubSlice, SubSliceMut};

use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::fmt;
use std::sync::Arc;

/// The CUDA libraries the backend loads at run time, checked before any CUDA call (cudarc
/// panics when a library is missing, so presence is tested first).
fn check_libraries(need_nvrtc: bool) -> Result<()> {
    // SAFETY: each check only tries to dlopen the library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "no CUDA driver found (libcuda.so); use --device cpu".into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "cuBLAS not found (libcublas.so.13): put the CUDA 13 library folder on \
             LD_LIBRARY_PATH, or use --device cpu"
                .into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "cuBLASLt not found (libcublasLt.so.13): put the CUDA 13 library folder on \
             LD_LIBRARY_PATH, or use --device cpu"
                .into(),
        ));
    }
    // SAFETY: as above.
    if need_nvrtc && !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "this build has no precompiled kernels (nvcc was missing at build time) and NVRTC \
             (libnvrtc.so.13) is not found: rebuild with nvcc, or put NVRTC on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// `1.23 GB` or `45.6 MB`, for messages.
fn byte_size(bytes: usize) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// Maps a cudarc error into [`Error::Cuda`], naming the operation.
pub(crate) fn cuda_error(op: &str, err: impl fmt::Display) -> Error {
    Error::Cuda(format!("{op}: {err}"))
}

/// A CUDA device with its stream, cuBLAS handle, kernels and a reusable scratch buffer.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    lt: gemm_lt::LtGemm,
    /// The bias-gradient vector cuBLASLt writes before it is accumulated (grows on demand).
    lt_sums: Option<CudaSlice<f32>>,
    kernels: kernels::Kernels,
    /// Reduction partials; grows on demand and is then reused (no steady-state allocation).
    scratch: CudaSlice<f32>,
    /// Kernels launched so far (the hand-written ones; GEMMs are counted in `lt`).
    launches: std::sync::atomic::AtomicU64,
    /// Work buffers of the seam's fallback passes (see `seam.rs`).
    work: buffers::Work,
    /// Buffers allocated through the seam (workspaces and work buffers).
    allocations: u64,
    /// The attention kernels chosen by [`Self::set_attention_kernels`] (`None`: by head dim).
    attention_kernels: Option<AttentionKernels>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ctx.ordinal())
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`. Fails with [`Error::Cuda`] (never panics) when the driver,
    /// cuBLAS, the device, or (without precompiled kernels) NVRTC is missing.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_libraries(!kernels::all_precompiled())?;
        let count = CudaContext::device_count().map_err(|e| {
            Error::Cuda(format!(
                "the CUDA driver found no usable device ({e}); use --device cpu"
            ))
        })?;
        if count <= 0 {
            return Err(Error::Cuda(
                "the CUDA driver reports no device; use --device cpu".into(),
            ));
        }
        if ordinal >= count as usize {
            return Err(Error::Cuda(format!(
                "no CUDA device {ordinal}: {count} device(s) present"
            )));
        }
        // cudarc panics on a few driver mismatches (a missing symbol); keep them typed.
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::Cuda("the CUDA driver is unusable (cudarc panicked)".into()))?
            .map_err(|e| cuda_error("cuCtxCreate", e))?;
        // One stream for all work: cudarc's per-buffer event tracking is not needed.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_error("cublasCreate", e))?;
        let (major, _) = ctx
            .compute_capability()
            .map_err(|e| cuda_error("cuDeviceGetAttribute", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(gemm_lt::workspace_bytes(major))
            .map_err(|e| cuda_error("cuMemAlloc (cuBLASLt workspace)", e))?;
        let lt = gemm_lt::LtGemm::new(workspace, gemm_lt::GemmPath::from_env()?)?;
        let kernels = kernels::Kernels::new(ctx.clone())?;
        let scratch = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| cuda_error("cuMemAlloc", e))?;
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            lt,
            lt_sums: None,
            kernels,
            scratch,
            launches: std::sync::atomic::AtomicU64::new(0),
            work: buffers::Work::default(),
            allocations: 0,
            attention_kernels: None,
        })
    }

    /// The device's name and compute capability, for logs.
    pub fn describe(&self) -> Result<String> {
        let name = self
            .ctx
            .name()
            .map_err(|e| cuda_error("cuDeviceGetName", e))?;
        let (major, minor) = self
            .ctx
            .compute_capability()
            .map_err(|e| cuda_error("cuDeviceGetAttribute", e))?;
        Ok(format!("{name} (sm_{major}{minor})"))
    }

    /// Hand-written kernels launched since this backend was made (with [`Self::gemm_stats`],
    /// the work a step queues: each launch costs a few microseconds of host time).
    pub fn kernel_launches(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The stream every launcher queues work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A timing event recorded now on the stream.
    pub fn record_event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_error("cuEventRecord", e))
    }

    /// A zero-filled device buffer.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len).map_err(|e| {
            if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                self.out_of_memory(len * std::mem::size_of::<T>())
            } else {
                cuda_error("cuMemAlloc", e)
            }
        })
    }

    /// The error for a failed allocation of `bytes`: what is in use and what to change.
    fn out_of_memory(&self, bytes: usize) -> Error {
        let in_use = match self.ctx.mem_get_info() {
            Ok((free, total)) => format!(
                "{} of {} in use",
                byte_size(total.saturating_sub(free)),
                byte_size(total)
            ),
            Err(_) => "device memory use unknown".to_string(),
        };
        Error::Cuda(format!(
            "out of device memory allocating {} ({in_use}): lower the batch size \
             (--batch-size) or the crop sizes, or use a device with more memory",
            byte_size(bytes)
        ))
    }

    /// Copies host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| cuda_error("cuMemcpyHtoD", e))
    }

    /// Copies a device buffer back to the host (waits for queued work).
    pub fn download<T: DeviceRepr + Clone + Default>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(|e| cuda_error("cuMemcpyDtoH", e))
    }

    /// A bf16 device buffer back to the host as f32.
    pub fn download_bf16(&self, buf: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        Ok(self.download(buf)?.into_iter().map(f32::from).collect())
    }

    /// Makes sure the scratch buffer holds at least `len` floats (allocates only when growing).
    fn reserve_scratch(&mut self, len: usize) -> Result<()> {
        if self.scratch.len() < len {
            self.scratch = self.alloc_zeros(len.next_power_of_two())?;
        }
        Ok(())
    }
}
