//! Whole models on the GPU, mirroring `crate::nn`: the backbone ([`vit::GpuVit`]) and what the
//! training step builds on it.
//!
//! Parameters live in one flat f32 buffer per model with the CPU `ParamTable` layout, so the
//! `nn` structs' `ParamRef`s index it unchanged; the GEMMs read a bf16 copy refreshed once per
//! step ([`DeviceWeights::refresh_bf16`]). Gradients are one flat f32 buffer of the same layout.

pub mod block;
pub(crate) mod branch;
pub mod buffers;
mod embed;
pub mod head;
pub(crate) mod linear;
pub mod losses;
pub mod optim;
pub mod step;
pub mod targets;
pub mod vit;

pub use block::GpuBlock;
pub use embed::ImageGrad;
pub use vit::{GpuVit, GpuVitOutput};

use super::{bf16, CudaBackend};
use crate::error::Result;
use cudarc::driver::CudaSlice;

/// One model's parameters on the device: f32 master and the bf16 copy the GEMMs read.
pub struct DeviceWeights {
    pub f32: CudaSlice<f32>,
    pub bf16: CudaSlice<bf16>,
}

impl DeviceWeights {
    /// Uploads the flat parameter buffer and rounds its bf16 copy.
    pub fn upload(gpu: &CudaBackend, host: &[f32]) -> Result<Self> {
        let f32 = gpu.upload(host)?;
        let mut bf16 = gpu.alloc_zeros::<bf16>(host.len())?;
        gpu.cast_f32_to_bf16(&mut bf16, &f32)?;
        Ok(DeviceWeights { f32, bf16 })
    }

    /// Re-rounds `bf16` from `f32` (after each optimizer/EMA update).
    pub fn refresh_bf16(&mut self, gpu: &CudaBackend) -> Result<()> {
        gpu.cast_f32_to_bf16(&mut self.bf16, &self.f32)
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.f32.len()
    }

    pub fn is_empty(&self) -> bool {
        self.f32.len() == 0
    }
}
