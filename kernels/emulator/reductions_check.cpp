// Runs the reduction-heavy kernels (LayerNorm, the DINO cross-entropy and teacher softmax,
// KoLeo, Sinkhorn-Knopp, the deterministic sums) and the segment / index kernels (AdamW groups,
// patch gather) on the CPU through the SIMT emulator
// and compares them with double-precision references: a check of their warp/block reduction
// and indexing logic. Each kernel file gets its own namespace (they share helper names).
//   g++ -O2 -std=c++20 -pthread kernels/emulator/reductions_check.cpp -o /tmp/reductions_check
#include "simt.hpp"
#include "../common.cuh"
#include "ptx_host.hpp"

namespace ln {
#include "../layernorm.cu"
}
namespace ew {
#include "../elementwise.cu"
}
namespace loss {
#include "../loss.cu"
}
namespace koleo {
#include "../koleo.cu"
}
namespace sk {
#include "../sinkhorn.cu"
}
namespace opt {
#include "../optimizer.cu"
}
namespace patch {
#include "../patch.cu"
}

#include <cstdio>
#include <random>

static bool failed = false;

static void expect(const char* name, const std::vector<float>& got, const std::vector<double>& ref, double bound) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        diff += (got[i] - ref[i]) * (got[i] - ref[i]);
        norm += ref[i] * ref[i];
    }
    const double err = std::sqrt(diff / std::max(norm, 1e-300));
    const bool ok = err <= bound && std::isfinite(err);
    failed |= !ok;
    std::printf("%-34s rel err %.2e (bound %.0e)  %s\n", name, err, bound, ok ? "ok" : "MISMATCH");
}

static std::vector<float> randn(unsigned seed, size_t n, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng) * scale;
    return v;
}

static void check_layernorm() {
    const int N = 37, C = 100;
    auto x = randn(1, N * C), w = randn(2, C), b = randn(3, C), dout = randn(4, N * C);
    std::vector<float> out(N * C), mean(N), rstd(N), dinp(N * C, 0.5f);
    simt::launch({(N + 7) / 8}, {256}, [&] {
        ln::layernorm_forward_f32(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-6f);
    });
    simt::launch({(N + 7) / 8}, {256}, [&] {
        ln::layernorm_backward_input(dinp.data(), dout.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C,
                                     ln::GRAD_ACCUMULATE);
    });
    std::vector<double> ref_out(N * C), ref_dinp(N * C);
    for (int r = 0; r < N; r++) {
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += x[r * C + c];
        m /= C;
        for (int c = 0; c < C; c++) v += (x[r * C + c] - m) * (x[r * C + c] - m);
        const double s = 1.0 / std::sqrt(v / C + 1e-6);
        double m1 = 0, m2 = 0;
        for (int c = 0; c < C; c++) {
            const double xh = (x[r * C + c] - m) * s, dxh = (double)dout[r * C + c] * w[c];
            ref_out[r * C + c] = xh * w[c] + b[c];
            m1 += dxh / C;
            m2 += dxh * xh / C;
        }
        for (int c = 0; c < C; c++) {
            const double xh = (x[r * C + c] - m) * s, dxh = (double)dout[r * C + c] * w[c];
            ref_dinp[r * C + c] = 0.5 + s * (dxh - m1 - xh * m2);
        }
    }
    expect("layernorm_forward_f32", out, ref_out, 1e-6);
    expect("layernorm_backward_input (+=)", dinp, ref_dinp, 1e-5);
}

