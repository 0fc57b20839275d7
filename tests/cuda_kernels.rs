//! GPU-vs-reference tests of the transformer kernels (GEMM, attention, LayerNorm, elementwise).
//! Each test skips with a message when there is no usable GPU; the first test runs everywhere.
//!
//! References are written here in f64 on the exact values the kernels see (bf16 inputs are
//! rounded first). Bounds are `‖out − ref‖ / ‖ref‖`: bf16 outputs carry about 2e-3 from their
//! own rounding, f32 paths about 1e-6.

mod cuda_support;

use cuda_support::{assert_close, gpu, randn, round_bf16, to_f64, uniform};
use dinotrain::backend::cpu::{Accumulate, Transpose};
use dinotrain::backend::cuda::{
    all_precompiled, bf16, compile_source_with_nvrtc, resolve_device, AttentionKernels,
    AttentionShape, CudaBackend, EpilogueRun, GemmPath, GemmStats, GradWrite, KernelFamily,
    LtOutcome, NormShape, ReduceOp, ResolvedDevice, GENERAL_MAX_HEAD_DIM,
};
use dinotrain::backend::Device;
use dinotrain::Error;

#[test]
fn backend_reports_a_typed_error_or_opens_the_device() {
    // Runs everywhere: without a driver or device this must be Error::Cuda, never a panic.
    match CudaBackend::new(0) {
        Ok(backend) => {
            eprintln!("GPU present: {}", backend.describe().unwrap());
            assert!(matches!(
                resolve_device(Device::Auto).unwrap(),
                ResolvedDevice::Cuda(_)
            ));
        }
        Err(Error::Cuda(msg)) => {
            eprintln!("no GPU here: {msg}");
            assert!(msg.contains("cpu") || msg.contains("CUDA") || msg.contains("device"));
            assert!(matches!(
                resolve_device(Device::Cpu).unwrap(),
                ResolvedDevice::Cpu
            ));
            assert!(matches!(
                resolve_device(Device::Auto).unwrap(),
                ResolvedDevice::Cpu
            ));
            assert!(matches!(
                resolve_device(Device::Cuda(0)),
                Err(Error::Cuda(_))
            ));
        }
        Err(other) => panic!("expected Error::Cuda, got {other:?}"),
    }
    assert!(matches!(CudaBackend::new(1 << 20), Err(Error::Cuda(_))));
}

#[test]
fn every_kernel_family_is_embedded() {
    for family in KernelFamily::ALL {
        let embedded = family.embedded().expect("embedded by build.rs");
        assert!(embedded.source.contains("__global__"), "{family:?}");
    }
    // CI builds with DINOTRAIN_REQUIRE_NVCC=1: every family must then carry a fatbin.
    if option_env!("DINOTRAIN_REQUIRE_NVCC") == Some("1") {
        assert!(
            all_precompiled(),
            "nvcc was required but a fatbin is missing"
        );
    }
}

#[test]
fn nvrtc_fallback_compiles_every_embedded_kernel() {
    // NVRTC needs no GPU: wherever libnvrtc is on the library path, the run-time fallback of a
    // build without nvcc is checked here (the kernels must avoid every system header).
    for family in KernelFamily::ALL {
        let embedded = family.embedded().expect("embedded by build.rs");
        match compile_source_with_nvrtc(embedded, "compute_90") {
            Ok(ptx) => assert!(
                ptx.to_src().contains(".entry"),
                "{family:?}: no kernel entry in the PTX"
            ),
            Err(Error::Cuda(msg)) if msg.contains("not found") => {
                eprintln!("skipping: {msg}");
                return;
            }
            Err(e) => panic!("{family:?}: {e}"),
        }
    }
}

// ---- GEMM ---------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn gemm_reference(
    c: &mut [f64],
    a: &[f32],
    ta: Transpose,
    b: &[f32],
    tb: Transpose,
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                let av = match ta {
                    Transpose::No => a[i * k + p],
                    Transpose::Yes => a[p * m + i],
                };
                let bv = match tb {
                    Transpose::No => b[p * n + j],
                    Transpose::Yes => b[j * k + p],
                };
                acc += av as f64 * bv as f64;
            }
            c[i * n + j] += acc;
        }
    }
}

/// An f64 reference as a kernel that rounds its f32 result to bf16 stores it.
fn rounded_bf16(reference: &[f64]) -> Vec<f64> {
    let as_f32: Vec<f32> = reference.iter().map(|&v| v as f32).collect();
    to_f64(&round_bf16(&as_f32))
}

/// Both GEMM libraries: cuBLASLt (with its cuBLAS fallback) and cuBLAS alone.
const PATHS: [GemmPath; 2] = [GemmPath::CublasLt, GemmPath::Cublas];

#[test]
fn gemm_bf16_matches_f64_in_every_transpose_layout() {
    let Some(mut gpu) = gpu() else { return };
    let (m, k, n) = (70, 96, 50);
    for path in PATHS {
        gpu.set_gemm_path(path);
        for (case, (ta, tb)) in [
            (Transpose::No, Transpose::No),
            (Transpose::No, Transpose::Yes),
            (Transpose::Yes, Transpose::No),
            (Transpose::Yes, Transpose::Yes),
        ]
        .into_iter()
        .enumerate()
        {
            let a = round_bf16(&randn(10 + case as u64, m * k, 1.0));
            let b = round_bf16(&randn(20 + case as u64, k * n, 1.0));
            let c0 = randn(30 + case as u64, m * n, 1.0);
            let (da, db) = (gpu.upload_bf16(&a).unwrap(), gpu.upload_bf16(&b).unwrap());
            let mut dc = gpu.upload(&c0).unwrap();
            let before = gpu.gemm_stats();
            gpu.matmul_bf16(&mut dc, &da, ta, &db, tb, m, k, n, Accumulate::Add)
                .unwrap();
            let ran = gemms_since(&gpu, before);
            assert_eq!(
                ran.cublaslt + ran.cublas,
                1,
                "{path:?}: one GEMM, counted once"
            );
            if path == GemmPath::Cublas {
                assert_eq!(ran.cublas, 1, "the cuBLAS path never calls cuBLASLt");
            }
            let mut reference = to_f64(&c0);
            gemm_reference(&mut reference, &a, ta, &b, tb, m, k, n);
            // Exact bf16 products, f32 accumulation over k = 96 (tensor cores may align partial
            // sums with truncation: allow 1e-4, still far below bf16 rounding).
            assert_close(
                &format!("gemm {path:?} {ta:?} {tb:?} ({ran})"),
                &gpu.download(&dc).unwrap(),
                &reference,
                1e-4,
            );
        }
    }
}

