//! File formats: safetensors (fixtures, exports, checkpoints), PyTorch `.pth` reading, and
//! parameter key names (official layouts and Hugging Face).

pub mod keys;
pub mod pth;
pub mod safetensors;

pub use self::safetensors::{write_atomic, TensorFile, Value};
