//! Evaluation features on either device: the backbone's final-norm CLS token (what the official
//! k-NN uses) and, when asked, the mean of its final-norm patch tokens, for a batch of images
//! already eval-transformed on the host.
//!
//! One [`FeatureExtractor`] serves the k-NN during training (`train::run`), `dinotrain embed`
//! and `dinotrain knn`. On the CPU it runs `nn::Vit::forward_inference`; on a CUDA device it
//! runs a [`GpuVit`] made for this extractor (dropped with it, so its workspace does not stay
//! resident beside a training run) in chunks of at most [`DEVICE_CHUNK`] images, and downloads
//! the CLS rows (and, for the patch mean, the patch tokens, averaged on the host in f64 exactly
//! as on the CPU path: the mean is only asked for by `embed --patch-mean`).

use crate::backend::cuda::model::{DeviceWeights, GpuVit};
use crate::backend::cuda::{CudaBackend, ResolvedDevice};
use crate::error::{Error, Result};
use crate::nn::Vit;

/// Images per forward on a CUDA device. An inference workspace holds about 30 f32 per token
/// and channel (stream, attention and MLP buffers, bf16 copies, the final norm): for ViT-L/14 at
/// 224 px (257 tokens, D 1024) 128 images take about 4 GB, ViT-S/14 about 1.5 GB, next to a
/// training run's own workspaces. Larger chunks gain little: 128 images already fill the GEMMs.
pub const DEVICE_CHUNK: usize = 128;

/// Whether the mean of the final-norm patch tokens is computed beside the CLS token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchMean {
    Skip,
    Compute,
}

/// The features of one batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Features {
    /// `[m, D]` final-norm CLS tokens (`x_norm_clstoken`).
    pub cls: Vec<f32>,
    /// `[m, D]` mean of the final-norm patch tokens, when asked for.
    pub patch_mean: Option<Vec<f32>>,
}

/// The backbone weights a CUDA extractor reads: a model already on the device (the training
/// teacher) or a copy uploaded for this extractor.
enum DeviceParams<'a> {
    Borrowed(&'a DeviceWeights),
    Uploaded(DeviceWeights),
}

impl DeviceParams<'_> {
    fn get(&self) -> &DeviceWeights {
        match self {
            DeviceParams::Borrowed(w) => w,
            DeviceParams::Uploaded(w) => w,
        }
    }
}

/// A backbone on a CUDA device with the one inference workspace in use.
pub struct CudaFeatures<'a> {
    gpu: &'a mut CudaBackend,
    vit: &'a Vit,
    weights: DeviceParams<'a>,
    /// Made for this extractor; replaced (dropping the old workspace) when the chunk shape
    /// changes, so at most one workspace is resident.
    runner: GpuVit,
    /// `(images, size)` of the workspace `runner` holds.
    shape: Option<(usize, usize)>,
    /// Most images per forward ([`DEVICE_CHUNK`] unless set).
    chunk: usize,
}

/// Where evaluation features are computed, with the backbone and its weights.
pub enum FeatureExtractor<'a> {
    /// `params` is a flat parameter buffer the `vit` views index (the backbone alone or the
    /// whole SSL model).
    Cpu { vit: &'a Vit, params: &'a [f32] },
    /// Boxed: the GPU backbone's state is large next to two references.
    Cuda(Box<CudaFeatures<'a>>),
}

impl<'a> FeatureExtractor<'a> {
    /// The CPU backbone on host parameters.
    pub fn cpu(vit: &'a Vit, params: &'a [f32]) -> Self {
        FeatureExtractor::Cpu { vit, params }
    }

    /// A backbone whose weights are already on the device (they are read, not copied).
    pub fn cuda(gpu: &'a mut CudaBackend, vit: &'a Vit, weights: &'a DeviceWeights) -> Self {
        Self::cuda_with(gpu, vit, DeviceParams::Borrowed(weights))
    }

    /// A backbone on the device from host parameters, uploaded for this extractor.
    pub fn cuda_uploading(gpu: &'a mut CudaBackend, vit: &'a Vit, params: &[f32]) -> Result<Self> {
        let weights = DeviceWeights::upload(gpu, params)?;
        Ok(Self::cuda_with(gpu, vit, DeviceParams::Uploaded(weights)))
    }

    fn cuda_with(gpu: &'a mut CudaBackend, vit: &'a Vit, weights: DeviceParams<'a>) -> Self {
        FeatureExtractor::Cuda(Box::new(CudaFeatures {
            gpu,
            vit,
            weights,
            runner: GpuVit::new(vit),
            shape: None,
            chunk: DEVICE_CHUNK,
        }))
    }

    /// At most `chunk` images per device forward (at least 1); the CPU runs a batch whole.
    pub fn with_device_chunk(mut self, chunk: usize) -> Self {
        if let FeatureExtractor::Cuda(c) = &mut self {
            c.chunk = chunk.max(1);
        }
        self
    }

    /// On a resolved device: the CPU, or the CUDA device with `params` uploaded.
    pub fn on(device: &'a mut ResolvedDevice, vit: &'a Vit, params: &'a [f32]) -> Result<Self> {
        match device {
            ResolvedDevice::Cpu => Ok(Self::cpu(vit, params)),
            ResolvedDevice::Cuda(gpu) => Self::cuda_uploading(gpu, vit, params),
        }
    }