/// What ran since `before`.
fn gemms_since(gpu: &CudaBackend, before: GemmStats) -> GemmStats {
    gpu.gemm_stats().since(&before)
}

/// The emulated device's cuBLASLt has an algorithm for every valid problem, so there every
/// epilogue must fuse; a GPU's may decline some (then the separate kernel is checked).
fn is_emulated(gpu: &CudaBackend) -> bool {
    gpu.describe().is_ok_and(|d| d.contains("emulated"))
}

#[test]
fn gemm_bias_epilogue_matches_f64_fused_or_separate() {
    let Some(mut gpu) = gpu() else { return };
    let (m, k, n) = (66, 96, 48);
    let x = round_bf16(&randn(40, m * k, 1.0)); // [m, k] activations
    let w = round_bf16(&randn(41, n * k, 0.2)); // [n, k] weight
    let bias = randn(42, n, 1.0);
    let mut reference = vec![0.0f64; m * n];
    gemm_reference(
        &mut reference,
        &x,
        Transpose::No,
        &w,
        Transpose::Yes,
        m,
        k,
        n,
    );
    for (i, r) in reference.iter_mut().enumerate() {
        *r += bias[i % n] as f64;
    }
    let (dx, dw) = (gpu.upload_bf16(&x).unwrap(), gpu.upload_bf16(&w).unwrap());
    for path in PATHS {
        gpu.set_gemm_path(path);
        // The bias at element offset 0 (256-byte aligned) and 1 (4 bytes: never fused).
        for shift in [0usize, 1] {
            let mut holder = vec![f32::NAN; shift];
            holder.extend_from_slice(&bias);
            let holder = gpu.upload(&holder).unwrap();
            let bias_view = gpu.sub(&holder, shift..shift + n).unwrap();
            let mut dc = gpu.upload(&vec![f32::NAN; m * n]).unwrap(); // overwritten
            let before = gpu.gemm_stats();
            gpu.matmul_bf16_bias(&mut dc, &dx, &dw, Transpose::Yes, Some(&bias_view), m, k, n)
                .unwrap();
            let ran = gemms_since(&gpu, before);
            assert_eq!(ran.fused_epilogues + ran.separate_epilogues, 1, "{ran}");
            if path == GemmPath::Cublas || shift == 1 {
                assert_eq!(ran.separate_epilogues, 1, "{path:?}, shift {shift}: {ran}");
            } else if is_emulated(&gpu) {
                assert_eq!(ran.fused_epilogues, 1, "{ran}");
            }
            assert_close(
                &format!("gemm+bias {path:?} shift {shift} ({ran})"),
                &gpu.download(&dc).unwrap(),
                &reference,
                1e-4,
            );
        }
    }
}

