// Fused multi-head attention, forward and backward: FlashAttention-2 style tensor-core kernels
// for the common head dims, and a general scalar path for any other head dim.
//
// Dimensions: B batch, T tokens (any T >= 1; tested 5..1370), H heads, HD head dim.
//   fast path:    HD a multiple of 16 up to 128, one instantiation per value, suffix `_hd{HD}`
//   general path: any 1 <= HD <= GEN_MAX_HD (256), suffix `_general`, HD a kernel argument
// Layouts (all row-major, bf16 = raw 16-bit patterns):
//   qkv   [B, T, 3, H, HD] bf16   the official layout: the qkv Linear output as is
//   out   [B, T, H, HD]    bf16   = [B, T, D] with channel h*HD + j (the merged heads)
//   lse   [B, H, T]        f32    log-sum-exp of each softmax row (natural log), saved for bwd
//   dout  [B, T, H, HD]    bf16
//   delta [B, H, T]        f32    rowsum(dout * out), from attention_backward_preprocess
//   dqkv  [B, T, 3, H, HD] bf16   written (not accumulated)
// Logits are scale * q.k; softmax, its statistics and every accumulator are f32. No T x T
// buffer exists: scores live in registers one key tile at a time (online softmax).
//
// Launch contracts (block = 32 * WARPS threads, static shared memory only, < 48 KB):
//   attention_forward_hd{HD}:             grid (ceil(T / 64), H, B), block 128
//   attention_backward_preprocess:        grid (ceil(B*T*H / 8)), block 256 (one warp per row)
//   attention_backward_dkdv_hd{HD}:       grid (ceil(T / BWD_TILE), H, B), block 32 * BWD_TILE / 16
//   attention_backward_dq_hd{HD}:         grid (ceil(T / BWD_TILE), H, B), same block
//   attention_forward_general:            grid (ceil(T / GEN_ROWS), H, B), block 32 * GEN_ROWS
//   attention_backward_dkdv_general:      same grid and block
//   attention_backward_dq_general:        same grid and block
// with BWD_TILE = 64 for HD <= 64 and 32 above (shared memory), GEN_ROWS = 4. Both backward
// paths use the same preprocess and are deterministic: dK/dV and dQ are computed by separate
// kernels without atomics, every sum in a fixed order.
#include "common.cuh"

#define PAD 8  // bf16 elements of row padding: keeps ldmatrix rows 16-byte aligned, conflict-free

// Copies rows [row0, row0 + ROWS) of a [T, HD] strided view into smem; rows >= T become zeros.
template <int ROWS, int HD>
__device__ __forceinline__ void load_tile_async(bf16_t (*dst)[HD + PAD], const bf16_t* base,
                                                int row0, int T, long long row_stride) {
    constexpr int CHUNKS = HD / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += blockDim.x) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const int t = row0 + r;
        const bool valid = t < T;
        const bf16_t* src = valid ? base + (long long)t * row_stride + col : base;
        cp_async_16(&dst[r][col], src, valid);
    }
}

// A fragment (16x16) of rows [r0, r0+16), cols [k0, k0+16) of a smem tile.
template <int HD>
__device__ __forceinline__ void load_a_frag(u32 a[4], bf16_t (*tile)[HD + PAD], int r0, int k0) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int mi = lane / 8;
    const int row = r0 + (lane % 8) + ((mi & 1) ? 8 : 0);
    const int col = k0 + ((mi & 2) ? 8 : 0);
    ldmatrix_x4(a, &tile[row][col]);
}

// B fragments for two n-tiles where B(k, n) = tile[n][k] (tile rows are the n index):
// b[0..1] for n in [n0, n0+8), b[2..3] for [n0+8, n0+16); k in [k0, k0+16).
template <int HD>
__device__ __forceinline__ void load_b_frag_nk(u32 b[4], bf16_t (*tile)[HD + PAD], int n0, int k0) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int mi = lane / 8;
    const int row = n0 + (lane % 8) + ((mi & 2) ? 8 : 0);
    const int col = k0 + ((mi & 1) ? 8 : 0);
    ldmatrix_x4(b, &tile[row][col]);
}

