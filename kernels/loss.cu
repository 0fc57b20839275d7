// DINO / iBOT losses: teacher softmax with centering and temperature, the centre's EMA, and the
// student's fused log-softmax cross-entropy with its gradient (K up to 65536 and beyond).
//
// Dimensions: Rt teacher rows, Rs student rows, K prototypes, P pairs per student row.
//   teacher [Rt, K] f32 logits;  center [K] f32 (may be null: no centering)
//   probs   [Rt, K] f32 = softmax((teacher - center) * inv_temp)
//   student [Rs, K] f32 logits;  dstudent [Rs, K] f32 (written)
//   pair_teacher [Rs, P] i32: the teacher rows paired with each student row (-1 = unused slot)
//   pair_weight  [Rs, P] f32: each pair's weight (1 / (Dn * B) for DINO, masks_weight / (2 n_img)
//                for iBOT, times the loss weight)
//   row_loss [Rs] f32 = sum_p w_p CE(probs[t_p], student_r; ts); the loss is its sum
//                (elementwise.cu sum_partial / sum_finalize).
// With q = sum_p w_p probs[t_p] (a combined target) and ls = log_softmax(student_r * inv_ts):
//   row_loss = -sum_k q_k ls_k;  dstudent_r = grad_scale * inv_ts * (softmax_k * sum(q) - q_k).
//
// Launch contracts:
//   teacher_softmax:         grid Rt, block 256 (one block per row)
//   center_ema:              grid ceil(K / 256), block 256: center_new = m * center +
//                            (1 - m) * inv_rows * sum_g partial[g] (partial [G, K] from
//                            elementwise.cu column_sum_partial over the teacher logits)
//   softmax_cross_entropy:   grid Rs, block 256 (one block per student row, two passes over K)
//   row_entropy:             grid R, block 256: entropy[r] = -sum_k p log p over p > 0 (nats;
//                            the mean over rows is the teacher-collapse signal of the logs)
#include "common.cuh"

extern "C" __global__ void teacher_softmax(float* __restrict__ probs,
                                           const float* __restrict__ teacher,
                                           const float* __restrict__ center, float inv_temp,
                                           int Rt, int K) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= Rt) return;
    const float* t = teacher + (long long)r * K;
    float m = neg_inf(), s = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float v = (t[k] - (center ? center[k] : 0.0f)) * inv_temp;
        softmax_merge(m, s, v, 1.0f);
    }
    const float row_max = block_max(m, scratch);
    s = s * __expf(m - row_max);  // m = -inf (no elements) gives s = 0
    if (m == neg_inf()) s = 0.0f;
    const float inv_sum = 1.0f / block_sum(s, scratch);
    float* p = probs + (long long)r * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float v = (t[k] - (center ? center[k] : 0.0f)) * inv_temp;
        p[k] = __expf(v - row_max) * inv_sum;
    }
}

extern "C" __global__ void center_ema(float* __restrict__ center_new,
                                      const float* __restrict__ partial,
                                      const float* __restrict__ center, int G, int K,
                                      float momentum, float one_minus_momentum, float inv_rows) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    float acc = 0.0f;
    for (int g = 0; g < G; g++) acc += partial[(long long)g * K + k];
    center_new[k] = momentum * center[k] + one_minus_momentum * acc * inv_rows;
}

#define MAX_PAIRS 16

extern "C" __global__ void softmax_cross_entropy(float* __restrict__ row_loss,
                                                 float* __restrict__ dstudent,
                                                 const float* __restrict__ student,
                                                 const float* __restrict__ probs,
                                                 const int* __restrict__ pair_teacher,
                                                 const float* __restrict__ pair_weight,
                                                 int n_pairs, float inv_ts, float grad_scale,
                                                 int Rs, int Rt, int K) {
    __shared__ float scratch[32];
    __shared__ const float* targets[MAX_PAIRS];
    __shared__ float weights[MAX_PAIRS];
    const int r = blockIdx.x;
    if (r >= Rs) return;
    if (threadIdx.x < n_pairs) {
        const int t = pair_teacher[r * n_pairs + threadIdx.x];
        const bool used = t >= 0 && t < Rt;
        targets[threadIdx.x] = used ? probs + (long long)t * K : (const float*)0;
        weights[threadIdx.x] = used ? pair_weight[r * n_pairs + threadIdx.x] : 0.0f;
    }
    __syncthreads();
    const float* s = student + (long long)r * K;

    // Pass 1: log-sum-exp of s * inv_ts and the combined target mass sum(q).
    float m = neg_inf(), e = 0.0f, q_sum = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        softmax_merge(m, e, s[k] * inv_ts, 1.0f);
        for (int p = 0; p < n_pairs; p++)
            if (targets[p]) q_sum += weights[p] * targets[p][k];
    }
    const float row_max = block_max(m, scratch);
    e = m == neg_inf() ? 0.0f : e * __expf(m - row_max);
    const float lse = row_max + logf(block_sum(e, scratch));
    q_sum = block_sum(q_sum, scratch);

    // Pass 2: loss = sum_k q_k (lse - s_k inv_ts) and the gradient.
    float loss = 0.0f;
    float* ds = dstudent + (long long)r * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float z = s[k] * inv_ts;
        float q = 0.0f;
        for (int p = 0; p < n_pairs; p++)
            if (targets[p]) q += weights[p] * targets[p][k];
        loss += q * (lse - z);
        ds[k] = grad_scale * inv_ts * (__expf(z - lse) * q_sum - q);
    }
    loss = block_sum(loss, scratch);
    if (threadIdx.x == 0) row_loss[r] = loss;
}

extern "C" __global__ void row_entropy(float* __restrict__ entropy, const float* __restrict__ probs,
                                       int R, int K) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= R) return;
    const float* p = probs + (long long)r * K;
    float acc = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float v = p[k];
        if (v > 0.0f) acc -= v * logf(v);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) entropy[r] = acc;
}
