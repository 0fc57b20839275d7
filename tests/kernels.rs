//! Kernel tests of the transformer operations (GEMM and linear layers, attention, LayerNorm,
//! elementwise) on every backend. Each check runs through the `Backend` trait on the CPU
//! (always, in f32) and on CUDA when a device opens (skipping with a message otherwise), against
//! f64 references written here on the exact values the kernels see (operands rounded to bf16
//! first). CUDA-only tests cover what only the CUDA backend has: its embedded kernel families and
//! NVRTC fallback, typed device errors, the two GEMM libraries with their epilogues and
//! statistics, and the general vs fast attention kernels.
//!
//! Bounds are `‖out − ref‖ / ‖ref‖`: on CUDA bf16 outputs carry about 2e-3 from their own
//! rounding, f32 paths about 1e-6; the CPU computes in f32 and is held to f32 bounds
//! ([`Tol::f32`]).

mod kernel_support;

use dinotrain::backend::cuda::{
    all_precompiled, bf16, compile_source_with_nvrtc, resolve_device, AttentionKernels,
    CudaBackend, EpilogueRun, GemmPath, GemmStats, KernelFamily, LtOutcome, ReduceOp,
    ResolvedDevice, GENERAL_MAX_HEAD_DIM,
};
use dinotrain::backend::{
    Accumulate, AttentionOps, AttentionShape, Backend, Buffers, Device, Gemm, GemmBatch, GemmOps,
    InputGrad, LinearDims, LinearOut, LnParams, LnSaved, LnStats, NormOut, NormShape, Residual,
    SampleSubset, Storage, TokenLayout, Transpose,
};
use dinotrain::Error;
use kernel_support::reference::{
    attention_backward_reference, attention_forward_reference, attention_probs, erf, gelu,
    gelu_grad, gemm_reference, layernorm_reference, rounded_bf16, silu, silu_grad, HeadView,
};
use kernel_support::{
    as_operand, assert_close, assert_each_close, bits, cpu, down, down_half, gpu, nans, nans_half,
    operand_values, randn, round_bf16, rounds_operands, to_f64, uniform, up, up_half, up_i64, Tol,
};

