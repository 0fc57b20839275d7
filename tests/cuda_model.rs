//! The backbone on the GPU against the CPU backbone (`nn`), layer by layer then whole: one
//! block forward/backward (with and without LayerScale, with batch-subset stochastic depth),
//! the whole ViT forward/backward (masks, registers, drop path, an interpolated crop size),
//! the inference forward, and the workspace reuse. Every test skips without a GPU.
//!
//! Both sides run the same seeded inputs, parameters and drop-path draws, so they differ only
//! by precision: the GPU rounds GEMM operands and attention inputs/outputs to bf16 (relative
//! error about 2e-3 per rounding), everything else is f32. Bounds are ‖gpu − cpu‖ / ‖cpu‖.

mod cuda_support;

use cuda_support::{gpu, rel_err, to_f64};
use dinotrain::backend::cuda::model::{DeviceWeights, GpuBlock, GpuVit, GpuVitOutput, ImageGrad};
use dinotrain::backend::cuda::CudaBackend;
use dinotrain::nn::block::{Block, BlockConfig};
use dinotrain::nn::drop_path::{draw_subset, DropPath};
use dinotrain::nn::ffn::Ffn;
use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::nn::presets::Preset;
use dinotrain::nn::vit::{Vit, VitConfig, VitOutput};
use dinotrain::rng::{keyed, stream, uniform_vec};
use dinotrain::Error;
use rand::Rng as _;

/// Forward outputs: a few bf16 roundings per layer on O(1) values.
const OUT_BOUND: f64 = 1e-2;
/// The whole gradient: bf16 operands in forward and backward GEMMs compound over the layers.
const GRAD_BOUND: f64 = 2e-2;
/// One parameter's gradient (localises a failure; a wrong formula gives errors near 1).
const PARAM_BOUND: f64 = 5e-2;

/// Official init plus uniform noise, so that every weight (LayerNorm, biases, mask token)
/// shapes the result and a wrong index shows.
fn noisy_params(table: &ParamTable, seed: u64) -> Vec<f32> {
    let mut p = table.init(&mut keyed(seed, &[stream::INIT]));
    let noise = uniform_vec(seed + 1000, p.len(), 0.1);
    p.iter_mut().zip(noise).for_each(|(a, n)| *a += n);
    p
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

fn check(name: &str, got: &[f32], want: &[f32], bound: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{name}: non-finite value"
    );
    let err = rel_err(got, &to_f64(want));
    eprintln!("{name}: relative error {err:.3e} (bound {bound:.0e})");
    assert!(
        err <= bound,
        "{name}: relative error {err:.3e} > {bound:.0e}"
    );
}

/// The whole gradient, then each parameter's (skipping those whose gradient is negligible
/// next to the whole, where relative error means nothing).
/// A GPU backbone's outputs against the CPU's: CLS, patch tokens, and the registers exactly
/// when the model has them.
fn check_outputs(gpu: &CudaBackend, name: &str, out: &GpuVitOutput, y: &VitOutput) {
    check(
        &format!("{name} cls"),
        &gpu.download(&out.cls).unwrap(),
        &y.cls,
        OUT_BOUND,
    );
    check(
        &format!("{name} patch"),
        &gpu.download(&out.patch).unwrap(),
        &y.patch,
        OUT_BOUND,
    );
    match &out.reg {
        Some(reg) => check(
            &format!("{name} reg"),
            &gpu.download(reg).unwrap(),
            &y.reg,
            OUT_BOUND,
        ),
        None => assert_eq!(y.n_registers, 0, "{name}: registers missing"),
    }
}

fn check_grads(name: &str, table: &ParamTable, got: &[f32], want: &[f32]) {
    let total = norm(want);
    for spec in table.specs() {
        let r = spec.at.range();
        if norm(&want[r.clone()]) < 1e-4 * total {
            assert!(
                norm(&got[r.clone()]) < 1e-3 * total,
                "{name}: {} should be (nearly) zero",
                spec.name
            );
            continue;
        }
        check(
            &format!("{name} grad {}", spec.name),
            &got[r.clone()],
            &want[r],
            PARAM_BOUND,
        );
    }
    check(&format!("{name} grad (all)"), got, want, GRAD_BOUND);
}

