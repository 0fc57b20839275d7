//! The official DINOv2 multi-crop augmentation (spec section 7), per image:
//!
//! every crop: RandomResizedCrop (bicubic) → horizontal flip 0.5 → colour jitter with p = 0.8
//! (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order) → grayscale 0.2
//! → Gaussian blur (kernel 9, σ ~ U(0.1, 2)) with the *effective* official probabilities
//! (global crop 1: never, global crop 2: 0.9 then solarize 0.2, local crops: 0.5) → ImageNet
//! normalisation to CHW float32.
//!
//! All draws of one image come from one generator, crop after crop, in torchvision's order, so
//! the same (seed, epoch, image) always gives the same crops.

use crate::data::blur::gaussian_blur;
use crate::data::color;
use crate::data::decode::RgbImage;
use crate::data::resize::{resize_bicubic, Rect};
use crate::error::{Error, Result};
use crate::rng::Rng;
use rand::Rng as _;

/// Sizes, counts and probabilities of the multi-crop recipe. `Default` is the official one.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiCropConfig {
    /// Side of the global crops in pixels.
    pub global_size: u32,
    /// Side of the local crops in pixels.
    pub local_size: u32,
    /// 1 or 2: the official recipe has exactly two, and treats them differently.
    pub n_global: usize,
    pub n_local: usize,
    /// Fraction of the image area a global crop covers, drawn uniformly in this range.
    pub global_scale: (f64, f64),
    pub local_scale: (f64, f64),
    /// Aspect ratio range (width / height) of the crop region.
    pub ratio: (f64, f64),
    pub flip_p: f64,
    pub jitter: ColorJitter,
    pub grayscale_p: f64,
    pub blur: BlurRecipe,
    /// Solarisation probability of global crop 2 (threshold 128).
    pub solarize_p: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// `RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`.
#[derive(Clone, Debug, PartialEq)]
pub struct ColorJitter {
    pub p: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
}

/// Gaussian blur: kernel size, σ range, and the probability of blurring each kind of crop.
#[derive(Clone, Debug, PartialEq)]
pub struct BlurRecipe {
    pub kernel_size: usize,
    pub sigma: (f64, f64),
    /// Effective probabilities (the official config writes 1.0 / 0.1 / 0.5 and its wrapper
    /// inverts them: see the spec's quirk 1).
    pub global1_p: f64,
    pub global2_p: f64,
    pub local_p: f64,
}

impl Default for MultiCropConfig {
    fn default() -> Self {
        MultiCropConfig {
            global_size: 224,
            local_size: 96,
            n_global: 2,
            n_local: 8,
            global_scale: (0.32, 1.0),
            local_scale: (0.05, 0.32),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter: ColorJitter {
                p: 0.8,
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.2,
                hue: 0.1,
            },
            grayscale_p: 0.2,
            blur: BlurRecipe {
                kernel_size: 9,
                sigma: (0.1, 2.0),
                global1_p: 0.0,
                global2_p: 0.9,
                local_p: 0.5,
            },
            solarize_p: 0.2,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl MultiCropConfig {
    /// Floats in one global crop: `3 · S · S`.
    pub fn global_len(&self) -> usize {
        3 * (self.global_size as usize).pow(2)
    }

    /// Floats in one local crop: `3 · s · s`.
    pub fn local_len(&self) -> usize {
        3 * (self.local_size as usize).pow(2)
    }

    /// Checks every field; the message names the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("multi-crop: {what}")));
        if self.global_size == 0 || (self.n_local > 0 && self.local_size == 0) {
            return bad("crop sizes must be positive".into());
        }
        if !(1..=2).contains(&self.n_global) {
            return bad(format!("n_global must be 1 or 2, got {}", self.n_global));
        }
        for (name, (lo, hi)) in [
            ("global_scale", self.global_scale),
            ("local_scale", self.local_scale),
        ] {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return bad(format!(
                    "{name} must satisfy 0 < lo <= hi <= 1, got ({lo}, {hi})"
                ));
            }
        }
        let (r0, r1) = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return bad(format!("ratio must satisfy 0 < lo <= hi, got ({r0}, {r1})"));
        }
        let j = &self.jitter;
        for (name, p) in [
            ("flip_p", self.flip_p),
            ("jitter.p", j.p),
            ("grayscale_p", self.grayscale_p),
            ("blur.global1_p", self.blur.global1_p),
            ("blur.global2_p", self.blur.global2_p),
            ("blur.local_p", self.blur.local_p),
            ("solarize_p", self.solarize_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be a probability, got {p}"));
            }
        }
        if !(j.brightness >= 0.0 && j.contrast >= 0.0 && j.saturation >= 0.0) {
            return bad("jitter strengths must be non-negative".into());
        }
        if !(0.0..=0.5).contains(&j.hue) {
            return bad(format!("jitter.hue must be in [0, 0.5], got {}", j.hue));
        }
        if self.blur.kernel_size % 2 == 0 {
            return bad(format!(
                "blur kernel size must be odd, got {}",
                self.blur.kernel_size
            ));
        }
        let (s0, s1) = self.blur.sigma;
        if !(s0 > 0.0 && s0 <= s1) {
            return bad(format!(
                "blur sigma range must be positive, got ({s0}, {s1})"
            ));
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return bad("std must be positive".into());
        }
        Ok(())
    }
}

