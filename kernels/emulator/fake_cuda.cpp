// An emulated CUDA device for machines without a GPU: the subset of the CUDA driver API and
// cuBLAS that the backend uses (through cudarc, loaded at run time), served on the CPU.
//
// Built as a shared library and installed as libcuda.so, libcublas.so and libcublasLt.so in a
// folder put first on LD_LIBRARY_PATH (tests/emulated_cuda.rs does this), it lets the whole
// CUDA code path of dinotrain run unchanged on a CPU: device memory is host memory, every
// kernel launch runs the real kernel source through the SIMT emulation (simt.hpp, ptx_host.hpp),
// and the bf16 GEMM is a plain f32-accumulating loop. The fatbins the backend loads are ignored:
// kernels are found by name in a registry generated from the `.cu` sources.
//
// What it checks: the host orchestration (buffer sizes and offsets, launch arguments, the order
// of operations, bf16 rounding points) and the kernels' index math, end to end. What it cannot:
// speed, hardware rounding of fast-math intrinsics, and races (blocks run one after another,
// the threads of a block as fibers that switch only at barriers, as in simt.hpp).
//
// Fresh allocations are filled with 0xFF bytes (NaN in f32 and bf16), so a read of memory that
// was never written shows up as NaN in the results.
//
//   g++ -O1 -std=c++20 -pthread -shared -fPIC -I<dir with registry.inc> fake_cuda.cpp -o libcuda.so
#include "all_kernels.hpp"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

namespace fake {

// ---- kernels by name -------------------------------------------------------------------------

using Launch = std::function<void(Dim3, Dim3, void**)>;

template <class... A, size_t... I>
void call_with(void (*k)(A...), void** params, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

template <class... A>
Launch wrap(void (*k)(A...)) {
    return [k](Dim3 grid, Dim3 block, void** params) {
        simt::launch(grid, block, [&] { call_with(k, params, std::index_sequence_for<A...>{}); });
    };
}

std::map<std::string, Launch>& registry() {
    static std::map<std::string, Launch> kernels = [] {
        std::map<std::string, Launch> m;
#define KERNEL(FAMILY, NAME) m.emplace(#NAME, wrap(&FAMILY::NAME));
#include "registry.inc"
#undef KERNEL
        return m;
    }();
    return kernels;
}

struct Function {
    const Launch* launch;
    std::string name;
};

std::mutex lock;  // one launch or GEMM at a time (the emulation's globals are shared)
int opaque_context, opaque_stream, opaque_module, opaque_blas;

struct Event {
    std::chrono::steady_clock::time_point at;
};

constexpr size_t total_memory = 8ull << 30;
std::map<void*, size_t> allocations;  // for cuMemGetInfo: free = total - live bytes
size_t live_bytes = 0;

void* fresh(size_t bytes) {
    std::lock_guard<std::mutex> guard(lock);
    if (live_bytes + bytes > total_memory) return nullptr;  // out of device memory
    void* p = std::malloc(bytes ? bytes : 1);
    if (!p) return nullptr;
    std::memset(p, 0xff, bytes);
    allocations[p] = bytes;
    live_bytes += bytes;
    return p;
}

void release(void* p) {
    if (!p) return;
    {
        std::lock_guard<std::mutex> guard(lock);
        auto it = allocations.find(p);
        if (it != allocations.end()) {
            live_bytes -= it->second;
            allocations.erase(it);
        }
    }
    std::free(p);
}

float bf16_value(const void* base, long long i) {
    return bf16_to_f32(static_cast<const bf16_t*>(base)[i]);
}

}  // namespace fake

// ---- the driver API ------------------------------------------------------------------------------

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, len, "dinotrain emulated CUDA device (CPU)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 75: *v = 9; break;   // compute capability major
        case 76: *v = 0; break;   // compute capability minor
        case 1: *v = 1024; break; // max threads per block
        case 16: *v = 132; break; // multiprocessors
        default: *v = 0;          // unsupported features: memory pools, unified addressing, ...
    }
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) { *bytes = fake::total_memory; return CUDA_SUCCESS; }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> guard(fake::lock);
    *free_bytes = fake::total_memory - fake::live_bytes;
    *total = fake::total_memory;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) { *ctx = &fake::opaque_context; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void*) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &fake::opaque_context; return CUDA_SUCCESS; }
CUresult cuCtxPushCurrent_v2(void*) { return CUDA_SUCCESS; }
CUresult cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = &fake::opaque_context; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return CUDA_SUCCESS; }
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }

CUresult cuStreamCreate(void** s, unsigned) { *s = &fake::opaque_stream; return CUDA_SUCCESS; }
CUresult cuStreamCreateWithFlags(void** s, unsigned) { *s = &fake::opaque_stream; return CUDA_SUCCESS; }
CUresult cuStreamDestroy_v2(void*) { return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(void*) { return CUDA_SUCCESS; }
CUresult cuStreamQuery(void*) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }

CUresult cuEventCreate(void** e, unsigned) { *e = new fake::Event{}; return CUDA_SUCCESS; }
CUresult cuEventRecord(void* e, void*) {
    static_cast<fake::Event*>(e)->at = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void*) { return CUDA_SUCCESS; }
CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    auto d = static_cast<fake::Event*>(end)->at - static_cast<fake::Event*>(start)->at;
    *ms = std::chrono::duration<float, std::milli>(d).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }
