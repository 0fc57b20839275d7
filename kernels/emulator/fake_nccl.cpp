// A stand-in for libnccl beside the emulated driver (fake_cuda.cpp): the collectives the
// training step uses, between processes of one machine, through files. Device memory is host
// memory in the emulation, so the buffers are read and written directly.
//
// The unique id names a fresh folder. Call number s of rank r writes its bytes to `s.r` there
// (written to a temporary name, then renamed: readers never see half a file); every rank waits
// for the files of all ranks of call s, reads them, and combines them in rank order, so every
// rank gets the same bits. A rank removes its own file of call s - 2 when it starts call s (by
// then every rank has read it). A rank missing for FAKE_NCCL_TIMEOUT_S seconds (default 600)
// is an error.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>
#include <unistd.h>

namespace {

enum Result { ok = 0, unhandled_cuda = 1, system_error = 2, internal_error = 3, invalid_argument = 4,
              invalid_usage = 5 };

struct Comm {
    std::string dir;
    int rank = 0;
    int ranks = 1;
    uint64_t calls = 0;
};

size_t type_size(int datatype) {
    switch (datatype) {
        case 0: case 1: return 1;           // int8, uint8
        case 2: case 3: case 7: return 4;   // int32, uint32, float32
        case 4: case 5: case 8: return 8;   // int64, uint64, float64
        case 6: case 9: return 2;           // float16, bfloat16
        default: return 0;
    }
}

std::string call_file(const Comm* c, uint64_t call, int rank) {
    return c->dir + "/" + std::to_string(call) + "." + std::to_string(rank);
}

// Every rank's bytes of this call, in rank order; false on a timeout or an I/O error.
bool exchange(Comm* c, const void* data, size_t bytes, std::vector<std::string>& out) {
    uint64_t call = c->calls++;
    if (call >= 2) std::remove(call_file(c, call - 2, c->rank).c_str());
    std::string path = call_file(c, call, c->rank);
    std::string tmp = path + ".tmp";
    {
        std::ofstream f(tmp, std::ios::binary);
        f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
        if (!f) return false;
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) return false;
    const char* limit = std::getenv("FAKE_NCCL_TIMEOUT_S");
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(limit ? std::atoi(limit) : 600);
    out.assign(c->ranks, std::string());
    for (int r = 0; r < c->ranks; ++r) {
        std::string theirs = call_file(c, call, r);
        while (access(theirs.c_str(), F_OK) != 0) {
            if (std::chrono::steady_clock::now() > deadline) {
                std::fprintf(stderr, "fake nccl: rank %d did not reach call %llu within the timeout\n", r,
                             static_cast<unsigned long long>(call));
                return false;
            }
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
        std::ifstream f(theirs, std::ios::binary);
        out[r].assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    return true;
}

}  // namespace

extern "C" {

typedef struct { char internal[128]; } ncclUniqueId;

int ncclGetVersion(int* version) { *version = 23000; return ok; }

const char* ncclGetErrorString(int result) {
    switch (result) {
        case ok: return "no error";
        case system_error: return "fake nccl: a file operation failed or a rank timed out";
        case invalid_argument: return "fake nccl: invalid argument";
        case invalid_usage: return "fake nccl: invalid usage";
        default: return "fake nccl: error";
    }
}

const char* ncclGetLastError(void*) { return ""; }

int ncclGetUniqueId(ncclUniqueId* id) {
    const char* base = std::getenv("TMPDIR");
    std::string templ = std::string(base && *base ? base : "/tmp") + "/fake-nccl-XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data()) || buf.size() > sizeof(id->internal)) return system_error;
    std::memset(id->internal, 0, sizeof(id->internal));
    std::memcpy(id->internal, buf.data(), buf.size());
    return ok;
}

int ncclCommInitRank(void** comm, int nranks, ncclUniqueId id, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks) return invalid_argument;
    auto* c = new Comm;
    c->dir = std::string(id.internal, strnlen(id.internal, sizeof(id.internal)));
    c->rank = rank;
    c->ranks = nranks;
    if (access(c->dir.c_str(), F_OK) != 0) { delete c; return invalid_argument; }
    *comm = c;
    return ok;
}

int ncclCommDestroy(void* comm) { delete static_cast<Comm*>(comm); return ok; }
int ncclCommAbort(void* comm) { return ncclCommDestroy(comm); }
int ncclCommCount(const void* comm, int* count) { *count = static_cast<const Comm*>(comm)->ranks; return ok; }
int ncclCommUserRank(const void* comm, int* rank) { *rank = static_cast<const Comm*>(comm)->rank; return ok; }
int ncclCommCuDevice(const void*, int* device) { *device = 0; return ok; }
int ncclGroupStart() { return ok; }
int ncclGroupEnd() { return ok; }

int ncclAllGather(const void* send, void* recv, size_t count, int datatype, void* comm, void*) {
    auto* c = static_cast<Comm*>(comm);
    size_t bytes = count * type_size(datatype);
    if (bytes == 0 && count != 0) return invalid_argument;
    std::vector<std::string> all;
    if (!exchange(c, send, bytes, all)) return system_error;
    for (int r = 0; r < c->ranks; ++r) {
        if (all[r].size() != bytes) return invalid_usage;
        std::memcpy(static_cast<char*>(recv) + r * bytes, all[r].data(), bytes);
    }
    return ok;
}

int ncclAllReduce(const void* send, void* recv, size_t count, int datatype, int op, void* comm, void*) {
    auto* c = static_cast<Comm*>(comm);
    if (datatype != 7 || op != 0) return invalid_argument;  // float32 sum only: what the step uses
    std::vector<std::string> all;
    if (!exchange(c, send, count * sizeof(float), all)) return system_error;
    std::vector<float> sum(count, 0.0f);
    for (int r = 0; r < c->ranks; ++r) {
        if (all[r].size() != count * sizeof(float)) return invalid_usage;
        const float* theirs = reinterpret_cast<const float*>(all[r].data());
        for (size_t i = 0; i < count; ++i) sum[i] += theirs[i];
    }
    std::memcpy(recv, sum.data(), count * sizeof(float));
    return ok;
}

int ncclBroadcast(const void* send, void* recv, size_t count, int datatype, int root, void* comm, void*) {
    auto* c = static_cast<Comm*>(comm);
    size_t bytes = count * type_size(datatype);
    if (root < 0 || root >= c->ranks) return invalid_argument;
    std::vector<std::string> all;
    // Every rank takes part in the exchange; only the root's bytes matter.
    if (!exchange(c, c->rank == root ? send : recv, c->rank == root ? bytes : 0, all)) return system_error;
    if (all[root].size() != bytes) return invalid_usage;
    std::memcpy(recv, all[root].data(), bytes);
    return ok;
}

}  // extern "C"
