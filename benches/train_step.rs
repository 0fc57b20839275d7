//! The full training iteration on the CPU (SSL step + clipping + AdamW + EMA), images/s, at the
//! two configurations of `CPU.md` where the official code was measured on the build machine:
//! the demo size (official: 29-30 images/s) and ViT-S/14 at 224/98 px, batch 8 (0.97 images/s).
//!
//! `cargo bench --bench train_step`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dinotrain::nn::Preset;
use dinotrain::optim::AdamHyper;
use dinotrain::optim::{LayerDecay, ScheduleConfig, Schedules};
use dinotrain::rng::{keyed, stream};
use dinotrain::ssl::step::{HeadConfig, LossConfig};
use dinotrain::ssl::Method;
use dinotrain::train::config::Centering;
use dinotrain::train::trainer::{TrainPlan, Trainer};
use rand::Rng as _;
use std::hint::black_box;

#[allow(clippy::too_many_arguments)]
fn plan(
    preset: Preset,
    patch: usize,
    global: usize,
    local: usize,
    batch: usize,
    k: usize,
    hidden: usize,
    bottleneck: usize,
) -> TrainPlan {
    let vit = preset.config(global, patch, 0);
    TrainPlan {
        layer_decay: LayerDecay::official(vit.depth),
        vit,
        dino_head: HeadConfig {
            hidden_dim: hidden,
            bottleneck_dim: bottleneck,
            n_prototypes: k,
        },
        ibot_head: None,
        losses: LossConfig::official(Method::Dinov2),
        centering: Centering::Softmax,
        batch_size: batch,
        accumulate: 1,
        n_local_crops: 8,
        global_crop_size: global,
        local_crop_size: local,
        mask_probability: 0.5,
        mask_ratio_min_max: (0.1, 0.5),
        drop_path_rate: 0.1,
        schedules: Schedules::new(&ScheduleConfig {
            batch_size_per_gpu: batch as u64,
            ..ScheduleConfig::default()
        })
        .unwrap(),
        adam: AdamHyper::default(),
        clip_grad: 3.0,
        seed: 0,
        precision: None,
    }
}

fn bench_step(c: &mut Criterion, name: &str, plan: TrainPlan) {
    let batch = plan.batch_size;
    let mut t = Trainer::new(plan).unwrap();
    let mut rng = keyed(1, &[stream::TEST]);
    let g: Vec<f32> = (0..t.global_len())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let l: Vec<f32> = (0..t.local_len())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(name, |b| {
        b.iter(|| black_box(t.train_step(&g, &l).unwrap().losses.loss))
    });
    group.finish();
}

fn train_step(c: &mut Criterion) {
    // D 192, depth 6, 3 heads, patch 4, 32 px global, 8 × 16 px local, batch 64, K 4096,
    // head hidden 512, bottleneck 128.
    bench_step(
        c,
        "demo_d192_b64",
        plan(Preset::Tiny, 4, 32, 16, 64, 4096, 512, 128),
    );
    if std::env::var_os("DINOTRAIN_BENCH_VITS").is_some() {
        // ViT-S/14 at 224/98 px, batch 8, K 65536 (official head 2048/256).
        bench_step(
            c,
            "vits14_b8",
            plan(Preset::Small, 14, 224, 98, 8, 65536, 2048, 256),
        );
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
