//! The analytical FLOP count of one training iteration, per image.
//!
//! Multiply-adds count 2 FLOPs; only matrix products are counted (LayerNorm, softmax, GELU,
//! losses, the optimizer are not). For a crop of `s` px, patch `p`, `n = (s/p)²` patches,
//! `T = 1 + registers + n` tokens, width `D`, FFN width `h`, depth `L`:
//! - patch embedding: `2·n·(3p²)·D`;
//! - per block: qkv `2·T·D·3D`, projection `2·T·D·D`, attention `QKᵀ` and `A·V` `2·2·T²·D`,
//!   MLP `2·2·T·D·h` (SwiGLU: `w12` `2·T·D·2w` + `w3` `2·T·w·D`);
//! - forward of a crop `F(s) = patch + L·block`; backward = 2 × forward.
//! - heads (3-layer MLP `D→H→H→bottleneck`, weight-normed last layer to `K` prototypes) per
//!   token: `2·(D·H + H·H + H·bn + bn·K)`.
//! - per image: student `3·(2·F(G) + n_local·F(Lc))`, teacher `2·F(G)`; student heads
//!   `3·(2 + n_local)` CLS tokens plus `3·m` masked patches, teacher heads `2 + m` tokens, where
//!   `m = int(2B·mask_probability)/B · mean(mask_ratio_min_max) · n_global_patches` is the
//!   expected number of masked patches per image (the official collate; the block masking may
//!   fall a little short of its targets, and the official code pads the head input to an upper
//!   bound, so `m` is the useful work).
//!
//! For ViT-S/14 this gives 12.25 GFLOP per 224-px forward and about 166 GFLOP per image per
//! DINOv2 step (593 for ViT-B/14), the figures of `GPU.md` (unit-tested below).

use crate::nn::{Ffn, VitConfig};
use crate::ssl::step::HeadConfig;
use crate::train::trainer::TrainPlan;
use serde::Serialize;

/// Analytical FLOPs of one training iteration per image (see the module docs for the formula).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepFlops {
    /// Student backbone forward and backward over every crop.
    pub student_backbone: f64,
    /// Teacher backbone forward over the global crops.
    pub teacher_backbone: f64,
    /// Student heads forward and backward (CLS of every crop, masked patches).
    pub student_heads: f64,
    /// Teacher heads forward (CLS of the global crops, masked patches).
    pub teacher_heads: f64,
    /// One backbone forward of one global crop.
    pub forward_global_crop: f64,
    /// One backbone forward of one local crop.
    pub forward_local_crop: f64,
    /// Expected masked patches per image (both global crops).
    pub masked_patches_per_image: f64,
}

impl StepFlops {
    /// The count for `plan`.
    pub fn of(plan: &TrainPlan) -> Self {
        let vit = &plan.vit;
        let fwd_global = vit_forward_flops(vit, plan.global_crop_size);
        let fwd_local = vit_forward_flops(vit, plan.local_crop_size);
        let n_local = plan.n_local_crops as f64;
        let dino_token = head_forward_flops(&plan.dino_head, vit.embed_dim);
        let ibot_token = head_forward_flops(
            plan.ibot_head.as_ref().unwrap_or(&plan.dino_head),
            vit.embed_dim,
        );
        let masked = if plan.losses.method.uses_ibot() {
            expected_masked_patches(plan)
        } else {
            0.0
        };
        StepFlops {
            student_backbone: 3.0 * (2.0 * fwd_global + n_local * fwd_local),
            teacher_backbone: 2.0 * fwd_global,
            student_heads: 3.0 * ((2.0 + n_local) * dino_token + masked * ibot_token),
            teacher_heads: 2.0 * dino_token + masked * ibot_token,
            forward_global_crop: fwd_global,
            forward_local_crop: fwd_local,
            masked_patches_per_image: masked,
        }
    }

    /// FLOPs per image of one iteration.
    pub fn total(&self) -> f64 {
        self.student_backbone + self.teacher_backbone + self.student_heads + self.teacher_heads
    }
}

/// FLOPs of one backbone forward of one `crop`-px crop (matrix products only).
pub fn vit_forward_flops(vit: &VitConfig, crop: usize) -> f64 {
    let grid = (crop / vit.patch_size) as f64;
    let n = grid * grid;
    let t = 1.0 + vit.num_register_tokens as f64 + n;
    let d = vit.embed_dim as f64;
    let patch = 2.0 * n * (vit.in_chans * vit.patch_size * vit.patch_size) as f64 * d;
    let ffn = match vit.ffn {
        Ffn::Mlp { hidden } => 2.0 * 2.0 * t * d * hidden as f64,
        Ffn::SwiGlu { hidden } => {
            let w = crate::nn::ffn::swiglu_width(hidden) as f64;
            2.0 * t * d * 2.0 * w + 2.0 * t * w * d
        }
    };
    let block = 2.0 * t * d * 3.0 * d + 2.0 * t * d * d + 2.0 * 2.0 * t * t * d + ffn;
    patch + vit.depth as f64 * block
}