static void check_layernorm_fused_and_params() {
    const int N = 29, C = 70, G = 3, per_chunk = (N + G - 1) / G;
    auto res = randn(20, N * C), branch = randn(21, N * C), gamma = randn(22, C, 0.3f);
    auto w = randn(23, C), b = randn(24, C), dout = randn(25, N * C);
    std::vector<float> out(N * C), mean(N), rstd(N), partial(2 * G * C), dw(C, 0.0f), db(C, 0.0f);
    const std::vector<float> res0 = res;
    simt::launch({(N + 7) / 8}, {256}, [&] {
        ln::residual_layernorm_forward_f32(res.data(), out.data(), mean.data(), rstd.data(), res.data(), branch.data(),
                                           gamma.data(), w.data(), b.data(), N, C, 1e-6f);
    });
    simt::launch({(C + 255) / 256, G}, {256}, [&] {
        ln::layernorm_backward_params_partial(partial.data(), dout.data(), res.data(), mean.data(), rstd.data(), N, C,
                                              per_chunk);
    });
    simt::launch({(C + 255) / 256}, {256}, [&] {
        ew::column_partial_reduce(dw.data(), partial.data(), G, C, 1.0f, ew::GRAD_ACCUMULATE);
    });
    simt::launch({(C + 255) / 256}, {256}, [&] {
        ew::column_partial_reduce(db.data(), partial.data() + G * C, G, C, 1.0f, ew::GRAD_ACCUMULATE);
    });
    std::vector<double> ref_x(N * C), ref_out(N * C), ref_dw(C, 0.0), ref_db(C, 0.0);
    for (int r = 0; r < N; r++) {
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += ref_x[r * C + c] = res0[r * C + c] + (double)gamma[c] * branch[r * C + c];
        m /= C;
        for (int c = 0; c < C; c++) v += (ref_x[r * C + c] - m) * (ref_x[r * C + c] - m);
        const double s = 1.0 / std::sqrt(v / C + 1e-6);
        for (int c = 0; c < C; c++) {
            const double xh = (ref_x[r * C + c] - m) * s;
            ref_out[r * C + c] = xh * w[c] + b[c];
            ref_dw[c] += dout[r * C + c] * xh;
            ref_db[c] += dout[r * C + c];
        }
    }
    expect("residual_layernorm residual", res, ref_x, 1e-7);
    expect("residual_layernorm out", out, ref_out, 1e-6);
    expect("layernorm dweight", dw, ref_dw, 1e-5);
    expect("layernorm dbias", db, ref_db, 1e-5);
}

static void check_sums() {
    const int N = 45, C = 300, G = 4, per_chunk = (N + G - 1) / G;
    auto x = randn(5, N * C);
    std::vector<float> partial(G * C), out(C, 1.0f), total(1), partial_sum(7);
    simt::launch({(C + 255) / 256, G}, {256}, [&] {
        ew::column_sum_partial(partial.data(), x.data(), nullptr, N, C, per_chunk);
    });
    simt::launch({(C + 255) / 256}, {256}, [&] {
        ew::column_partial_reduce(out.data(), partial.data(), G, C, 2.0f, ew::GRAD_ACCUMULATE);
    });
    simt::launch({7}, {256}, [&] { ew::sum_partial(partial_sum.data(), x.data(), (long long)N * C, ew::REDUCE_SUM_SQUARES); });
    simt::launch({1}, {256}, [&] { ew::sum_finalize(total.data(), partial_sum.data(), 7, 0.5f); });
    std::vector<double> ref(C, 1.0);
    double sq = 0;
    for (int i = 0; i < N * C; i++) {
        ref[i % C] += 2.0 * x[i];
        sq += 0.5 * (double)x[i] * x[i];
    }
    expect("column_sum (+= 2x)", out, ref, 1e-6);
    expect("sum of squares", total, {sq}, 1e-6);
}

