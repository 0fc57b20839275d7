// Host emulation of the CUDA features the kernels use, for checking their index math on a CPU
// (no GPU in the build machines). Every CUDA thread of a block is a fiber on the one calling OS
// thread (started once with ucontext, then switched with _setjmp/_longjmp: no system call per
// switch, and each fiber runs block after block); blocks run one after another. A fiber runs until it reaches a barrier
// (__syncthreads, or the warp exchange inside a shuffle / mma / ldmatrix), then the next fiber
// runs; a barrier opens when every thread still running has arrived, so a thread that returned
// early stops counting, as on the GPU. `__shared__` becomes `static` (shared by the block's
// threads, reused block after block). The tensor-core and ldmatrix fragment layouts follow the
// PTX ISA (see common.cuh). Include order: simt.hpp, ../common.cuh, ptx_host.hpp, then a kernel.
#pragma once
// Fibers switch with _setjmp/_longjmp between their own stacks, which glibc's fortified
// longjmp would reject; the emulation never needs the check.
#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE
#endif
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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
inline Dim3 threadIdx, blockIdx;  // the running fiber's (set by the scheduler before each switch)
inline Dim3 blockDim, gridDim;

namespace simt {

void yield();
inline unsigned long long barriers_opened = 0;  // progress measure of the deadlock check

// A barrier among fibers: arrive, then yield until the phase turns.
struct Barrier {
    unsigned expected;
    unsigned arrived = 0;
    unsigned long long phase = 0;
    explicit Barrier(unsigned n) : expected(n) {}
    void arrive_and_wait() {
        const unsigned long long mine = phase;
        if (++arrived >= expected) {
            arrived = 0;
            ++phase;
            ++barriers_opened;
            return;
        }
        while (phase == mine) yield();
    }
    // A participant that has returned: the others no longer wait for it.
    void drop() {
        if (expected == 0) return;
        --expected;
        if (expected > 0 && arrived >= expected) {
            arrived = 0;
            ++phase;
            ++barriers_opened;
        }
    }
};

struct Warp {
    Barrier bar{32};
    float f[32];
    unsigned a[32][4];
    unsigned b[32][2];
    const void* ptr[32];
};

inline Barrier* block_barrier = nullptr;
inline std::vector<std::unique_ptr<Warp>> warps;
inline Warp& warp() { return *warps[threadIdx.x / 32]; }
inline int lane() { return threadIdx.x % 32; }

constexpr size_t FIBER_STACK = 256 * 1024;

struct Fiber {
    ucontext_t start;  // used once, to enter the fiber the first time
    jmp_buf resume;    // where the fiber continues
    bool started = false;
    bool done = false;
};

inline jmp_buf scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<std::unique_ptr<char[]>> stacks;
inline unsigned current = 0;
inline const std::function<void()>* running_kernel = nullptr;

inline void yield() {
    if (!_setjmp(fibers[current].resume)) _longjmp(scheduler, 1);
}

// A fiber runs the current kernel as thread `current` of the current block, then parks until
// the scheduler hands it the next block (or the next launch's first block).
inline void fiber_main() {
    for (;;) {
        (*running_kernel)();
        fibers[current].done = true;
        block_barrier->drop();
        warp().bar.drop();
        yield();
    }
}

inline void switch_to(unsigned t) {
    current = t;
    threadIdx = Dim3{t, 0, 0};
    Fiber& f = fibers[t];
    if (_setjmp(scheduler)) return;  // back from the fiber
    if (!f.started) {
        f.started = true;
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = stacks[t].get();
        f.start.uc_stack.ss_size = FIBER_STACK;
        f.start.uc_link = nullptr;  // fiber_main never returns
        makecontext(&f.start, fiber_main, 0);
        setcontext(&f.start);
    }
    _longjmp(f.resume, 1);
}

// Runs `kernel` over the grid, block after block (blockDim.x a multiple of 32).
inline void launch(Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x;
    running_kernel = &kernel;
    while (stacks.size() < threads) {
        stacks.push_back(std::make_unique<char[]>(FIBER_STACK));
        fibers.emplace_back();
    }
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                Barrier bar(threads);
                block_barrier = &bar;
                warps.clear();
                for (unsigned w = 0; w < threads / 32; w++) warps.push_back(std::make_unique<Warp>());
                blockIdx = Dim3{x, y, z};
                for (unsigned t = 0; t < threads; t++) fibers[t].done = false;
                // Round robin until every thread has returned. Each fiber runs to its next
                // barrier, so a round in which no barrier opened and no thread returned can
                // never end: a deadlock (a barrier that some threads skip).
                unsigned live = threads;
                while (live > 0) {
                    const unsigned long long opened = barriers_opened;
                    unsigned returned = 0;
                    for (unsigned t = 0; t < threads; t++) {
                        if (fibers[t].done) continue;
                        switch_to(t);
                        if (fibers[t].done) returned++;
                    }
                    live -= returned;
                    if (live > 0 && returned == 0 && barriers_opened == opened) {
                        std::fprintf(stderr, "simt: deadlock in block (%u,%u,%u)\n", x, y, z);
                        std::abort();
                    }
                }
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
