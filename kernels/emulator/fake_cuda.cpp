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
// cuBLASLt: descriptors, a heuristic that answers one algorithm per valid problem (recording
// the alignments it was promised, which the matmul then checks against the pointers), and the
// DEFAULT, BIAS and BGRADB epilogues; anything else is NOT_SUPPORTED, as an algorithm-less
// problem is on a GPU.
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

// 8 GiB, or FAKE_CUDA_MEMORY_MB (a test of running out of device memory).
const size_t total_memory = [] {
    const char* mb = std::getenv("FAKE_CUDA_MEMORY_MB");
    return mb ? (size_t)std::strtoull(mb, nullptr, 10) << 20 : 8ull << 30;
}();
std::map<void*, size_t> allocations;  // for cuMemGetInfo: free = total - live bytes
size_t live_bytes = 0;

void* fresh(size_t bytes) {
    std::lock_guard<std::mutex> guard(lock);
    if (live_bytes + bytes > total_memory) return nullptr;  // out of device memory
    // 256-byte aligned like cuMemAlloc, so alignment-dependent paths (cuBLASLt) behave alike.
    void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + (bytes ? 0 : 256));
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

// ---- cuBLASLt: descriptors, heuristic, matmul with the BIAS and BGRADB epilogues ----------------

namespace fake {
struct LtLayout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int order = 0;  // CUBLASLT_ORDER_COL
    int batch = 1;
    int64_t stride = 0;
};
struct LtDesc {
    int compute, scale;
    int transa = 0, transb = 0;
    int epilogue = 1;  // CUBLASLT_EPILOGUE_DEFAULT
    const void* bias = nullptr;
    int bias_type = -1;
};
struct LtPref {
    uint64_t max_workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D
};
struct LtHeuristicResult {  // cublasLtMatmulHeuristicResult_t
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};
enum : int { LT_OK = 0, LT_INVALID_VALUE = 7, LT_NOT_SUPPORTED = 15 };
enum : int { EPI_DEFAULT = 1, EPI_BIAS = 4, EPI_BGRADB = 512 };
constexpr uint64_t ALGO_TAG = 0x64696e6f6c74ull;  // marks algorithms this heuristic made

template <class T>
int set_attr(T& field, const void* buf, size_t size) {
    if (size != sizeof(T)) return LT_INVALID_VALUE;
    std::memcpy(&field, buf, sizeof(T));
    return LT_OK;
}

// The shape of op(X) for a stored layout and an operation (0 = N, 1 = T).
std::pair<uint64_t, uint64_t> op_shape(const LtLayout& l, int trans) {
    return trans ? std::make_pair(l.cols, l.rows) : std::make_pair(l.rows, l.cols);
}

float lt_load(const void* base, int type, long long i) {
    return type == 14 ? bf16_value(base, i) : static_cast<const float*>(base)[i];
}

// Why a problem has no algorithm, or nullptr when it has one.
const char* lt_unsupported(const LtDesc& d, const LtLayout& a, const LtLayout& b,
                           const LtLayout& c, const LtLayout& dl) {
    const int F32 = 0, BF16 = 14, COMPUTE_32F = 68;
    if (d.compute != COMPUTE_32F || d.scale != F32) return "compute/scale type";
    if (a.type != b.type || (a.type != BF16 && a.type != F32)) return "A/B type";
    if (c.type != dl.type || (dl.type != F32 && !(dl.type == BF16 && a.type == BF16))) return "C/D type";
    if (a.order || b.order || c.order || dl.order) return "non-column-major order";
    if (d.epilogue != EPI_DEFAULT && d.epilogue != EPI_BIAS && d.epilogue != EPI_BGRADB) return "epilogue";
    if (d.epilogue != EPI_DEFAULT && (d.bias_type != -1 && d.bias_type != F32)) return "bias type";
    if (d.epilogue != EPI_DEFAULT && (a.batch != 1 || dl.batch != 1)) return "batched epilogue";
    return nullptr;
}