CUresult cuEventDestroy_v2(void* e) { delete static_cast<fake::Event*>(e); return CUDA_SUCCESS; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* m = fake::fresh(bytes);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = (CUdeviceptr)m;
    return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { fake::release((void*)p); return CUDA_SUCCESS; }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) { std::memcpy((void*)dst, src, n); return CUDA_SUCCESS; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) { return cuMemcpyHtoD_v2(dst, src, n); }
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { std::memcpy(dst, (const void*)src, n); return CUDA_SUCCESS; }
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoH_v2(dst, src, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { std::memmove((void*)dst, (const void*)src, n); return CUDA_SUCCESS; }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { std::memset((void*)dst, v, n); return CUDA_SUCCESS; }
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(dst, v, n); }
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void*) {
    for (size_t i = 0; i < n; i++) ((unsigned*)dst)[i] = v;
    return CUDA_SUCCESS;
}

CUresult cuModuleLoadData(void** m, const void*) { *m = &fake::opaque_module; return CUDA_SUCCESS; }
CUresult cuModuleUnload(void*) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    auto& kernels = fake::registry();
    auto it = kernels.find(name);
    if (it == kernels.end()) {
        std::fprintf(stderr, "emulated CUDA: no kernel named %s\n", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    *f = new fake::Function{&it->second, name};
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int, void*) { *v = 0; return CUDA_SUCCESS; }
CUresult cuFuncSetAttribute(void*, int, int) { return CUDA_SUCCESS; }
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared_bytes, void*, void** params, void** extra) {
    auto* fn = static_cast<fake::Function*>(f);
    if (by != 1 || bz != 1 || bx == 0 || bx % 32 != 0 || bx > 1024 || shared_bytes != 0 || extra) {
        std::fprintf(stderr, "emulated CUDA: %s launched with block (%u,%u,%u), %u B dynamic shared memory: not emulated\n",
                     fn->name.c_str(), bx, by, bz, shared_bytes);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (gx == 0 || gy == 0 || gz == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> guard(fake::lock);
    (*fn->launch)(Dim3{gx, gy, gz}, Dim3{bx, 1, 1}, params);
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult, const char** s) { *s = "emulated CUDA error"; return CUDA_SUCCESS; }
CUresult cuGetErrorName(CUresult, const char** s) { *s = "CUDA_ERROR_EMULATED"; return CUDA_SUCCESS; }

// ---- cuBLAS: the one GEMM the backend calls ------------------------------------------------------

typedef int cublasStatus_t;
cublasStatus_t cublasCreate_v2(void** h) { *h = &fake::opaque_blas; return 0; }
cublasStatus_t cublasDestroy_v2(void*) { return 0; }
cublasStatus_t cublasSetStream_v2(void*, void*) { return 0; }
cublasStatus_t cublasSetMathMode(void*, int) { return 0; }
cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
cublasStatus_t cublasLtCreate(void** h) { *h = &fake::opaque_blas; return 0; }
cublasStatus_t cublasLtDestroy(void*) { return 0; }

// Column-major C[m,n] = alpha op(A)[m,k] op(B)[k,n] + beta C, per batch entry; A and B bf16
// (CUDA_R_16BF = 14) or f32 (CUDA_R_32F = 0), C f32, f32 accumulation.
cublasStatus_t cublasGemmStridedBatchedEx(void*, int transa, int transb, int m, int n, int k,
                                          const void* alpha, const void* A, int a_type, int lda,
                                          long long stride_a, const void* B, int b_type, int ldb,
                                          long long stride_b, const void* beta, void* C, int c_type,
                                          int ldc, long long stride_c, int batch, int compute, int) {
    const int CUDA_R_32F = 0, CUDA_R_16BF = 14, CUBLAS_COMPUTE_32F = 68;
    if (c_type != CUDA_R_32F || compute != CUBLAS_COMPUTE_32F ||
        (a_type != CUDA_R_16BF && a_type != CUDA_R_32F) || (b_type != CUDA_R_16BF && b_type != CUDA_R_32F)) {
        std::fprintf(stderr, "emulated cuBLAS: GEMM types (%d, %d, %d, compute %d) not emulated\n",
                     a_type, b_type, c_type, compute);
        return 15;  // CUBLAS_STATUS_NOT_SUPPORTED
    }
    std::lock_guard<std::mutex> guard(fake::lock);
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    auto load = [](const void* base, int type, long long i) {
        return type == CUDA_R_16BF ? fake::bf16_value(base, i) : static_cast<const float*>(base)[i];
    };
    for (int e = 0; e < batch; e++) {
        float* c = static_cast<float*>(C) + e * stride_c;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                float acc = 0.0f;
                for (int p = 0; p < k; p++) {
                    // op(A)[i,p]: A[i + p*lda] (N) or A[p + i*lda] (T); op(B)[p,j] likewise.
                    const long long ai = e * stride_a + (transa ? (long long)p + (long long)i * lda : (long long)i + (long long)p * lda);
                    const long long bi = e * stride_b + (transb ? (long long)j + (long long)p * ldb : (long long)p + (long long)j * ldb);
                    acc += load(A, a_type, ai) * load(B, b_type, bi);
                }
                float& out = c[i + (long long)j * ldc];
                out = be == 0.0f ? al * acc : al * acc + be * out;  // beta 0 ignores C (may be NaN)
            }
    }
    return 0;
}

}  // extern "C"
