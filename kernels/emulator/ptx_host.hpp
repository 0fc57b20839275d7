// Host versions of common.cuh's PTX helpers (conversions, mma.sync m16n8k16, ldmatrix,
// cp.async), written from the PTX ISA's fragment-layout tables.
#pragma once

inline bf16_t f32_to_bf16(float f) {  // round to nearest even, like cvt.rn.bf16.f32
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

inline u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

inline float lo_half(u32 r) { return bf16_to_f32((bf16_t)(r & 0xffffu)); }
inline float hi_half(u32 r) { return bf16_to_f32((bf16_t)(r >> 16)); }

// D = A(16x16) B(16x8) + C with the fragment layout documented in common.cuh.
inline void mma_bf16_16816(float c[4], const u32 a[4], const u32 b[2]) {
    auto& w = simt::warp();
    const int me = simt::lane();
    std::memcpy(w.a[me], a, sizeof(u32) * 4);
    std::memcpy(w.b[me], b, sizeof(u32) * 2);
    w.bar.arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        A[g][2 * t] = lo_half(w.a[l][0]);
        A[g][2 * t + 1] = hi_half(w.a[l][0]);
        A[g + 8][2 * t] = lo_half(w.a[l][1]);
        A[g + 8][2 * t + 1] = hi_half(w.a[l][1]);
        A[g][2 * t + 8] = lo_half(w.a[l][2]);
        A[g][2 * t + 9] = hi_half(w.a[l][2]);
        A[g + 8][2 * t + 8] = lo_half(w.a[l][3]);
        A[g + 8][2 * t + 9] = hi_half(w.a[l][3]);
        B[2 * t][g] = lo_half(w.b[l][0]);
        B[2 * t + 1][g] = hi_half(w.b[l][0]);
        B[2 * t + 8][g] = lo_half(w.b[l][1]);
        B[2 * t + 9][g] = hi_half(w.b[l][1]);
    }
    w.bar.arrive_and_wait();
    const int g = me / 4, t = me % 4;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; e++) {
        float acc = c[e];
        for (int k = 0; k < 16; k++) acc += A[rows[e]][k] * B[k][cols[e]];
        c[e] = acc;
    }
}

// Lane l gives the address of row (l % 8) of matrix (l / 8); each lane receives, per matrix,
// M[g][2t..2t+1] (or M[2t..2t+1][g] transposed) packed low-first.
inline void ldmatrix_impl(u32 r[4], const void* row_ptr, bool trans) {
    auto& w = simt::warp();
    const int me = simt::lane();
    w.ptr[me] = row_ptr;
    w.bar.arrive_and_wait();
    const int g = me / 4, t = me % 4;
    for (int m = 0; m < 4; m++) {
        bf16_t lo, hi;
        if (!trans) {
            const bf16_t* row = (const bf16_t*)w.ptr[m * 8 + g];
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {
            lo = ((const bf16_t*)w.ptr[m * 8 + 2 * t])[g];
            hi = ((const bf16_t*)w.ptr[m * 8 + 2 * t + 1])[g];
        }
        r[m] = (u32)lo | ((u32)hi << 16);
    }
    w.bar.arrive_and_wait();
}
inline void ldmatrix_x4(u32 r[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(u32 r[4], const void* p) { ldmatrix_impl(r, p, true); }

// Copies are synchronous here; the kernels' barriers still order them.
inline void cp_async_16(void* smem, const void* gmem, bool valid) {
    if (valid) std::memcpy(smem, gmem, 16);
    else std::memset(smem, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
