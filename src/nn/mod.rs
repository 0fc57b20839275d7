//! The model, written once over the backend seam ([`crate::backend::Backend`]): layers with
//! explicit forward and backward (linear, LayerNorm, attention, MLP / SwiGLU, the residual
//! branch and the block), the ViT backbone and its workspaces, the DINO head, presets, and the
//! flat parameter table.
//!
//! A layer struct holds only parameter views ([`params::ParamRef`]s into the flat buffer) and
//! sizes; the activations it saves for backward live in workspaces sized once per input shape
//! and owned by the caller. Gradient contract (llm.c's): parameter gradients accumulate (`+=`);
//! activation gradients are written (`=`), except the residual stream, which adds.

pub mod attention;
pub mod backbone;
pub mod block;
pub mod branch;
pub mod dino_head;
pub mod drop_path;
pub mod embed;
pub mod ffn;
pub mod layernorm;
pub mod linear;
pub mod params;
pub mod patch_embed;
pub mod pos_embed;
pub mod presets;
pub mod vit;

pub use backbone::{OutputGrads, VitOutputBufs, VitWorkspaces};
pub use dino_head::{DinoHead, HeadCache, HeadScratch, Prototypes};
pub use drop_path::{DropPath, GivenSubsets};
pub use embed::ImageGrad;
pub use ffn::Ffn;
pub use presets::Preset;
pub use vit::{Vit, VitConfig, VitOutput};