/// Which crop of the recipe: decides blur and solarisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropKind {
    Global1,
    Global2,
    Local,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries of a (scale, log-ratio) draw, then
/// the centre crop of the closest allowed aspect ratio. Python's `round` rounds half to even.
pub fn random_resized_crop_params(
    rng: &mut Rng,
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> Rect {
    let area = width as f64 * height as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even() as i64;
        let h = (target_area / aspect).sqrt().round_ties_even() as i64;
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let y = rng.random_range(0..=(height as i64 - h)) as u32;
            let x = rng.random_range(0..=(width as i64 - w)) as u32;
            return Rect {
                x,
                y,
                width: w as u32,
                height: h as u32,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        let h = (width as f64 / ratio.0).round_ties_even() as u32;
        (width, h.clamp(1, height))
    } else if in_ratio > ratio.1 {
        let w = (height as f64 * ratio.1).round_ties_even() as u32;
        (w.clamp(1, width), height)
    } else {
        (width, height)
    };
    Rect {
        x: (width - w) / 2,
        y: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// `torch.empty(1).uniform_(lo, hi)`.
#[inline]
fn uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

#[inline]
fn coin(rng: &mut Rng, p: f64) -> bool {
    rng.random::<f64>() < p
}

/// Scratch buffers reused across crops (one set per worker thread).
#[derive(Default)]
pub struct Scratch {
    crop: Vec<u8>,
    resize: Vec<u8>,
    blur: Vec<f32>,
}

/// Flips `[H, W, 3]` left to right in place.
pub fn flip_horizontal(pixels: &mut [u8], width: usize) {
    for row in pixels.chunks_exact_mut(width * 3) {
        for x in 0..width / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (width - 1 - x) * 3 + c);
            }
        }
    }
}

/// Every random decision of one crop, drawn before any pixel is touched.
#[derive(Clone, Debug, PartialEq)]
pub struct CropPlan {
    pub region: Rect,
    pub flip: bool,
    /// Colour jitter, when applied.
    pub jitter: Option<JitterPlan>,
    pub grayscale: bool,
    /// Blur σ, when blurred.
    pub blur_sigma: Option<f32>,
    pub solarize: bool,
}

/// The factors of one colour jitter and the order of its four operations.
#[derive(Clone, Debug, PartialEq)]
pub struct JitterPlan {
    /// A permutation of [`JitterOp`]s.
    pub order: [JitterOp; 4],
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

/// The four colour-jitter operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JitterOp {
    Brightness,
    Contrast,
    Saturation,
    Hue,
}

/// Draws one crop's decisions in torchvision's order: RandomResizedCrop, flip, RandomApply of
/// the jitter (then its order and four factors), grayscale, blur (then σ), solarize.
pub fn draw_crop_plan(
    rng: &mut Rng,
    width: u32,
    height: u32,
    cfg: &MultiCropConfig,
    kind: CropKind,
) -> CropPlan {
    let scale = match kind {
        CropKind::Global1 | CropKind::Global2 => cfg.global_scale,
        CropKind::Local => cfg.local_scale,
    };
    let region = random_resized_crop_params(rng, width, height, scale, cfg.ratio);
    let flip = coin(rng, cfg.flip_p);
    let j = &cfg.jitter;
    let jitter = coin(rng, j.p).then(|| {
        let mut order = [
            JitterOp::Brightness,
            JitterOp::Contrast,
            JitterOp::Saturation,
            JitterOp::Hue,
        ];
        for i in (1..4).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        JitterPlan {
            order,
            brightness: uniform(rng, (1.0 - j.brightness).max(0.0), 1.0 + j.brightness) as f32,
            contrast: uniform(rng, (1.0 - j.contrast).max(0.0), 1.0 + j.contrast) as f32,
            saturation: uniform(rng, (1.0 - j.saturation).max(0.0), 1.0 + j.saturation) as f32,
            hue: uniform(rng, -j.hue, j.hue) as f32,
        }
    });
    let grayscale = coin(rng, cfg.grayscale_p);
    let blur_p = match kind {
        CropKind::Global1 => cfg.blur.global1_p,
        CropKind::Global2 => cfg.blur.global2_p,
        CropKind::Local => cfg.blur.local_p,
    };
    // The official global crop 1 has no blur transform at all: no draw when p is 0.
    let blur_sigma = (blur_p > 0.0 && coin(rng, blur_p))
        .then(|| uniform(rng, cfg.blur.sigma.0, cfg.blur.sigma.1) as f32);
    let solarize = kind == CropKind::Global2 && coin(rng, cfg.solarize_p);
    CropPlan {
        region,
        flip,
        jitter,
        grayscale,
        blur_sigma,
        solarize,
    }
}

