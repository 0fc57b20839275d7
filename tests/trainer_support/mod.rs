//! Shared by the trainer tests (CPU and CUDA): a micro training plan and seeded crops, so the
//! CPU and GPU trainers are checked on the same configuration.

#![allow(dead_code)] // each test binary uses a different subset

use dinotrain::nn::Preset;
use dinotrain::optim::AdamHyper;
use dinotrain::optim::{LayerDecay, ScheduleConfig, Schedules};
use dinotrain::rng::{keyed, stream};
use dinotrain::ssl::step::{HeadConfig, LossConfig};
use dinotrain::ssl::Method;
use dinotrain::train::config::Centering;
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
