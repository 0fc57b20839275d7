// Sinkhorn-Knopp normalisation of teacher logits (DINOv2's SK centering), f32 throughout.
//
// Dimensions: R samples (rows, up to several thousand), K prototypes (columns, up to 131072).
//   teacher [R, K] f32 logits;  E [R, K] f32 scratch;  Q [R, K] f32 result (may alias E)
//   a [K], b [R] f32 scaling vectors;  partial [G, K] or [G] f32 scratch;  scalar [1] f32
//
// The reference iterates on Q = exp(T / tt)^T / sum. Here Q is kept factored as
// Q[i, j] = E[i, j] * a[j] * b[i] with E = exp((T - max T) / tt) (one global shift, which the
// reference allows), so each half-iteration is one weighted pass over E:
//   init:   a = 1, b = 1 / sum(E)
//   repeat: a[j] = 1 / (K * sum_i E[i, j] b[i])          (per-prototype normalisation, / K)
//           b[i] = 1 / (n_samples * sum_j E[i, j] a[j])  (per-sample normalisation, / n_samples)
//   Q[i, j] = E[i, j] * a[j] * b[i] * n_samples          (each row sums to 1)
//
// Launch contracts:
//   sinkhorn_max_partial:   grid G, block 256            partial[g] = max over a grid-stride share
//   sinkhorn_max_finalize:  grid 1, block 256            scalar = max_g partial[g]
//   sinkhorn_exp:           grid-stride, block 256       E = exp((teacher - scalar) * inv_temp)
//   sinkhorn_fill:          grid-stride, block 256       x = value
//   sinkhorn_reciprocal:    grid 1, block 32             x[0..n) = 1 / scalar
//   sinkhorn_col_partial:   grid (ceil(K / 256), G), block 256; partial[g, j] = sum over the
//                           chunk's rows of E[i, j] b[i]
//   sinkhorn_col_update:    grid ceil(K / 256), block 256     a[j] = 1 / (K * sum_g partial[g, j])
//   sinkhorn_row_update:    grid R, block 256                 b[i] = 1 / (n_samples * sum_j E a)
//   sinkhorn_finalize:      grid-stride, block 256            Q = E * a * b * n_samples
// All reductions have a fixed order (bit-reproducible).
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                      \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);            \
         i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void sinkhorn_max_partial(float* __restrict__ partial,
                                                const float* __restrict__ x, long long n) {
    __shared__ float scratch[32];
    float m = neg_inf();
    GRID_STRIDE(i, n) m = fmaxf(m, x[i]);
    m = block_max(m, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = m;
}

extern "C" __global__ void sinkhorn_max_finalize(float* __restrict__ scalar,
                                                 const float* __restrict__ partial, int G) {
    __shared__ float scratch[32];
    float m = neg_inf();
    for (int g = threadIdx.x; g < G; g += blockDim.x) m = fmaxf(m, partial[g]);
    m = block_max(m, scratch);
    if (threadIdx.x == 0) scalar[0] = m;
}

extern "C" __global__ void sinkhorn_exp(float* __restrict__ E, const float* __restrict__ teacher,
                                        const float* __restrict__ shift, float inv_temp,
                                        long long n) {
    const float s = shift[0];
    GRID_STRIDE(i, n) E[i] = expf((teacher[i] - s) * inv_temp);
}

extern "C" __global__ void sinkhorn_fill(float* __restrict__ x, float value, long long n) {
    GRID_STRIDE(i, n) x[i] = value;
}

extern "C" __global__ void sinkhorn_reciprocal(float* __restrict__ x,
                                               const float* __restrict__ scalar, int n) {
    const float r = 1.0f / scalar[0];
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = r;
}

extern "C" __global__ void sinkhorn_col_partial(float* __restrict__ partial,
                                                const float* __restrict__ E,
                                                const float* __restrict__ b, int R, int K,
                                                int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= K) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(R, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int i = r0; i < r1; i++) acc += E[(long long)i * K + j] * b[i];
    partial[(long long)blockIdx.y * K + j] = acc;
}

extern "C" __global__ void sinkhorn_col_update(float* __restrict__ a,
                                               const float* __restrict__ partial, int G, int K) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= K) return;
    float s = 0.0f;
    for (int g = 0; g < G; g++) s += partial[(long long)g * K + j];
    a[j] = 1.0f / (s * (float)K);
}

extern "C" __global__ void sinkhorn_row_update(float* __restrict__ b, const float* __restrict__ E,
                                               const float* __restrict__ a, int R, int K,
                                               float n_samples) {
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    if (i >= R) return;
    const float* row = E + (long long)i * K;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < K; j += blockDim.x) acc += row[j] * a[j];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) b[i] = 1.0f / (acc * n_samples);
}

extern "C" __global__ void sinkhorn_finalize(float* Q, const float* E, const float* __restrict__ a,
                                             const float* __restrict__ b, int R, int K,
                                             float n_samples) {
    GRID_STRIDE(i, (long long)R * K) Q[i] = E[i] * a[i % K] * b[i / K] * n_samples;
}
