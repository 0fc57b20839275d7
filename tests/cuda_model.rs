//! The backbone on the CUDA backend against the same code on the CPU backend, layer by layer
//! then whole: one block forward/backward (with and without LayerScale, with batch-subset
//! stochastic depth, with SwiGLU, with attention head dims 8 and 4), the whole ViT
//! forward/backward (masks, registers, drop path, an interpolated crop size, SwiGLU with head
//! dim 8), the inference forward, and the workspace reuse. Every test skips without a GPU.
//!
//! The model code is one (`nn`, written over the `Backend` trait); each comparison runs it on
//! `CudaBackend` and on `CpuBackend` (f32) with the same seeded inputs, parameters and
//! drop-path draws, so the two differ only by precision: the GPU rounds GEMM operands and
//! attention inputs/outputs to bf16 (relative error about 2e-3 per rounding), everything else
//! is f32. Bounds are ‖gpu − cpu‖ / ‖cpu‖.

mod cuda_support;

use cuda_support::{gpu, rel_err, to_f64};
use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::cuda::CudaBackend;
use dinotrain::backend::prelude::*;
use dinotrain::nn::block::{Block, BlockConfig, BlockRunner};
use dinotrain::nn::drop_path::{draw_subset, DropPath, Subset};
use dinotrain::nn::ffn::Ffn;
use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::nn::presets::Preset;
use dinotrain::nn::vit::{Vit, VitConfig, VitOutput};
use dinotrain::nn::{ImageGrad, OutputGrads, VitWorkspaces};
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

/// A buffer of `be` holding `host`.
fn upload<B: Backend>(be: &mut B, host: &[f32]) -> B::BufF32 {
    let mut buf = be.alloc_f32(host.len()).unwrap();
    be.upload_f32(&mut buf, host).unwrap();
    buf
}

/// A GPU backbone's outputs against the CPU's: CLS, patch tokens, and the registers exactly
/// when the model has them.
fn check_outputs(name: &str, out: &VitOutput, y: &VitOutput) {
    check(&format!("{name} cls"), &out.cls, &y.cls, OUT_BOUND);
    check(&format!("{name} patch"), &out.patch, &y.patch, OUT_BOUND);
    if out.n_registers > 0 {
        check(&format!("{name} reg"), &out.reg, &y.reg, OUT_BOUND);
    } else {
        assert_eq!(y.n_registers, 0, "{name}: registers missing");
        assert!(out.reg.is_empty() && y.reg.is_empty(), "{name}: registers");
    }
}

/// The whole gradient, then each parameter's (skipping those whose gradient is negligible
/// next to the whole, where relative error means nothing).
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

/// One block's forward and backward on `be`: (output, input gradient, parameter gradients).
#[allow(clippy::too_many_arguments)]
fn block_run<B: Backend>(
    be: &mut B,
    blk: &Block,
    params: &[f32],
    x: &[f32],
    dy: &[f32],
    (b, t): (usize, usize),
    subsets: [Option<&Subset>; 2],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = be.weights(params).unwrap();
    let mut runner = BlockRunner::new(be, blk, b, t).unwrap();
    let mut xs = upload(be, x);
    runner.forward(be, blk, &w, &mut xs, subsets).unwrap();
    let mut dx = upload(be, dy);
    let mut grads = be.alloc_f32(params.len()).unwrap();
    runner.backward(be, blk, &w, &mut grads, &mut dx).unwrap();
    (
        be.download_f32(&xs).unwrap(),
        be.download_f32(&dx).unwrap(),
        be.download_f32(&grads).unwrap(),
    )
}

/// A block's FFN and head count on top of the MLP / head-dim-16 defaults.
#[derive(Clone, Copy, Debug)]
struct BlockKind {
    ffn: Ffn,
    num_heads: usize,
}

const MLP_HD16: BlockKind = BlockKind {
    ffn: Ffn::Mlp { hidden: 64 },
    num_heads: 2,
};

