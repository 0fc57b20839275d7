//! Evaluation features on any backend: the backbone's final-norm CLS token (what the official
//! k-NN uses) and, when asked, the mean of its final-norm patch tokens, for a batch of images
//! already eval-transformed on the host.
//!
//! One [`FeatureExtractor`] serves the k-NN during training (`train::run`), `dinotrain embed`
//! and `dinotrain knn`. It runs the backbone's inference forward in its own workspace (dropped
//! with it, so it does not stay resident beside a training run) in chunks of at most
//! [`DEVICE_CHUNK`] images, and reads back the CLS rows (and, for the patch mean, the patch
//! tokens, averaged on the host in f64: the mean is only asked for by `embed --patch-mean`).

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::ResolvedDevice;
use crate::backend::{Backend, Buffers};
use crate::error::{Error, Result};
use crate::nn::{Vit, VitWorkspaces};
use std::ops::{Deref, DerefMut};

/// Images per forward. An inference workspace holds about 30 f32 per token and channel
/// (stream, attention and MLP buffers, operand copies, the final norm): for ViT-L/14 at 224 px
/// (257 tokens, D 1024) 128 images take about 4 GB, ViT-S/14 about 1.5 GB, next to a training
/// run's own workspaces. Larger chunks gain little: 128 images already fill the GEMMs.
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

/// A value borrowed from the caller (`R`: a reference to `T`) or owned by the extractor.
enum Held<R, T> {
    Borrowed(R),
    Owned(T),
}

impl<R: Deref<Target = T>, T> Deref for Held<R, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

impl<R: DerefMut<Target = T>, T> DerefMut for Held<R, T> {
    fn deref_mut(&mut self) -> &mut T {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

/// The backbone's forward on one backend, chunk by chunk.
trait ChunkForward {
    /// The CLS rows `[b, D]` of `b` images and, when asked, their patch tokens `[b, n, D]`.
    fn forward(
        &mut self,
        vit: &Vit,
        images: &[f32],
        b_size: (usize, usize),
        patch_mean: PatchMean,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)>;
    fn device_name(&self) -> String;
}

struct OnBackend<'a, B: Backend> {
    be: Held<&'a mut B, B>,
    weights: Held<&'a B::Weights, B::Weights>,
    /// Replaced (dropping the old workspace) when the chunk shape changes, so at most one
    /// workspace is resident.
    runner: Option<VitWorkspaces<B>>,
    shape: Option<(usize, usize)>,
}

impl<B: Backend> ChunkForward for OnBackend<'_, B> {
    fn forward(
        &mut self,
        vit: &Vit,
        images: &[f32],
        (b, size): (usize, usize),
        patch_mean: PatchMean,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        if self.shape != Some((b, size)) {
            // Drop the old workspace before the new one is allocated.
            self.runner = None;
            self.shape = Some((b, size));
        }
        let runner = self.runner.get_or_insert_with(|| VitWorkspaces::new(vit));
        let (be, w) = (&mut *self.be, &*self.weights);
        let out = runner.forward_inference(be, vit, w, images, (b, size, size))?;
        let cls = be.download_f32(&out.cls)?;
        let patch = match patch_mean {
            PatchMean::Compute => Some(be.download_f32(&out.patch)?),
            PatchMean::Skip => None,
        };
        Ok((cls, patch))
    }

    fn device_name(&self) -> String {
        self.be.describe()
    }
}

/// Evaluation features of a backbone with its weights, on a backend.
pub struct FeatureExtractor<'a> {
    vit: &'a Vit,
    inner: Box<dyn ChunkForward + 'a>,
    /// Most images per forward ([`DEVICE_CHUNK`] unless set).
    chunk: usize,
}

impl<'a> FeatureExtractor<'a> {
    fn with<B: Backend + 'a>(
        vit: &'a Vit,
        be: Held<&'a mut B, B>,
        weights: Held<&'a B::Weights, B::Weights>,
    ) -> Self {
        let inner = OnBackend {
            be,
            weights,
            runner: None,
            shape: None,
        };
        FeatureExtractor {
            vit,
            inner: Box::new(inner),
            chunk: DEVICE_CHUNK,
        }
    }

    /// A backbone whose weights already live on `be` (they are read, not copied).
    pub fn borrowing<B: Backend + 'a>(
        be: &'a mut B,
        vit: &'a Vit,
        weights: &'a B::Weights,
    ) -> Self {
        Self::with(vit, Held::Borrowed(be), Held::Borrowed(weights))
    }

    /// A backbone on `be` from host parameters, uploaded for this extractor.
    pub fn uploading<B: Backend + 'a>(be: &'a mut B, vit: &'a Vit, params: &[f32]) -> Result<Self> {
        let weights = be.weights(params)?;
        Ok(Self::with(vit, Held::Borrowed(be), Held::Owned(weights)))
    }

    /// The CPU backbone (f32) on host parameters.
    pub fn cpu(vit: &'a Vit, params: &[f32]) -> Result<Self> {
        let mut be = CpuBackend::default();
        let weights = be.weights(params)?;
        Ok(Self::with(vit, Held::Owned(be), Held::Owned(weights)))
    }

    /// On a resolved device, with `params` uploaded to it.
    pub fn on(device: &'a mut ResolvedDevice, vit: &'a Vit, params: &[f32]) -> Result<Self> {
        match device {
            ResolvedDevice::Cpu(cpu) => Self::uploading(cpu, vit, params),
            ResolvedDevice::Cuda(gpu) => Self::uploading(&mut **gpu, vit, params),
        }
    }

    /// At most `chunk` images per forward (at least 1).
    pub fn with_device_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// The backbone.
    pub fn vit(&self) -> &Vit {
        self.vit
    }

    /// Where the features are computed, for logs (`cpu (2 threads, f32)`, `cuda (NAME (sm_XY))`).
    pub fn device_name(&self) -> String {
        self.inner.device_name()
    }

    /// Features of `m` images `[m, C, size, size]` (normalised, eval-transformed).
    pub fn features(
        &mut self,
        images: &[f32],
        m: usize,
        size: usize,
        patch_mean: PatchMean,
    ) -> Result<Features> {
        let (c, d) = (self.vit.cfg.in_chans, self.vit.cfg.embed_dim);
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
        for chunk in images.chunks(self.chunk * per) {
            let b = chunk.len() / per;
            let (cls, patch) = self.inner.forward(self.vit, chunk, (b, size), patch_mean)?;
            out.cls.extend_from_slice(&cls);
            if let (Some(pm), Some(patch)) = (out.patch_mean.as_mut(), patch) {
                pm.extend(mean_rows(&patch, b, patch.len() / (b * d).max(1), d));
            }
        }
        Ok(out)
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
        let mut be = CpuBackend::default();
        let w = be.weights(&params).unwrap();
        let mut runner = VitWorkspaces::new(&vit);
        let want = runner
            .forward_inference(&mut be, &vit, &w, &images, (m, size, size))
            .unwrap()
            .to_host(&mut be)
            .unwrap();
        let mut fx = FeatureExtractor::cpu(&vit, &params)
            .unwrap()
            .with_device_chunk(2);
        assert!(fx.device_name().starts_with("cpu"));
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