#[test]
fn gemm_to_bf16_rounds_the_biased_f32_result_once() {
    let Some(mut gpu) = gpu() else { return };
    let (m, k, n) = (40, 64, 56);
    let x = round_bf16(&randn(60, m * k, 1.0));
    let w = round_bf16(&randn(61, n * k, 0.2));
    let bias = randn(62, n, 1.0);
    let (dx, dw, dbias) = (
        gpu.upload_bf16(&x).unwrap(),
        gpu.upload_bf16(&w).unwrap(),
        gpu.upload(&bias).unwrap(),
    );
    for with_bias in [true, false] {
        let mut reference = vec![0.0f64; m * n];
        gemm_reference(
            &mut reference,
            &x,
            Transpose::No,
            &w,
            Transpose::Yes,
            m,
            k,
            n,
        );
        if with_bias {
            for (i, r) in reference.iter_mut().enumerate() {
                *r += bias[i % n] as f64;
            }
        }
        for path in PATHS {
            gpu.set_gemm_path(path);
            let untouched = vec![bf16::from_f32(7.0); m * n];
            let mut dc = gpu.upload(&untouched).unwrap();
            let outcome = gpu
                .matmul_bf16_to_bf16(
                    &mut dc,
                    &dx,
                    &dw,
                    Transpose::Yes,
                    with_bias.then_some(&dbias),
                    m,
                    k,
                    n,
                )
                .unwrap();
            let got = gpu.download_bf16(&dc).unwrap();
            let name = format!("gemm to bf16 {path:?}, bias {with_bias}");
            match outcome {
                LtOutcome::Done => {
                    assert_eq!(
                        path,
                        GemmPath::CublasLt,
                        "{name}: cuBLAS has no bf16 output path"
                    );
                    // The f32 result rounded once: as the reference rounded to bf16, but for
                    // values whose f32 sum lands across a rounding boundary (one bf16 step).
                    assert_close(&name, &got, &rounded_bf16(&reference), 1e-3);
                }
                LtOutcome::Unsupported => {
                    assert!(
                        path == GemmPath::Cublas || !is_emulated(&gpu),
                        "{name}: the emulated cuBLASLt writes bf16"
                    );
                    assert!(
                        got.iter().all(|&v| v == 7.0),
                        "{name}: wrote without saying so"
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_row_sums_epilogue_accumulates_the_bias_gradient() {
    let Some(mut gpu) = gpu() else { return };
    // A linear layer's backward: dW[out, in] += doutᵀ · inp, db[out] += Σ_rows dout.
    let (rows, inp_dim, out_dim) = (90, 40, 24);
    let dout = round_bf16(&randn(50, rows * out_dim, 1.0)); // [rows, out]
    let inp = round_bf16(&randn(51, rows * inp_dim, 1.0)); // [rows, in]
    let dw0 = randn(52, out_dim * inp_dim, 1.0);
    let db0 = randn(53, out_dim, 1.0);
    let mut dw_ref = to_f64(&dw0);
    gemm_reference(
        &mut dw_ref,
        &dout,
        Transpose::Yes,
        &inp,
        Transpose::No,
        out_dim,
        rows,
        inp_dim,
    );
    let mut db_ref = to_f64(&db0);
    for r in 0..rows {
        for (o, acc) in db_ref.iter_mut().enumerate() {
            *acc += dout[r * out_dim + o] as f64;
        }
    }
    let (d_dout, d_inp) = (
        gpu.upload_bf16(&dout).unwrap(),
        gpu.upload_bf16(&inp).unwrap(),
    );
    for path in PATHS {
        gpu.set_gemm_path(path);
        let mut dw = gpu.upload(&dw0).unwrap();
        let mut db = gpu.upload(&db0).unwrap();
        let before = gpu.gemm_stats();
        let run = gpu
            .matmul_bf16_with_row_sums(
                &mut dw,
                &d_dout,
                Transpose::Yes,
                &d_inp,
                Transpose::No,
                out_dim,
                rows,
                inp_dim,
                Accumulate::Add,
                Some(&mut db),
            )
            .unwrap();
        let ran = gemms_since(&gpu, before);
        let name = format!("gemm+row sums {path:?} ({ran})");
        assert_close(
            &format!("{name} dW"),
            &gpu.download(&dw).unwrap(),
            &dw_ref,
            1e-4,
        );
        match run {
            EpilogueRun::Fused => {
                assert_eq!(path, GemmPath::CublasLt, "cuBLAS cannot fuse");
                assert_eq!(ran.fused_epilogues, 1, "{ran}");
                // Sums of bf16 values in f32 over 90 rows.
                assert_close(
                    &format!("{name} db"),
                    &gpu.download(&db).unwrap(),
                    &db_ref,
                    1e-5,
                );
            }
            EpilogueRun::Separate => {
                assert!(
                    path == GemmPath::Cublas || !is_emulated(&gpu),
                    "the emulated cuBLASLt fuses every bias gradient"
                );
                assert_eq!(ran.separate_epilogues, 1, "{ran}");
                assert_eq!(
                    gpu.download(&db).unwrap(),
                    db0,
                    "{name}: sums left to the caller"
                );
            }
        }
    }
}

// ---- attention ----------------------------------------------------------------------------

struct HeadView<'a> {
    qkv: &'a [f64],
    s: AttentionShape,
}

impl HeadView<'_> {
    fn at(&self, b: usize, t: usize, which: usize, h: usize, d: usize) -> f64 {
        let s = &self.s;
        self.qkv[((b * s.tokens + t) * 3 + which) * s.heads * s.head_dim + h * s.head_dim + d]
    }
}

/// Softmax probabilities `[T, T]` of one (image, head).
fn attention_probs(v: &HeadView, b: usize, h: usize) -> (Vec<f64>, Vec<f64>) {
    let (t, hd) = (v.s.tokens, v.s.head_dim);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut p = vec![0.0f64; t * t];
    let mut lse = vec![0.0f64; t];
    for i in 0..t {
        let row = &mut p[i * t..(i + 1) * t];
        for (j, x) in row.iter_mut().enumerate() {
            *x = (0..hd)
                .map(|d| v.at(b, i, 0, h, d) * v.at(b, j, 1, h, d))
                .sum::<f64>()
                * scale;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
        lse[i] = max + sum.ln();
        row.iter_mut().for_each(|x| *x = (*x - lse[i]).exp());
    }
    (p, lse)
}

/// f64 reference forward: `out [B,T,H,hd]` and `lse [B,H,T]`.
fn attention_forward_reference(qkv: &[f64], s: AttentionShape) -> (Vec<f64>, Vec<f64>) {
    let view = HeadView { qkv, s };
    let (t, hd, nh) = (s.tokens, s.head_dim, s.heads);
    let mut out = vec![0.0f64; s.out_len()];
    let mut lse = vec![0.0f64; s.stats_len()];
    for b in 0..s.batch {
        for h in 0..nh {
            let (p, lse_row) = attention_probs(&view, b, h);
            lse[(b * nh + h) * t..(b * nh + h + 1) * t].copy_from_slice(&lse_row);
            for i in 0..t {
                for d in 0..hd {
                    out[(b * t + i) * nh * hd + h * hd + d] =
                        (0..t).map(|j| p[i * t + j] * view.at(b, j, 2, h, d)).sum();
                }
            }
        }
    }
    (out, lse)
}

/// f64 reference backward: `dqkv [B,T,3,H,hd]` of `L = sum(out * dout)`.
fn attention_backward_reference(qkv: &[f64], dout: &[f64], s: AttentionShape) -> Vec<f64> {
    let view = HeadView { qkv, s };
    let (t, hd, nh) = (s.tokens, s.head_dim, s.heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut dqkv = vec![0.0f64; s.qkv_len()];
    let idx = |b: usize, tok: usize, which: usize, h: usize, d: usize| {
        ((b * t + tok) * 3 + which) * nh * hd + h * hd + d
    };
    let dout_at =
        |b: usize, tok: usize, h: usize, d: usize| dout[(b * t + tok) * nh * hd + h * hd + d];
    for b in 0..s.batch {
        for h in 0..nh {
            let (p, _) = attention_probs(&view, b, h);
            let mut ds = vec![0.0f64; t * t]; // d loss / d (scaled logits)
            for i in 0..t {
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..hd)
                            .map(|d| dout_at(b, i, h, d) * view.at(b, j, 2, h, d))
                            .sum()
                    })
                    .collect();
                let delta_i: f64 = (0..t).map(|j| p[i * t + j] * dp[j]).sum();
                for j in 0..t {
                    ds[i * t + j] = p[i * t + j] * (dp[j] - delta_i);
                }
            }
            for i in 0..t {
                for d in 0..hd {
                    dqkv[idx(b, i, 0, h, d)] = scale
                        * (0..t)
                            .map(|j| ds[i * t + j] * view.at(b, j, 1, h, d))
                            .sum::<f64>();
                    dqkv[idx(b, i, 1, h, d)] = scale
                        * (0..t)
                            .map(|j| ds[j * t + i] * view.at(b, j, 0, h, d))
                            .sum::<f64>();
                    dqkv[idx(b, i, 2, h, d)] = (0..t)
                        .map(|j| p[j * t + i] * dout_at(b, j, h, d))
                        .sum::<f64>();
                }
            }
        }
    }
    dqkv
}

#[test]
fn attention_reference_gradient_matches_finite_differences() {
    // Runs everywhere: the f64 reference the GPU tests trust is itself checked here.
    let s = AttentionShape {
        batch: 2,
        tokens: 5,
        heads: 2,
        head_dim: 16,
    };
    let qkv = to_f64(&randn(7, s.qkv_len(), 1.0));
    let dout = to_f64(&randn(8, s.out_len(), 1.0));
    let grad = attention_backward_reference(&qkv, &dout, s);
    let objective = |x: &[f64]| -> f64 {
        let (out, _) = attention_forward_reference(x, s);
        out.iter().zip(&dout).map(|(o, g)| o * g).sum()
    };
    let step = 1e-6;
    for i in (0..s.qkv_len()).step_by(3) {
        let (mut plus, mut minus) = (qkv.clone(), qkv.clone());
        plus[i] += step;
        minus[i] -= step;
        let numeric = (objective(&plus) - objective(&minus)) / (2.0 * step);
        assert!(
            (numeric - grad[i]).abs() < 1e-6 * (1.0 + grad[i].abs()),
            "dqkv[{i}]: {numeric} vs {}",
            grad[i]
        );
    }
    // lse is the log of the softmax denominator: exp(logit - lse) sums to one per row.
    let (_, lse) = attention_forward_reference(&qkv, s);
    let view = HeadView { qkv: &qkv, s };
    let (p, lse_row) = attention_probs(&view, 1, 1);
    assert_eq!(&lse[(2 + 1) * 5..(2 + 2) * 5], &lse_row[..]);
    for i in 0..5 {
        assert!((p[i * 5..(i + 1) * 5].iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

fn run_attention_forward(gpu: &CudaBackend, s: AttentionShape, seed: u64) {
    let qkv = round_bf16(&randn(seed, s.qkv_len(), 1.0));
    let d_qkv = gpu.upload_bf16(&qkv).unwrap();
    let mut out = gpu.alloc_zeros::<bf16>(s.out_len()).unwrap();
    let mut lse = gpu.alloc_zeros::<f32>(s.stats_len()).unwrap();
    gpu.attention_forward(&mut out, &mut lse, &d_qkv, s)
        .unwrap();
    let (ref_out, ref_lse) = attention_forward_reference(&to_f64(&qkv), s);
    // bf16 output and bf16 probabilities in P·V: about 2e-3 each.
    assert_close(
        &format!("attention out {s:?}"),
        &gpu.download_bf16(&out).unwrap(),
        &ref_out,
        1e-2,
    );
    assert_close(
        &format!("attention lse {s:?}"),
        &gpu.download(&lse).unwrap(),
        &ref_lse,
        1e-5,
    );
}

#[test]
fn attention_forward_matches_f64_at_vit_shapes() {
    let Some(gpu) = gpu() else { return };
    let shape = |batch, tokens, heads, head_dim| AttentionShape {
        batch,
        tokens,
        heads,
        head_dim,
    };
    for (i, s) in [
        shape(2, 17, 3, 64),
        shape(2, 50, 2, 64),
        shape(1, 64, 2, 64),
        shape(1, 65, 2, 64),
        shape(1, 257, 6, 64),
        shape(1, 1370, 1, 64),
        shape(2, 100, 2, 32),
        shape(1, 130, 2, 128),
        shape(1, 77, 1, 80),
        shape(1, 33, 2, 16),
    ]
    .into_iter()
    .enumerate()
    {
        run_attention_forward(&gpu, s, 100 + i as u64);
    }
}

fn run_attention_backward(gpu: &CudaBackend, s: AttentionShape, seed: u64) {
    let qkv = round_bf16(&randn(seed, s.qkv_len(), 1.0));
    let dout = round_bf16(&randn(seed + 1, s.out_len(), 1.0));
    let d_qkv = gpu.upload_bf16(&qkv).unwrap();
    let d_dout = gpu.upload_bf16(&dout).unwrap();
    let mut out = gpu.alloc_zeros::<bf16>(s.out_len()).unwrap();
    let mut lse = gpu.alloc_zeros::<f32>(s.stats_len()).unwrap();
    let mut delta = gpu.alloc_zeros::<f32>(s.stats_len()).unwrap();
    let mut dqkv = gpu.alloc_zeros::<bf16>(s.qkv_len()).unwrap();
    gpu.attention_forward(&mut out, &mut lse, &d_qkv, s)
        .unwrap();
    gpu.attention_backward(&mut dqkv, &mut delta, &d_dout, &d_qkv, &out, &lse, s)
        .unwrap();
    let reference = attention_backward_reference(&to_f64(&qkv), &to_f64(&dout), s);
    // bf16 P and dS feed the gradient GEMMs, and the outputs are bf16.
    assert_close(
        &format!("attention dqkv {s:?}"),
        &gpu.download_bf16(&dqkv).unwrap(),
        &reference,
        2e-2,
    );
}

#[test]
fn attention_backward_matches_f64() {
    let Some(gpu) = gpu() else { return };
    let shape = |batch, tokens, heads, head_dim| AttentionShape {
        batch,
        tokens,
        heads,
        head_dim,
    };
    for (i, s) in [
        shape(2, 17, 3, 64),
        shape(1, 50, 2, 64),
        shape(1, 257, 2, 64),
        shape(1, 1370, 1, 64),
        shape(1, 100, 2, 128),
        shape(1, 77, 2, 48),
    ]
    .into_iter()
    .enumerate()
    {
        run_attention_backward(&gpu, s, 200 + 2 * i as u64);
    }
}

#[test]
fn attention_rejects_unsupported_head_dims_and_bad_lengths() {
    let Some(gpu) = gpu() else { return };
    let s = AttentionShape {
        batch: 1,
        tokens: 5,
        heads: 1,
        head_dim: 40,
    };
    let qkv = gpu.alloc_zeros::<bf16>(s.qkv_len()).unwrap();
    let mut out = gpu.alloc_zeros::<bf16>(s.out_len()).unwrap();
    let mut lse = gpu.alloc_zeros::<f32>(s.stats_len()).unwrap();
    // Head dim 40 has no fast instance: the general kernels run it, forcing the fast ones fails.
    assert_eq!(
        AttentionKernels::for_head_dim(40),
        AttentionKernels::General
    );
    assert_eq!(AttentionKernels::for_head_dim(64), AttentionKernels::Fast);
    gpu.attention_forward(&mut out, &mut lse, &qkv, s).unwrap();
    assert!(matches!(
        gpu.attention_forward_with(AttentionKernels::Fast, &mut out, &mut lse, &qkv, s),
        Err(Error::Unsupported(_))
    ));
    // Beyond the general kernels' range: refused before any length is looked at.
    for head_dim in [0, GENERAL_MAX_HEAD_DIM + 1] {
        let s = AttentionShape { head_dim, ..s };
        assert!(matches!(
            gpu.attention_forward(&mut out, &mut lse, &qkv, s),
            Err(Error::Unsupported(_))
        ));
    }
    for kernels in [AttentionKernels::Fast, AttentionKernels::General] {
        let s = AttentionShape { head_dim: 64, ..s };
        assert!(matches!(
            gpu.attention_forward_with(kernels, &mut out, &mut lse, &qkv, s),
            Err(Error::Shape { .. })
        ));
    }
}

/// Seeded bf16 inputs and what one forward + backward computed from them.
struct AttentionRun {
    qkv: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<f32>,
}

/// Forward then backward on seeded inputs, on `kernels` (`None`: the launchers' own choice).
fn run_attention(
    gpu: &CudaBackend,
    s: AttentionShape,
    seed: u64,
    kernels: Option<AttentionKernels>,
) -> AttentionRun {
    let qkv = round_bf16(&randn(seed, s.qkv_len(), 1.0));
    let dout = round_bf16(&randn(seed + 1, s.out_len(), 1.0));
    let d_qkv = gpu.upload_bf16(&qkv).unwrap();
    let d_dout = gpu.upload_bf16(&dout).unwrap();
    let mut out = gpu.alloc_zeros::<bf16>(s.out_len()).unwrap();
    let mut lse = gpu.alloc_zeros::<f32>(s.stats_len()).unwrap();
    let mut delta = gpu.alloc_zeros::<f32>(s.stats_len()).unwrap();
    let mut dqkv = gpu.alloc_zeros::<bf16>(s.qkv_len()).unwrap();
    match kernels {
        None => {
            gpu.attention_forward(&mut out, &mut lse, &d_qkv, s)
                .unwrap();
            gpu.attention_backward(&mut dqkv, &mut delta, &d_dout, &d_qkv, &out, &lse, s)
                .unwrap();
        }
        Some(k) => {
            gpu.attention_forward_with(k, &mut out, &mut lse, &d_qkv, s)
                .unwrap();
            gpu.attention_backward_with(k, &mut dqkv, &mut delta, &d_dout, &d_qkv, &out, &lse, s)
                .unwrap();
        }
    }
    AttentionRun {
        out: gpu.download_bf16(&out).unwrap(),
        lse: gpu.download(&lse).unwrap(),
        dqkv: gpu.download_bf16(&dqkv).unwrap(),
        qkv,
        dout,
    }
}

/// The CPU backend's attention (f32) on the same inputs: (out, lse, dqkv).
fn cpu_attention(run: &AttentionRun, s: AttentionShape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use dinotrain::backend::cpu;
    let (b, t, h, hd) = (s.batch, s.tokens, s.heads, s.head_dim);
    let mut out = vec![0f32; s.out_len()];
    let mut lse = vec![0f32; s.stats_len()];
    cpu::attention_forward(&mut out, &mut lse, &run.qkv, b, t, h, hd);
    let mut dqkv = vec![0f32; s.qkv_len()];
    cpu::attention_backward(&mut dqkv, &run.dout, &run.qkv, &lse, b, t, h, hd);
    (to_f64(&out), to_f64(&lse), to_f64(&dqkv))
}

/// Head dims without a tensor-core instance (the golden fixtures' and small models' 4, 8, 24,
/// 40; 1 and 256 the general kernels' bounds) at odd token counts, through the public
/// launchers: against the f64 reference and the CPU backend, with the fast kernels' bounds
/// (bf16 outputs 1e-2, lse 1e-5, bf16 gradients 2e-2), and bit for bit on a second run.
#[test]
fn attention_general_kernels_match_f64_and_the_cpu_at_any_head_dim() {
    let Some(gpu) = gpu() else { return };
    let shape = |batch, tokens, heads, head_dim| AttentionShape {
        batch,
        tokens,
        heads,
        head_dim,
    };
    for (i, s) in [
        shape(1, 5, 2, 4),
        shape(2, 17, 3, 8),
        shape(1, 17, 2, 24),
        shape(2, 5, 2, 40),
        shape(1, 37, 2, 40),
        shape(1, 17, 3, 1),
        shape(1, 33, 1, GENERAL_MAX_HEAD_DIM),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            AttentionKernels::for_head_dim(s.head_dim),
            AttentionKernels::General
        );
        let run = run_attention(&gpu, s, 300 + 2 * i as u64, None);
        let (ref_out, ref_lse) = attention_forward_reference(&to_f64(&run.qkv), s);
        let ref_dqkv = attention_backward_reference(&to_f64(&run.qkv), &to_f64(&run.dout), s);
        assert_close(&format!("general out {s:?}"), &run.out, &ref_out, 1e-2);
        assert_close(&format!("general lse {s:?}"), &run.lse, &ref_lse, 1e-5);
        assert_close(&format!("general dqkv {s:?}"), &run.dqkv, &ref_dqkv, 2e-2);
        let (cpu_out, cpu_lse, cpu_dqkv) = cpu_attention(&run, s);
        assert_close(
            &format!("general out vs cpu {s:?}"),
            &run.out,
            &cpu_out,
            1e-2,
        );
        assert_close(
            &format!("general lse vs cpu {s:?}"),
            &run.lse,
            &cpu_lse,
            1e-5,
        );
        assert_close(
            &format!("general dqkv vs cpu {s:?}"),
            &run.dqkv,
            &cpu_dqkv,
            2e-2,
        );
        let again = run_attention(&gpu, s, 300 + 2 * i as u64, None);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&again.out),
            bits(&run.out),
            "{s:?}: out not reproducible"
        );
        assert_eq!(
            bits(&again.lse),
            bits(&run.lse),
            "{s:?}: lse not reproducible"
        );
        assert_eq!(
            bits(&again.dqkv),
            bits(&run.dqkv),
            "{s:?}: dqkv not reproducible"
        );
    }
}

/// Where both exist, the general kernels give the fast kernels' answer within bf16 noise (the
/// fast ones round the probabilities to bf16, the general ones keep them in f32).
#[test]
fn attention_general_kernels_agree_with_the_fast_kernels() {
    let Some(gpu) = gpu() else { return };
    for (i, (tokens, heads, head_dim)) in [(33, 2, 16), (17, 3, 32), (70, 1, 32)]
        .into_iter()
        .enumerate()
    {
        let s = AttentionShape {
            batch: 2,
            tokens,
            heads,
            head_dim,
        };
        let seed = 400 + 2 * i as u64;
        let fast = run_attention(&gpu, s, seed, Some(AttentionKernels::Fast));
        let general = run_attention(&gpu, s, seed, Some(AttentionKernels::General));
        assert_close(
            &format!("general vs fast out {s:?}"),
            &general.out,
            &to_f64(&fast.out),
            1e-2,
        );
        assert_close(
            &format!("general vs fast lse {s:?}"),
            &general.lse,
            &to_f64(&fast.lse),
            1e-5,
        );
        assert_close(
            &format!("general vs fast dqkv {s:?}"),
            &general.dqkv,
            &to_f64(&fast.dqkv),
            2e-2,
        );
    }
}

// ---- LayerNorm ----------------------------------------------------------------------------

fn layernorm_reference(
    x: &[f64],
    w: &[f32],
    b: &[f32],
    c: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / c;
    let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &x[r * c..(r + 1) * c];
        let m = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - m).powi(2)).sum::<f64>() / c as f64;
        let s = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            out[r * c + i] = (row[i] - m) * s * w[i] as f64 + b[i] as f64;
        }
        mean[r] = m;
        rstd[r] = s;
    }
    (out, mean, rstd)
}

