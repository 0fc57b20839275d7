//! Evaluation inputs and accuracy: the official evaluation transform, the final-norm CLS
//! features of a whole source (on either device, through [`FeatureExtractor`]), and k-NN
//! accuracy of a labelled source.

use crate::data::augment::normalize_chw;
use crate::data::resize::{resize_bicubic, Rect};
use crate::data::{ImageSource, RgbImage};
use crate::error::{Error, Result};
use crate::eval::features::{FeatureExtractor, PatchMean};
use crate::eval::knn_classify;
use rayon::prelude::*;

/// ImageNet normalisation (the official transforms).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The official evaluation transform at `size` (224 officially): torchvision's
/// `Resize(round(size · 256/224), BICUBIC)` on the shorter side, `CenterCrop(size)`, `ToTensor`,
/// `Normalize` with the ImageNet statistics. Writes `[3, size, size]`.
pub fn eval_transform(out: &mut [f32], img: &RgbImage, size: usize) {
    let crop = eval_crop(img, size);
    normalize_chw(out, &crop.data, MEAN, STD);
}

/// The shorter side the evaluation transform resizes to: `round(size · 256/224)` (256 for 224).
pub fn eval_resize_short(size: usize) -> u32 {
    (size as f64 * 256.0 / 224.0).round() as u32
}

/// The size torchvision's `Resize(short)` gives a `width × height` image: the shorter side
/// becomes `short`, the longer `int(short · long / short_in)` (truncated; the exact integer
/// quotient, which the float division in torchvision always agrees with at these sizes).
pub fn resized_size(width: u32, height: u32, short: u32) -> (u32, u32) {
    let (w, h) = (width.max(1) as u64, height.max(1) as u64);
    let s = short as u64;
    if w <= h {
        (short, ((h * s) / w).max(1) as u32)
    } else {
        (((w * s) / h).max(1) as u32, short)
    }
}

/// torchvision's `CenterCrop` offset along a side of `len` pixels: `int(round((len - crop) / 2))`
/// with Python's round half to even, so `(len - crop) = 2k + 1` starts at `k` when `k` is even
/// and at `k + 1` when it is odd (not `floor`). 0 when the side is not longer than the crop.
pub fn center_crop_offset(len: u32, crop: u32) -> u32 {
    let d = len.saturating_sub(crop);
    let k = d / 2;
    if d % 2 == 1 && k % 2 == 1 {
        k + 1
    } else {
        k
    }
}

/// The 8-bit `size × size` crop of the evaluation transform (before `ToTensor`). The resized
/// shorter side, `round(size · 256/224)`, is never below `size`, so torchvision's padding branch
/// never applies.
pub fn eval_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (rw, rh) = resized_size(img.width, img.height, eval_resize_short(size));
    let mut resized = vec![0u8; (rw * rh * 3) as usize];
    let mut tmp = Vec::new();
    let whole = Rect {
        x: 0,
        y: 0,
        width: img.width,
        height: img.height,
    };
    resize_bicubic(&mut resized, &mut tmp, &img.data, img.width, whole, rw, rh);
    let s = size as u32;
    let (x0, y0) = (center_crop_offset(rw, s), center_crop_offset(rh, s));
    let mut crop = vec![0u8; size * size * 3];
    for y in 0..s.min(rh) {
        let src = ((y0 + y) * rw + x0) as usize * 3;
        let n = s.min(rw) as usize * 3;
        crop[y as usize * size * 3..y as usize * size * 3 + n]
            .copy_from_slice(&resized[src..src + n]);
    }
    RgbImage {
        width: s,
        height: s,
        data: crop,
    }
}

/// Final-norm CLS features `[n, D]` of every image of `source` from `extractor` (either
/// device), at `size` pixels, decoded and transformed on the host in chunks of `chunk` images.
/// Unreadable images are an error naming the file.
pub fn source_features(
    extractor: &mut FeatureExtractor<'_>,
    source: &dyn ImageSource,
    size: usize,
    chunk: usize,
) -> Result<Vec<f32>> {
    let n = source.len();
    let per = 3 * size * size;
    let d = extractor.vit().cfg.embed_dim;
    let mut features = Vec::with_capacity(n * d);
    for start in (0..n).step_by(chunk.max(1)) {
        let m = chunk.max(1).min(n - start);
        let mut images = vec![0f32; m * per]; // [m, 3, size, size]
        images
            .par_chunks_mut(per)
            .enumerate()
            .try_for_each(|(j, out)| {
                let img = source
                    .load(start + j)
                    .map_err(|e| Error::Data(format!("{}: {e}", source.name(start + j))))?;
                eval_transform(out, &img, size);
                Ok::<(), Error>(())
            })?;
        let f = extractor.features(&images, m, size, PatchMean::Skip)?;
        features.extend_from_slice(&f.cls);
    }
    Ok(features)
}

/// The labels of every image of `source`; an unlabelled image is an error.
pub fn source_labels(source: &dyn ImageSource) -> Result<Vec<usize>> {
    (0..source.len())
        .map(|i| {
            source
                .label(i)
                .map(|l| l as usize)
                .ok_or_else(|| Error::Data(format!("{} has no class label", source.name(i))))
        })
        .collect()
}

/// k-NN top-1 accuracy (in %) for each k of `nb_knn`, with the official weighting.
pub fn knn_top1(
    train: &[f32],
    train_labels: &[usize],
    test: &[f32],
    test_labels: &[usize],
    dim: usize,
    nb_knn: &[usize],
    temperature: f32,
) -> Result<Vec<(usize, f64)>> {
    let result = knn_classify(train, train_labels, test, dim, nb_knn, temperature)?;
    Ok(result
        .per_k
        .iter()
        .map(|pk| {
            let correct = pk
                .top1
                .iter()
                .zip(test_labels)
                .filter(|(p, l)| p == l)
                .count();
            (
                pk.k,
                100.0 * correct as f64 / test_labels.len().max(1) as f64,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_crop_offset_rounds_half_to_even() {
        // (len - crop) / 2 = 0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5 -> round half to even.
        let want = [0, 0, 1, 2, 2, 2, 3, 4];
        for (d, &w) in want.iter().enumerate() {
            assert_eq!(
                center_crop_offset(224 + d as u32, 224),
                w,
                "len - crop = {d}"
            );
        }
        assert_eq!(center_crop_offset(455, 224), 116); // 231 / 2 = 115.5 -> 116
        assert_eq!(center_crop_offset(341, 224), 58); // 117 / 2 = 58.5 -> 58
        assert_eq!(center_crop_offset(100, 224), 0);
    }

    #[test]
    fn eval_transform_keeps_a_uniform_image_uniform_and_centres_the_crop() {
        let img = RgbImage {
            width: 28,
            height: 40,
            data: [10u8, 128, 250].repeat(28 * 40),
        };
        let mut out = vec![0f32; 3 * 32 * 32];
        eval_transform(&mut out, &img, 32);
        for (c, &v) in [10u8, 128, 250].iter().enumerate() {
            let want = (v as f32 / 255.0 - MEAN[c]) / STD[c];
            assert!(out[c * 1024..(c + 1) * 1024]
                .iter()
                .all(|&x| (x - want).abs() < 1e-5));
        }
    }
}