// B fragments for two n-tiles where B(k, n) = tile[k][n] (tile rows are the k index).
template <int HD>
__device__ __forceinline__ void load_b_frag_kn(u32 b[4], bf16_t (*tile)[HD + PAD], int k0, int n0) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int mi = lane / 8;
    const int row = k0 + (lane % 8) + ((mi & 1) ? 8 : 0);
    const int col = n0 + ((mi & 2) ? 8 : 0);
    ldmatrix_x4_trans(b, &tile[row][col]);
}

// C fragments of n-tiles 2j and 2j+1 (f32) become the A fragment of k-step j (bf16).
__device__ __forceinline__ void c_to_a_frag(u32 a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16x2(c0[0], c0[1]);
    a[1] = pack_bf16x2(c0[2], c0[3]);
    a[2] = pack_bf16x2(c1[0], c1[1]);
    a[3] = pack_bf16x2(c1[2], c1[3]);
}

// C[16 x 8*NT] += A-tile rows (smem, rows r0..) x tile_nk^T over k in [0, HD). Column pairs
// at or beyond `n_valid` (rows past T in a partial last tile) are skipped: their C stays 0.
template <int HD, int NT>
__device__ __forceinline__ void mma_rows_by_tile_t(float acc[][4], bf16_t (*a_tile)[HD + PAD],
                                                   int r0, bf16_t (*b_tile)[HD + PAD],
                                                   int n_valid) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        u32 a[4];
        load_a_frag<HD>(a, a_tile, r0, kk * 16);
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            if (np * 16 >= n_valid) break;  // warp-uniform
            u32 b[4];
            load_b_frag_nk<HD>(b, b_tile, np * 16, kk * 16);
            mma_bf16_16816(acc[2 * np], a, &b[0]);
            mma_bf16_16816(acc[2 * np + 1], a, &b[2]);
        }
    }
}

// O[16 x HD] += P[16 x 16*KSTEPS] (f32 C fragments) x tile_kn[16*KSTEPS x HD]. k-steps at or
// beyond `k_valid` hold only zero probabilities (rows past T) and are skipped.
template <int HD, int KSTEPS>
__device__ __forceinline__ void mma_probs_by_tile(float o[][4], float p[][4],
                                                  bf16_t (*tile)[HD + PAD], int k_valid) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; kk++) {
        if (kk * 16 >= k_valid) break;  // warp-uniform
        u32 a[4];
        c_to_a_frag(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < HD / 16; dp++) {
            u32 b[4];
            load_b_frag_kn<HD>(b, tile, kk * 16, dp * 16);
            mma_bf16_16816(o[2 * dp], a, &b[0]);
            mma_bf16_16816(o[2 * dp + 1], a, &b[2]);
        }
    }
}

#define LOG2E 1.4426950408889634f

