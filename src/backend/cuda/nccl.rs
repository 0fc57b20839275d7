//! [`Collective`] over NCCL: one process per GPU, the communicator set up from a unique id that
//! rank 0 makes and the launcher hands to every rank. libnccl is loaded at run time like the
//! rest of CUDA (`libnccl.so` on the library path: the system's, or the `nvidia-nccl` wheel's).
//!
//! The values are staged through device buffers of this communicator's own stream: the step
//! exchanges host vectors (teacher logits, gradients, loss terms), so each call uploads, runs
//! the collective and downloads. Keeping the gradients on the device (bucketed all-reduce
//! overlapping the backward pass) is the next step; the semantics stay those of this trait.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::dist::Collective;
use crate::error::{Error, Result};

/// The bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// One rank's NCCL communicator on its GPU.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator and its stream are used from one thread at a time (`&mut self`).
unsafe impl Send for NcclCollective {}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Whether libnccl can be loaded, as an error that says what to install.
pub fn check_nccl() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Cuda(
            "NCCL is missing: multi-GPU training needs libnccl.so on the library path \
             (the system's NCCL, or `pip install nvidia-nccl-cu13` and its lib folder on \
             LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

/// A new NCCL unique id (rank 0 makes it; every rank needs it to join).
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    check_nccl()?;
    let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
    Ok(id.internal().map(|c| c as u8))
}

impl NcclCollective {
    /// Joins the communicator of `id` as `rank` of `world`, on CUDA device `ordinal`. Blocks
    /// until every rank has joined.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: &[u8; NCCL_ID_BYTES],
    ) -> Result<Self> {
        check_nccl()?;
        if rank >= world {
            return Err(Error::Config(format!("rank {rank} of a world of {world}")));
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::Cuda("the CUDA driver is unusable (cudarc panicked)".into()))?
            .map_err(|e| nccl_error("cuCtxCreate", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| nccl_error("cuStreamCreate", e))?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| nccl_error(&format!("ncclCommInitRank (rank {rank} of {world})"), e))?;
        Ok(NcclCollective { comm, stream })
    }

    fn upload(&self, host: &[f32]) -> Result<cudarc::driver::CudaSlice<f32>> {
        // A zero-length buffer cannot be allocated: send one unused value.
        let padded;
        let host = if host.is_empty() {
            padded = [0f32];
            &padded[..]
        } else {
            host
        };
        self.stream
            .clone_htod(host)
            .map_err(|e| nccl_error("cuMemcpyHtoD", e))
    }

    fn download(&self, dev: &cudarc::driver::CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| nccl_error("cuMemcpyDtoH", e))
    }

    /// Every rank's length.
    fn lengths(&mut self, mine: usize) -> Result<Vec<usize>> {
        let world = self.world_size();
        let send = self
            .stream
            .clone_htod(&[mine as u64])
            .map_err(|e| nccl_error("cuMemcpyHtoD", e))?;
        let mut recv = self
            .stream
            .alloc_zeros::<u64>(world)
            .map_err(|e| nccl_error("cuMemAlloc", e))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| nccl_error("ncclAllGather", e))?;
        let host = self
            .stream
            .clone_dtoh(&recv)
            .map_err(|e| nccl_error("cuMemcpyDtoH", e))?;
        Ok(host.into_iter().map(|l| l as usize).collect())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_gather(&mut self, mine: &[f32]) -> Result<Vec<Vec<f32>>> {
        // NCCL gathers equal counts: pad every rank's values to the longest.
        let lens = self.lengths(mine.len())?;
        let longest = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = mine.to_vec();
        padded.resize(longest, 0.0);
        let send = self.upload(&padded)?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(longest * lens.len())
            .map_err(|e| nccl_error("cuMemAlloc", e))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| nccl_error("ncclAllGather", e))?;
        let all = self.download(&recv)?;
        Ok((lens.iter().enumerate())
            .map(|(r, &len)| all[r * longest..r * longest + len].to_vec())
            .collect())
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let lens = self.lengths(data.len())?;
        if let Some(r) = lens.iter().position(|&l| l != data.len()) {
            return Err(Error::shape(
                "all-reduce",
                format!(
                    "rank {r} gave {} values, rank {} {}",
                    lens[r],
                    self.rank(),
                    data.len()
                ),
            ));
        }
        if data.is_empty() {
            return Ok(());
        }
        let send = self.upload(data)?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(data.len())
            .map_err(|e| nccl_error("cuMemAlloc", e))?;
        self.comm
            .all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map_err(|e| nccl_error("ncclAllReduce", e))?;
        data.copy_from_slice(&self.download(&recv)?);
        Ok(())
    }

    fn broadcast(&mut self, data: &mut Vec<f32>, root: usize) -> Result<()> {
        let lens = self.lengths(data.len())?;
        let len = *lens.get(root).ok_or_else(|| {
            Error::Config(format!(
                "broadcast from rank {root} in a group of {}",
                lens.len()
            ))
        })?;
        data.resize(len, 0.0);
        if len == 0 {
            return Ok(());
        }
        let send = self.upload(data)?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(len)
            .map_err(|e| nccl_error("cuMemAlloc", e))?;
        self.comm
            .broadcast(Some(&send), &mut recv, root as i32)
            .map_err(|e| nccl_error("ncclBroadcast", e))?;
        *data = self.download(&recv)?;
        Ok(())
    }
}
