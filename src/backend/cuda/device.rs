//! Resolving the user's `--device` into a concrete backend, once, at start-up.

use super::CudaBackend;
use crate::backend::Device;
use crate::error::Result;

/// The backend a run uses after resolution.
#[derive(Debug)]
pub enum ResolvedDevice {
    Cpu,
    Cuda(Box<CudaBackend>),
}

impl ResolvedDevice {
    /// A short name for logs (`cpu`, `cuda:0 (NVIDIA H100 ..., sm_90)`).
    pub fn describe(&self) -> String {
        match self {
            ResolvedDevice::Cpu => "cpu".to_string(),
            ResolvedDevice::Cuda(backend) => backend
                .describe()
                .map(|d| format!("cuda ({d})"))
                .unwrap_or_else(|_| "cuda".to_string()),
        }
    }
}

/// `Cpu` → CPU; `Cuda(i)` → device i or the typed error saying why not; `Auto` → CUDA device 0
/// when usable, else the CPU with one line on stderr saying why.
pub fn resolve_device(device: Device) -> Result<ResolvedDevice> {
    match device {
        Device::Cpu => Ok(ResolvedDevice::Cpu),
        Device::Cuda(ordinal) => Ok(ResolvedDevice::Cuda(Box::new(CudaBackend::new(ordinal)?))),
        Device::Auto => match CudaBackend::new(0) {
            Ok(backend) => Ok(ResolvedDevice::Cuda(Box::new(backend))),
            Err(e) => {
                eprintln!("device auto: using the CPU ({e})");
                Ok(ResolvedDevice::Cpu)
            }
        },
    }
}