// ---------------------------------------------------------------------------------------------
// Forward: one block per (64-query tile, head, image); warp w owns queries [16w, 16w + 16).
template <int HD>
__device__ __forceinline__ void attention_forward(bf16_t* __restrict__ out, float* __restrict__ lse,
                                                  const bf16_t* __restrict__ qkv, int B, int T,
                                                  int H, float scale) {
    constexpr int BQ = 64, BK = 64, NT = BK / 8;
    __shared__ __align__(16) bf16_t Ks[BK][HD + PAD];  // also stages Q before the loop
    __shared__ __align__(16) bf16_t Vs[BK][HD + PAD];

    const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t4 = lane % 4;
    const long long tok_stride = 3LL * H * HD;
    const bf16_t* q_base = qkv + (long long)b * T * tok_stride + 0LL * H * HD + h * HD;
    const bf16_t* k_base = q_base + (long long)H * HD;
    const bf16_t* v_base = q_base + 2LL * H * HD;
    const float scale_log2 = scale * LOG2E;

    // Q fragments stay in registers for the whole key loop.
    load_tile_async<BQ, HD>(Ks, q_base, q0, T, tok_stride);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 q_frag[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) load_a_frag<HD>(q_frag[kk], Ks, warp * 16, kk * 16);

    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float row_max[2] = {neg_inf(), neg_inf()};  // rows g and g+8, in log2 units
    float row_sum[2] = {0.0f, 0.0f};             // this thread's partial sums
    // A warp whose 16 queries are all past T (the last tile) skips the tensor-core work.
    const bool warp_active = q0 + warp * 16 < T;

    for (int k0 = 0; k0 < T; k0 += BK) {
        __syncthreads();  // previous tile (or the Q staging) fully consumed
        load_tile_async<BK, HD>(Ks, k_base, k0, T, tok_stride);
        cp_async_commit();
        load_tile_async<BK, HD>(Vs, v_base, k0, T, tok_stride);
        cp_async_commit();
        cp_async_wait<1>();  // K landed; V may still be in flight
        __syncthreads();
        const int keys_valid = warp_active ? T - k0 : 0;  // keys past T: skipped 16 at a time

        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                if (np * 16 >= keys_valid) break;  // warp-uniform
                u32 bf[4];
                load_b_frag_nk<HD>(bf, Ks, np * 16, kk * 16);
                mma_bf16_16816(s[2 * np], q_frag[kk], &bf[0]);
                mma_bf16_16816(s[2 * np + 1], q_frag[kk], &bf[2]);
            }
        }

        // Online softmax over this tile, rows g (e = 0, 1) and g + 8 (e = 2, 3).
        float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + n * 8 + 2 * t4 + (e & 1);
                s[n][e] = key < T ? s[n][e] * scale_log2 : neg_inf();
                tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
            }
        }
        float correction[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 2));
            const float new_max = fmaxf(row_max[r], tile_max[r]);  // finite: key k0 < T
            correction[r] = exp2f(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= correction[r];
        }
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[n][e] = exp2f(s[n][e] - row_max[e / 2]);
                row_sum[e / 2] += s[n][e];
            }
        }
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            o[i][0] *= correction[0];
            o[i][1] *= correction[0];
            o[i][2] *= correction[1];
            o[i][3] *= correction[1];
        }

        cp_async_wait<0>();
        __syncthreads();
        mma_probs_by_tile<HD, BK / 16>(o, s, Vs, keys_valid);
    }

    const long long out_tok_stride = (long long)H * HD;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        row_sum[r] += __shfl_xor_sync(FULL_MASK, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(FULL_MASK, row_sum[r], 2);
        const int q = q0 + warp * 16 + g + 8 * r;
        if (q >= T) continue;
        const float inv = 1.0f / row_sum[r];
        bf16_t* dst = out + ((long long)b * T + q) * out_tok_stride + h * HD;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            *reinterpret_cast<u32*>(&dst[i * 8 + 2 * t4]) =
                pack_bf16x2(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
        }
        if (t4 == 0) lse[((long long)b * H + h) * T + q] = (row_max[r] + log2f(row_sum[r])) / LOG2E;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward preprocess: delta[b, h, t] = sum_j dout[b, t, h, j] * out[b, t, h, j].
extern "C" __global__ void attention_backward_preprocess(float* __restrict__ delta,
                                                         const bf16_t* __restrict__ out,
                                                         const bf16_t* __restrict__ dout, int B,
                                                         int T, int H, int HD) {
    const long long row = (long long)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= (long long)B * T * H) return;
    const bf16_t* o = out + row * HD;
    const bf16_t* d = dout + row * HD;
    float acc = 0.0f;
    for (int j = lane; j < HD; j += WARP_SIZE) acc += bf16_to_f32(o[j]) * bf16_to_f32(d[j]);
    acc = warp_sum(acc);
    if (lane == 0) {
        const int h = (int)(row % H);
        const long long bt = row / H;  // b * T + t
        const long long b = bt / T, t = bt % T;
        delta[(b * H + h) * T + t] = acc;
    }
}

template <int HD>
struct BwdTile {
    static constexpr int N = HD <= 64 ? 64 : 32;  // rows per tile (both keys and queries)
    static constexpr int WARPS = N / 16;
};

