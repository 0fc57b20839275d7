// KoLeo regulariser: nearest-neighbour distances of L2-normalised rows, forward and backward.
//
// KL(x) = -(1/b) sum_i log(d_i + 1e-8), d_i = || xn_i - xn_{j(i)} + 1e-8 ||  (1e-8 added to every
// component), xn_i = x_i / max(||x_i||, 1e-8), j(i) = argmax_{j != i} <xn_i, xn_j> (lowest index
// on ties; not differentiated). Gradients reach both xn_i and xn_{j(i)}.
//
// Dimensions: b rows (a few thousand at most: the search is b^2 d), d <= KOLEO_MAX_D features.
//   x, dx [b, d] f32;  xn [b, d] f32;  norm [b] f32 (||x_i||);  nn [b] i32;  dist [b] f32;
//   row_loss [b] f32 = -log(d_i + 1e-8) (the loss is its mean: elementwise.cu sum_* with 1/b)
//
// Launch contracts:
//   koleo_normalize:  grid ceil(b / 8), block 256 (one warp per row)
//   koleo_nearest:    grid b, block 256 (one block per row; warps scan candidates j)
//   koleo_backward:   grid b, block 256; dx (=) for row r, gathering every i with nn[i] = r
//                     in increasing i (deterministic, no atomics); dloss = dL/dKL
//
// Row L2 normalisation of the projection heads (F.normalize: z = y / max(||y||, eps), the
// heads use eps 1e-12), the same row pass as koleo_normalize with the eps as an argument:
//   y, z, dz, dy [R, C] f32;  z_bf16, dy_bf16 [R, C] bf16 (GEMM operands);  norm [R] = ||y||
//   l2_normalize_forward:   grid ceil(R / 8), block 256 (one warp per row)
//   l2_normalize_backward:  same; dy (=) (dz - z <z, dz>) / ||y|| when ||y|| > eps, else dz / eps
#include "common.cuh"

#define KOLEO_MAX_D 2048
#define KOLEO_THREADS 256
#define KOLEO_EPS 1e-8f

extern "C" __global__ void koleo_normalize(float* __restrict__ xn, float* __restrict__ norm,
                                           const float* __restrict__ x, int b, int d) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= b) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const float* xr = x + (long long)row * d;
    float sq = 0.0f;
    for (int k = lane; k < d; k += WARP_SIZE) sq += xr[k] * xr[k];
    const float n = sqrtf(warp_sum(sq));
    const float inv = 1.0f / fmaxf(n, KOLEO_EPS);
    for (int k = lane; k < d; k += WARP_SIZE) xn[(long long)row * d + k] = xr[k] * inv;
    if (lane == 0) norm[row] = n;
}

extern "C" __global__ void koleo_nearest(int* __restrict__ nn, float* __restrict__ dist,
                                         float* __restrict__ row_loss,
                                         const float* __restrict__ xn, int b, int d) {
    __shared__ float best_sim[KOLEO_THREADS / WARP_SIZE];
    __shared__ int best_idx[KOLEO_THREADS / WARP_SIZE];
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    const float* xi = xn + (long long)i * d;

    float my_best = neg_inf();
    int my_idx = -1;
    for (int j = warp; j < b; j += n_warps) {  // increasing j per warp: strict > keeps the lowest
        if (j == i) continue;
        const float* xj = xn + (long long)j * d;
        float dot = 0.0f;
        for (int k = lane; k < d; k += WARP_SIZE) dot += xi[k] * xj[k];
        dot = warp_sum(dot);
        if (dot > my_best) {
            my_best = dot;
            my_idx = j;
        }
    }
    if (lane == 0) {
        best_sim[warp] = my_best;
        best_idx[warp] = my_idx;
    }
    __syncthreads();
    __shared__ int chosen;
    if (threadIdx.x == 0) {
        float s = neg_inf();
        int idx = -1;
        for (int w = 0; w < n_warps; w++) {
            const bool better = best_idx[w] >= 0 &&
                                (best_sim[w] > s || (best_sim[w] == s && best_idx[w] < idx));
            if (better) {
                s = best_sim[w];
                idx = best_idx[w];
            }
        }
        chosen = idx;
    }
    __syncthreads();
    const int j = chosen;
    float sq = 0.0f;
    if (j >= 0) {
        const float* xj = xn + (long long)j * d;
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
            const float diff = xi[k] - xj[k] + KOLEO_EPS;
            sq += diff * diff;
        }
    }
    const float di = sqrtf(block_sum(sq, scratch));
    if (threadIdx.x == 0) {
        nn[i] = j;
        dist[i] = di;
        row_loss[i] = -logf(di + KOLEO_EPS);
    }
}