#[test]
fn layernorm_forward_fused_residual_and_backward_match_f64() {
    let Some(mut gpu) = gpu() else { return };
    let (rows, c, eps) = (2 * 257, 384, 1e-6f32);
    let shape = NormShape { rows, channels: c };
    let residual = randn(1, rows * c, 1.0);
    let branch = randn(2, rows * c, 1.0);
    let gamma = randn(3, c, 0.5);
    let w = randn(4, c, 1.0);
    let bias = randn(5, c, 1.0);
    let dout = randn(6, rows * c, 1.0);
    let dinp0 = randn(7, rows * c, 1.0);
    let (dw0, db0) = (randn(8, c, 1.0), randn(9, c, 1.0));

    let mut d_res = gpu.upload(&residual).unwrap();
    let d_branch = gpu.upload(&branch).unwrap();
    let d_gamma = gpu.upload(&gamma).unwrap();
    let (d_w, d_b) = (gpu.upload(&w).unwrap(), gpu.upload(&bias).unwrap());
    let mut out_bf16 = gpu.alloc_zeros::<bf16>(rows * c).unwrap();
    let mut out_f32 = gpu.alloc_zeros::<f32>(rows * c).unwrap();
    let mut mean = gpu.alloc_zeros::<f32>(rows).unwrap();
    let mut rstd = gpu.alloc_zeros::<f32>(rows).unwrap();
    gpu.residual_layernorm_forward(
        &mut d_res,
        &mut out_bf16,
        &mut mean,
        &mut rstd,
        &d_branch,
        Some(&d_gamma),
        &d_w,
        &d_b,
        shape,
        eps,
    )
    .unwrap();
    gpu.layernorm_forward(
        &mut out_f32,
        &mut mean,
        &mut rstd,
        &d_res,
        &d_w,
        &d_b,
        shape,
        eps,
    )
    .unwrap();

    let x: Vec<f64> = (0..rows * c)
        .map(|i| residual[i] as f64 + gamma[i % c] as f64 * branch[i] as f64)
        .collect();
    let (ref_out, ref_mean, ref_rstd) = layernorm_reference(&x, &w, &bias, c, eps as f64);
    assert_close(
        "residual_layernorm residual",
        &gpu.download(&d_res).unwrap(),
        &x,
        1e-6,
    );
    assert_close(
        "residual_layernorm out (bf16)",
        &gpu.download_bf16(&out_bf16).unwrap(),
        &ref_out,
        1e-2,
    );
    assert_close(
        "layernorm out (f32)",
        &gpu.download(&out_f32).unwrap(),
        &ref_out,
        1e-5,
    );
    assert_close(
        "layernorm mean",
        &gpu.download(&mean).unwrap(),
        &ref_mean,
        1e-5,
    );
    assert_close(
        "layernorm rstd",
        &gpu.download(&rstd).unwrap(),
        &ref_rstd,
        1e-5,
    );

    let mut d_dinp = gpu.upload(&dinp0).unwrap();
    let (mut d_dw, mut d_db) = (gpu.upload(&dw0).unwrap(), gpu.upload(&db0).unwrap());
    let d_dout = gpu.upload(&dout).unwrap();
    gpu.layernorm_backward(
        &mut d_dinp,
        &mut d_dw,
        &mut d_db,
        &d_dout,
        &d_res,
        &d_w,
        &mean,
        &rstd,
        shape,
        GradWrite::Accumulate,
    )
    .unwrap();
    let (mut ref_dinp, mut ref_dw, mut ref_db) = (to_f64(&dinp0), to_f64(&dw0), to_f64(&db0));
    for r in 0..rows {
        let xhat: Vec<f64> = (0..c)
            .map(|i| (x[r * c + i] - ref_mean[r]) * ref_rstd[r])
            .collect();
        let dxhat: Vec<f64> = (0..c)
            .map(|i| dout[r * c + i] as f64 * w[i] as f64)
            .collect();
        let m1 = dxhat.iter().sum::<f64>() / c as f64;
        let m2 = dxhat.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for i in 0..c {
            ref_dinp[r * c + i] += ref_rstd[r] * (dxhat[i] - m1 - xhat[i] * m2);
            ref_dw[i] += dout[r * c + i] as f64 * xhat[i];
            ref_db[i] += dout[r * c + i] as f64;
        }
    }
    assert_close(
        "layernorm dinp (+=)",
        &gpu.download(&d_dinp).unwrap(),
        &ref_dinp,
        1e-5,
    );
    assert_close(
        "layernorm dweight (+=)",
        &gpu.download(&d_dw).unwrap(),
        &ref_dw,
        1e-5,
    );
    assert_close(
        "layernorm dbias (+=)",
        &gpu.download(&d_db).unwrap(),
        &ref_db,
        1e-5,
    );
}