// dK, dV: one block per (key tile, head, image); warp w owns keys [16w, 16w + 16) of the tile
// and loops over every query tile. Scores are computed transposed (keys x queries).
template <int HD>
__device__ __forceinline__ void attention_backward_dkdv(bf16_t* __restrict__ dqkv,
                                                        const bf16_t* __restrict__ qkv,
                                                        const bf16_t* __restrict__ dout,
                                                        const float* __restrict__ lse,
                                                        const float* __restrict__ delta, int B,
                                                        int T, int H, float scale) {
    constexpr int BK = BwdTile<HD>::N, BQ = BwdTile<HD>::N, NT = BQ / 8;
    __shared__ __align__(16) bf16_t Ks[BK][HD + PAD];
    __shared__ __align__(16) bf16_t Vs[BK][HD + PAD];
    __shared__ __align__(16) bf16_t Qs[BQ][HD + PAD];
    __shared__ __align__(16) bf16_t dOs[BQ][HD + PAD];
    __shared__ float lse_s[BQ];    // log2 units
    __shared__ float delta_s[BQ];

    const int k0 = blockIdx.x * BK, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t4 = lane % 4;
    const bool warp_active = k0 + warp * 16 < T;  // owns at least one real key
    const long long tok_stride = 3LL * H * HD;
    const bf16_t* q_base = qkv + (long long)b * T * tok_stride + h * HD;
    const bf16_t* k_base = q_base + (long long)H * HD;
    const bf16_t* v_base = q_base + 2LL * H * HD;
    const long long do_stride = (long long)H * HD;
    const bf16_t* do_base = dout + (long long)b * T * do_stride + h * HD;
    const float* lse_row = lse + ((long long)b * H + h) * T;
    const float* delta_row = delta + ((long long)b * H + h) * T;
    const float scale_log2 = scale * LOG2E;

    load_tile_async<BK, HD>(Ks, k_base, k0, T, tok_stride);
    load_tile_async<BK, HD>(Vs, v_base, k0, T, tok_stride);
    cp_async_commit();

    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[i][e] = dv[i][e] = 0.0f;

    for (int q0 = 0; q0 < T; q0 += BQ) {
        __syncthreads();  // previous query tile consumed
        load_tile_async<BQ, HD>(Qs, q_base, q0, T, tok_stride);
        load_tile_async<BQ, HD>(dOs, do_base, q0, T, do_stride);
        cp_async_commit();
        for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
            const int q = q0 + i;
            lse_s[i] = q < T ? lse_row[q] * LOG2E : 0.0f;
            delta_s[i] = q < T ? delta_row[q] : 0.0f;
        }
        cp_async_wait<0>();
        __syncthreads();

        // S^T = K Q^T and dP^T = V dO^T, [16 keys x BQ queries] per warp.
        float p[NT][4], dp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) p[n][e] = dp[n][e] = 0.0f;
        if (!warp_active) continue;  // keys past T: nothing to accumulate (no barrier below)
        mma_rows_by_tile_t<HD, NT>(p, Ks, warp * 16, Qs, T - q0);
        mma_rows_by_tile_t<HD, NT>(dp, Vs, warp * 16, dOs, T - q0);

#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qi = n * 8 + 2 * t4 + (e & 1);
                const int key = k0 + warp * 16 + g + 8 * (e / 2);
                const bool valid = q0 + qi < T && key < T;
                const float prob = valid ? exp2f(p[n][e] * scale_log2 - lse_s[qi]) : 0.0f;
                p[n][e] = prob;
                dp[n][e] = prob * (dp[n][e] - delta_s[qi]);  // dS^T (w.r.t. the scaled logits)
            }
        }
        mma_probs_by_tile<HD, BQ / 16>(dv, p, dOs, T - q0);  // dV += P^T dO
        mma_probs_by_tile<HD, BQ / 16>(dk, dp, Qs, T - q0);  // dK += dS^T Q
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = k0 + warp * 16 + g + 8 * r;
        if (key >= T) continue;
        bf16_t* dk_dst = dqkv + ((long long)b * T + key) * tok_stride + (long long)H * HD + h * HD;
        bf16_t* dv_dst = dk_dst + (long long)H * HD;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            *reinterpret_cast<u32*>(&dk_dst[i * 8 + 2 * t4]) =
                pack_bf16x2(dk[i][2 * r] * scale, dk[i][2 * r + 1] * scale);
            *reinterpret_cast<u32*>(&dv_dst[i * 8 + 2 * t4]) =
                pack_bf16x2(dv[i][2 * r], dv[i][2 * r + 1]);
        }
    }
}

