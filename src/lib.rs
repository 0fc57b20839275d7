//! # dinotrain
//!
//! Train DINOv2 vision foundation models on your own images, with every numeric piece checked
//! against the official implementation (golden fixtures in `tests/golden`).
//!
//! Layers, lowest first (each imports only those before it): [`backend`] (the seam: the
//! `Backend` trait, the CPU reference and CUDA), [`dist`] (the collectives of data-parallel
//! ranks), [`nn`] (the model, written once over the seam),
//! [`ssl`] (the method: losses, masking, one training step), [`optim`] (parameter groups, AdamW,
//! schedules), [`data`] (folders, decoding, multi-crop), [`io`] (file formats, released weights,
//! export), [`eval`] (features and k-NN), [`train`] (configuration, trainer, the loop),
//! [`mod@bench`] (throughput) and [`golden`] (the reference fixtures, per device).

pub mod backend;
pub mod bench;
pub mod data;
pub mod dist;
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
