//! Shared by the trainer tests (CPU and CUDA): a micro training plan and seeded crops, so the
//! CPU and GPU trainers are checked on the same configuration.

#![allow(dead_code)] // each test binary uses a different subset

use dinotrain::nn::Preset;
use dinotrain::optim::AdamHyper;
use dinotrain::optim::{LayerDecay, ScheduleConfig, Schedules};
use dinotrain::rng::{keyed, stream, Rng};
use dinotrain::ssl::step::{HeadConfig, LossConfig, StepOutput};
use dinotrain::ssl::Method;
use dinotrain::train::config::Centering;
use dinotrain::train::state::HostState;
use dinotrain::train::trainer::{TrainPlan, Trainer};
use rand::Rng as _;

/// A micro ViT (16 px, patch 4), small heads, 2 local crops, batch 4, drop path on.
pub fn micro_plan(method: Method) -> TrainPlan {
    let vit = Preset::Micro.config(16, 4, 1);
    TrainPlan {
        layer_decay: LayerDecay::official(vit.depth),
        vit,
        dino_head: HeadConfig {
            hidden_dim: 24,
            bottleneck_dim: 8,
            n_prototypes: 16,
        },
        ibot_head: None,
        losses: LossConfig::official(method),
        centering: Centering::Softmax,
        batch_size: 4,
        accumulate: 1,
        n_local_crops: 2,
        global_crop_size: 16,
        local_crop_size: 8,
        mask_probability: 0.5,
        mask_ratio_min_max: (0.1, 0.5),
        drop_path_rate: 0.1,
        schedules: Schedules::new(&ScheduleConfig {
            epochs: 2,
            epoch_length: 3,
            warmup_epochs: 1,
            freeze_last_layer_epochs: 1,
            warmup_teacher_temp_epochs: 1,
            batch_size_per_gpu: 4,
            ..ScheduleConfig::default()
        })
        .unwrap(),
        adam: AdamHyper::default(),
        clip_grad: 3.0,
        seed: 7,
        precision: None,
    }
}

/// Crop-major global and local crops for iteration `step`, uniform in [-2, 2).
pub fn crops(t: &Trainer, step: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = keyed(123, &[stream::TEST, step]);
    let g = (0..t.global_len())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let l = (0..t.local_len())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    (g, l)
}

/// Images `range` of each crop kind of crop-major `crops` (`kinds` crops of `n_img` images).
pub fn images_of<T: Copy>(
    crops: &[T],
    kinds: usize,
    n_img: usize,
    range: std::ops::Range<usize>,
) -> Vec<T> {
    let per_crop = crops.len() / (kinds * n_img);
    (0..kinds)
        .flat_map(|k| {
            &crops[(k * n_img + range.start) * per_crop..(k * n_img + range.end) * per_crop]
        })
        .copied()
        .collect()
}

/// One step's data for `n_img` images: crop-major global and local crops, uniform in [-2, 2),
/// and masks whose count per crop depends on the image's place inside a micro-batch of
/// `micro` images (so every micro-batch masks as many patches: the official iBOT center
/// averages per-rank means, which equals the 2B batch's mean only then).
pub struct StepData {
    pub global: Vec<f32>,
    pub local: Vec<f32>,
    pub masks: Vec<bool>,
}

pub fn step_data(p: &TrainPlan, n_img: usize, micro: usize, step: u64) -> StepData {
    let mut rng: Rng = keyed(321, &[stream::TEST, step]);
    let (g, l) = (p.global_crop_size, p.local_crop_size);
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
    let global = uniform(2 * n_img * 3 * g * g);
    let local = uniform(p.n_local_crops * n_img * 3 * l * l);
    let n = (g / p.vit.patch_size).pow(2);
    let mut masks = vec![false; 2 * n_img * n];
    for crop in 0..2 * n_img {
        let (kind, img) = (crop / n_img, crop % n_img);
        let count = (img % micro + kind) % 3 * 2; // 0, 2 or 4 masked patches
        let mut placed = 0;
        while placed < count {
            let at = crop * n + rng.random_range(0..n);
            if !masks[at] {
                masks[at] = true;
                placed += 1;
            }
        }
    }
    StepData {
        global,
        local,
        masks,
    }
}

/// ‖a − b‖ / ‖b‖.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// `(name, got, want, |got − want| / max(|want|, 1e-6))` of each logged loss term, KoLeo left
/// out unless `koleo` (runs that split a batch differently compute it over other samples).
pub fn loss_errors(
    got: &StepOutput,
    want: &StepOutput,
    koleo: bool,
) -> Vec<(&'static str, f32, f32, f32)> {
    (got.terms().into_iter().zip(want.terms()))
        .filter(|((name, _), _)| koleo || *name != "koleo_loss")
        .map(|((name, a), (_, b))| (name, a, b, ((a - b) / b.abs().max(1e-6)).abs()))
        .collect()
}

/// Relative errors ([`rel`]) of a training state against another: the student, the teacher,
/// both AdamW moments, and each center the centering keeps.
pub fn state_errors(got: &HostState, want: &HostState) -> Vec<(&'static str, f64)> {
    let mut errs = vec![
        ("student", rel(&got.student, &want.student)),
        ("teacher", rel(&got.teacher, &want.teacher)),
        (
            "adam m",
            rel(&got.optimizer.exp_avg, &want.optimizer.exp_avg),
        ),
        (
            "adam v",
            rel(&got.optimizer.exp_avg_sq, &want.optimizer.exp_avg_sq),
        ),
    ];
    for (a, b) in [
        (got.targets.dino.center(), want.targets.dino.center()),
        (got.targets.ibot.center(), want.targets.ibot.center()),
    ] {
        if let (Some(a), Some(b)) = (a, b) {
            errs.push(("center", rel(a, b)));
        }
    }
    errs
}