fn delta(after: &[f32], before: &[f32]) -> Vec<f32> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

// ---- one block -----------------------------------------------------------------------------

fn block_matches_cpu(layerscale: Option<f32>, drop_rate: f32, seed: u64) {
    let Some(mut gpu) = gpu() else { return };
    let (b, t, d) = (4, 17, 32);
    let cfg = BlockConfig {
        dim: d,
        num_heads: 2,
        ffn: Ffn::Mlp { hidden: 64 },
        layerscale,
        eps: 1e-6,
        qkv_bias: true,
        proj_bias: true,
        ffn_bias: true,
    };
    let mut table = ParamTable::new();
    table.push("other.before", &[8], Init::Zeros); // the block does not start at offset 0
    let blk = Block::new(&mut table, "blocks.0.", &cfg);
    let params = noisy_params(&table, seed);
    let x = uniform_vec(seed + 1, b * t * d, 1.0);
    let dy = uniform_vec(seed + 2, b * t * d, 1.0);

    let mut cpu_rng = keyed(seed, &[stream::DROP_PATH]);
    let mut dp = DropPath {
        rate: drop_rate,
        rng: &mut cpu_rng,
    };
    let mut x_cpu = x.clone();
    let cache = blk.forward(
        &mut x_cpu,
        &params,
        b,
        t,
        (drop_rate > 0.0).then_some(&mut dp),
    );
    let mut grads_cpu = vec![0f32; table.len()];
    let mut dx_cpu = dy.clone();
    blk.backward(&mut dx_cpu, &mut grads_cpu, &cache, &params);

    // The same draws, in the same order (attention branch, then FFN branch).
    let mut gpu_rng = keyed(seed, &[stream::DROP_PATH]);
    let s_attn = draw_subset(b, drop_rate, &mut gpu_rng);
    let s_ffn = draw_subset(b, drop_rate, &mut gpu_rng);
    assert_eq!(s_attn.is_some(), drop_rate > 0.0);
    let w = DeviceWeights::upload(&gpu, &params).unwrap();
    let mut runner = GpuBlock::new(&gpu, &blk, b, t).unwrap();
    let mut x_gpu = gpu.upload(&x).unwrap();
    runner
        .forward(
            &gpu,
            &blk,
            &w,
            &mut x_gpu,
            [s_attn.as_ref(), s_ffn.as_ref()],
        )
        .unwrap();
    let mut dx_gpu = gpu.upload(&dy).unwrap();
    let mut grads_gpu = gpu.alloc_zeros::<f32>(table.len()).unwrap();
    runner
        .backward(&mut gpu, &blk, &w, &mut grads_gpu, &mut dx_gpu)
        .unwrap();

    // The residual carries x and dy through unchanged: compare what the block adds.
    let name = format!("block (layerscale {layerscale:?}, drop {drop_rate})");
    let x_gpu = gpu.download(&x_gpu).unwrap();
    check(
        &format!("{name} out − x"),
        &delta(&x_gpu, &x),
        &delta(&x_cpu, &x),
        OUT_BOUND,
    );
    let dx_gpu = gpu.download(&dx_gpu).unwrap();
    check(
        &format!("{name} dx − dy"),
        &delta(&dx_gpu, &dy),
        &delta(&dx_cpu, &dy),
        GRAD_BOUND,
    );
    check_grads(
        &name,
        &table,
        &gpu.download(&grads_gpu).unwrap(),
        &grads_cpu,
    );
}

#[test]
fn block_with_layerscale_matches_cpu() {
    block_matches_cpu(Some(0.5), 0.0, 11);
}

#[test]
fn block_without_layerscale_matches_cpu() {
    block_matches_cpu(None, 0.0, 12);
}

#[test]
fn block_with_drop_path_subsets_matches_cpu() {
    block_matches_cpu(Some(0.5), 0.5, 13);
    block_matches_cpu(None, 0.3, 14);
}

