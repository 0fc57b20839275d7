//! # dinotrain
//!
//! Train DINOv2 vision foundation models on your own images, with every numeric piece checked
//! against the official implementation (golden fixtures in `tests/golden`).
//!
//! Layout: [`backend`] (CPU reference and CUDA), [`nn`] (layers with explicit forward and
//! backward), [`ssl`] (the method: losses, masking, one training step), [`optim`] (parameter
//! groups, AdamW, schedules), [`data`] (folders, decoding, multi-crop), [`train`] (the loop),
//! [`eval`] (k-NN), [`io`] (file formats), [`golden`] (the reference fixtures).

pub mod backend;
pub mod bench;
pub mod data;
pub mod error;
pub mod eval;
pub mod golden;
pub mod io;
pub mod nn;
pub mod optim;
pub mod rng;
pub mod ssl;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::Tensor;
