//! [`CudaBackend`] behind the [`Backend`] seam: each operation maps onto its launcher(s).
//!
//! GEMM operands are bf16 ([`Precision::Bf16`] is the only precision this backend runs). Where
//! cuBLASLt cannot fuse an epilogue (or write bf16 directly) the fallback pass runs here, on
//! work buffers the backend owns and reuses ([`Work`]), so the model never sees it.

use super::{bf16, CudaBackend, DevBuf};
use crate::backend::{Buffers, Counters, Precision, Storage, WeightStore};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// One model's parameters on the device: f32 master and the bf16 copy the GEMMs read.
#[derive(Debug)]
pub struct CudaWeights {
    pub master: CudaSlice<f32>,
    pub bf16: CudaSlice<bf16>,
}

impl WeightStore<CudaBackend> for CudaWeights {
    fn f32(&self) -> &CudaSlice<f32> {
        &self.master
    }
    fn f32_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.master
    }
    fn half(&self) -> &CudaSlice<bf16> {
        &self.bf16
    }
}

/// The backend's own f32 work buffers (fallback passes, per-row losses, Sinkhorn's scaling
/// vectors, the attention backward's row sums): grown on demand, counted, then reused.
#[derive(Debug, Default)]
pub(super) struct Work {
    slots: [Option<CudaSlice<f32>>; 2],
}

/// Which work buffer an operation takes.
#[derive(Clone, Copy)]
pub(super) enum Slot {
    A = 0,
    B = 1,
}

impl CudaBackend {
    /// Takes work buffer `slot` with at least `len` values (put it back with [`Self::put_work`]).
    pub(super) fn take_work(&mut self, slot: Slot, len: usize) -> Result<CudaSlice<f32>> {
        match self.work.slots[slot as usize].take() {
            Some(buf) if buf.len() >= len.max(1) => Ok(buf),
            _ => {
                self.allocations += 1;
                self.alloc_zeros(len.max(1).next_power_of_two())
            }
        }
    }

    pub(super) fn put_work(&mut self, slot: Slot, buf: CudaSlice<f32>) {
        self.work.slots[slot as usize] = Some(buf);
    }

    /// Runs `f` with the first `len` values of work buffer `slot`.
    pub(super) fn with_work<R>(
        &mut self,
        slot: Slot,
        len: usize,
        f: impl FnOnce(&mut Self, &mut CudaSlice<f32>) -> Result<R>,
    ) -> Result<R> {
        let mut buf = self.take_work(slot, len)?;
        let result = match buf.window_mut(0..len) {
            Ok(mut w) => f(self, &mut w),
            Err(e) => Err(e),
        };
        self.put_work(slot, buf);
        result
    }

    fn counted<T: DeviceRepr + ValidAsZeroBits>(&mut self, len: usize) -> Result<DevBuf<T>> {
        self.allocations += 1;
        // CUDA refuses empty allocations: one element, of which callers see an empty window.
        let buf = self.alloc_zeros::<T>(len.max(1))?;
        Ok(DevBuf(buf))
    }