fn block_matches_cpu(kind: BlockKind, layerscale: Option<f32>, drop_rate: f32, seed: u64) {
    let Some(mut gpu) = gpu() else { return };
    let (b, t, d) = (4, 17, 32);
    let cfg = BlockConfig {
        dim: d,
        num_heads: kind.num_heads,
        ffn: kind.ffn,
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

    // The draws of the backbone's order (attention branch, then FFN branch), used by both.
    let mut rng = keyed(seed, &[stream::DROP_PATH]);
    let s_attn = draw_subset(b, drop_rate, &mut rng);
    let s_ffn = draw_subset(b, drop_rate, &mut rng);
    assert_eq!(s_attn.is_some(), drop_rate > 0.0);
    let subsets = [s_attn.as_ref(), s_ffn.as_ref()];
    let mut cpu = CpuBackend::default();
    let (x_cpu, dx_cpu, grads_cpu) = block_run(&mut cpu, &blk, &params, &x, &dy, (b, t), subsets);
    let (x_gpu, dx_gpu, grads_gpu) = block_run(&mut gpu, &blk, &params, &x, &dy, (b, t), subsets);

    // The residual carries x and dy through unchanged: compare what the block adds.
    let name = format!(
        "block ({:?}, {} heads, layerscale {layerscale:?}, drop {drop_rate})",
        kind.ffn, kind.num_heads
    );
    check(
        &format!("{name} out − x"),
        &delta(&x_gpu, &x),
        &delta(&x_cpu, &x),
        OUT_BOUND,
    );
    check(
        &format!("{name} dx − dy"),
        &delta(&dx_gpu, &dy),
        &delta(&dx_cpu, &dy),
        GRAD_BOUND,
    );
    check_grads(&name, &table, &grads_gpu, &grads_cpu);
}

#[test]
fn block_with_layerscale_matches_cpu() {
    block_matches_cpu(MLP_HD16, Some(0.5), 0.0, 11);
}

#[test]
fn block_without_layerscale_matches_cpu() {
    block_matches_cpu(MLP_HD16, None, 0.0, 12);
}

#[test]
fn block_with_drop_path_subsets_matches_cpu() {
    block_matches_cpu(MLP_HD16, Some(0.5), 0.5, 13);
    block_matches_cpu(MLP_HD16, None, 0.3, 14);
}

/// SwiGLU (ViT-g's FFN) runs on CUDA through its kernels: the same bounds as the MLP.
#[test]
fn block_with_swiglu_matches_cpu() {
    let swiglu = BlockKind {
        ffn: Ffn::SwiGlu { hidden: 64 },
        num_heads: 2,
    };
    block_matches_cpu(swiglu, Some(0.5), 0.0, 15);
    block_matches_cpu(swiglu, None, 0.5, 16);
}

/// Head dims that are not multiples of 16 run on the general attention kernels: the same bounds
/// as head dim 16.
#[test]
fn block_with_head_dims_8_and_4_matches_cpu() {
    for (num_heads, seed) in [(4, 17), (8, 18)] {
        let kind = BlockKind {
            ffn: Ffn::Mlp { hidden: 64 },
            num_heads,
        };
        block_matches_cpu(kind, Some(0.5), 0.0, seed);
    }
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

/// The inputs of one training forward and backward.
struct VitInputs {
    key: (usize, usize, usize),
    images: Vec<f32>,
    masks: Option<Vec<bool>>,
    drop_rate: f32,
    /// Seeds the drop-path draws.
    seed: u64,
    d_cls: Vec<f32>,
    d_patch: Vec<f32>,
    d_reg: Option<Vec<f32>>,
}

/// A model and its workspaces on one backend, reused across calls as a training run does.
struct OnBackend<'m, B: Backend> {
    be: B,
    m: &'m Model,
    w: B::Weights,
    ws: VitWorkspaces<B>,
}

impl<'m, B: Backend> OnBackend<'m, B> {
    fn new(mut be: B, m: &'m Model) -> Self {
        let w = be.weights(&m.params).unwrap();
        OnBackend {
            be,
            m,
            w,
            ws: VitWorkspaces::new(&m.vit),
        }
    }

    /// Training forward and backward: (outputs, parameter gradients, image gradient).
    fn train(&mut self, inp: &VitInputs) -> (VitOutput, Vec<f32>, Vec<f32>) {
        let (be, vit) = (&mut self.be, &self.m.vit);
        let mut rng = keyed(inp.seed, &[stream::DROP_PATH]);
        let dp = (inp.drop_rate > 0.0).then_some(DropPath {
            rate: inp.drop_rate,
            rng: &mut rng,
        });
        let out = self
            .ws
            .forward(
                be,
                vit,
                &self.w,
                &inp.images,
                inp.key,
                inp.masks.as_deref(),
                dp,
            )
            .unwrap()
            .to_host(be)
            .unwrap();
        let (d_cls, d_patch) = (upload(be, &inp.d_cls), upload(be, &inp.d_patch));
        let d_reg = inp.d_reg.as_ref().map(|v| upload(be, v));
        let mut grads = be.alloc_f32(self.m.table.len()).unwrap();
        let d = OutputGrads::<B> {
            cls: &d_cls,
            patch: &d_patch,
            reg: d_reg.as_deref(),
        };
        let dimages = self
            .ws
            .backward(be, vit, &self.w, &mut grads, inp.key, d, ImageGrad::Compute)
            .unwrap()
            .expect("image gradient asked for");
        (out, be.download_f32(&grads).unwrap(), dimages)
    }

    fn infer(&mut self, images: &[f32], key: (usize, usize, usize)) -> VitOutput {
        let (be, vit) = (&mut self.be, &self.m.vit);
        self.ws
            .forward_inference(be, vit, &self.w, images, key)
            .unwrap()
            .to_host(be)
            .unwrap()
    }
}

/// One training forward and backward on both backends, compared.
fn vit_matches_cpu(
    gpu: &mut OnBackend<'_, CudaBackend>,
    cpu: &mut OnBackend<'_, CpuBackend>,
    (b, h, w_px): (usize, usize, usize),
    masked: bool,
    drop_rate: f32,
    seed: u64,
) {
    let m = cpu.m;
    let cfg = &m.vit.cfg;
    let (d, r) = (cfg.embed_dim, cfg.num_register_tokens);
    let n = (h / cfg.patch_size) * (w_px / cfg.patch_size);
    let inp = VitInputs {
        key: (b, h, w_px),
        images: uniform_vec(seed + 1, b * 3 * h * w_px, 1.0),
        masks: masked.then(|| random_masks(seed, b * n)),
        drop_rate,
        seed,
        d_cls: uniform_vec(seed + 2, b * d, 1.0),
        d_patch: uniform_vec(seed + 3, b * n * d, 1.0),
        d_reg: (r > 0).then(|| uniform_vec(seed + 4, b * r * d, 1.0)),
    };
    let (y, grads_cpu, dimages_cpu) = cpu.train(&inp);
    let (out, grads_gpu, dimages) = gpu.train(&inp);
    assert_eq!(
        (out.b, out.n_patches, out.n_registers, out.dim),
        (b, n, r, d)
    );
    let name = format!(
        "vit {b}x{h}x{w_px} ({:?}, {} heads; masks {masked}, drop {drop_rate})",
        cfg.ffn, cfg.num_heads
    );
    check_outputs(&name, &out, &y);
    check(
        &format!("{name} d images"),
        &dimages,
        &dimages_cpu,
        GRAD_BOUND,
    );
    check_grads(&name, &m.table, &grads_gpu, &grads_cpu);
}

#[test]
fn vit_with_masks_registers_and_drop_path_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let m = model(&micro(2, Some(0.5)), 21);
    let mut g = OnBackend::new(gpu, &m);
    let mut c = OnBackend::new(CpuBackend::default(), &m);
    vit_matches_cpu(&mut g, &mut c, (3, 32, 32), true, 0.4, 22);
    // A batch that keeps several samples per branch (int(6 · 0.5) = 3).
    vit_matches_cpu(&mut g, &mut c, (6, 32, 32), true, 0.5, 23);
}

