//! Compute backends.
//!
//! The CPU backend ([`cpu`]) is always available and is the reference implementation of every
//! kernel. The CUDA backend plugs in behind the same seam: a [`Device`] chosen by the user,
//! resolved once at start-up into a concrete backend.

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Where computation runs, as the user asked for it (`--device auto|cpu|cuda[:i]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA device 0 when a driver and device are present, else the CPU (with one line saying so).
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::Config(format!(
                    "unknown device '{s}' (expected auto, cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_device_spelling_and_rejects_junk() {
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
    }
}