// dQ: one block per (query tile, head, image); warp w owns queries [16w, 16w + 16).
template <int HD>
__device__ __forceinline__ void attention_backward_dq(bf16_t* __restrict__ dqkv,
                                                      const bf16_t* __restrict__ qkv,
                                                      const bf16_t* __restrict__ dout,
                                                      const float* __restrict__ lse,
                                                      const float* __restrict__ delta, int B,
                                                      int T, int H, float scale) {
    constexpr int BQ = BwdTile<HD>::N, BK = BwdTile<HD>::N, NT = BK / 8;
    __shared__ __align__(16) bf16_t Qs[BQ][HD + PAD];
    __shared__ __align__(16) bf16_t dOs[BQ][HD + PAD];
    __shared__ __align__(16) bf16_t Ks[BK][HD + PAD];
    __shared__ __align__(16) bf16_t Vs[BK][HD + PAD];

    const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t4 = lane % 4;
    const bool warp_active = q0 + warp * 16 < T;  // owns at least one real query
    const long long tok_stride = 3LL * H * HD;
    const bf16_t* q_base = qkv + (long long)b * T * tok_stride + h * HD;
    const bf16_t* k_base = q_base + (long long)H * HD;
    const bf16_t* v_base = q_base + 2LL * H * HD;
    const long long do_stride = (long long)H * HD;
    const bf16_t* do_base = dout + (long long)b * T * do_stride + h * HD;
    const float scale_log2 = scale * LOG2E;

    load_tile_async<BQ, HD>(Qs, q_base, q0, T, tok_stride);
    load_tile_async<BQ, HD>(dOs, do_base, q0, T, do_stride);
    cp_async_commit();
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int q = q0 + warp * 16 + g + 8 * r;
        const long long idx = ((long long)b * H + h) * T + q;
        row_lse[r] = q < T ? lse[idx] * LOG2E : 0.0f;
        row_delta[r] = q < T ? delta[idx] : 0.0f;
    }

    float dq[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;

    for (int k0 = 0; k0 < T; k0 += BK) {
        __syncthreads();
        load_tile_async<BK, HD>(Ks, k_base, k0, T, tok_stride);
        load_tile_async<BK, HD>(Vs, v_base, k0, T, tok_stride);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float p[NT][4], dp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) p[n][e] = dp[n][e] = 0.0f;
        if (!warp_active) continue;  // queries past T: nothing to accumulate (no barrier below)
        mma_rows_by_tile_t<HD, NT>(p, Qs, warp * 16, Ks, T - k0);   // S = Q K^T
        mma_rows_by_tile_t<HD, NT>(dp, dOs, warp * 16, Vs, T - k0); // dP = dO V^T
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + n * 8 + 2 * t4 + (e & 1);
                const int r = e / 2;
                const bool valid = key < T && q0 + warp * 16 + g + 8 * r < T;
                const float prob = valid ? exp2f(p[n][e] * scale_log2 - row_lse[r]) : 0.0f;
                dp[n][e] = prob * (dp[n][e] - row_delta[r]);
            }
        }
        mma_probs_by_tile<HD, BK / 16>(dq, dp, Ks, T - k0);  // dQ += dS K
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int q = q0 + warp * 16 + g + 8 * r;
        if (q >= T) continue;
        bf16_t* dst = dqkv + ((long long)b * T + q) * tok_stride + h * HD;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            *reinterpret_cast<u32*>(&dst[i * 8 + 2 * t4]) =
                pack_bf16x2(dq[i][2 * r] * scale, dq[i][2 * r + 1] * scale);
        }
    }
}

#define ATTENTION_INSTANCE(HD)                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                            \
        attention_forward_hd##HD(bf16_t* out, float* lse, const bf16_t* qkv, int B, int T, int H, \
                                 float scale) {                                                  \
        attention_forward<HD>(out, lse, qkv, B, T, H, scale);                                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BwdTile<HD>::WARPS * 32)                        \
        attention_backward_dkdv_hd##HD(bf16_t* dqkv, const bf16_t* qkv, const bf16_t* dout,      \
                                       const float* lse, const float* delta, int B, int T, int H, \
                                       float scale) {                                            \
        attention_backward_dkdv<HD>(dqkv, qkv, dout, lse, delta, B, T, H, scale);                \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BwdTile<HD>::WARPS * 32)                        \
        attention_backward_dq_hd##HD(bf16_t* dqkv, const bf16_t* qkv, const bf16_t* dout,        \
                                     const float* lse, const float* delta, int B, int T, int H,  \
                                     float scale) {                                              \
        attention_backward_dq<HD>(dqkv, qkv, dout, lse, delta, B, T, H, scale);                  \
    }