// ---- the whole backbone --------------------------------------------------------------------

fn micro(registers: usize, layerscale: Option<f32>) -> VitConfig {
    let mut cfg = Preset::Micro.config(32, 4, registers);
    cfg.layerscale = layerscale;
    cfg
}

struct Model {
    vit: Vit,
    table: ParamTable,
    params: Vec<f32>,
}

fn model(cfg: &VitConfig, seed: u64) -> Model {
    let mut table = ParamTable::new();
    table.push("other.before", &[8], Init::Zeros);
    let vit = Vit::new(cfg, &mut table, "backbone.");
    let params = noisy_params(&table, seed);
    Model { vit, table, params }
}

fn random_masks(seed: u64, len: usize) -> Vec<bool> {
    let mut rng = keyed(seed, &[stream::MASKS]);
    (0..len).map(|_| rng.random_bool(0.3)).collect()
}

/// One training forward and backward on both backends, compared.
#[allow(clippy::too_many_arguments)]
fn vit_matches_cpu(
    gpu: &mut CudaBackend,
    gvit: &mut GpuVit,
    m: &Model,
    w: &DeviceWeights,
    (b, h, w_px): (usize, usize, usize),
    masked: bool,
    drop_rate: f32,
    seed: u64,
) {
    let cfg = &m.vit.cfg;
    let (d, r) = (cfg.embed_dim, cfg.num_register_tokens);
    let n = (h / cfg.patch_size) * (w_px / cfg.patch_size);
    let images = uniform_vec(seed + 1, b * 3 * h * w_px, 1.0);
    let masks = masked.then(|| random_masks(seed, b * n));
    let d_cls = uniform_vec(seed + 2, b * d, 1.0);
    let d_patch = uniform_vec(seed + 3, b * n * d, 1.0);
    let d_reg = (r > 0).then(|| uniform_vec(seed + 4, b * r * d, 1.0));

    let mut cpu_rng = keyed(seed, &[stream::DROP_PATH]);
    let dp = (drop_rate > 0.0).then_some(DropPath {
        rate: drop_rate,
        rng: &mut cpu_rng,
    });
    let (y, cache) = m
        .vit
        .forward(&m.params, &images, b, h, w_px, masks.as_deref(), dp)
        .unwrap();
    let mut grads_cpu = vec![0f32; m.table.len()];
    let dimages_cpu = m
        .vit
        .backward(
            &m.params,
            &mut grads_cpu,
            &cache,
            &d_cls,
            &d_patch,
            d_reg.as_deref(),
        )
        .unwrap();

    let mut gpu_rng = keyed(seed, &[stream::DROP_PATH]);
    let dp = (drop_rate > 0.0).then_some(DropPath {
        rate: drop_rate,
        rng: &mut gpu_rng,
    });
    let out = gvit
        .forward(gpu, &m.vit, w, &images, b, h, w_px, masks.as_deref(), dp)
        .unwrap();
    assert_eq!(
        (out.b, out.n_patches, out.n_registers, out.dim),
        (b, n, r, d)
    );
    let name = format!("vit {b}x{h}x{w_px} (masks {masked}, drop {drop_rate})");
    check_outputs(gpu, &name, out, &y);

    let mut grads_gpu = gpu.alloc_zeros::<f32>(m.table.len()).unwrap();
    let d_cls = gpu.upload(&d_cls).unwrap();
    let d_patch = gpu.upload(&d_patch).unwrap();
    let d_reg = d_reg.map(|v| gpu.upload(&v).unwrap());
    let dimages = gvit
        .backward_with(
            gpu,
            &m.vit,
            w,
            &mut grads_gpu,
            (b, h, w_px),
            &d_cls,
            &d_patch,
            d_reg.as_ref(),
            ImageGrad::Compute,
        )
        .unwrap()
        .expect("image gradient asked for");
    check(
        &format!("{name} d images"),
        &dimages,
        &dimages_cpu,
        GRAD_BOUND,
    );
    check_grads(
        &name,
        &m.table,
        &gpu.download(&grads_gpu).unwrap(),
        &grads_cpu,
    );
}

