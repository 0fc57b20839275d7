// Optimizer family over the flat f32 parameter buffer: AdamW with per-group lr / weight decay,
// gradient-norm clipping, the teacher EMA, and the weight-normalised last layer of the heads.
//
// Dimensions: n parameters (flat), S segments (one per parameter tensor), G groups.
//   params, grads, exp_avg, exp_avg_sq, teacher, student [n] f32
//   seg_start [S] i64: first flat index of each segment, strictly increasing, seg_start[0] = 0
//   seg_group [S] i32: the group of each segment;  group_lr [G], group_wd [G] f32: this step's
//   lr and weight decay per group, computed on the host (schedules x multipliers; the frozen
//   last layer has lr 0 but its moments still move)
//   AdamW (torch semantics, bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t from the host):
//     p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//     p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
//   Weight norm (K prototypes of Bn dims): W = g v / ||v||, no epsilon (the reference has none).
//
// Launch contracts:
//   adamw_update, ema_update, scale_by_coef: grid-stride, ceil(n / 256) capped at 65535 x 256
//   clip_coef:            grid 1, block 32: norm = sqrt(sumsq), coef = min(max / (norm + 1e-6), 1)
//   weight_norm_forward:  grid ceil(K / 8), block 256 (one warp per prototype row)
//   weight_norm_backward: same; dg, dv accumulate (+=), parameter-gradient contract
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                      \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);            \
         i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ int find_segment(const i64* seg_start, int S, long long i) {
    int lo = 0, hi = S - 1;  // invariant: seg_start[lo] <= i
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (seg_start[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void adamw_update(float* __restrict__ params, float* __restrict__ exp_avg,
                                        float* __restrict__ exp_avg_sq,
                                        const float* __restrict__ grads,
                                        const i64* __restrict__ seg_start,
                                        const int* __restrict__ seg_group,
                                        const float* __restrict__ group_lr,
                                        const float* __restrict__ group_wd, int S, long long n,
                                        float beta1, float one_minus_beta1, float beta2,
                                        float one_minus_beta2, float eps, float bc1,
                                        float bc2_sqrt) {
    GRID_STRIDE(i, n) {
        const int group = seg_group[find_segment(seg_start, S, i)];
        const float lr = group_lr[group];
        const float wd = group_wd[group];
        const float g = grads[i];
        // p·(1 - lr·wd) as p - (lr·wd)·p: `1.0f - lr·wd` would round the tiny decay to f32's
        // spacing near 1 (a relative error of the decay of up to 1e-2).
        float p = params[i] - (lr * wd) * params[i];
        // 1 - beta arrive from the host (f64 there): 1.0f - 0.999f is off by 1.3e-5 relative.
        const float m = beta1 * exp_avg[i] + one_minus_beta1 * g;
        const float v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g;
        p -= (lr / bc1) * m / (sqrtf(v) / bc2_sqrt + eps);
        params[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

extern "C" __global__ void ema_update(float* __restrict__ teacher, const float* __restrict__ student,
                                      float momentum, float one_minus_momentum, long long n) {
    GRID_STRIDE(i, n) teacher[i] = momentum * teacher[i] + one_minus_momentum * student[i];
}

extern "C" __global__ void clip_coef(float* __restrict__ coef, float* __restrict__ norm,
                                     const float* __restrict__ sumsq, float max_norm) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const float total = sqrtf(sumsq[0]);
    norm[0] = total;
    coef[0] = fminf(max_norm / (total + 1e-6f), 1.0f);
}

extern "C" __global__ void scale_by_coef(float* __restrict__ x, const float* __restrict__ coef,
                                         long long n) {
    const float c = coef[0];
    GRID_STRIDE(i, n) x[i] *= c;
}

extern "C" __global__ void weight_norm_forward(float* __restrict__ W, float* __restrict__ inv_norm,
                                               const float* __restrict__ g,
                                               const float* __restrict__ v, int K, int Bn) {
    const int k = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (k >= K) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const float* vk = v + (long long)k * Bn;
    float sq = 0.0f;
    for (int j = lane; j < Bn; j += WARP_SIZE) sq += vk[j] * vk[j];
    const float inv = rsqrtf(warp_sum(sq));
    const float scale = g[k] * inv;
    for (int j = lane; j < Bn; j += WARP_SIZE) W[(long long)k * Bn + j] = vk[j] * scale;
    if (lane == 0) inv_norm[k] = inv;
}

// dg_k += <dW_k, v_k> / ||v_k||;  dv_k += (g_k / ||v_k||) (dW_k - vhat_k <vhat_k, dW_k>).
extern "C" __global__ void weight_norm_backward(float* __restrict__ dg, float* __restrict__ dv,
                                                const float* __restrict__ dW,
                                                const float* __restrict__ g,
                                                const float* __restrict__ v,
                                                const float* __restrict__ inv_norm, int K,
                                                int Bn) {
    const int k = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (k >= K) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const long long off = (long long)k * Bn;
    const float inv = inv_norm[k];
    float dot = 0.0f;  // <dW_k, vhat_k>
    for (int j = lane; j < Bn; j += WARP_SIZE) dot += dW[off + j] * v[off + j] * inv;
    dot = warp_sum(dot);
    const float scale = g[k] * inv;
    for (int j = lane; j < Bn; j += WARP_SIZE)
        dv[off + j] += scale * (dW[off + j] - v[off + j] * inv * dot);
    if (lane == 0) dg[k] += dot;
}
