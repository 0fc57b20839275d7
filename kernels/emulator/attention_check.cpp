// Runs kernels/attention.cu on the CPU through the SIMT emulator and compares forward and
// backward with a double-precision reference. A check of the kernels' index math (fragment
// layouts, tiling, masking of partial tiles), not of speed or of hardware rounding.
//   g++ -O2 -std=c++20 -pthread kernels/emulator/attention_check.cpp -o /tmp/attention_check
//   /tmp/attention_check        (exit status 1 on any mismatch)
#include "simt.hpp"
#include "../common.cuh"
#include "ptx_host.hpp"
#include "../attention.cu"

#include <cstdio>
#include <random>

struct Shape {
    int B, T, H, HD;
};

using Forward = void (*)(bf16_t*, float*, const bf16_t*, int, int, int, float);
using Backward = void (*)(bf16_t*, const bf16_t*, const bf16_t*, const float*, const float*, int,
                          int, int, float);

#define KERNELS(HD)                                                                            \
    case HD:                                                                                   \
        return {attention_forward_hd##HD, attention_backward_dkdv_hd##HD,                      \
                attention_backward_dq_hd##HD};
struct Kernels {
    Forward forward;
    Backward dkdv, dq;
};
static Kernels kernels_for(int hd) {
    switch (hd) {
        KERNELS(16) KERNELS(32) KERNELS(48) KERNELS(64) KERNELS(80) KERNELS(96) KERNELS(112)
        KERNELS(128)
    }
    std::abort();
}

static double rel_err(const std::vector<float>& got, const std::vector<double>& ref) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        diff += (got[i] - ref[i]) * (got[i] - ref[i]);
        norm += ref[i] * ref[i];
    }
    return std::sqrt(diff / std::max(norm, 1e-300));
}

static std::vector<float> to_float(const std::vector<bf16_t>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = bf16_to_f32(v[i]);
    return out;
}

