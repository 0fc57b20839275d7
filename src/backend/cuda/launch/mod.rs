//! One launcher per kernel, grouped like `kernels/*.cu`. Each launcher checks every buffer's
//! length against the dimensions and returns [`Error::Shape`] before anything is queued.

pub mod attention;
pub mod elementwise;
pub mod koleo;
pub mod layernorm;
pub mod loss;
pub mod optimizer;
pub mod tokens;

use super::CudaBackend;
pub(super) use crate::backend::check_len;
use crate::backend::Accumulate;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

/// Threads per block of every 1-D launch.
pub(super) const BLOCK: u32 = 256;
/// Rows handled by one block in the one-warp-per-row kernels.
pub(super) const ROWS_PER_BLOCK: usize = (BLOCK / 32) as usize;
/// Grid-stride kernels never use more blocks than this.
const MAX_GRID: usize = 65_535;

/// The `GradWrite` enum value of the `.cu` files: parameter gradients and the residual stream
/// accumulate, other activation gradients overwrite (llm.c's contract).
pub(super) fn write_code(acc: Accumulate) -> i32 {
    match acc {
        Accumulate::Overwrite => 0,
        Accumulate::Add => 1,
    }
}

pub(super) fn config(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` elements.
pub(super) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID);
    config((blocks as u32, 1, 1), BLOCK)
}

/// One block per row, up to the grid's x limit.
pub(super) fn blocks(op: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n.max(1))
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| Error::shape(op, format!("{n} blocks exceed the grid limit")))
}

pub(super) fn dim(op: &'static str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, format!("{name} = {v} exceeds i32")))
}

/// One block of [`BLOCK`] threads per row.
pub(super) fn per_row(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    Ok(config((blocks(op, rows)?, 1, 1), BLOCK))
}

/// One warp per row, [`ROWS_PER_BLOCK`] rows per block.
pub(super) fn warp_per_row(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    per_row(op, rows.div_ceil(ROWS_PER_BLOCK))
}

/// The first stage of a deterministic column reduction over `rows` rows of `channels`: `groups`
/// row chunks of `per_chunk` rows (enough to fill the device), each summed in a fixed order into
/// one row of a `[groups, channels]` partials array, on `grid`.
pub(super) struct ColumnChunks {
    pub groups: usize,
    pub per_chunk: i32,
    pub grid: (u32, u32, u32),
}

pub(super) fn column_chunks(
    op: &'static str,
    rows: usize,
    channels: usize,
) -> Result<ColumnChunks> {
    let groups = rows.clamp(1, 128);
    let per_chunk = rows.div_ceil(groups).max(1);
    let groups = rows.div_ceil(per_chunk).max(1);
    Ok(ColumnChunks {
        groups,
        per_chunk: dim(op, "rows per chunk", per_chunk)?,
        grid: (
            blocks(op, channels.div_ceil(BLOCK as usize))?,
            groups as u32,
            1,
        ),
    })
}

impl CudaBackend {
    /// Device address of `self.scratch[offset..]` (scratch regions are carved by offset; all
    /// work is on one stream, so no per-region tracking is needed).
    pub(super) fn scratch_ptr(&self, offset: usize) -> u64 {
        let (ptr, _sync) = self.scratch.device_ptr(self.stream.as_ref());
        ptr + (offset * std::mem::size_of::<f32>()) as u64
    }

    /// The device address of an optional buffer, 0 (a null pointer) when absent.
    pub(super) fn optional_ptr(&self, buf: Option<&CudaSlice<f32>>) -> u64 {
        buf.map(|b| b.device_ptr(self.stream.as_ref()).0)
            .unwrap_or(0)
    }

    /// The device address of a buffer that a kernel reads and writes in place.
    pub(super) fn device_ptr_mut_raw<T>(&self, buf: &mut CudaSlice<T>) -> u64 {
        buf.device_ptr_mut(self.stream.as_ref()).0
    }
}

/// `launch!(self, family, "kernel", config, [args...])`: looks the kernel up and queues it.
macro_rules! launch {
    ($backend:expr, $family:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use cudarc::driver::PushKernelArg as _;
        let function = $backend.kernels.function($family, $name)?;
        let mut builder = $backend.stream.launch_builder(&function);
        $( builder.arg($arg); )*
        // SAFETY: the argument list follows the kernel's signature in kernels/*.cu (the launch
        // contract at the top of each file) and every buffer length was checked by the caller.
        unsafe { builder.launch($cfg) }.map_err(|e| $crate::backend::cuda::cuda_error($name, e))?;
        $backend.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }};
}
pub(super) use launch;
