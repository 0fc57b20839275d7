// Host emulation of the CUDA features the kernels use, for checking their index math on a CPU
// (no GPU in the build machines). One std::thread per CUDA thread, one block at a time;
// `__shared__` becomes `static` (shared by the block's threads, reused block after block);
// warp-level operations exchange values through a per-warp buffer between two barriers.
// The tensor-core and ldmatrix fragment layouts follow the PTX ISA (see common.cuh).
// Include order: simt.hpp, ../common.cuh, ptx_host.hpp, then a kernel file.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define DINOTRAIN_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

namespace simt {
struct Warp {
    std::barrier<> bar{32};
    float f[32];
    unsigned a[32][4];
    unsigned b[32][2];
    const void* ptr[32];
};
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<Warp>> warps;
inline Warp& warp() { return *warps[threadIdx.x / 32]; }
inline int lane() { return threadIdx.x % 32; }

// Runs `kernel` over the grid, block after block (blockDim.x a multiple of 32).
inline void launch(Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> bar(threads);
                block_barrier = &bar;
                warps.clear();
                for (unsigned w = 0; w < threads / 32; w++) warps.push_back(std::make_unique<Warp>());
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; t++)
                    pool.emplace_back([&, t] {
                        threadIdx = Dim3{t, 0, 0};
                        blockIdx = Dim3{x, y, z};
                        kernel();
                    });
                for (auto& th : pool) th.join();
            }
}
}  // namespace simt

inline void __syncthreads() { simt::block_barrier->arrive_and_wait(); }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    auto& w = simt::warp();
    w.f[simt::lane()] = v;
    w.bar.arrive_and_wait();
    const float r = w.f[simt::lane() ^ lane_mask];
    w.bar.arrive_and_wait();
    return r;
}

using std::max;
using std::min;
