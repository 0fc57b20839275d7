//! File formats: safetensors (fixtures, exports, checkpoints), PyTorch `.pth` reading,
//! parameter key names (official layouts and Hugging Face), the released backbones
//! ([`pretrained`], downloaded by [`download`]) and backbone export / import ([`export`]).

pub mod download;
pub mod export;
pub mod keys;
pub mod pretrained;
pub mod pth;
pub mod safetensors;

pub use self::safetensors::{write_atomic, TensorFile, Value};
