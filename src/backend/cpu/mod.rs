//! The CPU backend: f32 everywhere, rayon for parallel loops, the `gemm` crate for matrix
//! products. It runs everything everywhere and is the reference the CUDA kernels are checked
//! against.

pub mod gemm;
pub mod koleo;
pub mod loss;
pub mod optimizer;
pub mod sinkhorn;

pub use gemm::{matmul, Accumulate, Transpose};
