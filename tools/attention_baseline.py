#!/usr/bin/env python3
"""PyTorch baseline for the attention benchmark: scaled_dot_product_attention in bf16 at the
shapes of benches/cuda_kernels.rs, forward and forward+backward, timed with CUDA events
(median of 20 after 5 warm-ups). Prints `RESULT sdpa_<pass>_<name> <TFLOP/s> TFLOP/s` lines
with the same nominal FLOP counts as the Rust bench (forward 4*B*H*T^2*hd, fwd+bwd 3.5x)."""

import torch
import torch.nn.functional as F

WARMUP, REPS = 5, 20
SHAPES = [  # name, batch, tokens, heads (head dim 64)
    ("vits_T257", 64, 257, 6),
    ("vits_T50", 256, 50, 6),
    ("vitb_T257", 64, 257, 12),
    ("vitb_T50", 256, 50, 12),
]


def time_ms(fn):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[REPS // 2]


def main():
    if not torch.cuda.is_available():
        print("skipped: no GPU for PyTorch")
        return
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for name, b, t, h in SHAPES:
        hd = 64
        # The same layout as the Rust kernels' input: qkv [B, T, 3, H, hd] viewed per head.
        qkv = torch.randn(b, t, 3, h, hd, device="cuda", dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_(True) for i in range(3))
        dout = torch.randn(b, h, t, hd, device="cuda", dtype=torch.bfloat16)
        flops = 4.0 * b * h * t * t * hd

        def forward():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)

        def forward_backward():
            out = F.scaled_dot_product_attention(q, k, v)
            out.backward(dout)

        fwd = time_ms(forward)
        both = time_ms(forward_backward)
        fwd_tflops = flops / (fwd * 1e-3) / 1e12
        both_tflops = 3.5 * flops / (both * 1e-3) / 1e12
        print(f"sdpa {name:<10} B={b:<4} T={t:<5} H={h:<3} hd={hd}: fwd {fwd:8.3f} ms "
              f"{fwd_tflops:7.1f} TFLOP/s | fwd+bwd {both:8.3f} ms {both_tflops:7.1f} TFLOP/s")
        print(f"RESULT sdpa_fwd_{name} {fwd_tflops:.2f} TFLOP/s")
        print(f"RESULT sdpa_fwdbwd_{name} {both_tflops:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