ATTENTION_INSTANCE(16)
ATTENTION_INSTANCE(32)
ATTENTION_INSTANCE(48)
ATTENTION_INSTANCE(64)
ATTENTION_INSTANCE(80)
ATTENTION_INSTANCE(96)
ATTENTION_INSTANCE(112)
ATTENTION_INSTANCE(128)

// ---------------------------------------------------------------------------------------------
// General path: any head dim 1 <= HD <= GEN_MAX_HD, for the shapes the tensor-core instances do
// not cover (golden fixtures and small test models: HD 4, 8, 24, 40, ...). Correct and
// deterministic first, not fast: scalar f32 math, probabilities kept in f32 (the fast path
// rounds them to bf16 for the tensor cores).
//
// One warp per row of the fixed side (a query in the forward and dQ, a key in dK/dV), GEN_ROWS
// rows per block, that row held in shared memory as f32. The other side streams through shared
// memory GEN_TILE = 32 rows at a time: lane l computes the score of tile row l (a dot product
// over HD), then the tile's weights go through shared memory to every lane, and lane l
// accumulates head-dim columns l, l + 32, ... (GEN_COLS registers) over the tile rows in order.
// Rows past T (the last block's warps) compute on zeros and write nothing; they still take part
// in every barrier.

#define GEN_MAX_HD 256
#define GEN_ROWS 4                         // warps per block = fixed-side rows per block
#define GEN_TILE WARP_SIZE                 // streamed rows per shared-memory tile (one per lane)
#define GEN_COLS (GEN_MAX_HD / WARP_SIZE)  // accumulator columns per lane
#define GEN_PAD 2  // bf16 row padding: an odd word stride, so lane l reading row l is conflict-free

typedef bf16_t GenTile[GEN_TILE][GEN_MAX_HD + GEN_PAD];

// Rows [row0, row0 + GEN_TILE) of a [T, HD] strided bf16 view into a tile; rows >= T are zeros.
__device__ __forceinline__ void gen_load_tile(GenTile& dst, const bf16_t* base, int row0, int T,
                                              int HD, long long row_stride) {
    for (int i = threadIdx.x; i < GEN_TILE * HD; i += blockDim.x) {
        const int r = i / HD, c = i % HD;
        const int t = row0 + r;
        dst[r][c] = t < T ? base[(long long)t * row_stride + c] : (bf16_t)0;
    }
}

// Row t of a [T, HD] strided bf16 view into `dst` as f32 (zeros when t >= T), by one warp.
__device__ __forceinline__ void gen_load_row(float* dst, const bf16_t* base, int t, int T, int HD,
                                             long long row_stride) {
    for (int c = threadIdx.x % WARP_SIZE; c < HD; c += WARP_SIZE)
        dst[c] = t < T ? bf16_to_f32(base[(long long)t * row_stride + c]) : 0.0f;
}

// sum_d a[d] * b[d] over the head dim, in order (a is the warp's row: a broadcast read).
__device__ __forceinline__ float gen_dot(const float* a, const bf16_t* b, int HD) {
    float acc = 0.0f;
    for (int d = 0; d < HD; d++) acc += a[d] * bf16_to_f32(b[d]);
    return acc;
}

// acc[i] += sum_{r < rows} w[r] * tile[r][lane + 32 i], rows in order.
__device__ __forceinline__ void gen_accumulate(float acc[GEN_COLS], const float* w,
                                               const GenTile& tile, int rows, int HD) {
    const int lane = threadIdx.x % WARP_SIZE;
    for (int r = 0; r < rows; r++) {
        const float wr = w[r];
#pragma unroll
        for (int i = 0; i < GEN_COLS; i++) {
            const int c = lane + i * WARP_SIZE;
            if (c < HD) acc[i] += wr * bf16_to_f32(tile[r][c]);
        }
    }
}

// acc[i] * mul as bf16 into dst[lane + 32 i] for every column below HD.
__device__ __forceinline__ void gen_store_row(bf16_t* dst, const float acc[GEN_COLS], float mul,
                                              int HD) {
    const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
    for (int i = 0; i < GEN_COLS; i++) {
        const int c = lane + i * WARP_SIZE;
        if (c < HD) dst[c] = f32_to_bf16(acc[i] * mul);
    }
}

