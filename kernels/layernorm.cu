// LayerNorm forward and backward, with an optional fused LayerScale residual add.
//
// Dimensions: N rows (B * T tokens), C channels. f32 statistics always.
//   inp / residual / branch [N, C] f32   the residual stream is f32
//   out                     [N, C] bf16 (GEMM input) or f32 (`_f32` suffix: final norm, heads)
//   mean, rstd              [N]    f32   saved for backward
//   weight, bias, gamma     [C]    f32
// LN(x) = (x - mean) / sqrt(var + eps) * weight + bias, biased variance over C.
//
// Launch contracts:
//   layernorm_forward_{bf16,f32}:            grid ceil(N / 8), block 256 (one warp per row)
//   residual_layernorm_forward_{bf16,f32}:   same; x = residual + gamma * branch is written to
//                                             residual_out (may alias residual) and normalised
//   layernorm_backward_input:                 grid ceil(N / 8), block 256 (one warp per row)
//   layernorm_backward_params_partial:        grid (ceil(C / 256), G), block 256; writes
//                                             partial [2, G, C] (dweight rows, then dbias rows),
//                                             reduced by elementwise.cu's column_partial_reduce.
// Every reduction has a fixed order: results are bit-reproducible.
#include "common.cuh"

enum GradWrite { GRAD_OVERWRITE = 0, GRAD_ACCUMULATE = 1 };

__device__ __forceinline__ void store(bf16_t* p, float v) { *p = f32_to_bf16(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }

// x[c] of the (possibly fused) input row.
struct PlainRow {
    const float* inp;
    __device__ float operator()(int c) const { return inp[c]; }
};
struct ResidualRow {
    const float* residual;
    const float* branch;
    const float* gamma;  // null: plain residual add
    __device__ float operator()(int c) const {
        return residual[c] + (gamma ? gamma[c] : 1.0f) * branch[c];
    }
};

template <typename Out, typename Row>
__device__ __forceinline__ void layernorm_row(Out* out, float* mean, float* rstd, Row x,
                                              float* residual_out, const float* weight,
                                              const float* bias, int row, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    float sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) sum += x(c);
    const float m = warp_sum(sum) / C;
    float sq = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float d = x(c) - m;
        sq += d * d;
    }
    const float s = rsqrtf(warp_sum(sq) / C + eps);
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float v = x(c);
        if (residual_out) residual_out[c] = v;  // after reading x(c): safe when aliasing
        store(&out[c], (v - m) * s * weight[c] + bias[c]);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

#define LN_FORWARD(SUFFIX, OUT_T)                                                              \
    extern "C" __global__ void layernorm_forward_##SUFFIX(                                      \
        OUT_T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,           \
        const float* __restrict__ inp, const float* __restrict__ weight,                       \
        const float* __restrict__ bias, int N, int C, float eps) {                             \
        const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;       \
        if (row >= N) return;                                                                  \
        const long long off = (long long)row * C;                                              \
        layernorm_row(out + off, mean, rstd, PlainRow{inp + off}, (float*)0, weight, bias, row, \
                      C, eps);                                                                 \
    }                                                                                          \
    extern "C" __global__ void residual_layernorm_forward_##SUFFIX(                             \
        float* residual_out, OUT_T* __restrict__ out, float* __restrict__ mean,                \
        float* __restrict__ rstd, const float* residual, const float* __restrict__ branch,     \
        const float* __restrict__ gamma, const float* __restrict__ weight,                     \
        const float* __restrict__ bias, int N, int C, float eps) {                             \
        const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;       \
        if (row >= N) return;                                                                  \
        const long long off = (long long)row * C;                                              \
        layernorm_row(out + off, mean, rstd, ResidualRow{residual + off, branch + off, gamma}, \
                      residual_out + off, weight, bias, row, C, eps);                          \
    }

LN_FORWARD(bf16, bf16_t)
LN_FORWARD(f32, float)

// dinp (= or +=) (1/C) * rstd * (C * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat)),
// dxhat = dout * weight.
extern "C" __global__ void layernorm_backward_input(float* __restrict__ dinp,
                                                    const float* __restrict__ dout,
                                                    const float* __restrict__ inp,
                                                    const float* __restrict__ weight,
                                                    const float* __restrict__ mean,
                                                    const float* __restrict__ rstd, int N, int C,
                                                    int grad_write) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const long long off = (long long)row * C;
    const float m = mean[row], s = rstd[row];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float dxhat = dout[off + c] * weight[c];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * (inp[off + c] - m) * s;
    }
    const float mean_dxhat = warp_sum(sum_dxhat) / C;
    const float mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) / C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float xhat = (inp[off + c] - m) * s;
        const float dxhat = dout[off + c] * weight[c];
        const float g = s * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
        dinp[off + c] = grad_write == GRAD_ACCUMULATE ? dinp[off + c] + g : g;
    }
}

// partial[0, chunk, c] = sum over the chunk's rows of dout * xhat; partial[1, chunk, c] = of dout.
extern "C" __global__ void layernorm_backward_params_partial(float* __restrict__ partial,
                                                             const float* __restrict__ dout,
                                                             const float* __restrict__ inp,
                                                             const float* __restrict__ mean,
                                                             const float* __restrict__ rstd,
                                                             int N, int C, int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (c >= C) return;
    const int r0 = chunk * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    for (int r = r0; r < r1; r++) {
        const long long i = (long long)r * C + c;
        const float d = dout[i];
        dw += d * (inp[i] - mean[r]) * rstd[r];
        db += d;
    }
    partial[(long long)chunk * C + c] = dw;
    partial[(long long)gridDim.y * C + (long long)chunk * C + c] = db;
}