#[test]
fn vit_at_crop_sizes_that_interpolate_the_position_embedding_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let m = model(&micro(0, None), 31);
    let mut g = OnBackend::new(gpu, &m);
    let mut c = OnBackend::new(CpuBackend::default(), &m);
    // The construction size (identity plan), a smaller square crop and a non-square one (both
    // resampled), each with its own workspace.
    vit_matches_cpu(&mut g, &mut c, (2, 32, 32), false, 0.0, 32);
    vit_matches_cpu(&mut g, &mut c, (4, 16, 16), true, 0.0, 33);
    vit_matches_cpu(&mut g, &mut c, (2, 16, 24), false, 0.0, 34);
    // Registers with an interpolated crop.
    let m = model(&micro(1, Some(0.5)), 35);
    let mut g = OnBackend::new(g.be, &m);
    let mut c = OnBackend::new(CpuBackend::default(), &m);
    vit_matches_cpu(&mut g, &mut c, (3, 24, 24), true, 0.0, 36);
}

#[test]
fn vit_without_blocks_matches_cpu() {
    // Depth 0: the embedding (patch GEMM, mask tokens, position embedding, registers) and the
    // final norm alone, at the construction size and an interpolated one.
    let Some(gpu) = gpu() else { return };
    let mut cfg = micro(3, Some(0.5));
    cfg.depth = 0;
    let m = model(&cfg, 71);
    let mut g = OnBackend::new(gpu, &m);
    let mut c = OnBackend::new(CpuBackend::default(), &m);
    vit_matches_cpu(&mut g, &mut c, (2, 32, 32), true, 0.0, 72);
    vit_matches_cpu(&mut g, &mut c, (2, 20, 28), true, 0.0, 73);
}