    pub(super) fn upload_prefix<T: DeviceRepr>(
        &self,
        dst: &mut CudaSlice<T>,
        src: &[T],
    ) -> Result<()> {
        if src.len() > dst.len() {
            return Err(Error::shape(
                "cuda upload",
                format!("{} values into a buffer of {}", src.len(), dst.len()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.stream()
            .memcpy_htod(src, dst)
            .map_err(|e| super::cuda_error("cuMemcpyHtoD", e))
    }
}

pub(super) fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || len % c != 0 {
        return Err(Error::shape(
            op,
            format!("{what} holds {len} values, not a whole number of rows of {c}"),
        ));
    }
    Ok(len / c)
}

impl Buffers for CudaBackend {
    type F32 = CudaSlice<f32>;

    type Half = CudaSlice<bf16>;

    type I64 = CudaSlice<i64>;

    type U8 = CudaSlice<u8>;

    type BufF32 = DevBuf<f32>;

    type BufHalf = DevBuf<bf16>;

    type BufI64 = DevBuf<i64>;

    type BufU8 = DevBuf<u8>;

    type Weights = CudaWeights;

    fn describe(&self) -> String {
        CudaBackend::describe(self)
            .map(|d| format!("cuda ({d})"))
            .unwrap_or_else(|_| "cuda".to_string())
    }

    fn precision(&self) -> Precision {
        Precision::Bf16
    }

    fn counters(&self) -> Counters {
        Counters {
            allocations: self.allocations,
            kernel_launches: Some(self.kernel_launches()),
            gemms: Some(self.gemm_stats()),
        }
    }

    /// Blocks until all queued work is done.
    fn synchronize(&mut self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| super::cuda_error("cuStreamSynchronize", e))
    }

    fn memory_in_use(&self) -> Option<u64> {
        self.stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| total.saturating_sub(free) as u64)
    }

    fn alloc_f32(&mut self, len: usize) -> Result<DevBuf<f32>> {
        self.counted(len)
    }

    fn alloc_half(&mut self, len: usize) -> Result<DevBuf<bf16>> {
        self.counted(len)
    }

    fn alloc_i64(&mut self, len: usize) -> Result<DevBuf<i64>> {
        self.counted(len)
    }

    fn alloc_u8(&mut self, len: usize) -> Result<DevBuf<u8>> {
        self.counted(len)
    }

    fn upload_f32(&mut self, dst: &mut CudaSlice<f32>, src: &[f32]) -> Result<()> {
        self.upload_prefix(dst, src)
    }

    fn upload_half(&mut self, dst: &mut CudaSlice<bf16>, src: &[f32]) -> Result<()> {
        let rounded: Vec<bf16> = src.iter().map(|&v| bf16::from_f32(v)).collect();
        self.upload_prefix(dst, &rounded)
    }

    fn upload_i64(&mut self, dst: &mut CudaSlice<i64>, src: &[i64]) -> Result<()> {
        self.upload_prefix(dst, src)
    }

    fn upload_u8(&mut self, dst: &mut CudaSlice<u8>, src: &[u8]) -> Result<()> {
        self.upload_prefix(dst, src)
    }

    fn download_f32(&mut self, src: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.download(src)
    }

    fn download_half(&mut self, src: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        self.download_bf16(src)
    }

    fn copy_f32(&mut self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::shape(
                "cuda copy",
                format!("{} values into {}", src.len(), dst.len()),
            ));
        }
        self.stream()
            .memcpy_dtod(src, dst)
            .map_err(|e| super::cuda_error("cuMemcpyDtoD", e))
    }

    fn zero_f32(&mut self, dst: &mut CudaSlice<f32>) -> Result<()> {
        self.stream()
            .memset_zeros(dst)
            .map_err(|e| super::cuda_error("cuMemsetD8", e))
    }

    fn weights(&mut self, host: &[f32]) -> Result<CudaWeights> {
        self.allocations += 2;
        let master = self.upload(host)?;
        let mut w = CudaWeights {
            master,
            bf16: self.alloc_zeros::<bf16>(host.len().max(1))?,
        };
        if host.is_empty() {
            return Ok(w);
        }
        self.refresh_weights(&mut w)?;
        Ok(w)
    }

    fn refresh_weights(&mut self, w: &mut CudaWeights) -> Result<()> {
        if w.master.is_empty() {
            return Ok(());
        }
        let n = w.master.len();
        let mut half = w.bf16.window_mut(0..n)?;
        self.cast_to_half(&mut half, &w.master)
    }

    /// `out = bf16(inp)`, round to nearest even.
    fn cast_to_half(&mut self, out: &mut CudaSlice<bf16>, inp: &CudaSlice<f32>) -> Result<()> {
        let names = ("cuda cast_f32_to_bf16", "cast_f32_to_bf16");
        self.map_elements(names, out, inp)
    }

    fn cast_to_f32(&mut self, out: &mut CudaSlice<f32>, inp: &CudaSlice<bf16>) -> Result<()> {
        let names = ("cuda cast_bf16_to_f32", "cast_bf16_to_f32");
        self.map_elements(names, out, inp)
    }
}
