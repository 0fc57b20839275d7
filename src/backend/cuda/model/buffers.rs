//! Workspace buffers of the GPU step: device buffers that grow to the largest size a step asks
//! for and are reused afterwards (the number of masked patches changes every step, so buffers
//! sized by it keep a capacity and expose only their current length), host-to-device copies
//! into existing buffers, and a counter of the allocations made, so a test can check that the
//! steady-state step allocates nothing.

use crate::backend::cuda::{cuda_error, CudaBackend, SubSlice, SubSliceMut};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use std::cell::Cell;

thread_local! {
    /// Per thread: the GPU work of one trainer runs on the thread that owns it, so parallel
    /// tests do not see each other's allocations.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Device allocations made on this thread by the step's workspaces (heads, losses, targets,
/// optimizer; the backbone counts its own, [`super::vit::GpuVit::allocations`]).
pub fn allocation_count() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// A zero-filled device buffer, counted.
pub fn alloc_counted<T: DeviceRepr + ValidAsZeroBits>(
    gpu: &CudaBackend,
    len: usize,
) -> Result<CudaSlice<T>> {
    count_allocations(1);
    gpu.alloc_zeros(len)
}

/// Copies `src` into the first `src.len()` elements of the existing buffer `dst`.
pub fn upload_into<T: DeviceRepr>(
    gpu: &CudaBackend,
    dst: &mut CudaSlice<T>,
    src: &[T],
) -> Result<()> {
    if src.len() > dst.len() {
        return Err(Error::shape(
            "cuda upload_into",
            format!("{} values into a buffer of {}", src.len(), dst.len()),
        ));
    }
    if src.is_empty() {
        return Ok(());
    }
    gpu.stream()
        .memcpy_htod(src, dst)
        .map_err(|e| cuda_error("cuMemcpyHtoD", e))
}

/// A device buffer with a capacity and a current length (the first `len` elements).
#[derive(Debug)]
pub struct Grow<T> {
    buf: Option<CudaSlice<T>>,
    len: usize,
}

impl<T> Default for Grow<T> {
    fn default() -> Self {
        Grow { buf: None, len: 0 }
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> Grow<T> {
    /// Sets the current length, allocating (zeroed) only when it exceeds the capacity.
    pub fn resize(&mut self, gpu: &CudaBackend, len: usize) -> Result<()> {
        let capacity = self.buf.as_ref().map_or(0, |b| b.len());
        if self.buf.is_none() || capacity < len {
            self.buf = Some(alloc_counted(gpu, len.max(1))?);
        }
        self.len = len;
        Ok(())
    }

    /// Makes the capacity at least `capacity` (the contents are not kept when it grows), so
    /// later [`resize`](Self::resize) calls up to it allocate nothing.
    pub fn reserve(&mut self, gpu: &CudaBackend, capacity: usize) -> Result<()> {
        let current = self.buf.as_ref().map_or(0, |b| b.len());
        if self.buf.is_none() || current < capacity {
            self.buf = Some(alloc_counted(gpu, capacity.max(1))?);
            self.len = self.len.min(capacity);
        }
        Ok(())
    }

    /// The current length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the current length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn buffer(&self) -> Result<&CudaSlice<T>> {
        self.buf
            .as_ref()
            .ok_or_else(|| Error::Cuda("a workspace buffer was used before it was sized".into()))
    }

    /// The first `len` elements, read-only.
    pub fn get<'a>(&'a self, gpu: &CudaBackend) -> Result<SubSlice<'a, T>> {
        gpu.sub(self.buffer()?, 0..self.len)
    }

    /// The first `len` elements, writable.
    pub fn get_mut<'a>(&'a mut self, gpu: &CudaBackend) -> Result<SubSliceMut<'a, T>> {
        let len = self.len;
        let buf = self
            .buf
            .as_mut()
            .ok_or_else(|| Error::Cuda("a workspace buffer was used before it was sized".into()))?;
        gpu.sub_mut(buf, 0..len)
    }

    /// Elements `range` of the current length, read-only.
    pub fn rows<'a>(
        &'a self,
        gpu: &CudaBackend,
        range: std::ops::Range<usize>,
    ) -> Result<SubSlice<'a, T>> {
        if range.end > self.len {
            return Err(Error::shape(
                "workspace window",
                format!("{range:?} beyond the current length {}", self.len),
            ));
        }
        gpu.sub(self.buffer()?, range)
    }

    /// Elements `range` of the current length, writable.
    pub fn rows_mut<'a>(
        &'a mut self,
        gpu: &CudaBackend,
        range: std::ops::Range<usize>,
    ) -> Result<SubSliceMut<'a, T>> {
        if range.end > self.len {
            return Err(Error::shape(
                "workspace window",
                format!("{range:?} beyond the current length {}", self.len),
            ));
        }
        let buf = self
            .buf
            .as_mut()
            .ok_or_else(|| Error::Cuda("a workspace buffer was used before it was sized".into()))?;
        gpu.sub_mut(buf, range)
    }
}

/// Counts allocations made through other constructors (launcher-owned tables and buffers).
pub fn count_allocations(n: u64) {
    ALLOCATIONS.with(|c| c.set(c.get() + n));
}

/// Copies `src` over the whole of `dst` (same length).
pub fn upload_exact<T: DeviceRepr>(
    gpu: &CudaBackend,
    dst: &mut CudaSlice<T>,
    src: &[T],
) -> Result<()> {
    if src.len() != dst.len() {
        return Err(Error::shape(
            "cuda upload",
            format!("{} values for a buffer of {}", src.len(), dst.len()),
        ));
    }
    upload_into(gpu, dst, src)
}
