//! The CPU backend: rayon for parallel loops, the `gemm` crate for matrix products. It runs
//! everything everywhere and is the reference the CUDA kernels are checked against: one file per
//! kernel family (mirroring `kernels/*.cu`), and [`CpuBackend`], the [`crate::backend::Backend`]
//! seam over them.

pub mod alloc;
pub mod attention;
mod backend;
pub mod elementwise;
pub mod gemm;
pub mod head;
pub mod layernorm;
pub mod loss;
pub mod optimizer;
pub mod sinkhorn;
pub mod tokens;

pub use crate::backend::{Accumulate, Transpose};
pub use alloc::tune_allocator;
pub use backend::{round_bf16, CpuBackend, CpuPairs, CpuSegments, CpuWeights};
pub use gemm::matmul;