/// FLOPs of one head forward of one token: `D → H → H → bottleneck → K`.
pub fn head_forward_flops(head: &HeadConfig, embed_dim: usize) -> f64 {
    let (d, h, bn, k) = (
        embed_dim as f64,
        head.hidden_dim as f64,
        head.bottleneck_dim as f64,
        head.n_prototypes as f64,
    );
    2.0 * (d * h + h * h + h * bn + bn * k)
}

/// `int(2B·p)/B · mean(ratio range) · patches per global crop`.
fn expected_masked_patches(plan: &TrainPlan) -> f64 {
    let b = plan.batch_size as f64;
    let masked_crops = (2.0 * b * decimal(plan.mask_probability)).floor();
    let (lo, hi) = plan.mask_ratio_min_max;
    let grid = (plan.global_crop_size / plan.vit.patch_size) as f64;
    masked_crops / b * 0.5 * (decimal(lo) + decimal(hi)) * grid * grid
}

/// The configured decimal value of an f32 setting (0.3, not 0.30000001192...).
fn decimal(v: f32) -> f64 {
    format!("{v}").parse().unwrap_or(v as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tests::plan;
    use crate::bench::BenchModel;
    use crate::train::config::Method;

    fn close(got: f64, want: f64, rel: f64) -> bool {
        (got - want).abs() <= rel * want
    }

    #[test]
    fn vits14_forward_matches_gpu_md() {
        let p = plan(BenchModel::Vits14, 8);
        let f = vit_forward_flops(&p.vit, 224);
        // GPU.md: 12.25 GFLOP per 224-px crop.
        assert!(close(f, 12.25e9, 0.002), "{f:e}");
        // 98 px: 7x7 patches + CLS = 50 tokens.
        let local = vit_forward_flops(&p.vit, 98);
        let by_hand = 2.0 * 49.0 * 588.0 * 384.0
            + 12.0 * (24.0 * 50.0 * 384.0 * 384.0 + 4.0 * 50.0 * 50.0 * 384.0);
        assert!(close(local, by_hand, 1e-12), "{local:e} vs {by_hand:e}");
    }

    #[test]
    fn dinov2_step_flops_match_gpu_md() {
        // GPU.md: about 166 GFLOP per image for ViT-S/14, 593 for ViT-B/14.
        let s = StepFlops::of(&plan(BenchModel::Vits14, 8)).total();
        assert!(close(s, 166e9, 0.005), "ViT-S/14 {s:e}");
        let b = StepFlops::of(&plan(BenchModel::Vitb14, 64)).total();
        assert!(close(b, 593e9, 0.005), "ViT-B/14 {b:e}");
        // Official collate: 8 of 16 global crops masked at a mean ratio 0.3 of 256 patches.
        let f = StepFlops::of(&plan(BenchModel::Vits14, 8));
        assert!(close(f.masked_patches_per_image, 76.8, 1e-12));
    }

    #[test]
    fn method_changes_the_head_work_only() {
        let mut p = plan(BenchModel::Vits14, 8);
        let full = StepFlops::of(&p);
        p.losses.method = Method::Dino;
        let dino = StepFlops::of(&p);
        assert_eq!(dino.student_backbone, full.student_backbone);
        assert_eq!(dino.masked_patches_per_image, 0.0);
        let token = head_forward_flops(&p.dino_head, 384);
        assert!(close(dino.student_heads, 3.0 * 10.0 * token, 1e-12));
        assert!(close(dino.teacher_heads, 2.0 * token, 1e-12));
        assert!(full.total() > dino.total());
    }

    #[test]
    fn swiglu_models_count_the_fused_width() {
        let p = plan(BenchModel::Vitg14, 2);
        let Ffn::SwiGlu { hidden } = p.vit.ffn else {
            panic!("vitg14 uses SwiGLU: {:?}", p.vit.ffn)
        };
        let w = crate::nn::ffn::swiglu_width(hidden) as f64;
        assert_eq!(w, 4096.0);
        let (t, d) = (257.0, 1536.0);
        let block = 8.0 * t * d * d + 4.0 * t * t * d + 6.0 * t * d * w;
        let want = 2.0 * 256.0 * 588.0 * d + 40.0 * block;
        assert!(close(vit_forward_flops(&p.vit, 224), want, 1e-12));
    }
}