static void check_losses() {
    const int Rt = 4, Rs = 6, K = 700, P = 2;
    auto t = randn(6, Rt * K, 2.0f), center = randn(7, K, 0.3f), s = randn(8, Rs * K, 2.0f);
    std::vector<float> probs(Rt * K), row_loss(Rs), ds(Rs * K);
    std::vector<int> pt = {2, -1, 3, -1, 0, 1, 1, 0, 2, 3, 0, -1};
    std::vector<float> pw = {0.2f, 0.0f, 0.3f, 0.0f, 0.1f, 0.1f, 0.25f, 0.05f, 0.2f, 0.2f, 1.0f, 0.0f};
    const float tt = 0.04f, ts = 0.1f;
    simt::launch({Rt}, {256}, [&] { loss::teacher_softmax(probs.data(), t.data(), center.data(), 1.0f / tt, Rt, K); });
    simt::launch({Rs}, {256}, [&] {
        loss::softmax_cross_entropy(row_loss.data(), ds.data(), s.data(), probs.data(), pt.data(), pw.data(), P, 1.0f / ts,
                                    0.5f, Rs, Rt, K);
    });
    std::vector<double> ref_p(Rt * K), ref_loss(Rs, 0.0), ref_ds(Rs * K, 0.0);
    for (int r = 0; r < Rt; r++) {
        double mx = -1e300, sum = 0;
        for (int k = 0; k < K; k++) mx = std::max(mx, (t[r * K + k] - (double)center[k]) / tt);
        for (int k = 0; k < K; k++) sum += std::exp((t[r * K + k] - (double)center[k]) / tt - mx);
        for (int k = 0; k < K; k++) ref_p[r * K + k] = std::exp((t[r * K + k] - (double)center[k]) / tt - mx) / sum;
    }
    for (int r = 0; r < Rs; r++) {
        double mx = -1e300, sum = 0;
        for (int k = 0; k < K; k++) mx = std::max(mx, s[r * K + k] / (double)ts);
        for (int k = 0; k < K; k++) sum += std::exp(s[r * K + k] / (double)ts - mx);
        const double lse = mx + std::log(sum);
        for (int p = 0; p < P; p++) {
            const int tr = pt[r * P + p];
            if (tr < 0) continue;
            for (int k = 0; k < K; k++) {
                const double q = pw[r * P + p] * ref_p[tr * K + k], z = s[r * K + k] / (double)ts;
                ref_loss[r] += q * (lse - z);
                ref_ds[r * K + k] += 0.5 / ts * (pw[r * P + p] * std::exp(z - lse) - q);
            }
        }
    }
    expect("teacher_softmax (centered)", probs, ref_p, 1e-5);
    expect("softmax_cross_entropy row loss", row_loss, ref_loss, 1e-5);
    expect("softmax_cross_entropy dstudent", ds, ref_ds, 1e-5);
}

static void check_koleo() {
    const int b = 11, d = 40;
    auto x = randn(9, b * d);
    std::vector<float> xn(b * d), norm(b), dist(b), row_loss(b), dx(b * d);
    std::vector<int> nn(b);
    simt::launch({(b + 7) / 8}, {256}, [&] { koleo::koleo_normalize(xn.data(), norm.data(), x.data(), b, d); });
    simt::launch({b}, {256}, [&] { koleo::koleo_nearest(nn.data(), dist.data(), row_loss.data(), xn.data(), b, d); });
    simt::launch({b}, {256}, [&] { koleo::koleo_backward(dx.data(), xn.data(), norm.data(), nn.data(), dist.data(), 1.0f, b, d); });
    std::vector<double> rxn(b * d), rnorm(b), rloss(b), gxn(b * d, 0.0), rdx(b * d);
    for (int i = 0; i < b; i++) {
        double n = 0;
        for (int c = 0; c < d; c++) n += (double)x[i * d + c] * x[i * d + c];
        rnorm[i] = std::sqrt(n);
        for (int c = 0; c < d; c++) rxn[i * d + c] = x[i * d + c] / rnorm[i];
    }
    bool same_nn = true;
    for (int i = 0; i < b; i++) {
        int best = -1;
        double best_dot = -1e300;
        for (int j = 0; j < b; j++) {
            if (j == i) continue;
            double dot = 0;
            for (int c = 0; c < d; c++) dot += rxn[i * d + c] * rxn[j * d + c];
            if (dot > best_dot) best_dot = dot, best = j;
        }
        same_nn &= best == nn[i];
        double dd = 0;
        for (int c = 0; c < d; c++) dd += std::pow(rxn[i * d + c] - rxn[best * d + c] + 1e-8, 2);
        dd = std::sqrt(dd);
        rloss[i] = -std::log(dd + 1e-8);
        const double w = -1.0 / (b * (dd + 1e-8) * dd);
        for (int c = 0; c < d; c++) {
            const double diff = rxn[i * d + c] - rxn[best * d + c] + 1e-8;
            gxn[i * d + c] += w * diff;
            gxn[best * d + c] -= w * diff;
        }
    }
    for (int i = 0; i < b; i++) {
        double dot = 0;
        for (int c = 0; c < d; c++) dot += rxn[i * d + c] * gxn[i * d + c];
        for (int c = 0; c < d; c++) rdx[i * d + c] = (gxn[i * d + c] - rxn[i * d + c] * dot) / rnorm[i];
    }
    std::printf("%-34s %s\n", "koleo nearest neighbours", same_nn ? "ok" : "MISMATCH");
    failed |= !same_nn;
    expect("koleo row loss", row_loss, rloss, 1e-5);
    expect("koleo dx", dx, rdx, 1e-4);
}

