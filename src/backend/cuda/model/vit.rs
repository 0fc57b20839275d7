//! The DINOv2 backbone on the GPU (`nn::Vit` mirrored): training forward with a reusable
//! workspace per input size, backward into the flat gradient buffer, and inference forward.

use super::DeviceWeights;
use crate::backend::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::nn::{DropPath, Vit};
use cudarc::driver::CudaSlice;

/// The backbone's outputs after the final LayerNorm (f32), owned by the workspace of their size.
pub struct GpuVitOutput {
    pub cls: CudaSlice<f32>,           // [b, d]
    pub patch: CudaSlice<f32>,         // [b, n, d]
    pub reg: Option<CudaSlice<f32>>,   // [b, r, d] (None without registers)
    pub b: usize,
    pub n_patches: usize,
    pub n_registers: usize,
    pub dim: usize,
}

/// The backbone's GPU workspaces, one per input size (b, h, w), reused across steps.
pub struct GpuVit {}

impl GpuVit {
    pub fn new(_vit: &Vit) -> Self {
        GpuVit {}
    }

    /// Training forward; images are host `[b, 3, h, w]` f32 (normalised); masks `[b, n]`.
    /// The cache stays inside `self`, keyed by (b, h, w_px); the output is also reachable later
    /// through [`GpuVit::output`] (so two sizes' outputs can be read at once).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        _gpu: &mut CudaBackend,
        _vit: &Vit,
        _w: &DeviceWeights,
        _images: &[f32],
        _b: usize,
        _h: usize,
        _w_px: usize,
        _masks: Option<&[bool]>,
        _drop_path: Option<DropPath<'_>>,
    ) -> Result<&GpuVitOutput> {
        Err(Error::Unsupported("GpuVit::forward is not written yet".into()))
    }

    /// The output of the last training forward at this size.
    pub fn output(&self, _b: usize, _h: usize, _w_px: usize) -> Result<&GpuVitOutput> {
        Err(Error::Unsupported("GpuVit::output is not written yet".into()))
    }

    /// Backward of the last `forward` at this size; gradients ACCUMULATE into `grads [P]`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        _gpu: &mut CudaBackend,
        _vit: &Vit,
        _w: &DeviceWeights,
        _grads: &mut CudaSlice<f32>,
        _b: usize,
        _h: usize,
        _w_px: usize,
        _d_cls: &CudaSlice<f32>,
        _d_patch: &CudaSlice<f32>,
    ) -> Result<()> {
        Err(Error::Unsupported("GpuVit::backward is not written yet".into()))
    }

    /// Inference forward (teacher, embeddings): no backward cache kept.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_inference(
        &mut self,
        _gpu: &mut CudaBackend,
        _vit: &Vit,
        _w: &DeviceWeights,
        _images: &[f32],
        _b: usize,
        _h: usize,
        _w_px: usize,
    ) -> Result<&GpuVitOutput> {
        Err(Error::Unsupported("GpuVit::forward_inference is not written yet".into()))
    }

    /// The output of the last inference forward at this size.
    pub fn inference_output(&self, _b: usize, _h: usize, _w_px: usize) -> Result<&GpuVitOutput> {
        Err(Error::Unsupported("GpuVit::inference_output is not written yet".into()))
    }
}
