// Elementwise ops and deterministic reductions.
//
// Dimensions: n elements, or N rows x C channels (row-major). f32 unless named bf16.
// gelu is the exact erf form: 0.5 x (1 + erf(x / sqrt 2)); silu(x) = x sigmoid(x).
//
// Launch contracts (grid-stride loops: any grid works; launchers use ceil(n / 256) capped
// at 65535 x 1 blocks of 256 threads):
//   cast_f32_to_bf16, cast_bf16_to_f32         out[i] = convert(inp[i])
//   add_bias                                   x[r, c] += bias[c]
//   bias_gelu_forward                          pre = inp + bias (pre may alias inp; bias may be null,
//                                              then an aliased pre is not rewritten); act = gelu(pre) in bf16
//   gelu_forward                               out = gelu(inp), f32
//   gelu_backward                              dpre = bf16(dact * gelu'(pre)) (the next GEMM's operand)
//   layerscale_residual_forward                residual += gamma * branch
//   layerscale_backward_input                  dbranch = bf16(gamma * dresidual) (the next GEMM's operand)
// SwiGLU gate (ViT-g's SwiGLUFFNFused) on x12 [N, 2W] = [x1 | x2] per row, the w12 output:
//   swiglu_forward                             gated [N, W] = bf16(silu(x1) * x2) (w3's operand)
//   swiglu_backward                            dx12 [N, 2W] = bf16([dgated * x2 * silu'(x1) |
//                                              dgated * silu(x1)]) (w12's operand)
// Batch-subset residual branches (stochastic depth): S samples of L values (L = T * C), kept
// [S] i64 the sample indices (unique):
//   gather_samples_scaled                      out[j, e] = alpha * x[kept[j], e]
//   residual_add_samples                       x[kept[j], e] += alpha * gamma[e % C] * y[j, e]
//                                              (gamma null: 1; kept null: sample j itself)
// Reductions (fixed order, bit-reproducible; no atomics):
//   column_sum_partial: grid (ceil(C / 256), G), block 256 -> partial [G, C] of sum_r x (or x * y)
//   column_partial_reduce: grid ceil(C / 256), block 256 -> out[c] (= or +=) scale * sum_g partial
//   sum_partial: grid G, block 256 -> partial [G] of sum x (REDUCE_SUM) or sum x^2
//   sum_finalize: grid 1, block 256 -> out[0] = scale * sum_g partial[g]
#include "common.cuh"

enum GradWrite { GRAD_OVERWRITE = 0, GRAD_ACCUMULATE = 1 };
enum ReduceOp { REDUCE_SUM = 0, REDUCE_SUM_SQUARES = 1 };

#define GRID_STRIDE(i, n)                                                                      \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);            \
         i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void cast_f32_to_bf16(bf16_t* __restrict__ out, const float* __restrict__ inp,
                                            long long n) {
    GRID_STRIDE(i, n) out[i] = f32_to_bf16(inp[i]);
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const bf16_t* __restrict__ inp,
                                            long long n) {
    GRID_STRIDE(i, n) out[i] = bf16_to_f32(inp[i]);
}

extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ bias, int N,
                                    int C) {
    GRID_STRIDE(i, (long long)N * C) x[i] += bias[i % C];
}

extern "C" __global__ void bias_gelu_forward(float* pre, bf16_t* __restrict__ act, const float* inp,
                                             const float* __restrict__ bias, int N, int C) {
    GRID_STRIDE(i, (long long)N * C) {
        const float v = inp[i] + (bias ? bias[i % C] : 0.0f);
        if (bias || pre != inp) pre[i] = v;  // in place without a bias: pre already holds v
        act[i] = f32_to_bf16(gelu_erf(v));
    }
}

extern "C" __global__ void gelu_forward(float* __restrict__ out, const float* __restrict__ inp,
                                        long long n) {
    GRID_STRIDE(i, n) out[i] = gelu_erf(inp[i]);
}

extern "C" __global__ void gelu_backward(bf16_t* __restrict__ dpre, const float* __restrict__ dact,
                                         const float* __restrict__ pre, long long n) {
    GRID_STRIDE(i, n) dpre[i] = f32_to_bf16(dact[i] * gelu_erf_grad(pre[i]));
}