static bool check(Shape s, bool backward, unsigned seed) {
    const int B = s.B, T = s.T, H = s.H, HD = s.HD;
    const size_t n_qkv = (size_t)B * T * 3 * H * HD, n_out = (size_t)B * T * H * HD;
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::vector<bf16_t> qkv(n_qkv), dout(n_out), out(n_out), dqkv(n_qkv, 0);
    for (auto& v : qkv) v = f32_to_bf16(normal(rng));
    for (auto& v : dout) v = f32_to_bf16(normal(rng));
    std::vector<float> lse((size_t)B * H * T), delta((size_t)B * H * T);
    const float scale = 1.0f / std::sqrt((float)HD);
    const Kernels k = kernels_for(HD);

    simt::launch({(unsigned)((T + 63) / 64), (unsigned)H, (unsigned)B}, {128}, [&] {
        k.forward(out.data(), lse.data(), qkv.data(), B, T, H, scale);
    });
    if (backward) {
        const unsigned rows = (unsigned)(B * T * H);
        simt::launch({(rows + 7) / 8, 1, 1}, {256}, [&] {
            attention_backward_preprocess(delta.data(), out.data(), dout.data(), B, T, H, HD);
        });
        const int tile = HD <= 64 ? 64 : 32;
        const Dim3 grid{(unsigned)((T + tile - 1) / tile), (unsigned)H, (unsigned)B};
        const Dim3 block{(unsigned)(tile / 16 * 32)};
        simt::launch(grid, block, [&] {
            k.dkdv(dqkv.data(), qkv.data(), dout.data(), lse.data(), delta.data(), B, T, H, scale);
        });
        simt::launch(grid, block, [&] {
            k.dq(dqkv.data(), qkv.data(), dout.data(), lse.data(), delta.data(), B, T, H, scale);
        });
    }

    // Double reference.
    auto at = [&](int b, int t, int which, int h, int d) {
        return (double)bf16_to_f32(qkv[(((size_t)b * T + t) * 3 + which) * H * HD + h * HD + d]);
    };
    auto dout_at = [&](int b, int t, int h, int d) {
        return (double)bf16_to_f32(dout[((size_t)b * T + t) * H * HD + h * HD + d]);
    };
    std::vector<double> ref_out(n_out), ref_lse((size_t)B * H * T), ref_dqkv(n_qkv);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            std::vector<double> p((size_t)T * T), ds((size_t)T * T);
            for (int i = 0; i < T; i++) {
                double mx = -1e300;
                for (int j = 0; j < T; j++) {
                    double acc = 0;
                    for (int d = 0; d < HD; d++) acc += at(b, i, 0, h, d) * at(b, j, 1, h, d);
                    p[(size_t)i * T + j] = acc * scale;
                    mx = std::max(mx, acc * scale);
                }
                double sum = 0;
                for (int j = 0; j < T; j++) sum += std::exp(p[(size_t)i * T + j] - mx);
                ref_lse[((size_t)b * H + h) * T + i] = mx + std::log(sum);
                for (int j = 0; j < T; j++) p[(size_t)i * T + j] = std::exp(p[(size_t)i * T + j] - mx) / sum;
                for (int d = 0; d < HD; d++) {
                    double acc = 0;
                    for (int j = 0; j < T; j++) acc += p[(size_t)i * T + j] * at(b, j, 2, h, d);
                    ref_out[((size_t)b * T + i) * H * HD + h * HD + d] = acc;
                }
                std::vector<double> dp(T);
                double delta_i = 0;
                for (int j = 0; j < T; j++) {
                    double acc = 0;
                    for (int d = 0; d < HD; d++) acc += dout_at(b, i, h, d) * at(b, j, 2, h, d);
                    dp[j] = acc;
                    delta_i += p[(size_t)i * T + j] * acc;
                }
                for (int j = 0; j < T; j++) ds[(size_t)i * T + j] = p[(size_t)i * T + j] * (dp[j] - delta_i);
            }
            for (int i = 0; i < T; i++)
                for (int d = 0; d < HD; d++) {
                    double dq = 0, dk = 0, dv = 0;
                    for (int j = 0; j < T; j++) {
                        dq += ds[(size_t)i * T + j] * at(b, j, 1, h, d);
                        dk += ds[(size_t)j * T + i] * at(b, j, 0, h, d);
                        dv += p[(size_t)j * T + i] * dout_at(b, j, h, d);
                    }
                    const size_t base = ((size_t)b * T + i) * 3 * H * HD + h * HD + d;
                    ref_dqkv[base] = dq * scale;
                    ref_dqkv[base + (size_t)H * HD] = dk * scale;
                    ref_dqkv[base + 2 * (size_t)H * HD] = dv;
                }
        }

    const double e_out = rel_err(to_float(out), ref_out);
    const double e_lse = rel_err(lse, ref_lse);
    bool ok = e_out < 1e-2 && e_lse < 1e-5;
    std::printf("B=%d T=%4d H=%d HD=%3d  out %.2e  lse %.2e", B, T, H, HD, e_out, e_lse);
    if (backward) {
        const double e_dqkv = rel_err(to_float(dqkv), ref_dqkv);
        std::printf("  dqkv %.2e", e_dqkv);
        ok = ok && e_dqkv < 2e-2;
    }
    std::printf("  %s\n", ok ? "ok" : "MISMATCH");
    return ok;
}

int main() {
    bool ok = true;
    ok &= check({1, 17, 2, 64}, true, 1);
    ok &= check({1, 65, 1, 64}, true, 2);
    ok &= check({2, 50, 1, 64}, true, 3);
    ok &= check({1, 130, 1, 128}, true, 4);
    ok &= check({1, 33, 1, 16}, true, 5);
    ok &= check({1, 70, 1, 48}, true, 6);
    ok &= check({1, 129, 1, 80}, false, 7);
    return ok ? 0 : 1;
}