    /// The backbone.
    pub fn vit(&self) -> &Vit {
        match self {
            FeatureExtractor::Cpu { vit, .. } => vit,
            FeatureExtractor::Cuda(c) => c.vit,
        }
    }

    /// Where the features are computed, for logs (`cpu`, `cuda (NAME (sm_XY))`).
    pub fn device_name(&self) -> String {
        match self {
            FeatureExtractor::Cpu { .. } => "cpu".to_string(),
            FeatureExtractor::Cuda(c) => c
                .gpu
                .describe()
                .map(|d| format!("cuda ({d})"))
                .unwrap_or_else(|_| "cuda".to_string()),
        }
    }

    /// Features of `m` images `[m, C, size, size]` (normalised, eval-transformed).
    pub fn features(
        &mut self,
        images: &[f32],
        m: usize,
        size: usize,
        patch_mean: PatchMean,
    ) -> Result<Features> {
        let vit = self.vit();
        let (c, d) = (vit.cfg.in_chans, vit.cfg.embed_dim);
        let per = c * size * size;
        if m == 0 || images.len() != m * per {
            return Err(Error::shape(
                "eval features",
                format!(
                    "images hold {} values, expected [{m}, {c}, {size}, {size}] with m > 0",
                    images.len()
                ),
            ));
        }
        let mut out = Features {
            cls: Vec::with_capacity(m * d),
            patch_mean: (patch_mean == PatchMean::Compute).then(|| Vec::with_capacity(m * d)),
        };
        match self {
            FeatureExtractor::Cpu { vit, params } => {
                let o = vit.forward_inference(params, images, m, size, size, None)?;
                out.cls = o.cls;
                if let Some(pm) = out.patch_mean.as_mut() {
                    *pm = mean_rows(&o.patch, m, o.n_patches, d);
                }
            }
            FeatureExtractor::Cuda(cuda) => {
                for chunk in images.chunks(cuda.chunk * per) {
                    let b = chunk.len() / per;
                    let (cls, patch) = cuda.forward(chunk, b, size, patch_mean)?;
                    out.cls.extend_from_slice(&cls);
                    if let (Some(pm), Some(patch)) = (out.patch_mean.as_mut(), patch) {
                        pm.extend(mean_rows(&patch, b, patch.len() / (b * d).max(1), d));
                    }
                }
            }
        }
        Ok(out)
    }
}

impl CudaFeatures<'_> {
    /// One chunk of `b` images: the CLS rows `[b, D]` and, when asked, the patch tokens
    /// `[b, n, D]`, downloaded.
    fn forward(
        &mut self,
        images: &[f32],
        b: usize,
        size: usize,
        patch_mean: PatchMean,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        if self.shape != Some((b, size)) {
            // Drop the old workspace before the new one is allocated.
            self.runner = GpuVit::new(self.vit);
            self.shape = Some((b, size));
        }
        let out = self.runner.forward_inference(
            self.gpu,
            self.vit,
            self.weights.get(),
            images,
            b,
            size,
            size,
        )?;
        let cls = self.gpu.download(&out.cls)?;
        let patch = match patch_mean {
            PatchMean::Compute => Some(self.gpu.download(&out.patch)?),
            PatchMean::Skip => None,
        };
        Ok((cls, patch))
    }
}

/// `x [b, n, d]` → `[b, d]`, the mean over `n` (accumulated in f64).
pub fn mean_rows(x: &[f32], b: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(b * d);
    for img in x.chunks((n * d).max(1)).take(b) {
        let mut acc = vec![0f64; d];
        for row in img.chunks(d.max(1)) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        out.extend(acc.iter().map(|&a| (a / n.max(1) as f64) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::params::ParamTable;
    use crate::nn::Preset;
    use crate::rng::{keyed, stream, uniform_vec};

    #[test]
    fn patch_mean_averages_each_image() {
        let x = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]; // [2, 2, 2]
        assert_eq!(mean_rows(&x, 2, 2, 2), vec![2.0, 3.0, 20.0, 30.0]);
    }

    #[test]
    fn cpu_features_are_the_backbone_outputs_and_refuse_a_wrong_batch() {
        let cfg = Preset::Micro.config(16, 4, 1);
        let mut table = ParamTable::new();
        let vit = Vit::new(&cfg, &mut table, "backbone.");
        let params = table.init(&mut keyed(3, &[stream::INIT]));
        let (m, size) = (3, 16);
        let images = uniform_vec(4, m * 3 * size * size, 1.0);
        let want = vit
            .forward_inference(&params, &images, m, size, size, None)
            .unwrap();
        let mut fx = FeatureExtractor::cpu(&vit, &params);
        assert_eq!(fx.device_name(), "cpu");
        let got = fx.features(&images, m, size, PatchMean::Compute).unwrap();
        assert_eq!(got.cls, want.cls);
        let d = cfg.embed_dim;
        assert_eq!(
            got.patch_mean.unwrap(),
            mean_rows(&want.patch, m, want.n_patches, d)
        );
        let skip = fx.features(&images, m, size, PatchMean::Skip).unwrap();
        assert_eq!((skip.cls, skip.patch_mean), (want.cls, None));
        assert!(matches!(
            fx.features(&images[1..], m, size, PatchMean::Skip),
            Err(Error::Shape { .. })
        ));
        assert!(fx.features(&[], 0, size, PatchMean::Skip).is_err());
    }
}
