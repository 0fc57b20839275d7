//! File formats: safetensors (fixtures, exports, checkpoints), PyTorch `.pth` reading, and
//! parameter key names (official layouts and Hugging Face).

pub mod export;
pub mod keys;
pub mod pretrained;
pub mod pth;
pub mod safetensors;

pub use self::safetensors::{write_atomic, TensorFile, Value};