/// A SwiGLU backbone with head dim 8 (4 heads of D 32), as the `vit_forward-swiglu-hd8` fixture:
/// it runs on CUDA and matches the CPU within the MLP / head-dim-16 bounds; and an MLP backbone
/// with head dim 4.
#[test]
fn vit_with_swiglu_and_small_head_dims_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut cfg = micro(1, Some(0.5));
    cfg.ffn = Ffn::SwiGlu { hidden: 128 };
    cfg.num_heads = 4;
    let m = model(&cfg, 91);
    let mut g = OnBackend::new(gpu, &m);
    let mut c = OnBackend::new(CpuBackend::default(), &m);
    vit_matches_cpu(&mut g, &mut c, (3, 32, 32), true, 0.4, 92);
    vit_matches_cpu(&mut g, &mut c, (2, 24, 24), false, 0.0, 93);
    let mut cfg = micro(0, Some(0.5));
    cfg.num_heads = 8;
    let m = model(&cfg, 94);
    let mut g = OnBackend::new(g.be, &m);
    let mut c = OnBackend::new(CpuBackend::default(), &m);
    vit_matches_cpu(&mut g, &mut c, (2, 32, 32), true, 0.0, 95);
}

#[test]
fn inference_forward_matches_cpu_forward_inference() {
    let Some(gpu) = gpu() else { return };
    let m = model(&micro(2, Some(0.5)), 41);
    let mut g = OnBackend::new(gpu, &m);
    let mut c = OnBackend::new(CpuBackend::default(), &m);
    for (b, h, w_px) in [(2, 32, 32), (5, 24, 24)] {
        let images = uniform_vec(42 + b as u64, b * 3 * h * w_px, 1.0);
        let y = c.infer(&images, (b, h, w_px));
        let out = g.infer(&images, (b, h, w_px));
        check_outputs(&format!("inference {b}x{h}x{w_px}"), &out, &y);
        assert_eq!(out.n_registers, 2, "two registers");
        assert_eq!(out.reg.len(), b * 2 * m.vit.cfg.embed_dim);
    }
    // Inference keeps no cache: backward at that size is refused with a typed error.
    let be = &mut g.be;
    let mut grads = be.alloc_f32(m.table.len()).unwrap();
    let d = be.alloc_f32(2 * 32).unwrap();
    let dp = be.alloc_f32(2 * 64 * 32).unwrap();
    let dout = OutputGrads::<CudaBackend> {
        cls: &d,
        patch: &dp,
        reg: None,
    };
    let refused = g.ws.backward(
        be,
        &m.vit,
        &g.w,
        &mut grads,
        (2, 32, 32),
        dout,
        ImageGrad::Skip,
    );
    assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
}

