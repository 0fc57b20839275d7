//! Resolving the user's `--device` into a concrete backend, once, at start-up.

use super::CudaBackend;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Buffers, Device, Precision};
use crate::error::Result;

/// The backend a run uses after resolution.
#[derive(Debug)]
pub enum ResolvedDevice {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl ResolvedDevice {
    /// The CPU in f32.
    pub fn cpu() -> Self {
        ResolvedDevice::Cpu(CpuBackend::new(Precision::F32))
    }

    /// A short name for logs (`cpu (2 threads, f32)`, `cuda (NVIDIA H100 ..., sm_90)`).
    pub fn describe(&self) -> String {
        match self {
            ResolvedDevice::Cpu(cpu) => cpu.describe(),
            ResolvedDevice::Cuda(gpu) => Buffers::describe(&**gpu),
        }
    }
}

/// `Cpu` → the CPU (f32); `Cuda(i)` → device i or the typed error saying why not; `Auto` →
/// CUDA device 0 when usable, else the CPU with one log line saying why.
pub fn resolve_device(device: Device) -> Result<ResolvedDevice> {
    match device {
        Device::Cpu => Ok(ResolvedDevice::cpu()),
        Device::Cuda(ordinal) => Ok(ResolvedDevice::Cuda(Box::new(CudaBackend::new(ordinal)?))),
        Device::Auto => match CudaBackend::new(0) {
            Ok(backend) => Ok(ResolvedDevice::Cuda(Box::new(backend))),
            Err(e) => {
                log::info!("device auto: using the CPU ({e})");
                Ok(ResolvedDevice::cpu())
            }
        },
    }
}
