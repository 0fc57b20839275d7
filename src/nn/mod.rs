//! Layers with explicit forward and backward (CPU, f32).
//!
//! Gradient contract (llm.c's): parameter gradients accumulate (`+=`); activation gradients are
//! written (`=`), except the residual stream, which adds.

pub mod params;
