//! Layers with explicit forward and backward (CPU, f32).
//!
//! Gradient contract (llm.c's): parameter gradients accumulate (`+=`); activation gradients are
//! written (`=`), except the residual stream, which adds.

pub mod attention;
pub mod block;
pub mod dino_head;
pub mod drop_path;
pub mod ffn;
pub mod layernorm;
pub mod linear;
pub mod mlp;
pub mod params;
pub mod patch_embed;
pub mod pos_embed;
pub mod presets;
pub mod swiglu;
pub mod vit;

pub use dino_head::{DinoHead, HeadCache};
pub use drop_path::DropPath;
pub use ffn::Ffn;
pub use presets::Preset;
pub use vit::{Vit, VitCache, VitConfig, VitOutput};
