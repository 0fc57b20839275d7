//! Method kernels at official sizes: Sinkhorn-Knopp and the DINO loss at K = 65536 (2B = 16 and
//! 128 rows), AdamW and EMA over 22 M parameters (ViT-S + heads), reported as GB/s of traffic.
//!
//! `cargo bench --bench ssl -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dinotrain::backend::cpu::sinkhorn::sinkhorn_knopp;
use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::prelude::*;
use dinotrain::backend::{AdamWBuffers, AdamWStep};
use dinotrain::ssl::{dino_loss_forward_backward, Centering, DinoPairs, DinoStudent, TargetState};
use std::hint::black_box;

const K: usize = 65536;

fn random(n: usize, seed: u64) -> Vec<f32> {
    dinotrain::rng::uniform_vec(seed, n, 1.0)
}

fn bench_sinkhorn(c: &mut Criterion) {
    let mut g = c.benchmark_group("sinkhorn_knopp_k65536");
    for rows in [16usize, 128] {
        let t = random(rows * K, 1);
        let mut p = vec![0f32; rows * K];
        g.throughput(Throughput::Bytes((rows * K * 4) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, &rows| {
            b.iter(|| sinkhorn_knopp(&mut p, black_box(&t), rows, K, 0.07, 3).unwrap())
        });
    }
    g.finish();
}

/// Teacher targets plus the student cross-entropy forward and backward over the 2B global rows.
fn bench_dino_loss(c: &mut Criterion) {
    let mut g = c.benchmark_group("dino_loss_k65536");
    for rows in [16usize, 128] {
        let n_img = rows / 2;
        let s = random(rows * K, 2);
        let t = random(rows * K, 3);
        let mut p = vec![0f32; rows * K];
        let mut d = vec![0f32; rows * K];
        let mut terms = [0f32; 2];
        let mut be = CpuBackend::default();
        let mut pairs = DinoPairs::default();
        g.throughput(Throughput::Bytes((rows * K * 4) as u64));
        for (label, host) in [
            ("centering", Centering::softmax(K)),
            ("sinkhorn", Centering::sinkhorn_knopp()),
        ] {
            let mut cent = TargetState::new(&mut be, &host).unwrap();
            g.bench_with_input(BenchmarkId::new(label, rows), &rows, |b, &rows| {
                b.iter(|| {
                    cent.teacher_probs(&mut be, &mut p, black_box(&t), (rows, K), 0.07)
                        .unwrap();
                    let student = DinoStudent::<CpuBackend> {
                        global: &s,
                        local: &[],
                        d_global: &mut d,
                        d_local: &mut [],
                    };
                    let dims = (n_img, 0, K);
                    dino_loss_forward_backward(
                        &mut be, &mut pairs, &mut terms, student, &p, dims, 0.1, 1.0,
                    )
                    .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn bench_optimizer(c: &mut Criterion) {
    let n = 22_000_000;
    let mut p = random(n, 4);
    let grad = random(n, 5);
    let mut m = vec![0f32; n];
    let mut v = vec![0f32; n];
    let mut teacher = random(n, 6);
    let mut be = CpuBackend::default();
    let segments = be.segments(&[0], &[0], 1, n).unwrap();
    let mut g = c.benchmark_group("optimizer_22m");
    g.sample_size(10);
    // Traffic: AdamW reads p, g, m, v and writes p, m, v; EMA reads t, s and writes t.
    g.throughput(Throughput::Bytes((n * 4 * 7) as u64));
    let mut step = 0;
    g.bench_function("adamw", |b| {
        b.iter(|| {
            step += 1;
            let bufs = AdamWBuffers {
                params: &mut p[..],
                exp_avg: &mut m[..],
                exp_avg_sq: &mut v[..],
                grads: black_box(&grad[..]),
            };
            let hp = AdamWStep {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step,
            };
            be.adamw_update(bufs, &segments, &[1e-4], &[0.04], hp)
                .unwrap()
        })
    });
    g.throughput(Throughput::Bytes((n * 4 * 3) as u64));
    g.bench_function("ema", |b| {
        b.iter(|| be.ema_update(&mut teacher, black_box(&p), 0.994).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_sinkhorn, bench_dino_loss, bench_optimizer);
criterion_main!(benches);