// Forward: warp w of block x owns query x * GEN_ROWS + w and loops over every key tile with an
// online softmax; lane l scores key k0 + l and keeps a partial row sum over its own keys.
extern "C" __global__ void __launch_bounds__(GEN_ROWS * WARP_SIZE)
    attention_forward_general(bf16_t* __restrict__ out, float* __restrict__ lse,
                              const bf16_t* __restrict__ qkv, int B, int T, int H, int HD,
                              float scale) {
    __shared__ __align__(16) GenTile Ks;
    __shared__ __align__(16) GenTile Vs;
    __shared__ float qs[GEN_ROWS][GEN_MAX_HD];
    __shared__ float ps[GEN_ROWS][GEN_TILE];

    const int h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int q = blockIdx.x * GEN_ROWS + warp;
    const long long tok_stride = 3LL * H * HD;
    const bf16_t* q_base = qkv + (long long)b * T * tok_stride + h * HD;
    const bf16_t* k_base = q_base + (long long)H * HD;
    const bf16_t* v_base = q_base + 2LL * H * HD;

    gen_load_row(qs[warp], q_base, q, T, HD, tok_stride);
    float o[GEN_COLS];
#pragma unroll
    for (int i = 0; i < GEN_COLS; i++) o[i] = 0.0f;
    float row_max = neg_inf();
    float row_sum = 0.0f;  // this lane's keys only, summed across the warp at the end

    for (int k0 = 0; k0 < T; k0 += GEN_TILE) {
        __syncthreads();  // previous tile consumed (first time: qs written)
        gen_load_tile(Ks, k_base, k0, T, HD, tok_stride);
        gen_load_tile(Vs, v_base, k0, T, HD, tok_stride);
        __syncthreads();
        const int key = k0 + lane;
        const float s = key < T ? scale * gen_dot(qs[warp], Ks[lane], HD) : neg_inf();
        const float new_max = fmaxf(row_max, warp_max(s));  // finite: key k0 < T
        const float correction = expf(row_max - new_max);
        const float p = expf(s - new_max);  // 0 for keys past T
        row_max = new_max;
        row_sum = row_sum * correction + p;
#pragma unroll
        for (int i = 0; i < GEN_COLS; i++) o[i] *= correction;
        ps[warp][lane] = p;
        __syncthreads();
        gen_accumulate(o, ps[warp], Vs, min(GEN_TILE, T - k0), HD);  // O += P V
    }

    const float sum = warp_sum(row_sum);
    if (q >= T) return;
    gen_store_row(out + ((long long)b * T + q) * H * HD + h * HD, o, 1.0f / sum, HD);
    if (lane == 0) lse[((long long)b * H + h) * T + q] = row_max + logf(sum);
}

// dK, dV: warp w of block x owns key x * GEN_ROWS + w and loops over every query tile; lane l
// recomputes the probability and dS of query q0 + l against that key.
extern "C" __global__ void __launch_bounds__(GEN_ROWS * WARP_SIZE)
    attention_backward_dkdv_general(bf16_t* __restrict__ dqkv, const bf16_t* __restrict__ qkv,
                                    const bf16_t* __restrict__ dout,
                                    const float* __restrict__ lse,
                                    const float* __restrict__ delta, int B, int T, int H, int HD,
                                    float scale) {
    __shared__ __align__(16) GenTile Qs;
    __shared__ __align__(16) GenTile dOs;
    __shared__ float ks[GEN_ROWS][GEN_MAX_HD];
    __shared__ float vs[GEN_ROWS][GEN_MAX_HD];
    __shared__ float ps[GEN_ROWS][GEN_TILE];
    __shared__ float dss[GEN_ROWS][GEN_TILE];

    const int h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int key = blockIdx.x * GEN_ROWS + warp;
    const long long tok_stride = 3LL * H * HD;
    const bf16_t* q_base = qkv + (long long)b * T * tok_stride + h * HD;
    const bf16_t* k_base = q_base + (long long)H * HD;
    const bf16_t* v_base = q_base + 2LL * H * HD;
    const long long do_stride = (long long)H * HD;
    const bf16_t* do_base = dout + (long long)b * T * do_stride + h * HD;
    const long long stat_base = ((long long)b * H + h) * T;

    gen_load_row(ks[warp], k_base, key, T, HD, tok_stride);
    gen_load_row(vs[warp], v_base, key, T, HD, tok_stride);
    float dk[GEN_COLS], dv[GEN_COLS];
#pragma unroll
    for (int i = 0; i < GEN_COLS; i++) dk[i] = dv[i] = 0.0f;

    for (int q0 = 0; q0 < T; q0 += GEN_TILE) {
        __syncthreads();  // previous tile consumed (first time: ks, vs written)
        gen_load_tile(Qs, q_base, q0, T, HD, tok_stride);
        gen_load_tile(dOs, do_base, q0, T, HD, do_stride);
        __syncthreads();
        const int q = q0 + lane;
        float p = 0.0f, ds = 0.0f;
        if (q < T) {
            p = expf(scale * gen_dot(ks[warp], Qs[lane], HD) - lse[stat_base + q]);
            const float dp = gen_dot(vs[warp], dOs[lane], HD);
            ds = p * (dp - delta[stat_base + q]);  // w.r.t. the scaled logit
        }
        ps[warp][lane] = p;
        dss[warp][lane] = ds;
        __syncthreads();
        const int rows = min(GEN_TILE, T - q0);
        gen_accumulate(dv, ps[warp], dOs, rows, HD);  // dV += P^T dO
        gen_accumulate(dk, dss[warp], Qs, rows, HD);  // dK += dS^T Q
    }

    if (key >= T) return;
    bf16_t* dk_dst = dqkv + ((long long)b * T + key) * tok_stride + (long long)H * HD + h * HD;
    gen_store_row(dk_dst, dk, scale, HD);
    gen_store_row(dk_dst + (long long)H * HD, dv, 1.0f, HD);
}

