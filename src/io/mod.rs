//! File formats: safetensors (fixtures, exports, checkpoints).

pub mod safetensors;

pub use self::safetensors::{write_atomic, TensorFile, Value};