// ---- elementwise --------------------------------------------------------------------------

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

fn gelu_grad(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
        + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// erf to ~1e-15 (series for small |x|, continued fraction tail otherwise).
fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series: 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0f64;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), accurate for |x| >= 2.5
        let z = x.abs();
        let mut f = z;
        let (mut c, mut d) = (z, 0.0);
        for k in 1..200 {
            let a = k as f64 / 2.0;
            d = z + a * d;
            d = 1.0 / d;
            c = z + a / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        let erfc = (-z * z).exp() / (f * std::f64::consts::PI.sqrt());
        (1.0 - erfc).copysign(x)
    }
}

#[test]
fn reference_erf_is_accurate() {
    // Known values: erf(0.5) = 0.5204998778130465, erf(1) = 0.8427007929497149,
    // erf(3) = 0.9999779095030014.
    assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-14);
    assert!((erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-14);
    assert!((erf(-3.0) + 0.999_977_909_503_001_4).abs() < 1e-14);
}

#[test]
fn elementwise_kernels_match_f64() {
    let Some(mut gpu) = gpu() else { return };
    let (rows, c) = (300, 1536);
    let n = rows * c;
    let x = randn(40, n, 2.0);
    let bias = randn(41, c, 0.5);
    let d_x = gpu.upload(&x).unwrap();
    let d_bias = gpu.upload(&bias).unwrap();

    // casts: exactly the half crate's round-to-nearest-even, and back exactly.
    let mut as_bf16 = gpu.alloc_zeros::<bf16>(n).unwrap();
    gpu.cast_f32_to_bf16(&mut as_bf16, &d_x).unwrap();
    let host: Vec<bf16> = gpu.download(&as_bf16).unwrap();
    assert!(host
        .iter()
        .zip(&x)
        .all(|(h, v)| h.to_bits() == bf16::from_f32(*v).to_bits()));
    let mut back = gpu.alloc_zeros::<f32>(n).unwrap();
    gpu.cast_bf16_to_f32(&mut back, &as_bf16).unwrap();
    assert_eq!(gpu.download(&back).unwrap(), round_bf16(&x));

    // gelu (f32) and bias + gelu (bf16 activation, pre-activation saved in place)
    let mut g = gpu.alloc_zeros::<f32>(n).unwrap();
    gpu.gelu_forward(&mut g, &d_x).unwrap();
    let ref_gelu: Vec<f64> = x.iter().map(|&v| gelu(v as f64)).collect();
    assert_close("gelu_forward", &gpu.download(&g).unwrap(), &ref_gelu, 1e-6);
    let mut pre = gpu.upload(&x).unwrap();
    let mut act = gpu.alloc_zeros::<bf16>(n).unwrap();
    gpu.bias_gelu_forward(&mut pre, &mut act, Some(&d_bias), rows, c)
        .unwrap();
    let pre_host = gpu.download(&pre).unwrap();
    let ref_pre: Vec<f64> = (0..n).map(|i| x[i] as f64 + bias[i % c] as f64).collect();
    assert_close("bias_gelu pre", &pre_host, &ref_pre, 1e-7);
    let ref_act: Vec<f64> = ref_pre.iter().map(|&v| gelu(v)).collect();
    assert_close(
        "bias_gelu act (bf16)",
        &gpu.download_bf16(&act).unwrap(),
        &ref_act,
        1e-2,
    );

    let dact = randn(42, n, 1.0);
    let d_dact = gpu.upload(&dact).unwrap();
    let mut d = gpu.alloc_zeros::<bf16>(n).unwrap();
    gpu.gelu_backward(&mut d, &d_dact, &pre).unwrap();
    let ref_d: Vec<f64> = (0..n)
        .map(|i| dact[i] as f64 * gelu_grad(pre_host[i] as f64))
        .collect();
    // Against the reference rounded to bf16 the same way: only values whose f32 result falls
    // on the other side of a rounding boundary may differ (by one bf16 step).
    assert_close(
        "gelu_backward (bf16)",
        &gpu.download_bf16(&d).unwrap(),
        &rounded_bf16(&ref_d),
        1e-4,
    );

    // bias add, LayerScale residual forward and backward, column sums
    let mut xb = gpu.upload(&x).unwrap();
    gpu.add_bias(&mut xb, &d_bias, rows, c).unwrap();
    assert_close("add_bias", &gpu.download(&xb).unwrap(), &ref_pre, 1e-7);

    let gamma = randn(43, c, 1e-1);
    let branch = randn(44, n, 1.0);
    let (d_gamma, d_branch) = (gpu.upload(&gamma).unwrap(), gpu.upload(&branch).unwrap());
    let mut residual = gpu.upload(&x).unwrap();
    gpu.layerscale_residual_forward(&mut residual, &d_branch, &d_gamma, rows, c)
        .unwrap();
    let ref_res: Vec<f64> = (0..n)
        .map(|i| x[i] as f64 + gamma[i % c] as f64 * branch[i] as f64)
        .collect();
    assert_close(
        "layerscale_residual_forward",
        &gpu.download(&residual).unwrap(),
        &ref_res,
        1e-7,
    );

    let dres = randn(45, n, 1.0);
    let dgamma0 = randn(46, c, 1.0);
    let d_dres = gpu.upload(&dres).unwrap();
    let mut dbranch = gpu.alloc_zeros::<bf16>(n).unwrap();
    let mut dgamma = gpu.upload(&dgamma0).unwrap();
    gpu.layerscale_backward(
        &mut dbranch,
        &mut dgamma,
        &d_dres,
        &d_branch,
        &d_gamma,
        rows,
        c,
    )
    .unwrap();
    let ref_dbranch: Vec<f64> = (0..n)
        .map(|i| gamma[i % c] as f64 * dres[i] as f64)
        .collect();
    let mut ref_dgamma = to_f64(&dgamma0);
    let mut ref_colsum = vec![0.0f64; c];
    for i in 0..n {
        ref_dgamma[i % c] += dres[i] as f64 * branch[i] as f64;
        ref_colsum[i % c] += dres[i] as f64;
    }
    assert_close(
        "layerscale dbranch (bf16)",
        &gpu.download_bf16(&dbranch).unwrap(),
        &rounded_bf16(&ref_dbranch),
        1e-4,
    );
    assert_close(
        "layerscale dgamma (+=)",
        &gpu.download(&dgamma).unwrap(),
        &ref_dgamma,
        1e-5,
    );
    let mut colsum = gpu.alloc_zeros::<f32>(c).unwrap();
    gpu.column_sum(&mut colsum, &d_dres, None, rows, c, GradWrite::Overwrite)
        .unwrap();
    assert_close(
        "column_sum",
        &gpu.download(&colsum).unwrap(),
        &ref_colsum,
        1e-5,
    );

    // full sums (positive terms for the plain sum: no cancellation to amplify f32 rounding)
    let mut total = gpu.alloc_zeros::<f32>(1).unwrap();
    let positive = uniform(47, n, 0.0, 1.0);
    gpu.sum(
        &mut total,
        &gpu.upload(&positive).unwrap(),
        ReduceOp::Sum,
        0.5,
    )
    .unwrap();
    let ref_sum = 0.5 * positive.iter().map(|&v| v as f64).sum::<f64>();
    assert_close("sum", &gpu.download(&total).unwrap(), &[ref_sum], 1e-5);
    gpu.sum(&mut total, &d_x, ReduceOp::SumOfSquares, 1.0)
        .unwrap();
    let ref_sq = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    assert_close(
        "sum of squares",
        &gpu.download(&total).unwrap(),
        &[ref_sq],
        1e-5,
    );
}