// dQ: warp w of block x owns query x * GEN_ROWS + w and loops over every key tile; lane l
// recomputes the probability and dS of that query against key k0 + l.
extern "C" __global__ void __launch_bounds__(GEN_ROWS * WARP_SIZE)
    attention_backward_dq_general(bf16_t* __restrict__ dqkv, const bf16_t* __restrict__ qkv,
                                  const bf16_t* __restrict__ dout, const float* __restrict__ lse,
                                  const float* __restrict__ delta, int B, int T, int H, int HD,
                                  float scale) {
    __shared__ __align__(16) GenTile Ks;
    __shared__ __align__(16) GenTile Vs;
    __shared__ float qs[GEN_ROWS][GEN_MAX_HD];
    __shared__ float dos[GEN_ROWS][GEN_MAX_HD];
    __shared__ float dss[GEN_ROWS][GEN_TILE];

    const int h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int q = blockIdx.x * GEN_ROWS + warp;
    const long long tok_stride = 3LL * H * HD;
    const bf16_t* q_base = qkv + (long long)b * T * tok_stride + h * HD;
    const bf16_t* k_base = q_base + (long long)H * HD;
    const bf16_t* v_base = q_base + 2LL * H * HD;
    const long long do_stride = (long long)H * HD;
    const bf16_t* do_base = dout + (long long)b * T * do_stride + h * HD;
    const long long stat = ((long long)b * H + h) * T + q;
    const float row_lse = q < T ? lse[stat] : 0.0f;
    const float row_delta = q < T ? delta[stat] : 0.0f;

    gen_load_row(qs[warp], q_base, q, T, HD, tok_stride);
    gen_load_row(dos[warp], do_base, q, T, HD, do_stride);
    float dq[GEN_COLS];
#pragma unroll
    for (int i = 0; i < GEN_COLS; i++) dq[i] = 0.0f;

    for (int k0 = 0; k0 < T; k0 += GEN_TILE) {
        __syncthreads();  // previous tile consumed (first time: qs, dos written)
        gen_load_tile(Ks, k_base, k0, T, HD, tok_stride);
        gen_load_tile(Vs, v_base, k0, T, HD, tok_stride);
        __syncthreads();
        const int key = k0 + lane;
        float ds = 0.0f;
        if (key < T) {
            const float p = expf(scale * gen_dot(qs[warp], Ks[lane], HD) - row_lse);
            ds = p * (gen_dot(dos[warp], Vs[lane], HD) - row_delta);
        }
        dss[warp][lane] = ds;
        __syncthreads();
        gen_accumulate(dq, dss[warp], Ks, min(GEN_TILE, T - k0), HD);  // dQ += dS K
    }

    if (q >= T) return;
    gen_store_row(dqkv + ((long long)b * T + q) * tok_stride + h * HD, dq, scale, HD);
}
