// Masked patches: mask-token substitution (iBOT student input) and the gather / scatter of the
// masked patch tokens (iBOT head input and its gradient).
//
// Dimensions: R = crops * Np patch rows, C channels, M masked patches, T tokens per crop
// (1 cls + n_reg registers + Np patches), token_offset = 1 + n_reg.
//   x, dx           [R, C] f32        patch tokens before the cls token is prepended
//   masks           [R]    u8         1 = masked
//   mask_token      [C]    f32
//   indices         [M]    i64        flat crop * Np + patch, strictly increasing (unique)
//   tokens          [crops * T, C]    f32 or bf16 (suffix), the full token rows
//   gathered        [M, C]
//
// Launch contracts (grid-stride: launchers use ceil(n / 256) capped at 65535 blocks of 256):
//   mask_token_substitute:        x[r] = mask_token where masks[r]
//   mask_token_backward_partial:  grid (ceil(C / 256), G), block 256; partial [G, C] =
//                                 sum of dx over the chunk's masked rows, which are then zeroed
//                                 (the mask token replaced them); reduce with column_partial_reduce
//   gather_rows_{f32,bf16}:       gathered[m] = tokens[crop * T + token_offset + patch]
//   scatter_rows_add_f32:         dtokens[...] += dgathered[m] (indices are unique: no races)
//   assemble_tokens:              x [B, T, C] = [cls + pos[0], reg[0..n_reg], pe[b, p] + pos[1 + p]]
//                                 with T = 1 + n_reg + Np; reg may be null when n_reg = 0
// Out-of-range indices are skipped (the launcher validates them on the host first).
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                      \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);            \
         i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void mask_token_substitute(float* __restrict__ x,
                                                 const unsigned char* __restrict__ masks,
                                                 const float* __restrict__ mask_token, int R,
                                                 int C) {
    GRID_STRIDE(i, (long long)R * C) {
        if (masks[i / C]) x[i] = mask_token[i % C];
    }
}

extern "C" __global__ void mask_token_backward_partial(float* __restrict__ partial,
                                                       float* __restrict__ dx,
                                                       const unsigned char* __restrict__ masks,
                                                       int R, int C, int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(R, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) {
        if (!masks[r]) continue;
        const long long i = (long long)r * C + c;
        acc += dx[i];
        dx[i] = 0.0f;
    }
    partial[(long long)blockIdx.y * C + c] = acc;
}

__device__ __forceinline__ long long token_row(i64 flat, int n_patches, int T, int token_offset) {
    return (flat / n_patches) * T + token_offset + flat % n_patches;
}

#define GATHER(SUFFIX, TYPE)                                                                   \
    extern "C" __global__ void gather_rows_##SUFFIX(                                            \
        TYPE* __restrict__ gathered, const TYPE* __restrict__ tokens,                          \
        const i64* __restrict__ indices, int M, int C, int n_patches, int T, int token_offset, \
        long long n_token_rows) {                                                              \
        GRID_STRIDE(i, (long long)M * C) {                                                     \
            const long long row = token_row(indices[i / C], n_patches, T, token_offset);       \
            if (row >= 0 && row < n_token_rows) gathered[i] = tokens[row * C + i % C];         \
        }                                                                                      \
    }

GATHER(f32, float)
GATHER(bf16, bf16_t)

extern "C" __global__ void scatter_rows_add_f32(float* __restrict__ dtokens,
                                                const float* __restrict__ dgathered,
                                                const i64* __restrict__ indices, int M, int C,
                                                int n_patches, int T, int token_offset,
                                                long long n_token_rows) {
    GRID_STRIDE(i, (long long)M * C) {
        const long long row = token_row(indices[i / C], n_patches, T, token_offset);
        if (row >= 0 && row < n_token_rows) dtokens[row * C + i % C] += dgathered[i];
    }
}

// The backbone's input tokens (the registers go in after the position embedding, as the
// official model does): x[b, 0] = cls + pos[0], x[b, 1 + i] = reg[i], x[b, 1 + n_reg + p] =
// pe[b, p] + pos[1 + p]. pe [B, Np, C], pos [1 + Np, C], reg [n_reg, C], cls [C].
extern "C" __global__ void assemble_tokens(float* __restrict__ x, const float* __restrict__ pe,
                                           const float* __restrict__ cls,
                                           const float* __restrict__ reg,
                                           const float* __restrict__ pos, int B, int n_patches,
                                           int n_reg, int C) {
    const long long T = 1 + n_reg + n_patches;
    GRID_STRIDE(i, B * T * C) {
        const long long c = i % C;
        const long long row = i / C;
        const long long t = row % T;
        const long long b = row / T;
        float v;
        if (t == 0) {
            v = cls[c] + pos[c];
        } else if (t <= n_reg) {
            v = reg[(t - 1) * C + c];
        } else {
            const long long p = t - 1 - n_reg;
            v = pe[(b * n_patches + p) * C + c] + pos[(1 + p) * C + c];
        }
        x[i] = v;
    }
}