static void check_sinkhorn_row_update() {
    const int R = 5, K = 900;
    auto e = randn(10, R * K), a = randn(11, K);
    for (auto& v : e) v = std::fabs(v);
    for (auto& v : a) v = std::fabs(v);
    std::vector<float> b(R);
    simt::launch({R}, {256}, [&] { sk::sinkhorn_row_update(b.data(), e.data(), a.data(), R, K, 3.0f); });
    std::vector<double> ref(R);
    for (int i = 0; i < R; i++) {
        double acc = 0;
        for (int j = 0; j < K; j++) acc += (double)e[i * K + j] * a[j];
        ref[i] = 1.0 / (acc * 3.0);
    }
    expect("sinkhorn_row_update", b, ref, 1e-6);
}

// The launcher's sequence (src/backend/cuda/launch/sinkhorn.rs) against the README's SK.
static void check_sinkhorn() {
    const int R = 9, K = 300, iters = 3, G = 3, per_chunk = (R + G - 1) / G;
    const float tt = 0.05f;
    std::vector<float> t(R * K);
    std::mt19937 rng(12);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    for (auto& v : t) v = uni(rng);
    std::vector<float> q(R * K), a(K), b(R), partial(8), scalar(2), col(G * K);
    const long long n = (long long)R * K;
    simt::launch({8}, {256}, [&] { sk::sinkhorn_max_partial(partial.data(), t.data(), n); });
    simt::launch({1}, {256}, [&] { sk::sinkhorn_max_finalize(&scalar[0], partial.data(), 8); });
    simt::launch({8}, {256}, [&] { sk::sinkhorn_exp(q.data(), t.data(), &scalar[0], 1.0f / tt, n); });
    simt::launch({8}, {256}, [&] { ew::sum_partial(partial.data(), q.data(), n, ew::REDUCE_SUM); });
    simt::launch({1}, {256}, [&] { ew::sum_finalize(&scalar[1], partial.data(), 8, 1.0f); });
    simt::launch({1}, {256}, [&] { sk::sinkhorn_reciprocal(b.data(), &scalar[1], R); });
    for (int it = 0; it < iters; it++) {
        simt::launch({(K + 255) / 256, G}, {256}, [&] { sk::sinkhorn_col_partial(col.data(), q.data(), b.data(), R, K, per_chunk); });
        simt::launch({(K + 255) / 256}, {256}, [&] { sk::sinkhorn_col_update(a.data(), col.data(), G, K); });
        simt::launch({R}, {256}, [&] { sk::sinkhorn_row_update(b.data(), q.data(), a.data(), R, K, (float)R); });
    }
    simt::launch({8}, {256}, [&] { sk::sinkhorn_finalize(q.data(), q.data(), a.data(), b.data(), R, K, (float)R); });
    double mx = -1e300;
    for (float v : t) mx = std::max(mx, (double)v);
    std::vector<double> ref(R * K);
    double total = 0;
    for (int i = 0; i < R * K; i++) total += ref[i] = std::exp((t[i] - mx) / tt);
    for (auto& v : ref) v /= total;
    for (int it = 0; it < iters; it++) {
        for (int j = 0; j < K; j++) {
            double s = 0;
            for (int i = 0; i < R; i++) s += ref[i * K + j];
            for (int i = 0; i < R; i++) ref[i * K + j] /= s * K;
        }
        for (int i = 0; i < R; i++) {
            double s = 0;
            for (int j = 0; j < K; j++) s += ref[i * K + j];
            for (int j = 0; j < K; j++) ref[i * K + j] /= s * R;
        }
    }
    for (auto& v : ref) v *= R;
    expect("sinkhorn_knopp (launcher sequence)", q, ref, 1e-5);
}