/// Applies a plan: the crop of `img` at `size`², written as normalised CHW to `out`.
pub fn apply_crop_plan(
    out: &mut [f32],
    scratch: &mut Scratch,
    img: &RgbImage,
    cfg: &MultiCropConfig,
    size: u32,
    plan: &CropPlan,
) {
    let side = size as usize;
    let px = &mut scratch.crop;
    px.resize(side * side * 3, 0);
    resize_bicubic(
        px,
        &mut scratch.resize,
        &img.data,
        img.width,
        plan.region,
        size,
        size,
    );
    if plan.flip {
        flip_horizontal(px, side);
    }
    if let Some(j) = &plan.jitter {
        for op in j.order {
            match op {
                JitterOp::Brightness => color::adjust_brightness(px, j.brightness),
                JitterOp::Contrast => color::adjust_contrast(px, j.contrast),
                JitterOp::Saturation => color::adjust_saturation(px, j.saturation),
                JitterOp::Hue => color::adjust_hue(px, j.hue),
            }
        }
    }
    if plan.grayscale {
        color::grayscale(px);
    }
    if let Some(sigma) = plan.blur_sigma {
        gaussian_blur(
            px,
            &mut scratch.blur,
            side,
            side,
            cfg.blur.kernel_size,
            sigma,
        );
    }
    if plan.solarize {
        color::solarize(px, 128);
    }
    normalize_chw(out, px, cfg.mean, cfg.std);
}

/// One crop of the recipe: all its draws from `rng`, result written as normalised CHW to `out`.
pub fn augment_crop(
    out: &mut [f32],
    scratch: &mut Scratch,
    img: &RgbImage,
    cfg: &MultiCropConfig,
    kind: CropKind,
    rng: &mut Rng,
) {
    let size = match kind {
        CropKind::Global1 | CropKind::Global2 => cfg.global_size,
        CropKind::Local => cfg.local_size,
    };
    let plan = draw_crop_plan(rng, img.width, img.height, cfg, kind);
    apply_crop_plan(out, scratch, img, cfg, size, &plan);
}

/// `ToTensor` then `Normalize`: `[H, W, 3]` u8 → `[3, H, W]` f32, `(v / 255 - mean) / std`.
pub fn normalize_chw(out: &mut [f32], pixels: &[u8], mean: [f32; 3], std: [f32; 3]) {
    let plane = pixels.len() / 3;
    for c in 0..3 {
        let (m, s) = (mean[c], std[c]);
        let dst = &mut out[c * plane..(c + 1) * plane];
        for (d, p) in dst.iter_mut().zip(pixels.chunks_exact(3)) {
            *d = (p[c] as f32 / 255.0 - m) / s;
        }
    }
}

/// All crops of one image: `global_out[i]` gets global crop `i` (`[3, S, S]`), `local_out[i]`
/// local crop `i` (`[3, s, s]`). The slice counts and lengths must match the config.
pub fn multi_crop(
    img: &RgbImage,
    cfg: &MultiCropConfig,
    rng: &mut Rng,
    global_out: &mut [&mut [f32]],
    local_out: &mut [&mut [f32]],
) -> Result<()> {
    let mut scratch = Scratch::default();
    multi_crop_with(&mut scratch, img, cfg, rng, global_out, local_out)
}

/// [`multi_crop`] with caller-owned scratch buffers (the loader keeps one per worker).
pub fn multi_crop_with(
    scratch: &mut Scratch,
    img: &RgbImage,
    cfg: &MultiCropConfig,
    rng: &mut Rng,
    global_out: &mut [&mut [f32]],
    local_out: &mut [&mut [f32]],
) -> Result<()> {
    if global_out.len() != cfg.n_global || local_out.len() != cfg.n_local {
        return Err(Error::shape(
            "multi_crop",
            format!(
                "{} global and {} local outputs for a recipe of {} and {}",
                global_out.len(),
                local_out.len(),
                cfg.n_global,
                cfg.n_local
            ),
        ));
    }
    let (gl, ll) = (cfg.global_len(), cfg.local_len());
    if let Some(o) = global_out.iter().find(|o| o.len() != gl) {
        return Err(Error::shape(
            "multi_crop",
            format!("global output of {} floats, expected {gl}", o.len()),
        ));
    }
    if let Some(o) = local_out.iter().find(|o| o.len() != ll) {
        return Err(Error::shape(
            "multi_crop",
            format!("local output of {} floats, expected {ll}", o.len()),
        ));
    }
    if img.width == 0
        || img.height == 0
        || img.data.len() != img.width as usize * img.height as usize * 3
    {
        return Err(Error::shape(
            "multi_crop",
            format!(
                "image {}x{} with {} bytes",
                img.width,
                img.height,
                img.data.len()
            ),
        ));
    }
    for (i, out) in global_out.iter_mut().enumerate() {
        let kind = if i == 0 {
            CropKind::Global1
        } else {
            CropKind::Global2
        };
        augment_crop(out, scratch, img, cfg, kind, rng);
    }
    for out in local_out.iter_mut() {
        augment_crop(out, scratch, img, cfg, CropKind::Local, rng);
    }
    Ok(())
}