extern "C" __global__ void __launch_bounds__(KOLEO_THREADS)
    koleo_backward(float* __restrict__ dx, const float* __restrict__ xn,
                   const float* __restrict__ norm, const int* __restrict__ nn,
                   const float* __restrict__ dist, float dloss, int b, int d) {
    __shared__ float scratch[32];
    constexpr int PER_THREAD = KOLEO_MAX_D / KOLEO_THREADS;
    const int r = blockIdx.x;
    const float* xr = xn + (long long)r * d;
    float g[PER_THREAD];
#pragma unroll
    for (int s = 0; s < PER_THREAD; s++) g[s] = 0.0f;

    // dKL/d(diff_i) = w_i * diff_i, w_i = -dloss / (b * (d_i + eps) * d_i); diff_i enters xn_i
    // with + and xn_{nn(i)} with -.
    for (int i = 0; i < b; i++) {
        const int j = nn[i];
        if (i != r && j != r) continue;
        if (j < 0 || dist[i] == 0.0f) continue;
        const float w = -dloss / ((float)b * (dist[i] + KOLEO_EPS) * dist[i]);
        const float* xi = xn + (long long)i * d;
        const float* xj = xn + (long long)j * d;
        const float sign = i == r ? 1.0f : -1.0f;  // i == r and j == r cannot both hold
#pragma unroll
        for (int s = 0; s < PER_THREAD; s++) {
            const int k = threadIdx.x + s * KOLEO_THREADS;
            if (k < d) g[s] += sign * w * (xi[k] - xj[k] + KOLEO_EPS);
        }
    }
    // Through xn = x / max(||x||, eps): dx = (g - xn <xn, g>) / ||x||, or g / eps when clamped.
    float dot = 0.0f;
#pragma unroll
    for (int s = 0; s < PER_THREAD; s++) {
        const int k = threadIdx.x + s * KOLEO_THREADS;
        if (k < d) dot += xr[k] * g[s];
    }
    dot = block_sum(dot, scratch);
    const float n = norm[r];
    const bool clamped = n <= KOLEO_EPS;
    const float inv = 1.0f / fmaxf(n, KOLEO_EPS);
#pragma unroll
    for (int s = 0; s < PER_THREAD; s++) {
        const int k = threadIdx.x + s * KOLEO_THREADS;
        if (k < d) dx[(long long)r * d + k] = clamped ? g[s] * inv : (g[s] - xr[k] * dot) * inv;
    }
}

extern "C" __global__ void l2_normalize_forward(float* __restrict__ z, bf16_t* __restrict__ z_bf16,
                                                float* __restrict__ norm,
                                                const float* __restrict__ y, float eps, int R,
                                                int C) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= R) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const long long off = (long long)row * C;
    float sq = 0.0f;
    for (int k = lane; k < C; k += WARP_SIZE) sq += y[off + k] * y[off + k];
    const float n = sqrtf(warp_sum(sq));
    const float inv = 1.0f / fmaxf(n, eps);
    for (int k = lane; k < C; k += WARP_SIZE) {
        const float v = y[off + k] * inv;
        z[off + k] = v;
        z_bf16[off + k] = f32_to_bf16(v);
    }
    if (lane == 0) norm[row] = n;
}

extern "C" __global__ void l2_normalize_backward(float* __restrict__ dy,
                                                 bf16_t* __restrict__ dy_bf16,
                                                 const float* __restrict__ dz,
                                                 const float* __restrict__ z,
                                                 const float* __restrict__ norm, float eps, int R,
                                                 int C) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= R) return;
    const int lane = threadIdx.x % WARP_SIZE;
    const long long off = (long long)row * C;
    const float n = norm[row];
    const bool clamped = !(n > eps);
    float dot = 0.0f;
    for (int k = lane; k < C; k += WARP_SIZE) dot += z[off + k] * dz[off + k];
    dot = clamped ? 0.0f : warp_sum(dot);
    const float inv = 1.0f / fmaxf(n, eps);
    for (int k = lane; k < C; k += WARP_SIZE) {
        const float v = (dz[off + k] - z[off + k] * dot) * inv;
        dy[off + k] = v;
        dy_bf16[off + k] = f32_to_bf16(v);
    }
}