static void check_adamw_segments() {
    const long long n = 1000;
    std::vector<i64> start = {0, 10, 11, 500, 999};
    std::vector<int> group = {1, 0, 2, 1, 0};
    std::vector<float> lr = {1e-2f, 1e-3f, 0.0f}, wd = {0.1f, 0.0f, 0.05f};
    auto p = randn(13, n), g = randn(14, n);
    std::vector<float> m(n, 0.0f), v(n, 0.0f);
    const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, bc1 = 1 - b1, bc2s = std::sqrt(1 - b2);
    std::vector<double> ref(n);
    for (long long i = 0; i < n; i++) {
        int s = 0;
        while (s + 1 < (int)start.size() && start[s + 1] <= i) s++;
        const double l = lr[group[s]], w = wd[group[s]];
        const double mi = (1 - 0.9) * (double)g[i], vi = (1 - 0.999) * (double)g[i] * g[i];
        ref[i] = p[i] * (1 - l * w) - l / bc1 * mi / (std::sqrt(vi) / bc2s + eps);
    }
    simt::launch({4}, {256}, [&] {
        opt::adamw_update(p.data(), m.data(), v.data(), g.data(), start.data(), group.data(), lr.data(), wd.data(),
                          (int)start.size(), n, b1, (float)(1 - 0.9), b2, (float)(1 - 0.999), eps, bc1, bc2s);
    });
    expect("adamw_update (5 segments, 3 groups)", p, ref, 1e-6);
}

static void check_patch_gather() {
    const int crops = 3, T = 7, Np = 4, off = 3, C = 5;
    std::vector<i64> idx = {0, 3, 5, 11};
    auto tokens = randn(15, crops * T * C);
    std::vector<float> out(idx.size() * C);
    simt::launch({1}, {256}, [&] {
        patch::gather_rows_f32(out.data(), tokens.data(), idx.data(), (int)idx.size(), C, Np, T, off, crops * T);
    });
    std::vector<double> ref;
    for (i64 f : idx)
        for (int c = 0; c < C; c++) ref.push_back(tokens[((f / Np) * T + off + f % Np) * C + c]);
    expect("gather_rows_f32", out, ref, 0.0);
}

static void check_assemble_tokens() {
    const int B = 2, Np = 5, R = 2, C = 6, T = 1 + R + Np;
    auto pe = randn(30, B * Np * C), cls = randn(31, C), reg = randn(32, R * C), pos = randn(33, (1 + Np) * C);
    std::vector<float> x(B * T * C, -7.0f);
    simt::launch({2}, {64}, [&] {  // fewer threads than elements: exercises the grid stride
        patch::assemble_tokens(x.data(), pe.data(), cls.data(), reg.data(), pos.data(), B, Np, R, C);
    });
    std::vector<double> ref;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                if (t == 0) ref.push_back((double)cls[c] + pos[c]);
                else if (t <= R) ref.push_back(reg[(t - 1) * C + c]);
                else ref.push_back((double)pe[(b * Np + t - 1 - R) * C + c] + pos[(t - R) * C + c]);
            }
    expect("assemble_tokens (registers)", x, ref, 1e-7);
    // Without registers the register pointer is null and never read.
    std::vector<float> x0(B * (1 + Np) * C);
    simt::launch({1}, {256}, [&] {
        patch::assemble_tokens(x0.data(), pe.data(), cls.data(), nullptr, pos.data(), B, Np, 0, C);
    });
    std::vector<double> ref0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t <= Np; t++)
            for (int c = 0; c < C; c++)
                ref0.push_back(t == 0 ? (double)cls[c] + pos[c] : (double)pe[(b * Np + t - 1) * C + c] + pos[t * C + c]);
    expect("assemble_tokens (no registers)", x0, ref0, 1e-7);
}

static void check_sample_subsets() {
    const int B = 5, S = 3, C = 4, T = 3;
    const long long L = T * C;
    std::vector<i64> kept = {0, 2, 4};
    auto x = randn(40, B * L), y = randn(41, S * L), gamma = randn(42, C);
    std::vector<float> gathered(S * L);
    simt::launch({1}, {32}, [&] { ew::gather_samples_scaled(gathered.data(), x.data(), kept.data(), S, L, 1.5f); });
    std::vector<double> ref_g;
    for (int j = 0; j < S; j++)
        for (long long e = 0; e < L; e++) ref_g.push_back(1.5 * x[kept[j] * L + e]);
    expect("gather_samples_scaled", gathered, ref_g, 1e-7);

    auto xs = x;
    simt::launch({1}, {64}, [&] {
        ew::residual_add_samples(xs.data(), y.data(), gamma.data(), kept.data(), S, L, C, 2.5f);
    });
    std::vector<double> ref_s(x.begin(), x.end());
    for (int j = 0; j < S; j++)
        for (long long e = 0; e < L; e++) ref_s[kept[j] * L + e] += 2.5 * gamma[e % C] * y[j * L + e];
    expect("residual_add_samples (subset, gamma)", xs, ref_s, 1e-6);

    // Full batch, no gamma: a plain residual add.
    auto y_full = randn(43, B * L);
    auto xf = x;
    simt::launch({1}, {256}, [&] {
        ew::residual_add_samples(xf.data(), y_full.data(), nullptr, nullptr, B, L, C, 1.0f);
    });
    std::vector<double> ref_f;
    for (long long i = 0; i < B * L; i++) ref_f.push_back((double)x[i] + y_full[i]);
    expect("residual_add_samples (all, plain)", xf, ref_f, 1e-7);
}

