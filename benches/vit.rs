//! CPU throughput on ViT-S shapes: the GEMMs of one block (GFLOP/s) and a ViT-S/14 training
//! forward + backward at 224 px, batch 8 (images/s; GFLOP/s = images/s × the FLOPs printed).
//!
//! `cargo bench --bench vit -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dinotrain::backend::cpu::{matmul, CpuBackend, Transpose};
use dinotrain::backend::prelude::*;
use dinotrain::backend::Gemm;
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::presets::Preset;
use dinotrain::nn::vit::Vit;
use dinotrain::nn::{ImageGrad, OutputGrads, VitWorkspaces};
use dinotrain::rng::{keyed, stream};
use std::hint::black_box;

fn random(n: usize, seed: u64) -> Vec<f32> {
    dinotrain::rng::uniform_vec(seed, n, 1.0)
}

/// `[8·257, 384] × [384, 1152]` (qkv), `× [384, 1536]` (fc1), `[8·257, 1536] × [1536, 384]` (fc2),
/// each as the forward uses it (`x · Wᵀ`, weight `[out, in]`).
fn gemm(c: &mut Criterion) {
    let rows = 8 * 257;
    let mut group = c.benchmark_group("gemm_vits");
    group.sample_size(10);
    for (name, k, n) in [("qkv", 384, 1152), ("fc1", 384, 1536), ("fc2", 1536, 384)] {
        let a = random(rows * k, 1);
        let w = random(n * k, 2);
        let mut out = vec![0f32; rows * n];
        group.throughput(Throughput::Elements((2 * rows * k * n) as u64)); // FLOP
        group.bench_function(BenchmarkId::new(name, format!("{rows}x{k}x{n}")), |bch| {
            bch.iter(|| {
                let g = Gemm::nn(rows, k, n).t(Transpose::No, Transpose::Yes);
                matmul(&mut out, black_box(&a), &w, g);
            })
        });
    }
    group.finish();
}

fn vit_small(c: &mut Criterion) {
    let (b, h, w) = (8, 224, 224);
    let cfg = Preset::Small.config(224, 14, 0);
    let mut table = ParamTable::new();
    let vit = Vit::new(&cfg, &mut table, "backbone.");
    let params = table.init(&mut keyed(0, &[stream::INIT]));
    let images = random(b * 3 * h * w, 3);
    let n = (h / 14) * (w / 14);
    let d = cfg.embed_dim;
    let d_cls = random(b * d, 4);
    let d_patch = random(b * n * d, 5);
    let fwd = vit.forward_flops(h, w);
    eprintln!(
        "ViT-S/14 224 px: {:.2} GFLOP forward per image, {:.1} GFLOP per batch-8 step (forward + 2x backward)",
        fwd / 1e9,
        3.0 * fwd * b as f64 / 1e9
    );
    let mut grads = vec![0f32; table.len()];
    let mut be = CpuBackend::default();
    let wts = be.weights(&params).unwrap();
    let mut ws = VitWorkspaces::new(&vit);
    let mut group = c.benchmark_group("vit_s14_224_b8");
    group.sample_size(10);
    group.throughput(Throughput::Elements(b as u64)); // images
    group.bench_function("forward_backward", |bch| {
        bch.iter(|| {
            ws.forward(&mut be, &vit, &wts, &images, (b, h, w), None, None)
                .unwrap();
            let d = OutputGrads::<CpuBackend> {
                cls: &d_cls,
                patch: &d_patch,
                reg: None,
            };
            ws.backward(
                &mut be,
                &vit,
                &wts,
                &mut grads,
                (b, h, w),
                d,
                ImageGrad::Skip,
            )
            .unwrap()
        })
    });
    group.bench_function("forward_inference", |bch| {
        bch.iter(|| {
            ws.forward_inference(&mut be, &vit, &wts, &images, (b, h, w))
                .map(drop)
                .unwrap()
        })
    });
    group.finish();
}

/// The CPU demo model (D 192, depth 6, 3 heads, patch 4) on one training step's crops for 64
/// images: 2 global crops of 32 px and 8 local crops of 16 px, forward + backward.
fn vit_tiny(c: &mut Criterion) {
    let n_img = 64;
    let cfg = Preset::Tiny.config(32, 4, 0);
    let mut table = ParamTable::new();
    let vit = Vit::new(&cfg, &mut table, "backbone.");
    let params = table.init(&mut keyed(0, &[stream::INIT]));
    let d = cfg.embed_dim;
    let crops = [(2 * n_img, 32usize), (8 * n_img, 16usize)];
    let inputs: Vec<_> = crops
        .iter()
        .enumerate()
        .map(|(i, &(b, s))| {
            let n = (s / 4) * (s / 4);
            (
                b,
                s,
                random(b * 3 * s * s, 10 + i as u64),
                random(b * d, 20 + i as u64),
                random(b * n * d, 30 + i as u64),
            )
        })
        .collect();
    let flops: f64 = crops
        .iter()
        .map(|&(b, s)| 3.0 * b as f64 * vit.forward_flops(s, s))
        .sum();
    eprintln!(
        "tiny demo step: {:.1} GFLOP (student forward + backward, all crops)",
        flops / 1e9
    );
    let mut grads = vec![0f32; table.len()];
    let mut be = CpuBackend::default();
    let wts = be.weights(&params).unwrap();
    // One workspace per crop size, as the training step keeps them.
    let mut ws: Vec<VitWorkspaces<CpuBackend>> =
        inputs.iter().map(|_| VitWorkspaces::new(&vit)).collect();
    let mut group = c.benchmark_group("vit_tiny_demo_64img");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n_img as u64)); // images
    group.bench_function("student_forward_backward", |bch| {
        bch.iter(|| {
            for ((b, s, images, d_cls, d_patch), ws) in inputs.iter().zip(&mut ws) {
                let key = (*b, *s, *s);
                ws.forward(&mut be, &vit, &wts, images, key, None, None)
                    .unwrap();
                let d = OutputGrads::<CpuBackend> {
                    cls: d_cls,
                    patch: d_patch,
                    reg: None,
                };
                ws.backward(&mut be, &vit, &wts, &mut grads, key, d, ImageGrad::Skip)
                    .unwrap();
            }
        })
    });
    group.finish();
}

/// `DINOTRAIN_BENCH_PLAIN_MALLOC=1` measures without [`tune_allocator`] (for comparison).
fn setup() {
    if std::env::var_os("DINOTRAIN_BENCH_PLAIN_MALLOC").is_none() {
        dinotrain::backend::cpu::tune_allocator();
    }
}

fn all(c: &mut Criterion) {
    setup();
    gemm(c);
    vit_small(c);
    vit_tiny(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