/// SwiGLU (ViT-g's FFN gate) forward and backward against the CPU backend's f32 reference
/// rounded to bf16 the same way: only values whose f32 result lands across a rounding boundary
/// may differ (by one bf16 step). An odd width, and inputs large enough to saturate the sigmoid.
#[test]
fn swiglu_matches_the_cpu_reference_rounded_to_bf16() {
    use dinotrain::backend::cpu::elementwise as cpu;
    let Some(gpu) = gpu() else { return };
    let (rows, width) = (130, 300);
    let x12 = randn(70, rows * 2 * width, 3.0);
    let dgated = randn(71, rows * width, 1.0);
    let (d_x12, d_dgated) = (gpu.upload(&x12).unwrap(), gpu.upload(&dgated).unwrap());

    let mut gated = gpu
        .upload(&vec![bf16::from_f32(f32::NAN); rows * width])
        .unwrap();
    gpu.swiglu_forward(&mut gated, &d_x12, rows, width).unwrap();
    let mut ref_gated = vec![0f32; rows * width];
    cpu::swiglu_forward(&mut ref_gated, &x12, rows, width);
    assert_close(
        "swiglu_forward (bf16)",
        &gpu.download_bf16(&gated).unwrap(),
        &to_f64(&round_bf16(&ref_gated)),
        1e-4,
    );

    let mut dx12 = gpu
        .upload(&vec![bf16::from_f32(f32::NAN); rows * 2 * width])
        .unwrap();
    gpu.swiglu_backward(&mut dx12, &d_dgated, &d_x12, rows, width)
        .unwrap();
    let mut ref_dx12 = vec![0f32; rows * 2 * width];
    cpu::swiglu_backward(&mut ref_dx12, &dgated, &x12, rows, width);
    let got = gpu.download_bf16(&dx12).unwrap();
    let want = round_bf16(&ref_dx12);
    // Each half of the rows on its own (x1's gradient, then x2's): their scales differ.
    let half = |v: &[f32], range: std::ops::Range<usize>| -> Vec<f32> {
        v.chunks(2 * width)
            .flat_map(|row| row[range.clone()].to_vec())
            .collect()
    };
    for (name, range) in [("dx1", 0..width), ("dx2", width..2 * width)] {
        assert_close(
            &format!("swiglu_backward {name} (bf16)"),
            &half(&got, range.clone()),
            &to_f64(&half(&want, range)),
            1e-4,
        );
    }

    // Lengths are checked before anything is queued.
    assert!(matches!(
        gpu.swiglu_forward(&mut gated, &d_x12, rows, width + 1),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        gpu.swiglu_backward(&mut dx12, &d_dgated, &d_x12, rows + 1, width),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        gpu.swiglu_forward(&mut gated, &d_x12, rows, 0),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn reductions_are_bit_reproducible() {
    let Some(mut gpu) = gpu() else { return };
    let (rows, c) = (1000, 384);
    let x = gpu.upload(&randn(50, rows * c, 1.0)).unwrap();
    let mut first = gpu.alloc_zeros::<f32>(c).unwrap();
    let mut second = gpu.alloc_zeros::<f32>(c).unwrap();
    gpu.column_sum(&mut first, &x, None, rows, c, GradWrite::Overwrite)
        .unwrap();
    gpu.column_sum(&mut second, &x, None, rows, c, GradWrite::Overwrite)
        .unwrap();
    assert_eq!(
        gpu.download(&first).unwrap(),
        gpu.download(&second).unwrap()
    );
}

#[test]
fn windows_read_and_write_only_their_range_of_the_parent_buffer() {
    let Some(gpu) = gpu() else { return };
    let src: Vec<f32> = (0..40).map(|i| i as f32 * 0.5 - 3.0).collect();
    let d_src = gpu.upload(&src).unwrap();
    let mut d_dst = gpu.upload(&[7.0f32; 40]).unwrap();
    // dst[10..20] := bf16(src[25..35]) through a bf16 window, then back into two windows of dst.
    let mut tmp = gpu.alloc_zeros::<bf16>(10).unwrap();
    gpu.cast_f32_to_bf16(&mut tmp, &gpu.sub(&d_src, 25..35).unwrap())
        .unwrap();
    {
        let [mut a, mut b] = gpu.sub_mut_disjoint(&mut d_dst, [10..15, 15..20]).unwrap();
        gpu.cast_bf16_to_f32(&mut a, &gpu.sub(&tmp, 0..5).unwrap())
            .unwrap();
        gpu.cast_bf16_to_f32(&mut b, &gpu.sub(&tmp, 5..10).unwrap())
            .unwrap();
    }
    let got = gpu.download(&d_dst).unwrap();
    let want: Vec<f32> = (0..40)
        .map(|i| match i {
            10..20 => f32::from(bf16::from_f32(src[i + 15])),
            _ => 7.0,
        })
        .collect();
    assert_eq!(got, want);
    // The parent is intact after the windows are gone (they never free its memory).
    assert_eq!(gpu.download(&d_src).unwrap(), src);
    assert!(gpu.sub(&d_src, 30..41).is_err());
    assert!(gpu.sub_mut_disjoint(&mut d_dst, [0..5, 4..8]).is_err());
}
