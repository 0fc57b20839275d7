//! CUDA kernel workbench: attention forward and forward+backward TFLOP/s at ViT-S/B shapes,
//! LayerNorm GB/s against the device-to-device copy bandwidth. Timed with CUDA events after a
//! warm-up, median of the repetitions, on random (non-zero) inputs.
//!
//! `cargo bench --bench cuda_kernels` (prints `skipped: no GPU` without one). Each result is
//! also printed as `RESULT <name> <value> <unit>` for `tools/gpu-check.sh`.

use dinotrain::backend::cuda::{bf16, CudaBackend, DevBuf};
use dinotrain::backend::{
    AttentionOps, AttentionShape, Buffers, LnParams, LnStats, NormOps, NormOut, NormShape,
};
use dinotrain::Result;

const WARMUP: usize = 5;
const REPS: usize = 20;

/// Median milliseconds of `REPS` timed runs of `f` (after `WARMUP` untimed ones).
fn time_ms(
    gpu: &mut CudaBackend,
    mut f: impl FnMut(&mut CudaBackend) -> Result<()>,
) -> Result<f64> {
    for _ in 0..WARMUP {
        f(gpu)?;
    }
    let mut times = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let start = gpu.record_event()?;
        f(gpu)?;
        let end = gpu.record_event()?;
        end.synchronize()
            .map_err(|e| dinotrain::Error::Cuda(e.to_string()))?;
        times.push(
            start
                .elapsed_ms(&end)
                .map_err(|e| dinotrain::Error::Cuda(e.to_string()))? as f64,
        );
    }
    times.sort_by(f64::total_cmp);
    Ok(times[REPS / 2])
}

/// A bf16 operand buffer holding `values`.
fn upload_half(gpu: &mut CudaBackend, values: &[f32]) -> Result<DevBuf<bf16>> {
    let mut buf = gpu.alloc_half(values.len())?;
    gpu.upload_half(&mut buf, values)?;
    Ok(buf)
}

/// An f32 buffer holding `values`.
fn upload(gpu: &mut CudaBackend, values: &[f32]) -> Result<DevBuf<f32>> {
    let mut buf = gpu.alloc_f32(values.len())?;
    gpu.upload_f32(&mut buf, values)?;
    Ok(buf)
}

/// Seeded pseudo-random values in [-1, 1) (a cheap LCG: timing needs non-zero data only).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bench_attention(gpu: &mut CudaBackend, name: &str, s: AttentionShape) -> Result<()> {
    let qkv = upload_half(gpu, &noise(s.qkv_len(), 1))?;
    let dout = upload_half(gpu, &noise(s.out_len(), 2))?;
    let mut out = gpu.alloc_half(s.out_len())?;
    let mut lse = gpu.alloc_f32(s.stats_len())?;
    let mut dqkv = gpu.alloc_half(s.qkv_len())?;
    // Nominal FLOPs: forward 2 GEMMs (QK^T, PV), backward 5 (FlashAttention convention).
    let fwd_flops = 4.0 * (s.batch * s.heads * s.tokens * s.tokens * s.head_dim) as f64;
    let fwd_ms = time_ms(gpu, |g| g.attention_forward(&mut out, &mut lse, &qkv, s))?;
    let both_ms = time_ms(gpu, |g| {
        g.attention_forward(&mut out, &mut lse, &qkv, s)?;
        g.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, s)
    })?;
    let fwd_tflops = fwd_flops / (fwd_ms * 1e-3) / 1e12;
    let both_tflops = 3.5 * fwd_flops / (both_ms * 1e-3) / 1e12;
    println!(
        "attention {name:<10} B={:<4} T={:<5} H={:<3} hd={}: fwd {fwd_ms:8.3} ms {fwd_tflops:7.1} TFLOP/s | fwd+bwd {both_ms:8.3} ms {both_tflops:7.1} TFLOP/s",
        s.batch, s.tokens, s.heads, s.head_dim
    );
    println!("RESULT attention_fwd_{name} {fwd_tflops:.2} TFLOP/s");
    println!("RESULT attention_fwdbwd_{name} {both_tflops:.2} TFLOP/s");
    Ok(())
}