#[test]
fn vit_with_masks_registers_and_drop_path_matches_cpu() {
    let Some(mut gpu) = gpu() else { return };
    let m = model(&micro(2, Some(0.5)), 21);
    let w = DeviceWeights::upload(&gpu, &m.params).unwrap();
    let mut gvit = GpuVit::new(&m.vit);
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (3, 32, 32), true, 0.4, 22);
    // A batch that keeps several samples per branch (int(6 · 0.5) = 3).
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (6, 32, 32), true, 0.5, 23);
}

#[test]
fn vit_at_crop_sizes_that_interpolate_the_position_embedding_matches_cpu() {
    let Some(mut gpu) = gpu() else { return };
    let m = model(&micro(0, None), 31);
    let w = DeviceWeights::upload(&gpu, &m.params).unwrap();
    let mut gvit = GpuVit::new(&m.vit);
    // The construction size (identity plan), a smaller square crop and a non-square one (both
    // resampled on the host), each with its own workspace.
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (2, 32, 32), false, 0.0, 32);
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (4, 16, 16), true, 0.0, 33);
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (2, 16, 24), false, 0.0, 34);
    // Registers with an interpolated crop.
    let m = model(&micro(1, Some(0.5)), 35);
    let w = DeviceWeights::upload(&gpu, &m.params).unwrap();
    let mut gvit = GpuVit::new(&m.vit);
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (3, 24, 24), true, 0.0, 36);
}

#[test]
fn vit_without_blocks_matches_cpu() {
    // Depth 0: the embedding (patch GEMM, mask tokens, position embedding, registers) and the
    // final norm alone, at the construction size and an interpolated one.
    let Some(mut gpu) = gpu() else { return };
    let mut cfg = micro(3, Some(0.5));
    cfg.depth = 0;
    let m = model(&cfg, 71);
    let w = DeviceWeights::upload(&gpu, &m.params).unwrap();
    let mut gvit = GpuVit::new(&m.vit);
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (2, 32, 32), true, 0.0, 72);
    vit_matches_cpu(&mut gpu, &mut gvit, &m, &w, (2, 20, 28), true, 0.0, 73);
}

#[test]
fn inference_forward_matches_cpu_forward_inference() {
    let Some(mut gpu) = gpu() else { return };
    let m = model(&micro(2, Some(0.5)), 41);
    let w = DeviceWeights::upload(&gpu, &m.params).unwrap();
    let mut gvit = GpuVit::new(&m.vit);
    for (b, h, w_px) in [(2, 32, 32), (5, 24, 24)] {
        let images = uniform_vec(42 + b as u64, b * 3 * h * w_px, 1.0);
        let y = m
            .vit
            .forward_inference(&m.params, &images, b, h, w_px, None)
            .unwrap();
        let out = gvit
            .forward_inference(&mut gpu, &m.vit, &w, &images, b, h, w_px)
            .unwrap();
        check_outputs(&gpu, &format!("inference {b}x{h}x{w_px}"), out, &y);
        assert!(out.reg.is_some(), "two registers");
    }
    // Inference keeps no cache: backward at that size is refused with a typed error.
    let mut grads = gpu.alloc_zeros::<f32>(m.table.len()).unwrap();
    let d = gpu.alloc_zeros::<f32>(2 * 32).unwrap();
    let dp = gpu.alloc_zeros::<f32>(2 * 64 * 32).unwrap();
    let refused = gvit.backward(&mut gpu, &m.vit, &w, &mut grads, 2, 32, 32, &d, &dp);
    assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
}