// The heads' row L2 normalisation (forward with its bf16 copy, backward), one row below eps, and
// the teacher-entropy rows.
static void check_l2_normalize_and_entropy() {
    const int R = 13, C = 70;
    const float eps = 1e-12f;
    auto y = randn(40, R * C), dz = randn(41, R * C);
    for (int c = 0; c < C; c++) y[5 * C + c] = 0.0f;  // a zero row: clamped by eps
    std::vector<float> z(R * C), norm(R), dy(R * C);
    std::vector<bf16_t> z_bf16(R * C), dy_bf16(R * C);
    simt::launch({(R + 7) / 8}, {256}, [&] {
        koleo::l2_normalize_forward(z.data(), z_bf16.data(), norm.data(), y.data(), eps, R, C);
    });
    simt::launch({(R + 7) / 8}, {256}, [&] {
        koleo::l2_normalize_backward(dy.data(), dy_bf16.data(), dz.data(), z.data(), norm.data(), eps, R, C);
    });
    std::vector<double> rz(R * C), rnorm(R), rdy(R * C);
    bool bf16_ok = true;
    for (int r = 0; r < R; r++) {
        double n = 0;
        for (int c = 0; c < C; c++) n += (double)y[r * C + c] * y[r * C + c];
        rnorm[r] = std::sqrt(n);
        const double d = std::max(rnorm[r], (double)eps);
        double dot = 0;
        for (int c = 0; c < C; c++) {
            rz[r * C + c] = y[r * C + c] / d;
            dot += rz[r * C + c] * dz[r * C + c];
        }
        if (!(rnorm[r] > eps)) dot = 0;
        for (int c = 0; c < C; c++) rdy[r * C + c] = (dz[r * C + c] - rz[r * C + c] * dot) / d;
        for (int c = 0; c < C; c++) {
            bf16_ok &= z_bf16[r * C + c] == f32_to_bf16(z[r * C + c]);
            bf16_ok &= dy_bf16[r * C + c] == f32_to_bf16(dy[r * C + c]);
        }
    }
    expect("l2_normalize z", z, rz, 1e-6);
    expect("l2_normalize norm", norm, rnorm, 1e-6);
    expect("l2_normalize_backward dy", dy, rdy, 1e-5);
    std::printf("%-34s %s\n", "l2_normalize bf16 copies", bf16_ok ? "ok" : "MISMATCH");
    failed |= !bf16_ok;

    const int Rt = 5, K = 600;
    auto t = randn(42, Rt * K, 2.0f);
    std::vector<float> probs(Rt * K), entropy(Rt);
    simt::launch({Rt}, {256}, [&] { loss::teacher_softmax(probs.data(), t.data(), nullptr, 1.0f / 0.5f, Rt, K); });
    probs[3] = 0.0f;  // p = 0 contributes nothing (0 log 0 = 0)
    simt::launch({Rt}, {256}, [&] { loss::row_entropy(entropy.data(), probs.data(), Rt, K); });
    std::vector<double> rent(Rt, 0.0);
    for (int r = 0; r < Rt; r++)
        for (int k = 0; k < K; k++) {
            const double p = probs[r * K + k];
            if (p > 0) rent[r] -= p * std::log(p);
        }
    expect("row_entropy", entropy, rent, 1e-5);
}

int main() {
    check_layernorm();
    check_layernorm_fused_and_params();
    check_sums();
    check_losses();
    check_koleo();
    check_sinkhorn_row_update();
    check_sinkhorn();
    check_adamw_segments();
    check_patch_gather();
    check_assemble_tokens();
    check_sample_subsets();
    check_l2_normalize_and_entropy();
    return failed ? 1 : 0;
}
