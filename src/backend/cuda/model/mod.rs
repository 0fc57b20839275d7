//! The model on the GPU: backbone, heads, the whole training step and its optimizer passes.

pub mod buffers;
pub mod head;
pub mod optim;