// Why a problem is malformed (INVALID_VALUE on a GPU), or nullptr.
const char* lt_invalid(const LtDesc& d, const LtLayout& a, const LtLayout& b, const LtLayout& c,
                       const LtLayout& dl) {
    auto [am, ak] = op_shape(a, d.transa);
    auto [bk, bn] = op_shape(b, d.transb);
    if (am != dl.rows || bn != dl.cols || ak != bk) return "operand shapes disagree";
    if (c.rows != dl.rows || c.cols != dl.cols) return "C and D shapes differ";
    for (const LtLayout* l : {&a, &b, &c, &dl})
        if (l->ld < (int64_t)l->rows || l->batch < 1) return "leading dimension or batch";
    if (a.batch != dl.batch || b.batch != dl.batch || c.batch != dl.batch) return "batch counts differ";
    if (d.epilogue != EPI_DEFAULT && !d.bias) return "epilogue without a bias pointer";
    return nullptr;
}
}  // namespace fake

extern "C" {
cublasStatus_t cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    *l = new fake::LtLayout{type, rows, cols, ld};
    return fake::LT_OK;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(void* l) { delete static_cast<fake::LtLayout*>(l); return fake::LT_OK; }
cublasStatus_t cublasLtMatrixLayoutSetAttribute(void* p, int attr, const void* buf, size_t size) {
    auto& l = *static_cast<fake::LtLayout*>(p);
    switch (attr) {
        case 1: return fake::set_attr(l.order, buf, size);
        case 5: return fake::set_attr(l.batch, buf, size);
        case 6: return fake::set_attr(l.stride, buf, size);
        default: std::fprintf(stderr, "emulated cuBLASLt: layout attribute %d not emulated\n", attr); return fake::LT_NOT_SUPPORTED;
    }
}
cublasStatus_t cublasLtMatmulDescCreate(void** d, int compute, int scale) {
    *d = new fake::LtDesc{compute, scale};
    return fake::LT_OK;
}
cublasStatus_t cublasLtMatmulDescDestroy(void* d) { delete static_cast<fake::LtDesc*>(d); return fake::LT_OK; }
cublasStatus_t cublasLtMatmulDescSetAttribute(void* p, int attr, const void* buf, size_t size) {
    auto& d = *static_cast<fake::LtDesc*>(p);
    switch (attr) {
        case 3: return fake::set_attr(d.transa, buf, size);
        case 4: return fake::set_attr(d.transb, buf, size);
        case 7: return fake::set_attr(d.epilogue, buf, size);
        case 8: return fake::set_attr(d.bias, buf, size);
        case 26: return fake::set_attr(d.bias_type, buf, size);
        default: std::fprintf(stderr, "emulated cuBLASLt: matmul attribute %d not emulated\n", attr); return fake::LT_NOT_SUPPORTED;
    }
}
cublasStatus_t cublasLtMatmulPreferenceCreate(void** p) { *p = new fake::LtPref{}; return fake::LT_OK; }
cublasStatus_t cublasLtMatmulPreferenceDestroy(void* p) { delete static_cast<fake::LtPref*>(p); return fake::LT_OK; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void* p, int attr, const void* buf, size_t size) {
    auto& pref = *static_cast<fake::LtPref*>(p);
    switch (attr) {
        case 1: return fake::set_attr(pref.max_workspace, buf, size);
        case 5: case 6: case 7: case 8: return fake::set_attr(pref.align[attr - 5], buf, size);
        default: std::fprintf(stderr, "emulated cuBLASLt: preference attribute %d not emulated\n", attr); return fake::LT_NOT_SUPPORTED;
    }
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d, void* pref,
                                              int requested, fake::LtHeuristicResult* results, int* returned) {
    auto& ds = *static_cast<fake::LtDesc*>(desc);
    auto &la = *static_cast<fake::LtLayout*>(a), &lb = *static_cast<fake::LtLayout*>(b);
    auto &lc = *static_cast<fake::LtLayout*>(c), &ld = *static_cast<fake::LtLayout*>(d);
    auto& pr = *static_cast<fake::LtPref*>(pref);
    *returned = 0;
    if (requested < 1) return fake::LT_INVALID_VALUE;
    if (const char* why = fake::lt_invalid(ds, la, lb, lc, ld)) {
        std::fprintf(stderr, "emulated cuBLASLt: heuristic on an invalid problem: %s\n", why);
        return fake::LT_INVALID_VALUE;
    }
    if (fake::lt_unsupported(ds, la, lb, lc, ld)) return fake::LT_NOT_SUPPORTED;
    fake::LtHeuristicResult r{};
    r.algo[0] = fake::ALGO_TAG;
    for (int i = 0; i < 4; i++) r.algo[1 + i] = pr.align[i];
    r.algo[5] = (uint64_t)ds.epilogue;
    r.workspace = pr.max_workspace < (1u << 20) ? pr.max_workspace : (1u << 20);
    r.waves = 1.0f;
    results[0] = r;
    *returned = 1;
    return fake::LT_OK;
}
cublasStatus_t cublasLtMatmul(void*, void* desc, const void* alpha, const void* A, void* a, const void* B, void* b,
                              const void* beta, const void* C, void* c, void* D, void* d,
                              const fake::LtHeuristicResult* algo, void* workspace, size_t workspace_bytes, void*) {
    auto& ds = *static_cast<fake::LtDesc*>(desc);
    auto &la = *static_cast<fake::LtLayout*>(a), &lb = *static_cast<fake::LtLayout*>(b);
    auto &lc = *static_cast<fake::LtLayout*>(c), &ld = *static_cast<fake::LtLayout*>(d);
    const char* why = fake::lt_invalid(ds, la, lb, lc, ld);
    if (!why && fake::lt_unsupported(ds, la, lb, lc, ld)) why = "a problem the heuristic has no algorithm for";
    if (!why && (!algo || algo->algo[0] != fake::ALGO_TAG)) why = "an algorithm the heuristic did not give";
    if (!why && algo->algo[5] != (uint64_t)ds.epilogue) why = "an algorithm found for another epilogue";
    const void* ptrs[4] = {A, B, C, D};
    for (int i = 0; i < 4 && !why; i++)
        if ((uintptr_t)ptrs[i] % algo->algo[1 + i]) why = "a pointer less aligned than the heuristic was told";
    if (!why && workspace_bytes > 0 && !workspace) why = "a null workspace";
    if (!why && std::getenv("FAKE_CUBLASLT_REFUSE")) {
        // Test hook: a library whose heuristic answers but whose matmul declines every problem.
        return fake::LT_NOT_SUPPORTED;
    }
    if (why) {
        std::fprintf(stderr, "emulated cuBLASLt: matmul with %s\n", why);
        return fake::LT_INVALID_VALUE;
    }
    std::lock_guard<std::mutex> guard(fake::lock);
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    const long long k = (long long)fake::op_shape(la, ds.transa).second;
    for (int e = 0; e < ld.batch; e++) {
        auto a_at = [&](long long i, long long p) {  // op(A)[i, p]
            return fake::lt_load(A, la.type, e * la.stride + (ds.transa ? p + i * la.ld : i + p * la.ld));
        };
        auto b_at = [&](long long p, long long j) {  // op(B)[p, j]
            return fake::lt_load(B, lb.type, e * lb.stride + (ds.transb ? j + p * lb.ld : p + j * lb.ld));
        };
        const bool bf16_out = ld.type == 14;  // D (and C) bf16: rounded once, to nearest even
        for (long long j = 0; j < (long long)ld.cols; j++)
            for (long long i = 0; i < (long long)ld.rows; i++) {
                float acc = 0.0f;
                for (long long p = 0; p < k; p++) acc += a_at(i, p) * b_at(p, j);
                float v = al * acc;
                const long long ci = e * lc.stride + i + j * lc.ld, di = e * ld.stride + i + j * ld.ld;
                if (be != 0.0f) v += be * fake::lt_load(C, lc.type, ci);  // beta 0 ignores C (may be NaN)
                if (ds.epilogue == fake::EPI_BIAS) v += static_cast<const float*>(ds.bias)[i];
                if (bf16_out)
                    static_cast<bf16_t*>(D)[di] = f32_to_bf16(v);
                else
                    static_cast<float*>(D)[di] = v;
            }
        if (ds.epilogue == fake::EPI_BGRADB)  // one sum per column of D, over k, from B
            for (long long j = 0; j < (long long)ld.cols; j++) {
                float sum = 0.0f;
                for (long long p = 0; p < k; p++) sum += b_at(p, j);
                const_cast<float*>(static_cast<const float*>(ds.bias))[j] = sum;
            }
    }
    return fake::LT_OK;
}
}  // extern "C"