// ---- the CUDA device and its kernels ------------------------------------------------------

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
                ResolvedDevice::Cpu(_)
            ));
            assert!(matches!(
                resolve_device(Device::Auto).unwrap(),
                ResolvedDevice::Cpu(_)
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

// ---- GEMM and linear layers ---------------------------------------------------------------

const LAYOUTS: [(Transpose, Transpose); 4] = [
    (Transpose::No, Transpose::No),
    (Transpose::No, Transpose::Yes),
    (Transpose::Yes, Transpose::No),
    (Transpose::Yes, Transpose::Yes),
];

/// Both GEMM libraries: cuBLASLt (with its cuBLAS fallback) and cuBLAS alone.
const PATHS: [GemmPath; 2] = [GemmPath::CublasLt, GemmPath::Cublas];

/// What ran since `before` (CUDA: which library took the GEMMs).
fn gemms_since<B: Buffers>(be: &B, before: Option<GemmStats>) -> Option<GemmStats> {
    Some(be.counters().gemms?.since(&before?))
}

/// `c (=|+=) op(a) · op(b)` in every transpose layout and both write modes, at (70, 96, 50) and
/// (37, 53, 29). Returns each product's name and GEMM statistics (CUDA).
fn check_matmul<B: Backend>(be: &mut B, tol: Tol) -> Vec<(String, GemmStats)> {
    let mut ran_per_gemm = Vec::new();
    for (shape, (m, k, n)) in [(70, 96, 50), (37, 53, 29)].into_iter().enumerate() {
        for (case, (ta, tb)) in LAYOUTS.into_iter().enumerate() {
            let seed = 40 * shape as u64 + case as u64;
            let a = round_bf16(&randn(10 + seed, m * k, 1.0));
            let b = round_bf16(&randn(20 + seed, k * n, 1.0));
            let c0 = randn(30 + seed, m * n, 1.0);
            let (da, db) = (up_half(be, &a), up_half(be, &b));
            for acc in [Accumulate::Add, Accumulate::Overwrite] {
                let mut dc = up(be, &c0);
                let before = be.counters().gemms;
                let g = Gemm::nn(m, k, n).t(ta, tb).acc(acc);
                be.matmul(&mut dc, &da, &db, g).unwrap();
                let name = format!("gemm {m}x{k}x{n} {ta:?} {tb:?} {acc:?}");
                ran_per_gemm.extend(gemms_since(be, before).map(|r| (name.clone(), r)));
                let mut reference = match acc {
                    Accumulate::Add => to_f64(&c0),
                    Accumulate::Overwrite => vec![0.0; m * n],
                };
                gemm_reference(&mut reference, &a, ta, &b, tb, m, k, n);
                let got = down(be, &dc);
                // Exact bf16 products, f32 accumulation (tensor cores may align partial sums
                // with truncation: allow 1e-4, still far below bf16 rounding).
                assert_close(&name, &got, &reference, tol.at(1e-4));
                if !rounds_operands(be) {
                    // f32 accumulation of f32 products: close element by element too.
                    assert_each_close(&name, &got, &reference, 1e-5, 1e-5);
                }
            }
        }
    }
    ran_per_gemm
}

#[test]
fn gemm_matches_f64_in_every_transpose_layout_and_write_mode() {
    check_matmul(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    for path in PATHS {
        gpu.set_gemm_path(path);
        let ran_per_gemm = check_matmul(&mut gpu, Tol::CUDA);
        assert_eq!(ran_per_gemm.len(), 16, "{path:?}: every GEMM counted");
        for (name, ran) in ran_per_gemm {
            assert_eq!(
                ran.cublaslt + ran.cublas,
                1,
                "{name}, {path:?}: one GEMM, counted once ({ran})"
            );
            if path == GemmPath::Cublas {
                assert_eq!(ran.cublas, 1, "the cuBLAS path never calls cuBLASLt");
            }
        }
    }
}

/// The batched f32 products (the position-embedding resampling): plain f32 arithmetic on every
/// backend. Three products of one shape, `a` and `c` strided, `b` shared (stride 0).
fn check_matmul_f32<B: Backend>(be: &mut B, tol: Tol) {
    let (batch, m, k, n) = (3, 7, 5, 6);
    for (case, (ta, tb)) in LAYOUTS.into_iter().enumerate() {
        let a = randn(90 + case as u64, batch * m * k, 1.0);
        let b = randn(95 + case as u64, k * n, 1.0);
        let c0 = randn(99, batch * m * n, 1.0);
        let (da, db) = (up(be, &a), up(be, &b));
        for acc in [Accumulate::Add, Accumulate::Overwrite] {
            let mut dc = up(be, &c0);
            let g = GemmBatch {
                gemm: Gemm::nn(m, k, n).t(ta, tb).acc(acc),
                batch,
                stride_a: m * k,
                stride_b: 0,
                stride_c: m * n,
            };
            be.matmul_f32(&mut dc, &da, &db, g).unwrap();
            let mut reference = match acc {
                Accumulate::Add => to_f64(&c0),
                Accumulate::Overwrite => vec![0.0; batch * m * n],
            };
            for (i, c) in reference.chunks_mut(m * n).enumerate() {
                let a = &a[i * m * k..(i + 1) * m * k];
                gemm_reference(c, a, ta, &b, tb, m, k, n);
            }
            let name = format!("matmul_f32 {batch} x {m}x{k}x{n} {ta:?} {tb:?} {acc:?}");
            assert_close(&name, &down(be, &dc), &reference, tol.at(1e-6));
        }
    }
}

#[test]
fn batched_f32_gemm_matches_f64() {
    check_matmul_f32(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_matmul_f32(&mut gpu, Tol::CUDA);
}

/// A linear layer `y = x · Wᵀ + b` through the trait: forward into f32 (with and without a
/// bias), into an operand (the biased f32 result rounded once), and with fc1's GELU (the f32
/// pre-activation kept, the activation as an operand); backward: the input gradient written,
/// added and as an operand, and the parameter gradients accumulated (with and without the f32
/// copy of `dout`).
fn check_linear<B: Backend>(be: &mut B, tol: Tol) {
    let (rows, in_dim, out_dim) = (66, 96, 48);
    let dims = LinearDims {
        rows,
        in_dim,
        out_dim,
    };
    let x = round_bf16(&randn(40, rows * in_dim, 1.0)); // [rows, in]
    let w = round_bf16(&randn(41, out_dim * in_dim, 0.2)); // [out, in]
    let bias = randn(42, out_dim, 1.0);
    let (dx_in, dw, dbias) = (up_half(be, &x), up_half(be, &w), up(be, &bias));
    let mut product = vec![0.0f64; rows * out_dim];
    let (no, yes) = (Transpose::No, Transpose::Yes);
    gemm_reference(&mut product, &x, no, &w, yes, rows, in_dim, out_dim);
    let biased: Vec<f64> = (0..rows * out_dim)
        .map(|i| product[i] + bias[i % out_dim] as f64)
        .collect();

    let mut y = nans(be, rows * out_dim);
    be.linear_forward(LinearOut::F32(&mut *y), &dx_in, &dw, Some(&dbias), dims)
        .unwrap();
    assert_close("linear + bias", &down(be, &y), &biased, tol.at(1e-4));
    be.linear_forward(LinearOut::F32(&mut *y), &dx_in, &dw, None, dims)
        .unwrap();
    assert_close("linear", &down(be, &y), &product, tol.at(1e-4));
    let mut y_half = nans_half(be, rows * out_dim);
    be.linear_forward(
        LinearOut::Half(&mut *y_half),
        &dx_in,
        &dw,
        Some(&dbias),
        dims,
    )
    .unwrap();
    // The f32 result rounded once: as the reference rounded, but for values whose f32 sum
    // lands across a rounding boundary (one bf16 step).
    let want = as_operand(be, &biased);
    let got = down_half(be, &y_half);
    assert_close("linear + bias to an operand", &got, &want, tol.at(1e-3));
    let (mut pre, mut act) = (nans(be, rows * out_dim), nans_half(be, rows * out_dim));
    let out = LinearOut::Gelu {
        pre: &mut *pre,
        act: &mut *act,
    };
    be.linear_forward(out, &dx_in, &dw, Some(&dbias), dims)
        .unwrap();
    assert_close("linear + gelu pre", &down(be, &pre), &biased, tol.at(1e-4));
    let ref_act: Vec<f64> = biased.iter().map(|&v| gelu(v)).collect();
    let got = down_half(be, &act);
    assert_close("linear + gelu act", &got, &ref_act, tol.at(1e-2));

    // Backward: dx = dout · W, dW += doutᵀ · x, db += Σ_rows dout.
    let dout = round_bf16(&randn(43, rows * out_dim, 1.0));
    let (d_dout, d_dout_f32) = (up_half(be, &dout), up(be, &dout));
    let dx0 = randn(44, rows * in_dim, 1.0);
    let mut ref_dx = vec![0.0f64; rows * in_dim];
    gemm_reference(&mut ref_dx, &dout, no, &w, no, rows, out_dim, in_dim);
    let mut d_dx = nans(be, rows * in_dim);
    let grad = InputGrad::F32(&mut *d_dx, Accumulate::Overwrite);
    be.linear_input_grad(grad, &d_dout, &dw, dims).unwrap();
    assert_close("linear dx", &down(be, &d_dx), &ref_dx, tol.at(1e-4));
    let mut d_dx = up(be, &dx0);
    let grad = InputGrad::F32(&mut *d_dx, Accumulate::Add);
    be.linear_input_grad(grad, &d_dout, &dw, dims).unwrap();
    let ref_dx_add: Vec<f64> = (0..rows * in_dim)
        .map(|i| ref_dx[i] + dx0[i] as f64)
        .collect();
    assert_close(
        "linear dx (+=)",
        &down(be, &d_dx),
        &ref_dx_add,
        tol.at(1e-4),
    );
    let mut d_dx_half = nans_half(be, rows * in_dim);
    be.linear_input_grad(InputGrad::Half(&mut *d_dx_half), &d_dout, &dw, dims)
        .unwrap();
    let (got, want) = (down_half(be, &d_dx_half), as_operand(be, &ref_dx));
    assert_close("linear dx to an operand", &got, &want, tol.at(1e-3));

    let (dw0, db0) = (randn(45, out_dim * in_dim, 1.0), randn(46, out_dim, 1.0));
    let mut ref_dw = to_f64(&dw0);
    gemm_reference(&mut ref_dw, &dout, yes, &x, no, out_dim, rows, in_dim);
    let mut ref_db = to_f64(&db0);
    for (i, &g) in dout.iter().enumerate() {
        ref_db[i % out_dim] += g as f64;
    }
    for with_f32_dout in [false, true] {
        let (mut d_dw, mut d_db) = (up(be, &dw0), up(be, &db0));
        let dout_f32 = with_f32_dout.then_some(&*d_dout_f32);
        be.linear_param_grads(&mut d_dw, Some(&mut d_db), &d_dout, dout_f32, &dx_in, dims)
            .unwrap();
        let name = format!("linear param grads (f32 dout given: {with_f32_dout})");
        assert_close(
            &format!("{name} dW"),
            &down(be, &d_dw),
            &ref_dw,
            tol.at(1e-4),
        );
        // Sums of bf16 values in f32 over 66 rows.
        assert_close(
            &format!("{name} db"),
            &down(be, &d_db),
            &ref_db,
            tol.at(1e-5),
        );
    }
    let mut d_dw = up(be, &dw0);
    be.linear_param_grads(&mut d_dw, None, &d_dout, None, &dx_in, dims)
        .unwrap();
    assert_close(
        "linear dW, no bias",
        &down(be, &d_dw),
        &ref_dw,
        tol.at(1e-4),
    );
}

#[test]
fn linear_layers_forward_and_backward_match_f64() {
    check_linear(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    for path in PATHS {
        gpu.set_gemm_path(path);
        check_linear(&mut gpu, Tol::CUDA);
    }
}

/// The emulated device's cuBLASLt has an algorithm for every valid problem, so there every
/// epilogue must fuse; a GPU's may decline some (then the separate kernel is checked).
fn is_emulated(gpu: &CudaBackend) -> bool {
    gpu.describe().is_ok_and(|d| d.contains("emulated"))
}

/// What ran on `gpu` since `before`.
fn ran_since(gpu: &CudaBackend, before: GemmStats) -> GemmStats {
    gpu.gemm_stats().since(&before)
}

#[test]
fn cuda_gemm_bias_epilogue_matches_f64_fused_or_separate() {
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
    let (dx, dw) = (up_half(&mut gpu, &x), up_half(&mut gpu, &w));
    for path in PATHS {
        gpu.set_gemm_path(path);
        // The bias at element offset 0 (256-byte aligned) and 1 (4 bytes: never fused).
        for shift in [0usize, 1] {
            let mut holder = vec![f32::NAN; shift];
            holder.extend_from_slice(&bias);
            let holder = up(&mut gpu, &holder);
            let bias_view = holder.window(shift..shift + n).unwrap();
            let mut dc = nans(&mut gpu, m * n); // overwritten
            let before = gpu.gemm_stats();
            let dims = LinearDims {
                rows: m,
                in_dim: k,
                out_dim: n,
            };
            let out = LinearOut::F32(&mut *dc);
            gpu.linear_forward(out, &dx, &dw, Some(&bias_view), dims)
                .unwrap();
            let ran = ran_since(&gpu, before);
            assert_eq!(ran.fused_epilogues + ran.separate_epilogues, 1, "{ran}");
            if path == GemmPath::Cublas || shift == 1 {
                assert_eq!(ran.separate_epilogues, 1, "{path:?}, shift {shift}: {ran}");
            } else if is_emulated(&gpu) {
                assert_eq!(ran.fused_epilogues, 1, "{ran}");
            }
            assert_close(
                &format!("gemm+bias {path:?} shift {shift} ({ran})"),
                &down(&mut gpu, &dc),
                &reference,
                1e-4,
            );
        }
    }
}

#[test]
fn cuda_gemm_to_bf16_rounds_the_biased_f32_result_once() {
    let Some(mut gpu) = gpu() else { return };
    let (m, k, n) = (40, 64, 56);
    let x = round_bf16(&randn(60, m * k, 1.0));
    let w = round_bf16(&randn(61, n * k, 0.2));
    let bias = randn(62, n, 1.0);
    let (dx, dw, dbias) = (
        up_half(&mut gpu, &x),
        up_half(&mut gpu, &w),
        up(&mut gpu, &bias),
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
            let mut dc = up_half(&mut gpu, &vec![7.0; m * n]);
            let outcome = gpu
                .matmul_to_bf16(
                    &mut dc,
                    &dx,
                    &dw,
                    with_bias.then_some(&*dbias),
                    Gemm::nn(m, k, n).t(Transpose::No, Transpose::Yes),
                )
                .unwrap();
            let got = down_half(&mut gpu, &dc);
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
fn cuda_gemm_row_sums_epilogue_accumulates_the_bias_gradient() {
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
    let (d_dout, d_inp) = (up_half(&mut gpu, &dout), up_half(&mut gpu, &inp));
    for path in PATHS {
        gpu.set_gemm_path(path);
        let mut dw = up(&mut gpu, &dw0);
        let mut db = up(&mut gpu, &db0);
        let before = gpu.gemm_stats();
        let run = gpu
            .matmul_with_row_sums(
                &mut dw,
                &d_dout,
                &d_inp,
                &mut db,
                Gemm::nn(out_dim, rows, inp_dim)
                    .t(Transpose::Yes, Transpose::No)
                    .acc(Accumulate::Add),
            )
            .unwrap();
        let ran = ran_since(&gpu, before);
        let name = format!("gemm+row sums {path:?} ({ran})");
        assert_close(&format!("{name} dW"), &down(&mut gpu, &dw), &dw_ref, 1e-4);
        match run {
            EpilogueRun::Fused => {
                assert_eq!(path, GemmPath::CublasLt, "cuBLAS cannot fuse");
                assert_eq!(ran.fused_epilogues, 1, "{ran}");
                // Sums of bf16 values in f32 over 90 rows.
                assert_close(&format!("{name} db"), &down(&mut gpu, &db), &db_ref, 1e-5);
            }
            EpilogueRun::Separate => {
                assert!(
                    path == GemmPath::Cublas || !is_emulated(&gpu),
                    "the emulated cuBLASLt fuses every bias gradient"
                );
                assert_eq!(ran.separate_epilogues, 1, "{ran}");
                assert_eq!(down(&mut gpu, &db), db0, "{name}: sums left to the caller");
            }
        }
    }
}

// ---- attention ----------------------------------------------------------------------------

fn shape(batch: usize, tokens: usize, heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape {
        batch,
        tokens,
        heads,
        head_dim,
    }
}

#[test]
fn attention_reference_gradient_matches_finite_differences() {
    // The f64 reference the attention checks trust is itself checked here.
    let s = shape(2, 5, 2, 16);
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

/// Seeded operand inputs and what one forward + backward computed from them.
struct AttentionRun {
    qkv: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<f32>,
}

/// Forward then backward through the trait on seeded bf16-exact inputs.
fn run_attention<B: Backend>(be: &mut B, s: AttentionShape, seed: u64) -> AttentionRun {
    let qkv = round_bf16(&randn(seed, s.qkv_len(), 1.0));
    let dout = round_bf16(&randn(seed + 1, s.out_len(), 1.0));
    let (d_qkv, d_dout) = (up_half(be, &qkv), up_half(be, &dout));
    let mut out = nans_half(be, s.out_len());
    let mut lse = nans(be, s.stats_len());
    let mut dqkv = nans_half(be, s.qkv_len());
    be.attention_forward(&mut out, &mut lse, &d_qkv, s).unwrap();
    be.attention_backward(&mut dqkv, &d_dout, &d_qkv, &out, &lse, s)
        .unwrap();
    AttentionRun {
        out: down_half(be, &out),
        lse: down(be, &lse),
        dqkv: down_half(be, &dqkv),
        qkv,
        dout,
    }
}

/// The forward at ViT shapes (head dims 16 to 128, up to 1370 tokens) against f64.
fn check_attention_forward<B: Backend>(be: &mut B, tol: Tol) {
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
        let qkv = round_bf16(&randn(100 + i as u64, s.qkv_len(), 1.0));
        let d_qkv = up_half(be, &qkv);
        let mut out = nans_half(be, s.out_len());
        let mut lse = nans(be, s.stats_len());
        be.attention_forward(&mut out, &mut lse, &d_qkv, s).unwrap();
        let (ref_out, ref_lse) = attention_forward_reference(&to_f64(&qkv), s);
        // bf16 output and bf16 probabilities in P·V: about 2e-3 each.
        let got = down_half(be, &out);
        assert_close(
            &format!("attention out {s:?}"),
            &got,
            &ref_out,
            tol.at(1e-2),
        );
        let got = down(be, &lse);
        assert_close(
            &format!("attention lse {s:?}"),
            &got,
            &ref_lse,
            tol.at(1e-5),
        );
    }
}

#[test]
fn attention_forward_matches_f64_at_vit_shapes() {
    check_attention_forward(&mut cpu(), Tol::f32(3e-6));
    let Some(mut gpu) = gpu() else { return };
    check_attention_forward(&mut gpu, Tol::CUDA);
}

fn check_attention_backward<B: Backend>(be: &mut B, tol: Tol) {
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
        let run = run_attention(be, s, 200 + 2 * i as u64);
        let reference = attention_backward_reference(&to_f64(&run.qkv), &to_f64(&run.dout), s);
        // bf16 P and dS feed the gradient GEMMs, and the outputs are bf16.
        let name = format!("attention dqkv {s:?}");
        assert_close(&name, &run.dqkv, &reference, tol.at(2e-2));
    }
}

#[test]
fn attention_backward_matches_f64() {
    check_attention_backward(&mut cpu(), Tol::f32(5e-6));
    let Some(mut gpu) = gpu() else { return };
    check_attention_backward(&mut gpu, Tol::CUDA);
}

/// Long sequences (the released models see 1370 tokens) with large logits (up to about
/// ±hd·16²·hd^-0.5 ≈ ±700: exp overflows without the max subtraction): three rows checked
/// against a direct f64 softmax, and the saved log-sum-exp against its definition.
fn check_attention_long_sequence_with_large_logits<B: Backend>(be: &mut B, tol: Tol) {
    use rand::Rng as _;
    let s = shape(1, 1400, 2, 8);
    let (t, h, hd) = (s.tokens, s.heads, s.head_dim);
    let c = h * hd;
    let mut rng = dinotrain::rng::keyed(3, &[dinotrain::rng::stream::TEST]);
    let qkv: Vec<f32> = (0..s.qkv_len())
        .map(|_| rng.random_range(-16.0f32..16.0))
        .collect();
    let qkv = operand_values(be, &qkv);
    let d_qkv = up_half(be, &qkv);
    let mut out = nans_half(be, s.out_len());
    let mut lse = nans(be, s.stats_len());
    be.attention_forward(&mut out, &mut lse, &d_qkv, s).unwrap();
    let (out, lse) = (down_half(be, &out), down(be, &lse));
    assert!(out.iter().all(|v| v.is_finite()));
    let at = |tok: usize, which: usize, head: usize, j: usize| {
        qkv[(tok * 3 + which) * c + head * hd + j] as f64
    };
    let scale = (hd as f64).powf(-0.5);
    for &(i, head) in &[(0, 0), (777, 1), (t - 1, 0)] {
        let s: Vec<f64> = (0..t)
            .map(|j| {
                (0..hd)
                    .map(|e| at(i, 0, head, e) * at(j, 1, head, e))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
        let want_lse = m + z.ln();
        let got = lse[head * t + i] as f64;
        assert!(
            (got - want_lse).abs() < 1e-3 * want_lse.abs().max(1.0),
            "lse row {i} head {head}: {got} vs {want_lse}"
        );
        for e in 0..hd {
            let want: f64 = (0..t)
                .map(|j| (s[j] - m).exp() / z * at(j, 2, head, e))
                .sum();
            let got = out[i * c + head * hd + e] as f64;
            // A bf16 output is within 2^-9 of its value (plus the f32 path).
            assert!(
                (got - want).abs() < tol.at(1e-2) * (1.0 + want.abs()),
                "row {i} head {head}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn attention_of_long_sequences_with_large_logits_matches_a_direct_softmax() {
    check_attention_long_sequence_with_large_logits(&mut cpu(), Tol::f32(1e-3));
    let Some(mut gpu) = gpu() else { return };
    check_attention_long_sequence_with_large_logits(&mut gpu, Tol::CUDA);
}

/// Buffer lengths are checked against the shape before anything runs.
fn check_attention_rejects_bad_lengths<B: Backend>(be: &mut B) {
    let s = shape(1, 5, 1, 40);
    let qkv = be.alloc_half(s.qkv_len()).unwrap();
    let mut out = be.alloc_half(s.out_len()).unwrap();
    let mut lse = be.alloc_f32(s.stats_len()).unwrap();
    let wrong = AttentionShape { head_dim: 64, ..s };
    assert!(matches!(
        be.attention_forward(&mut out, &mut lse, &qkv, wrong),
        Err(Error::Shape { .. })
    ));
    let mut dqkv = be.alloc_half(s.qkv_len()).unwrap();
    let dout = be.alloc_half(s.out_len()).unwrap();
    assert!(matches!(
        be.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, wrong),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn attention_rejects_bad_lengths() {
    check_attention_rejects_bad_lengths(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_attention_rejects_bad_lengths(&mut gpu);
}

#[test]
fn cuda_attention_rejects_head_dims_its_kernels_lack() {
    let Some(mut gpu) = gpu() else { return };
    let s = shape(1, 5, 1, 40);
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
    gpu.set_attention_kernels(Some(AttentionKernels::Fast));
    assert!(matches!(
        gpu.attention_forward(&mut out, &mut lse, &qkv, s),
        Err(Error::Unsupported(_))
    ));
    gpu.set_attention_kernels(None);
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
        gpu.set_attention_kernels(Some(kernels));
        assert!(matches!(
            gpu.attention_forward(&mut out, &mut lse, &qkv, s),
            Err(Error::Shape { .. })
        ));
    }
    gpu.set_attention_kernels(None);
}

/// Head dims without a tensor-core instance on CUDA (the golden fixtures' and small models' 4,
/// 8, 24, 40; 1 and 256 the general kernels' bounds) at odd token counts.
const ANY_HEAD_DIM: [AttentionShape; 7] = [
    AttentionShape {
        batch: 1,
        tokens: 5,
        heads: 2,
        head_dim: 4,
    },
    AttentionShape {
        batch: 2,
        tokens: 17,
        heads: 3,
        head_dim: 8,
    },
    AttentionShape {
        batch: 1,
        tokens: 17,
        heads: 2,
        head_dim: 24,
    },
    AttentionShape {
        batch: 2,
        tokens: 5,
        heads: 2,
        head_dim: 40,
    },
    AttentionShape {
        batch: 1,
        tokens: 37,
        heads: 2,
        head_dim: 40,
    },
    AttentionShape {
        batch: 1,
        tokens: 17,
        heads: 3,
        head_dim: 1,
    },
    AttentionShape {
        batch: 1,
        tokens: 33,
        heads: 1,
        head_dim: GENERAL_MAX_HEAD_DIM,
    },
];

/// Forward and backward at [`ANY_HEAD_DIM`] against f64 (bf16 outputs 1e-2, lse 1e-5, bf16
/// gradients 2e-2 on CUDA), and bit for bit on a second run. Returns the runs.
fn check_attention_at_any_head_dim<B: Backend>(be: &mut B, tol: Tol) -> Vec<AttentionRun> {
    let mut runs = Vec::new();
    for (i, s) in ANY_HEAD_DIM.into_iter().enumerate() {
        let run = run_attention(be, s, 300 + 2 * i as u64);
        let (ref_out, ref_lse) = attention_forward_reference(&to_f64(&run.qkv), s);
        let ref_dqkv = attention_backward_reference(&to_f64(&run.qkv), &to_f64(&run.dout), s);
        assert_close(&format!("out {s:?}"), &run.out, &ref_out, tol.at(1e-2));
        assert_close(&format!("lse {s:?}"), &run.lse, &ref_lse, tol.at(1e-5));
        assert_close(&format!("dqkv {s:?}"), &run.dqkv, &ref_dqkv, tol.at(2e-2));
        let again = run_attention(be, s, 300 + 2 * i as u64);
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
        runs.push(run);
    }
    runs
}

/// On CUDA these shapes run the general kernels; they must also agree with the CPU backend on
/// the same inputs, with the same bounds.
#[test]
fn attention_at_any_head_dim_matches_f64_the_cpu_and_repeats_bit_for_bit() {
    let cpu_runs = check_attention_at_any_head_dim(&mut cpu(), Tol::f32(2e-6));
    let Some(mut gpu) = gpu() else { return };
    for s in ANY_HEAD_DIM {
        assert_eq!(
            AttentionKernels::for_head_dim(s.head_dim),
            AttentionKernels::General
        );
    }
    let gpu_runs = check_attention_at_any_head_dim(&mut gpu, Tol::CUDA);
    for ((s, run), cpu) in ANY_HEAD_DIM.iter().zip(&gpu_runs).zip(&cpu_runs) {
        assert_eq!((&run.qkv, &run.dout), (&cpu.qkv, &cpu.dout));
        let (out, lse, dqkv) = (to_f64(&cpu.out), to_f64(&cpu.lse), to_f64(&cpu.dqkv));
        assert_close(&format!("general out vs cpu {s:?}"), &run.out, &out, 1e-2);
        assert_close(&format!("general lse vs cpu {s:?}"), &run.lse, &lse, 1e-5);
        assert_close(
            &format!("general dqkv vs cpu {s:?}"),
            &run.dqkv,
            &dqkv,
            2e-2,
        );
    }
}

/// Forward then backward on `kernels`, on the inputs of [`run_attention`].
fn run_attention_with(
    gpu: &mut CudaBackend,
    s: AttentionShape,
    seed: u64,
    kernels: AttentionKernels,
) -> AttentionRun {
    let qkv = round_bf16(&randn(seed, s.qkv_len(), 1.0));
    let dout = round_bf16(&randn(seed + 1, s.out_len(), 1.0));
    let (d_qkv, d_dout) = (up_half(gpu, &qkv), up_half(gpu, &dout));
    let mut out = gpu.alloc_zeros::<bf16>(s.out_len()).unwrap();
    let mut lse = gpu.alloc_zeros::<f32>(s.stats_len()).unwrap();
    let mut dqkv = gpu.alloc_zeros::<bf16>(s.qkv_len()).unwrap();
    gpu.set_attention_kernels(Some(kernels));
    gpu.attention_forward(&mut out, &mut lse, &d_qkv, s)
        .unwrap();
    gpu.attention_backward(&mut dqkv, &d_dout, &d_qkv, &out, &lse, s)
        .unwrap();
    gpu.set_attention_kernels(None);
    AttentionRun {
        out: down_half(gpu, &out),
        lse: down(gpu, &lse),
        dqkv: down_half(gpu, &dqkv),
        qkv,
        dout,
    }
}

/// Where both exist, the general kernels give the fast kernels' answer within bf16 noise (the
/// fast ones round the probabilities to bf16, the general ones keep them in f32).
#[test]
fn cuda_attention_general_kernels_agree_with_the_fast_kernels() {
    let Some(mut gpu) = gpu() else { return };
    for (i, (tokens, heads, head_dim)) in [(33, 2, 16), (17, 3, 32), (70, 1, 32)]
        .into_iter()
        .enumerate()
    {
        let s = shape(2, tokens, heads, head_dim);
        let seed = 400 + 2 * i as u64;
        let fast = run_attention_with(&mut gpu, s, seed, AttentionKernels::Fast);
        let general = run_attention_with(&mut gpu, s, seed, AttentionKernels::General);
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

// ---- tokens and samples -------------------------------------------------------------------

/// Token assembly `[cls + pos[0], reg.., pe + pos[1 + p]]` with and without registers, the
/// scaled gather of kept samples, and the residual add into a batch subset (kept samples with
/// LayerScale, or the first samples without).
fn check_tokens_and_samples<B: Backend>(be: &mut B, tol: Tol) {
    let (batch, patches, c) = (3, 10, 24);
    let pe = randn(80, batch * patches * c, 1.0);
    let cls = randn(81, c, 1.0);
    let pos = randn(82, (1 + patches) * c, 1.0);
    let reg = randn(83, 2 * c, 1.0);
    let (d_pe, d_cls, d_pos, d_reg) = (up(be, &pe), up(be, &cls), up(be, &pos), up(be, &reg));
    for registers in [0, 2] {
        let layout = TokenLayout {
            batch,
            patches,
            registers,
            channels: c,
        };
        let t = layout.tokens();
        let mut x = nans(be, batch * t * c);
        let regs = (registers > 0).then_some(&*d_reg);
        be.assemble_tokens(&mut x, &d_pe, &d_cls, regs, &d_pos, layout)
            .unwrap();
        let want: Vec<f32> = (0..batch * t * c)
            .map(|i| {
                let (b, tok, j) = (i / (t * c), (i / c) % t, i % c);
                match tok {
                    0 => cls[j] + pos[j],
                    _ if tok <= registers => reg[(tok - 1) * c + j],
                    _ => {
                        let p = tok - 1 - registers;
                        pe[(b * patches + p) * c + j] + pos[(1 + p) * c + j]
                    }
                }
            })
            .collect();
        assert_eq!(down(be, &x), want, "{registers} registers");
    }

    // Samples of `len` values (2 tokens of c channels) in a batch of 5; three kept, unsorted.
    let (batch, len) = (5, 2 * c);
    let x = randn(84, batch * len, 1.0);
    let kept = [3i64, 0, 4];
    let (d_x, d_kept) = (up(be, &x), up_i64(be, &kept));
    let mut gathered = nans(be, kept.len() * len);
    be.gather_samples_scaled(&mut gathered, &d_x, &d_kept, len, 1.25)
        .unwrap();
    let want: Vec<f32> = kept
        .iter()
        .flat_map(|&i| {
            x[i as usize * len..(i as usize + 1) * len]
                .iter()
                .map(|v| 1.25 * v)
        })
        .collect();
    assert_eq!(down(be, &gathered), want);

    let y = randn(85, kept.len() * len, 1.0);
    let gamma = randn(86, c, 0.5);
    let (d_y, d_gamma) = (up(be, &y), up(be, &gamma));
    for (kept_given, samples) in [(true, kept.len()), (false, 2)] {
        let mut d_x = up(be, &x);
        let subset = SampleSubset {
            kept: kept_given.then_some(&*d_kept),
            samples,
            batch,
            sample_len: len,
            channels: c,
        };
        let branch = d_y.window(0..samples * len).unwrap();
        let scale = kept_given.then_some(&*d_gamma);
        be.residual_add_samples(&mut d_x, &branch, scale, subset, 1.25)
            .unwrap();
        let mut want = to_f64(&x);
        for j in 0..samples {
            let i = if kept_given { kept[j] as usize } else { j };
            for e in 0..len {
                let g = if kept_given { gamma[e % c] as f64 } else { 1.0 };
                want[i * len + e] += 1.25 * g * y[j * len + e] as f64;
            }
        }
        let name = format!("residual_add_samples (kept given: {kept_given})");
        assert_close(&name, &down(be, &d_x), &want, tol.at(1e-6));
    }
}

#[test]
fn token_assembly_and_sample_subsets_match_reference() {
    check_tokens_and_samples(&mut cpu(), Tol::f32(2e-7));
    let Some(mut gpu) = gpu() else { return };
    check_tokens_and_samples(&mut gpu, Tol::CUDA);
}

// ---- LayerNorm ----------------------------------------------------------------------------

/// The fused residual + LayerNorm into an operand, the plain LayerNorm into f32 with its saved
/// statistics, and the backward accumulating into `dinp`, `dweight` and `dbias`.
fn check_layernorm<B: Backend>(be: &mut B, tol: Tol) {
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

    let mut d_res = up(be, &residual);
    let (d_branch, d_gamma) = (up(be, &branch), up(be, &gamma));
    let (d_w, d_b) = (up(be, &w), up(be, &bias));
    let mut out_half = nans_half(be, rows * c);
    let mut out_f32 = nans(be, rows * c);
    let (mut mean, mut rstd) = (nans(be, rows), nans(be, rows));
    let p = || LnParams {
        weight: &*d_w,
        bias: &*d_b,
        eps,
    };
    be.residual_layernorm_forward(
        Residual {
            stream: &mut d_res,
            branch: &d_branch,
            gamma: Some(&d_gamma),
        },
        NormOut::Half(&mut *out_half),
        LnStats {
            mean: &mut mean,
            rstd: &mut rstd,
        },
        p(),
        shape,
    )
    .unwrap();
    let got_half = down_half(be, &out_half);
    be.layernorm_forward(
        NormOut::F32(&mut *out_f32),
        LnStats {
            mean: &mut mean,
            rstd: &mut rstd,
        },
        &d_res,
        p(),
        shape,
    )
    .unwrap();

    let x: Vec<f64> = (0..rows * c)
        .map(|i| residual[i] as f64 + gamma[i % c] as f64 * branch[i] as f64)
        .collect();
    let (ref_out, ref_mean, ref_rstd) = layernorm_reference(&x, &w, &bias, c, eps as f64);
    let got = down(be, &d_res);
    assert_close("residual_layernorm residual", &got, &x, tol.at(1e-6));
    let name = "residual_layernorm out (operand)";
    assert_close(name, &got_half, &ref_out, tol.at(1e-2));
    let got = down(be, &out_f32);
    assert_close("layernorm out (f32)", &got, &ref_out, tol.at(1e-5));
    let got = down(be, &mean);
    assert_close("layernorm mean", &got, &ref_mean, tol.at(1e-5));
    let got = down(be, &rstd);
    assert_close("layernorm rstd", &got, &ref_rstd, tol.at(1e-5));

    let mut d_dinp = up(be, &dinp0);
    let (mut d_dw, mut d_db) = (up(be, &dw0), up(be, &db0));
    let d_dout = up(be, &dout);
    be.layernorm_backward(
        &mut d_dinp,
        Accumulate::Add,
        &mut d_dw,
        &mut d_db,
        LnSaved {
            dout: &d_dout,
            inp: &d_res,
            weight: &d_w,
            mean: &mean,
            rstd: &rstd,
        },
        shape,
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
    let got = down(be, &d_dinp);
    assert_close("layernorm dinp (+=)", &got, &ref_dinp, tol.at(1e-5));
    let got = down(be, &d_dw);
    assert_close("layernorm dweight (+=)", &got, &ref_dw, tol.at(1e-5));
    let got = down(be, &d_db);
    assert_close("layernorm dbias (+=)", &got, &ref_db, tol.at(1e-5));
}

#[test]
fn layernorm_forward_fused_residual_and_backward_match_f64() {
    check_layernorm(&mut cpu(), Tol::f32(2e-6));
    let Some(mut gpu) = gpu() else { return };
    check_layernorm(&mut gpu, Tol::CUDA);
}

// ---- elementwise --------------------------------------------------------------------------

#[test]
fn reference_erf_is_accurate() {
    // Known values: erf(0.5) = 0.5204998778130465, erf(1) = 0.8427007929497149,
    // erf(3) = 0.9999779095030014.
    assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-14);
    assert!((erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-14);
    assert!((erf(-3.0) + 0.999_977_909_503_001_4).abs() < 1e-14);
}

/// The CPU's f32 erf (a rational approximation, the form XLA and Eigen use) against libm's.
#[test]
fn cpu_erf_matches_libm_to_f32_precision() {
    use dinotrain::backend::cpu::elementwise::erf;
    let mut worst = 0f32;
    for i in -600_000..=600_000 {
        let x = i as f32 * 1e-5;
        worst = worst.max((erf(x) - libm::erff(x)).abs());
    }
    assert!(worst < 5e-7, "max |erf - erff| = {worst}");
    assert_eq!(erf(0.0), 0.0);
    assert!((erf(9.0) - 1.0).abs() <= f32::EPSILON && erf(-9.0) == -erf(9.0));
}

/// `gelu` at `x` through the trait: fc1's GELU on a 1 × 1 identity weight (`pre` = `x`).
fn gelu_through_linear<B: Backend>(be: &mut B, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dims = LinearDims {
        rows: x.len(),
        in_dim: 1,
        out_dim: 1,
    };
    let (inp, one) = (up_half(be, x), up_half(be, &[1.0]));
    let (mut pre, mut act) = (nans(be, x.len()), nans_half(be, x.len()));
    let out = LinearOut::Gelu {
        pre: &mut *pre,
        act: &mut *act,
    };
    be.linear_forward(out, &inp, &one, None, dims).unwrap();
    (down(be, &pre), down_half(be, &act))
}

/// Known values of the exact (erf) GELU: gelu(1) = 0.5 (1 + erf(1/√2)) = 0.841344746...,
/// gelu(−2) = −0.0455002638..., gelu(0) = 0.
fn check_gelu_known_values<B: Backend>(be: &mut B, tol: Tol) {
    let (pre, act) = gelu_through_linear(be, &[1.0, -2.0, 0.0]);
    assert_eq!(pre, [1.0, -2.0, 0.0]);
    // An operand output is within half a bf16 step (2^-9 below 1).
    let bound = tol.at(2e-3);
    assert!((act[0] - 0.841_344_8).abs() < bound as f32, "{}", act[0]);
    assert!((act[1] + 0.045_500_264).abs() < bound as f32, "{}", act[1]);
    assert_eq!(act[2], 0.0);
}

#[test]
fn gelu_matches_known_values() {
    check_gelu_known_values(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_gelu_known_values(&mut gpu, Tol::CUDA);
}

/// The backward passes of GELU and SiLU against central differences of the backend's own
/// forward at seven points (`silu` through SwiGLU with `x2 = 1`). Only where outputs are f32:
/// a central difference of bf16 outputs is rounding noise.
fn check_activation_gradients_match_central_differences<B: Backend>(be: &mut B) {
    assert!(!rounds_operands(be), "needs f32 outputs");
    let xs = [-3.0f64, -1.2, -0.3, 0.0, 0.4, 1.7, 3.5];
    let h = 1e-3f64;
    let at = |dx: f64| -> Vec<f32> { xs.iter().map(|&x| (x + dx) as f32).collect() };
    let n = xs.len();
    // GELU: gelu_backward with dact = 1 is gelu'(pre).
    let (_, plus) = gelu_through_linear(be, &at(h));
    let (_, minus) = gelu_through_linear(be, &at(-h));
    let (pre, ones) = (up(be, &at(0.0)), up(be, &vec![1.0; n]));
    let mut dpre = nans_half(be, n);
    be.gelu_backward(&mut dpre, &ones, &pre).unwrap();
    let grad = down_half(be, &dpre);
    // SiLU: swiglu with x2 = 1 is silu(x1); its backward with dgated = 1 gives silu'(x1).
    let silu_at = |be: &mut B, x: &[f32]| -> Vec<f32> {
        let x12: Vec<f32> = x.iter().flat_map(|&v| [v, 1.0]).collect();
        let x12 = up(be, &x12);
        let mut gated = nans_half(be, x.len());
        be.swiglu_forward(&mut gated, &x12, x.len(), 1).unwrap();
        down_half(be, &gated)
    };
    let (silu_plus, silu_minus) = (silu_at(be, &at(h)), silu_at(be, &at(-h)));
    let x12: Vec<f32> = at(0.0).iter().flat_map(|&v| [v, 1.0]).collect();
    let x12 = up(be, &x12);
    let mut dx12 = nans_half(be, 2 * n);
    be.swiglu_backward(&mut dx12, &ones, &x12, n, 1).unwrap();
    let dx12 = down_half(be, &dx12);
    for (i, &x) in xs.iter().enumerate() {
        let central = |p: &[f32], m: &[f32]| (p[i] as f64 - m[i] as f64) / (2.0 * h);
        let gelu_fd = central(&plus, &minus);
        assert!((grad[i] as f64 - gelu_fd).abs() < 2e-3, "gelu' at {x}");
        let silu_fd = central(&silu_plus, &silu_minus);
        assert!((dx12[2 * i] as f64 - silu_fd).abs() < 2e-3, "silu' at {x}");
    }
}

#[test]
fn gelu_and_silu_gradients_match_central_differences_on_the_cpu() {
    check_activation_gradients_match_central_differences(&mut cpu());
}

/// Casts to and from operands, the GELU backward, the LayerScale backward and column sums.
fn check_elementwise<B: Backend>(be: &mut B, tol: Tol) {
    let (rows, c) = (300, 1536);
    let n = rows * c;
    let x = randn(40, n, 2.0);
    let bias = randn(41, c, 0.5);
    let d_x = up(be, &x);

    // Casts: to an operand exactly the half crate's round-to-nearest-even (bf16), back exactly.
    let mut as_half = nans_half(be, n);
    be.cast_to_half(&mut as_half, &d_x).unwrap();
    let want = operand_values(be, &x);
    assert_eq!(bits(&down_half(be, &as_half)), bits(&want));
    let mut back = nans(be, n);
    be.cast_to_f32(&mut back, &as_half).unwrap();
    assert_eq!(bits(&down(be, &back)), bits(&want));

    // gelu backward at fc1's pre-activation x + bias.
    let pre: Vec<f32> = (0..n).map(|i| x[i] + bias[i % c]).collect();
    let dact = randn(42, n, 1.0);
    let (d_pre, d_dact) = (up(be, &pre), up(be, &dact));
    let mut d = nans_half(be, n);
    be.gelu_backward(&mut d, &d_dact, &d_pre).unwrap();
    let ref_d: Vec<f64> = (0..n)
        .map(|i| dact[i] as f64 * gelu_grad(pre[i] as f64))
        .collect();
    // Against the reference rounded to bf16 the same way: only values whose f32 result falls
    // on the other side of a rounding boundary may differ (by one bf16 step).
    let got = down_half(be, &d);
    let want = as_operand(be, &ref_d);
    assert_close("gelu_backward", &got, &want, tol.at(1e-4));

    // LayerScale backward and column sums.
    let gamma = randn(43, c, 1e-1);
    let branch = randn(44, n, 1.0);
    let (d_gamma, d_branch) = (up(be, &gamma), up(be, &branch));
    let dres = randn(45, n, 1.0);
    let dgamma0 = randn(46, c, 1.0);
    let d_dres = up(be, &dres);
    let mut dbranch = nans_half(be, n);
    let mut dgamma = up(be, &dgamma0);
    let shape = NormShape { rows, channels: c };
    be.layerscale_backward(
        &mut dbranch,
        &mut dgamma,
        &d_dres,
        &d_branch,
        &d_gamma,
        shape,
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
    let (got, want) = (down_half(be, &dbranch), as_operand(be, &ref_dbranch));
    assert_close("layerscale dbranch", &got, &want, tol.at(1e-4));
    let got = down(be, &dgamma);
    assert_close("layerscale dgamma (+=)", &got, &ref_dgamma, tol.at(1e-5));
    let mut colsum = nans(be, c);
    be.column_sum(&mut colsum, &d_dres, rows, Accumulate::Overwrite)
        .unwrap();
    let got = down(be, &colsum);
    assert_close("column_sum", &got, &ref_colsum, tol.at(1e-5));
    let mut colsum = up(be, &dgamma0);
    be.column_sum(&mut colsum, &d_dres, rows, Accumulate::Add)
        .unwrap();
    let ref_colsum_add: Vec<f64> = (0..c).map(|i| ref_colsum[i] + dgamma0[i] as f64).collect();
    let got = down(be, &colsum);
    assert_close("column_sum (+=)", &got, &ref_colsum_add, tol.at(1e-5));
}

#[test]
fn elementwise_kernels_match_f64() {
    check_elementwise(&mut cpu(), Tol::f32(2e-6));
    let Some(mut gpu) = gpu() else { return };
    check_elementwise(&mut gpu, Tol::CUDA);
}

/// The CUDA elementwise kernels outside the trait: GELU forward, fc1's bias + GELU (the
/// pre-activation saved in place), the bias add, the LayerScale residual and full sums.
#[test]
fn cuda_elementwise_kernels_outside_the_trait_match_f64() {
    let Some(mut gpu) = gpu() else { return };
    let (rows, c) = (300, 1536);
    let n = rows * c;
    let x = randn(40, n, 2.0);
    let bias = randn(41, c, 0.5);
    let d_x = gpu.upload(&x).unwrap();
    let d_bias = gpu.upload(&bias).unwrap();

    let mut g = gpu.alloc_zeros::<f32>(n).unwrap();
    gpu.gelu_forward(&mut g, &d_x).unwrap();
    let ref_gelu: Vec<f64> = x.iter().map(|&v| gelu(v as f64)).collect();
    assert_close("gelu_forward", &gpu.download(&g).unwrap(), &ref_gelu, 1e-6);
    let mut pre = gpu.upload(&x).unwrap();
    let mut act = gpu.alloc_zeros::<bf16>(n).unwrap();
    gpu.bias_gelu_forward(&mut pre, &mut act, Some(&d_bias), rows, c)
        .unwrap();
    let ref_pre: Vec<f64> = (0..n).map(|i| x[i] as f64 + bias[i % c] as f64).collect();
    assert_close(
        "bias_gelu pre",
        &gpu.download(&pre).unwrap(),
        &ref_pre,
        1e-7,
    );
    let ref_act: Vec<f64> = ref_pre.iter().map(|&v| gelu(v)).collect();
    assert_close(
        "bias_gelu act (bf16)",
        &gpu.download_bf16(&act).unwrap(),
        &ref_act,
        1e-2,
    );

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

    // Full sums (positive terms for the plain sum: no cancellation to amplify f32 rounding).
    let mut total = gpu.alloc_zeros::<f32>(1).unwrap();
    let positive = gpu.upload(&uniform(47, n, 0.0, 1.0)).unwrap();
    gpu.sum(&mut total, &positive, ReduceOp::Sum, 0.5).unwrap();
    let ref_sum = 0.5
        * uniform(47, n, 0.0, 1.0)
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>();
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
    // The inherent column sum with a second factor: Σ_r x ∘ y, written.
    let mut colsum = gpu.alloc_zeros::<f32>(c).unwrap();
    gpu.column_sum_product(
        &mut colsum,
        &d_x,
        Some(&d_branch),
        rows,
        Accumulate::Overwrite,
    )
    .unwrap();
    let mut ref_colsum = vec![0.0f64; c];
    for i in 0..n {
        ref_colsum[i % c] += x[i] as f64 * branch[i] as f64;
    }
    assert_close(
        "column_sum x∘y",
        &gpu.download(&colsum).unwrap(),
        &ref_colsum,
        1e-5,
    );
}

/// SwiGLU (ViT-g's FFN gate) forward and backward against f64, rounded to bf16 the same way
/// where the backend rounds operands: only values whose f32 result lands across a rounding
/// boundary may differ (by one bf16 step). An odd width, and inputs large enough to saturate
/// the sigmoid. Lengths are checked before anything runs.
fn check_swiglu<B: Backend>(be: &mut B, tol: Tol) {
    let (rows, width) = (130, 300);
    let x12 = randn(70, rows * 2 * width, 3.0);
    let dgated = randn(71, rows * width, 1.0);
    let (d_x12, d_dgated) = (up(be, &x12), up(be, &dgated));

    let mut gated = nans_half(be, rows * width);
    be.swiglu_forward(&mut gated, &d_x12, rows, width).unwrap();
    let x = |r: usize, i: usize| x12[r * 2 * width + i] as f64;
    let ref_gated: Vec<f64> = (0..rows * width)
        .map(|j| {
            let (r, i) = (j / width, j % width);
            silu(x(r, i)) * x(r, width + i)
        })
        .collect();
    let (got, want) = (down_half(be, &gated), as_operand(be, &ref_gated));
    assert_close("swiglu_forward", &got, &want, tol.at(1e-4));

    let mut dx12 = nans_half(be, rows * 2 * width);
    be.swiglu_backward(&mut dx12, &d_dgated, &d_x12, rows, width)
        .unwrap();
    let got = down_half(be, &dx12);
    // Each half of the rows on its own (x1's gradient, then x2's): their scales differ.
    for (name, half) in [("dx1", 0), ("dx2", 1)] {
        let reference: Vec<f64> = (0..rows * width)
            .map(|j| {
                let (r, i) = (j / width, j % width);
                let dy = dgated[j] as f64;
                match half {
                    0 => dy * x(r, width + i) * silu_grad(x(r, i)),
                    _ => dy * silu(x(r, i)),
                }
            })
            .collect();
        let got: Vec<f32> = (0..rows * width)
            .map(|j| got[(j / width) * 2 * width + half * width + j % width])
            .collect();
        let want = as_operand(be, &reference);
        assert_close(
            &format!("swiglu_backward {name}"),
            &got,
            &want,
            tol.at(1e-4),
        );
    }

    assert!(matches!(
        be.swiglu_forward(&mut gated, &d_x12, rows, width + 1),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        be.swiglu_backward(&mut dx12, &d_dgated, &d_x12, rows + 1, width),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        be.swiglu_forward(&mut gated, &d_x12, rows, 0),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn swiglu_matches_f64() {
    check_swiglu(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_swiglu(&mut gpu, Tol::CUDA);
}

fn check_reductions_are_bit_reproducible<B: Backend>(be: &mut B) {
    let (rows, c) = (1000, 384);
    let x = up(be, &randn(50, rows * c, 1.0));
    let (mut first, mut second) = (nans(be, c), nans(be, c));
    be.column_sum(&mut first, &x, rows, Accumulate::Overwrite)
        .unwrap();
    be.column_sum(&mut second, &x, rows, Accumulate::Overwrite)
        .unwrap();
    assert_eq!(bits(&down(be, &first)), bits(&down(be, &second)));
}

#[test]
fn reductions_are_bit_reproducible() {
    check_reductions_are_bit_reproducible(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_reductions_are_bit_reproducible(&mut gpu);
}

/// `dst[10..20] := operand(src[25..35])` through an operand window, then back into two windows
/// of `dst`: only their range of the parent changes, and the parent outlives its windows.
fn check_windows<B: Backend>(be: &mut B) {
    let src: Vec<f32> = (0..40).map(|i| i as f32 * 0.5 - 3.0).collect();
    let d_src = up(be, &src);
    let mut d_dst = up(be, &[7.0f32; 40]);
    let mut tmp = nans_half(be, 10);
    be.cast_to_half(&mut tmp, &d_src.window(25..35).unwrap())
        .unwrap();
    {
        let [mut a, mut b] = d_dst.windows_mut([10..15, 15..20]).unwrap();
        be.cast_to_f32(&mut a, &tmp.window(0..5).unwrap()).unwrap();
        be.cast_to_f32(&mut b, &tmp.window(5..10).unwrap()).unwrap();
    }
    let got = down(be, &d_dst);
    let moved = operand_values(be, &src[25..35]);
    let want: Vec<f32> = (0..40)
        .map(|i| match i {
            10..20 => moved[i - 10],
            _ => 7.0,
        })
        .collect();
    assert_eq!(got, want);
    // The parent is intact after the windows are gone (they never free its memory).
    assert_eq!(down(be, &d_src), src);
    assert!(d_src.window(30..41).is_err());
    assert!(d_dst.windows_mut([0..5, 4..8]).is_err());
}

#[test]
fn windows_read_and_write_only_their_range_of_the_parent_buffer() {
    check_windows(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_windows(&mut gpu);
}