// The CPU reference's formulas (src/backend/cpu/elementwise.rs), in the same order.
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// d silu / dx = sigmoid(x) (1 + x (1 - sigmoid(x)))
__device__ __forceinline__ float silu_grad(float x) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

extern "C" __global__ void swiglu_forward(bf16_t* __restrict__ gated, const float* __restrict__ x12,
                                          int N, int W) {
    GRID_STRIDE(i, (long long)N * W) {
        const long long x1 = i / W * 2 * W + i % W;  // x2 = x1 + W
        gated[i] = f32_to_bf16(silu(x12[x1]) * x12[x1 + W]);
    }
}

extern "C" __global__ void swiglu_backward(bf16_t* __restrict__ dx12,
                                           const float* __restrict__ dgated,
                                           const float* __restrict__ x12, int N, int W) {
    GRID_STRIDE(i, (long long)N * W) {
        const long long x1 = i / W * 2 * W + i % W;  // x2 = x1 + W
        const float a = x12[x1], g = x12[x1 + W], d = dgated[i];
        dx12[x1] = f32_to_bf16(d * g * silu_grad(a));
        dx12[x1 + W] = f32_to_bf16(d * silu(a));
    }
}

extern "C" __global__ void layerscale_residual_forward(float* __restrict__ residual,
                                                       const float* __restrict__ branch,
                                                       const float* __restrict__ gamma, int N,
                                                       int C) {
    GRID_STRIDE(i, (long long)N * C) residual[i] += gamma[i % C] * branch[i];
}

extern "C" __global__ void layerscale_backward_input(bf16_t* __restrict__ dbranch,
                                                     const float* __restrict__ dresidual,
                                                     const float* __restrict__ gamma, int N,
                                                     int C) {
    GRID_STRIDE(i, (long long)N * C) dbranch[i] = f32_to_bf16(gamma[i % C] * dresidual[i]);
}

extern "C" __global__ void gather_samples_scaled(float* __restrict__ out,
                                                 const float* __restrict__ x,
                                                 const i64* __restrict__ kept, int S,
                                                 long long L, float alpha) {
    GRID_STRIDE(i, S * L) out[i] = alpha * x[kept[i / L] * L + i % L];
}

extern "C" __global__ void residual_add_samples(float* __restrict__ x, const float* __restrict__ y,
                                                const float* __restrict__ gamma,
                                                const i64* __restrict__ kept, int S, long long L,
                                                int C, float alpha) {
    GRID_STRIDE(i, S * L) {
        const long long j = i / L;
        const long long e = i % L;
        const long long sample = kept ? kept[j] : j;
        x[sample * L + e] += alpha * (gamma ? gamma[e % C] : 1.0f) * y[i];
    }
}

extern "C" __global__ void column_sum_partial(float* __restrict__ partial,
                                              const float* __restrict__ x,
                                              const float* __restrict__ y, int N, int C,
                                              int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) {
        const long long i = (long long)r * C + c;
        acc += y ? x[i] * y[i] : x[i];
    }
    partial[(long long)blockIdx.y * C + c] = acc;
}

extern "C" __global__ void column_partial_reduce(float* __restrict__ out,
                                                 const float* __restrict__ partial, int G, int C,
                                                 float scale, int grad_write) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int g = 0; g < G; g++) acc += partial[(long long)g * C + c];
    acc *= scale;
    out[c] = grad_write == GRAD_ACCUMULATE ? out[c] + acc : acc;
}

extern "C" __global__ void sum_partial(float* __restrict__ partial, const float* __restrict__ x,
                                       long long n, int op) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    GRID_STRIDE(i, n) {
        const float v = x[i];
        acc += op == REDUCE_SUM_SQUARES ? v * v : v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void sum_finalize(float* __restrict__ out, const float* __restrict__ partial,
                                        int G, float scale) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int g = threadIdx.x; g < G; g += blockDim.x) acc += partial[g];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc * scale;
}