#[test]
fn a_second_step_at_the_same_size_allocates_nothing_and_repeats_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let m = model(&micro(2, Some(0.5)), 51);
    let mut g = OnBackend::new(gpu, &m);
    let (b, h, w_px) = (4, 32, 32);
    let n = 64;
    let d = m.vit.cfg.embed_dim;
    let images = uniform_vec(52, b * 3 * h * w_px, 1.0);
    let masks = random_masks(53, b * n);
    let be = &mut g.be;
    let d_cls = upload(be, &uniform_vec(54, b * d, 1.0));
    let d_patch = upload(be, &uniform_vec(55, b * n * d, 1.0));
    let mut grads = be.alloc_f32(m.table.len()).unwrap();
    let step = |g: &mut OnBackend<'_, CudaBackend>, grads: &mut <CudaBackend as Buffers>::F32| {
        let (be, vit) = (&mut g.be, &m.vit);
        let mut rng = keyed(56, &[stream::DROP_PATH]);
        let dp = DropPath {
            rate: 0.5,
            rng: &mut rng,
        };
        let key = (b, h, w_px);
        let out =
            g.ws.forward(be, vit, &g.w, &images, key, Some(&masks), Some(dp))
                .unwrap();
        let cls = be.download_f32(&out.cls).unwrap();
        be.zero_f32(grads).unwrap();
        let dout = OutputGrads::<CudaBackend> {
            cls: &d_cls,
            patch: &d_patch,
            reg: None,
        };
        g.ws.backward(be, vit, &g.w, grads, key, dout, ImageGrad::Skip)
            .unwrap();
        (cls, be.download_f32(grads).unwrap())
    };
    let before = g.be.counters().allocations;
    let first = step(&mut g, &mut grads);
    let allocated = g.be.counters().allocations;
    assert!(allocated > before, "the first step allocated its workspace");
    let second = step(&mut g, &mut grads);
    assert_eq!(
        g.be.counters().allocations,
        allocated,
        "the second step allocated"
    );
    assert_eq!(
        first, second,
        "same inputs, same draws: bit-identical results"
    );
    // The output stays reachable by size after other sizes ran.
    g.infer(&images[..2 * 3 * h * w_px], (2, h, w_px));
    assert!(
        g.be.counters().allocations > allocated,
        "a new size gets its own workspace"
    );
    let kept = g.ws.output((b, h, w_px)).unwrap();
    assert_eq!(g.be.download_f32(&kept.cls).unwrap(), first.0);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let m = model(&micro(0, None), 61);
    let mut g = OnBackend::new(gpu, &m);
    let (be, vit, w) = (&mut g.be, &m.vit, &g.w);
    let images = uniform_vec(62, 2 * 3 * 32 * 32, 1.0);
    let short =
        g.ws.forward(be, vit, w, &images[1..], (2, 32, 32), None, None);
    assert!(matches!(short, Err(Error::Shape { .. })));
    let odd = g.ws.forward(be, vit, w, &images, (2, 30, 32), None, None);
    assert!(matches!(odd, Err(Error::Shape { .. })));
    let masks = vec![false; 3];
    let bad_masks =
        g.ws.forward(be, vit, w, &images, (2, 32, 32), Some(&masks), None);
    assert!(matches!(bad_masks, Err(Error::Shape { .. })));
    assert!(
        g.ws.output((2, 32, 32)).is_err(),
        "no forward has succeeded"
    );
    // Workspaces belong to one architecture.
    let other = model(&micro(1, None), 64);
    let ow = be.weights(&other.params).unwrap();
    let mixed =
        g.ws.forward_inference(be, &other.vit, &ow, &images, (2, 32, 32));
    assert!(matches!(mixed, Err(Error::Config(_))));
}
