//! The CPU backend: f32 everywhere, rayon for parallel loops, the `gemm` crate for matrix
//! products. It runs everything everywhere and is the reference the CUDA kernels are checked
//! against.

pub mod alloc;
pub mod attention;
pub mod elementwise;
pub mod gemm;
pub mod koleo;
pub mod layernorm;
pub mod loss;
pub mod optimizer;
pub mod sinkhorn;

pub use alloc::tune_allocator;
pub use attention::{attention_backward, attention_forward};
pub use gemm::{matmul, Accumulate, Transpose};
pub use layernorm::{layernorm_backward, layernorm_forward};