fn bench_layernorm(
    gpu: &mut CudaBackend,
    name: &str,
    shape: NormShape,
    copy_gbs: f64,
) -> Result<()> {
    let n = shape.rows * shape.channels;
    let inp = upload(gpu, &noise(n, 3))?;
    let weight = upload(gpu, &noise(shape.channels, 4))?;
    let bias = upload(gpu, &noise(shape.channels, 5))?;
    let mut out = gpu.alloc_half(n)?;
    let mut mean = gpu.alloc_f32(shape.rows)?;
    let mut rstd = gpu.alloc_f32(shape.rows)?;
    let ms = time_ms(gpu, |g| {
        let stats = LnStats {
            mean: &mut *mean,
            rstd: &mut *rstd,
        };
        let p = LnParams {
            weight: &*weight,
            bias: &*bias,
            eps: 1e-6,
        };
        g.layernorm_forward(NormOut::Half(&mut *out), stats, &inp, p, shape)
    })?;
    // Compulsory traffic: read x (f32), write out (bf16), write mean and rstd.
    let bytes = (n * 4 + n * 2 + shape.rows * 8) as f64;
    let gbs = bytes / (ms * 1e-3) / 1e9;
    println!(
        "layernorm {name:<10} N={:<7} C={:<5}: {ms:8.3} ms {gbs:7.0} GB/s ({:.0}% of copy)",
        shape.rows,
        shape.channels,
        100.0 * gbs / copy_gbs
    );
    println!("RESULT layernorm_fwd_{name} {gbs:.0} GB/s");
    Ok(())
}

/// Device-to-device copy bandwidth (read + write bytes per second) of a 1 GiB buffer.
fn bench_copy(gpu: &mut CudaBackend) -> Result<f64> {
    let n = 1usize << 28; // f32 elements = 1 GiB
    let src = gpu.alloc_zeros::<f32>(n)?;
    let mut dst = gpu.alloc_zeros::<f32>(n)?;
    let ms = time_ms(gpu, |g| {
        g.stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| dinotrain::Error::Cuda(e.to_string()))
    })?;
    let gbs = 2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9;
    println!("copy       1 GiB dtod: {ms:8.3} ms {gbs:7.0} GB/s");
    println!("RESULT copy {gbs:.0} GB/s");
    Ok(gbs)
}

fn run(gpu: &mut CudaBackend) -> Result<()> {
    println!("device: {}", gpu.describe()?);
    let copy = bench_copy(gpu)?;
    let attn = |batch, tokens, heads| AttentionShape {
        batch,
        tokens,
        heads,
        head_dim: 64,
    };
    // ViT-S/14 (6 heads) and ViT-B/14 (12 heads): 224 px global crops (257 tokens) and
    // 98 px local crops (50 tokens), batches of a training step on one GPU.
    bench_attention(gpu, "vits_T257", attn(64, 257, 6))?;
    bench_attention(gpu, "vits_T50", attn(256, 50, 6))?;
    bench_attention(gpu, "vitb_T257", attn(64, 257, 12))?;
    bench_attention(gpu, "vitb_T50", attn(256, 50, 12))?;
    bench_layernorm(
        gpu,
        "vits",
        NormShape {
            rows: 64 * 257,
            channels: 384,
        },
        copy,
    )?;
    bench_layernorm(
        gpu,
        "vitb",
        NormShape {
            rows: 64 * 257,
            channels: 768,
        },
        copy,
    )?;
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mut gpu = match CudaBackend::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("skipped: no GPU ({e})");
            return;
        }
    };
    if let Err(e) = run(&mut gpu) {
        eprintln!("cuda_kernels bench failed: {e}");
        std::process::exit(1);
    }
}
