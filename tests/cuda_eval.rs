//! Evaluation features on the GPU against the CPU's (`eval::FeatureExtractor`, the same code on
//! `CudaBackend` and `CpuBackend`): a backbone uploaded from host weights, split into device
//! chunks of changing shape, at the construction size and an interpolated one; and a CUDA
//! trainer's teacher read in place for the k-NN, after which a step still allocates nothing.
//! Every test skips without a GPU.
//!
//! Both sides run the same weights and images, so they differ only by precision: the GPU
//! rounds GEMM operands and attention inputs/outputs to bf16 (relative error about 2e-3 per
//! rounding, a few roundings per layer on O(1) final-norm values), everything else is f32.
//! Bounds are ‖gpu − cpu‖ / ‖cpu‖, as for the backbone's own tests (`tests/cuda_model.rs`).

mod cuda_support;
mod trainer_support;

use cuda_support::{assert_close, gpu, to_f64};
use dinotrain::backend::cuda::ResolvedDevice;
use dinotrain::eval::{FeatureExtractor, Features, PatchMean};
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::{Preset, Vit};
use dinotrain::rng::{keyed, stream, uniform_vec};
use dinotrain::ssl::Method;
use dinotrain::train::trainer::{EvalWeights, Trainer};
use trainer_support::{crops, micro_plan};

/// Final-norm outputs after a few bf16 roundings per layer (as `cuda_model`'s forward bound).
const FEATURE_BOUND: f64 = 1e-2;

/// Official init plus uniform noise, so that every weight (LayerNorm, biases, registers)
/// shapes the features.
fn noisy_params(table: &ParamTable, seed: u64) -> Vec<f32> {
    let mut p = table.init(&mut keyed(seed, &[stream::INIT]));
    let noise = uniform_vec(seed + 1000, p.len(), 0.1);
    p.iter_mut().zip(noise).for_each(|(a, n)| *a += n);
    p
}

fn check_features(name: &str, got: &Features, want: &Features) {
    assert_close(
        &format!("{name} cls"),
        &got.cls,
        &to_f64(&want.cls),
        FEATURE_BOUND,
    );
    match (&got.patch_mean, &want.patch_mean) {
        (Some(g), Some(w)) => {
            assert_close(&format!("{name} patch mean"), g, &to_f64(w), FEATURE_BOUND)
        }
        (None, None) => {}
        _ => panic!("{name}: the patch mean is present on one side only"),
    }
}

#[test]
fn gpu_features_match_the_cpu_across_chunks_sizes_and_patch_means() {
    let Some(gpu) = gpu() else { return };
    let mut device = ResolvedDevice::Cuda(Box::new(gpu));
    let cfg = Preset::Micro.config(16, 4, 1); // D 32, patch 4, one register
    let mut table = ParamTable::new();
    let vit = Vit::new(&cfg, &mut table, "backbone.");
    let params = noisy_params(&table, 81);
    let mut cpu = FeatureExtractor::cpu(&vit, &params).unwrap();
    // Chunks of 3: 7 images run as 3 + 3 + 1, then 2 as one chunk, each a new workspace shape.
    let mut cuda = FeatureExtractor::on(&mut device, &vit, &params)
        .unwrap()
        .with_device_chunk(3);
    assert!(
        cuda.device_name().starts_with("cuda"),
        "{}",
        cuda.device_name()
    );
    for (m, size, patch_mean, seed) in [
        (7, 16, PatchMean::Compute, 82),
        (2, 16, PatchMean::Skip, 83),
        // Not the construction size: the position embedding is resampled.
        (4, 24, PatchMean::Compute, 84),
    ] {
        let images = uniform_vec(seed, m * 3 * size * size, 1.0);
        let want = cpu.features(&images, m, size, patch_mean).unwrap();
        let got = cuda.features(&images, m, size, patch_mean).unwrap();
        assert_eq!(got.cls.len(), m * cfg.embed_dim);
        check_features(&format!("{m} images at {size} px"), &got, &want);
    }
    // A wrong image count is a typed error on the device too.
    let images = uniform_vec(85, 2 * 3 * 16 * 16, 1.0);
    assert!(cuda.features(&images[1..], 2, 16, PatchMean::Skip).is_err());
}

#[test]
fn a_cuda_trainer_evaluates_its_teacher_in_place_without_new_step_allocations() {
    let Some(gpu) = gpu() else { return };
    let plan = micro_plan(Method::Dinov2);
    let size = plan.global_crop_size;
    let mut cuda = Trainer::new_on(plan, ResolvedDevice::Cuda(Box::new(gpu))).unwrap();
    // Noisy weights: at the official init LayerScale (1e-5) mutes every block, and the CLS
    // token would barely see the bf16 GEMMs.
    let initial = noisy_params(&cuda.model.table, 90);
    let mut state = cuda.snapshot().unwrap();
    state.student = initial.clone();
    state.teacher = initial.clone();
    cuda.restore(&state).unwrap();
    for step in 0..2 {
        let (g, l) = crops(&cuda, step);
        cuda.train_step(&g, &l).unwrap();
    }
    let warm = cuda.device_allocations();
    let m = 5;
    let images = uniform_vec(91, m * 3 * size * size, 1.0);

    // The device teacher, read in place: its features are those of the (downloaded) teacher on
    // the CPU.
    let got = cuda
        .feature_extractor(EvalWeights::Teacher)
        .unwrap()
        .features(&images, m, size, PatchMean::Compute)
        .unwrap();
    let teacher = cuda.snapshot().unwrap().teacher;
    assert_ne!(teacher, initial, "two steps moved the teacher");
    let vit = &cuda.model.backbone;
    let want = FeatureExtractor::cpu(vit, &teacher)
        .unwrap()
        .features(&images, m, size, PatchMean::Compute)
        .unwrap();
    check_features("trainer teacher", &got, &want);

    // Host weights (the initialisation of a resumed run) are uploaded for the extractor.
    let got = cuda
        .feature_extractor(EvalWeights::Host(&initial))
        .unwrap()
        .features(&images, m, size, PatchMean::Skip)
        .unwrap();
    let vit = &cuda.model.backbone;
    let want = FeatureExtractor::cpu(vit, &initial)
        .unwrap()
        .features(&images, m, size, PatchMean::Skip)
        .unwrap();
    check_features("trainer host weights", &got, &want);

    // The evaluations ran in workspaces of their own on the trainer's device (the counter
    // counts every buffer of the backend), which went with their extractors: the step's
    // workspaces are untouched and a step after the evaluation still allocates nothing.
    let evaluated = cuda.device_allocations();
    assert!(
        evaluated > warm,
        "the evaluations allocated their own workspaces"
    );
    let (g, l) = crops(&cuda, 2);
    cuda.train_step(&g, &l).unwrap();
    assert_eq!(
        cuda.device_allocations(),
        evaluated,
        "a step after the evaluation allocated"
    );
}