#[test]
fn a_second_step_at_the_same_size_allocates_nothing_and_repeats_bit_for_bit() {
    let Some(mut gpu) = gpu() else { return };
    let m = model(&micro(2, Some(0.5)), 51);
    let w = DeviceWeights::upload(&gpu, &m.params).unwrap();
    let mut gvit = GpuVit::new(&m.vit);
    let (b, h, w_px) = (4, 32, 32);
    let n = 64;
    let d = m.vit.cfg.embed_dim;
    let images = uniform_vec(52, b * 3 * h * w_px, 1.0);
    let masks = random_masks(53, b * n);
    let d_cls = gpu.upload(&uniform_vec(54, b * d, 1.0)).unwrap();
    let d_patch = gpu.upload(&uniform_vec(55, b * n * d, 1.0)).unwrap();
    let step = |gpu: &mut CudaBackend, gvit: &mut GpuVit| {
        let mut rng = keyed(56, &[stream::DROP_PATH]);
        let dp = DropPath {
            rate: 0.5,
            rng: &mut rng,
        };
        let out = gvit
            .forward(gpu, &m.vit, &w, &images, b, h, w_px, Some(&masks), Some(dp))
            .unwrap();
        let cls = gpu.download(&out.cls).unwrap();
        let mut grads = gpu.alloc_zeros::<f32>(m.table.len()).unwrap();
        gvit.backward(gpu, &m.vit, &w, &mut grads, b, h, w_px, &d_cls, &d_patch)
            .unwrap();
        (cls, gpu.download(&grads).unwrap())
    };
    let first = step(&mut gpu, &mut gvit);
    let allocated = gvit.allocations();
    assert!(allocated > 0);
    let second = step(&mut gpu, &mut gvit);
    assert_eq!(gvit.allocations(), allocated, "the second step allocated");
    assert_eq!(
        first, second,
        "same inputs, same draws: bit-identical results"
    );
    // The output stays reachable by size after other sizes ran.
    gvit.forward_inference(
        &mut gpu,
        &m.vit,
        &w,
        &images[..2 * 3 * h * w_px],
        2,
        h,
        w_px,
    )
    .unwrap();
    assert!(
        gvit.allocations() > allocated,
        "a new size gets its own workspace"
    );
    let kept = gvit.output(b, h, w_px).unwrap();
    assert_eq!(gpu.download(&kept.cls).unwrap(), first.0);
}

#[test]
fn bad_inputs_and_swiglu_are_typed_errors() {
    let Some(mut gpu) = gpu() else { return };
    let m = model(&micro(0, None), 61);
    let w = DeviceWeights::upload(&gpu, &m.params).unwrap();
    let mut gvit = GpuVit::new(&m.vit);
    let images = uniform_vec(62, 2 * 3 * 32 * 32, 1.0);
    let short = gvit.forward(&mut gpu, &m.vit, &w, &images[1..], 2, 32, 32, None, None);
    assert!(matches!(short, Err(Error::Shape { .. })));
    let odd = gvit.forward(&mut gpu, &m.vit, &w, &images, 2, 30, 32, None, None);
    assert!(matches!(odd, Err(Error::Shape { .. })));
    let masks = vec![false; 3];
    let bad_masks = gvit.forward(&mut gpu, &m.vit, &w, &images, 2, 32, 32, Some(&masks), None);
    assert!(matches!(bad_masks, Err(Error::Shape { .. })));
    assert!(gvit.output(2, 32, 32).is_err(), "no forward has succeeded");
    // Workspaces belong to one architecture.
    let other = model(&micro(1, None), 64);
    let ow = DeviceWeights::upload(&gpu, &other.params).unwrap();
    let mixed = gvit.forward_inference(&mut gpu, &other.vit, &ow, &images, 2, 32, 32);
    assert!(matches!(mixed, Err(Error::Config(_))));

    let mut cfg = micro(0, None);
    cfg.ffn = Ffn::SwiGlu { hidden: 128 };
    let g = model(&cfg, 63);
    let gw = DeviceWeights::upload(&gpu, &g.params).unwrap();
    let mut gg = GpuVit::new(&g.vit);
    let refused = gg.forward_inference(&mut gpu, &g.vit, &gw, &images, 2, 32, 32);
    assert!(matches!(refused, Err(Error::Unsupported(m)) if m.contains("SwiGLU")));
}
