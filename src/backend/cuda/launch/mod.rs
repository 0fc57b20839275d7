//! One launcher per kernel, grouped like `kernels/*.cu`. Each launcher checks every buffer's
//! length against the dimensions and returns [`Error::Shape`] before anything is queued.

pub mod attention;
pub mod elementwise;
pub mod koleo;
pub mod layernorm;
pub mod loss;
pub mod optimizer;
pub mod sinkhorn;
pub mod tokens;

use super::CudaBackend;
use crate::error::{Error, Result};
use cudarc::driver::{DevicePtr, LaunchConfig};

/// Threads per block of every 1-D launch.
pub(super) const BLOCK: u32 = 256;
/// Rows handled by one block in the one-warp-per-row kernels.
pub(super) const ROWS_PER_BLOCK: usize = (BLOCK / 32) as usize;
/// Grid-stride kernels never use more blocks than this.
const MAX_GRID: usize = 65_535;

/// How a kernel writes a gradient: parameter gradients and the residual stream accumulate,
/// other activation gradients overwrite (llm.c's contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    Overwrite,
    Accumulate,
}

impl GradWrite {
    /// The `GradWrite` enum value of the `.cu` files.
    pub(super) fn code(self) -> i32 {
        match self {
            GradWrite::Overwrite => 0,
            GradWrite::Accumulate => 1,
        }
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

pub(super) fn check_len(op: &'static str, name: &str, len: usize, need: usize) -> Result<()> {
    if len != need {
        return Err(Error::shape(
            op,
            format!("{name} holds {len} elements, expected {need}"),
        ));
    }
    Ok(())
}

pub(super) fn dim(op: &'static str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, format!("{name} = {v} exceeds i32")))
}

/// Row chunking of the deterministic column reductions: `(groups, rows_per_chunk)`, enough
/// groups to fill the device, each chunk summed in a fixed order.
pub(super) fn row_chunks(rows: usize) -> (usize, usize) {
    let groups = rows.clamp(1, 128);
    let per_chunk = rows.div_ceil(groups).max(1);
    (rows.div_ceil(per_chunk).max(1), per_chunk)
}

impl CudaBackend {
    /// Device address of `self.scratch[offset..]` (scratch regions are carved by offset; all
    /// work is on one stream, so no per-region tracking is needed).
    pub(super) fn scratch_ptr(&self, offset: usize) -> u64 {
        let (ptr, _sync) = self.scratch.device_ptr(self.stream.as_ref());
        ptr + (offset * std::mem::size_of::<f32>()) as u64
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
