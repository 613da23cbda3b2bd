// The kernels of kernels/*.cu, compiled as host C++ against cuda_sim.h (a CPU emulation of the
// CUDA execution model) and compared with double-precision references. Run by
// tests/gpu_kernels_sim.rs, so the kernels' indexing, reductions and barriers are checked on
// machines without a GPU (CI included). Outputs start as NaN: an unwritten element fails.
// The bf16-storage kernels (`*_bf16`) are checked against their f32 instantiations on the
// widened inputs, bit for bit after rounding (test_bf16_all, at the end), and against f64.
#include "cuda_sim.h"
#include "elementwise.cu"
#include "batchnorm.cu"
#define CARP_BATCHNORM_CU_INCLUDED  // bn_fused.cu includes batchnorm.cu when compiled alone
#include "bn_fused.cu"
#include "pool.cu"
#include "weightnorm.cu"
#include "carp_loss.cu"
#include "lars.cu"
#include "ema.cu"
#include "augment.cu"
#include <random>
#include <numeric>
#include <cassert>
#include <cstring>
#include <fstream>

static std::mt19937_64 rng(42);
std::vector<float> randn(size_t n, float s = 1.0f) {
    std::normal_distribution<float> d(0, s);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}
int fails = 0;
void check(const char* name, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double scale = 1e-6, worst = 0;
    size_t at = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) { printf("FAIL %s: element %zu = %f\n", name, i, got[i]); fails++; return; }
        double d = std::fabs(got[i] - want[i]);
        if (d > worst) { worst = d; at = i; }
    }
    bool ok = worst / scale <= tol;
    printf("%s %s: rel %.2e (at %zu: %g vs %g)\n", ok ? "ok  " : "FAIL", name, worst / scale, at, got[at], want[at]);
    if (!ok) fails++;
}
std::vector<float> nanv(size_t n) { return std::vector<float>(n, NAN); }

void test_carp(int vs, int n, int k, int nb, unsigned threads) {
    const double eps = 1.1920929e-7;
    int np = k / nb;
    std::vector<int> perm(k);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    auto s = randn((size_t)vs * n * k, 3), t = randn((size_t)2 * n * k, 3);
    // GPU path
    std::vector<float> Ps = nanv((size_t)vs * np * n * nb), Pt = nanv((size_t)2 * np * n * nb), pbar(k, 0.0f), g = nanv(k),
                       sc = nanv(2), d = nanv((size_t)vs * n * k), part = nanv((size_t)n * np);
    launch({(unsigned)np, (unsigned)n, (unsigned)vs}, threads, carp_softmax_gather_f32, (const float*)s.data(), (const int*)perm.data(), Ps.data(), pbar.data(), n, k, nb, vs);
    launch({(unsigned)np, (unsigned)n, 2}, threads, carp_softmax_gather_f32, (const float*)t.data(), (const int*)perm.data(), Pt.data(), pbar.data(), n, k, nb, 2);
    launch({1, 1, 1}, 64, carp_entropy_f32, (const float*)pbar.data(), g.data(), sc.data(), k, nb, (float)((vs + 2) * n));
    launch({(unsigned)np, (unsigned)n, 1}, threads, carp_consistency_grad_f32, (const float*)Ps.data(), (const float*)Pt.data(), (const float*)g.data(), (const int*)perm.data(), d.data(), part.data(), n, k, nb, vs);
    launch({1, 1, 1}, 64, sum_f32, (const float*)part.data(), sc.data() + 1, (i64)(n * np));
    // reference
    auto clamp = [&](double v) { return std::min(std::max(v, eps), 1 - eps); };
    auto softmax = [&](const std::vector<float>& L, int v, int i, int j) {
        std::vector<double> z(nb);
        double m = -INFINITY, sum = 0;
        for (int q = 0; q < nb; ++q) { z[q] = L[((size_t)v * n + i) * k + perm[j * nb + q]]; m = std::max(m, z[q]); }
        for (auto& x : z) { x = std::exp(x - m); sum += x; }
        for (auto& x : z) x /= sum;
        return z;
    };
    // pbar over every student view (local crops included) and both teacher views.
    double R = (double)(vs + 2) * n;
    std::vector<double> pb(k, 0);
    for (int j = 0; j < np; ++j)
        for (int i = 0; i < n; ++i) {
            for (int v = 0; v < vs; ++v) {
                auto p = softmax(s, v, i, j);
                for (int x = 0; x < nb; ++x) pb[j * nb + x] += p[x] / R;
            }
            for (int v = 0; v < 2; ++v) {
                auto q = softmax(t, v, i, j);
                for (int x = 0; x < nb; ++x) pb[j * nb + x] += q[x] / R;
            }
        }
    double ent = 0;
    std::vector<double> gg(k);
    for (int x = 0; x < k; ++x) {
        ent += pb[x] * std::log(clamp(pb[x]));
        gg[x] = (std::log(clamp(pb[x])) + ((pb[x] >= eps && pb[x] <= 1 - eps) ? 1 : 0)) / (R * np);
    }
    ent = std::log((double)nb) + ent / np;
    int pairs = 2 + 2 * (vs - 2);
    double c = 1.0 / ((double)pairs * n * np), cons = 0;
    std::vector<double> dref((size_t)vs * n * k);
    for (int j = 0; j < np; ++j)
        for (int i = 0; i < n; ++i)
            for (int a = 0; a < vs; ++a) {
                auto p = softmax(s, a, i, j);
                std::vector<double> dz(nb, 0);
                for (int b = 0; b < 2; ++b) {
                    if (b == a) continue;
                    auto q = softmax(t, b, i, j);
                    double sv = 0;
                    for (int x = 0; x < nb; ++x) sv += p[x] * q[x];
                    cons -= std::log(clamp(sv)) * c;
                    if (sv >= eps && sv <= 1 - eps)
                        for (int x = 0; x < nb; ++x) dz[x] -= c * p[x] * (q[x] - sv) / sv;
                }
                {
                    double pg = 0;
                    for (int x = 0; x < nb; ++x) pg += p[x] * gg[j * nb + x];
                    for (int x = 0; x < nb; ++x) dz[x] += p[x] * (gg[j * nb + x] - pg);
                }
                for (int x = 0; x < nb; ++x) dref[((size_t)a * n + i) * k + perm[j * nb + x]] = dz[x];
            }
    char name[128];
    snprintf(name, sizeof name, "carp vs=%d n=%d k=%d nb=%d thr=%u", vs, n, k, nb, threads);
    printf("  H gpu %.7f ref %.7f | cons gpu %.7f ref %.7f\n", sc[0], ent, sc[1], cons);
    if (std::fabs(sc[0] - ent) > 1e-5 || std::fabs(sc[1] - cons) > 1e-5 * std::max(1.0, cons)) { printf("FAIL %s scalars\n", name); fails++; }
    check(name, d, dref, 1e-4);
}

// Batch norm as the launcher runs it: statistics and parameter gradients on a (C, S) grid of
// partial reductions plus a finalize kernel, elementwise kernels on `eb` blocks of `et` threads
// (a small grid makes the grid-stride loop wrap across planes and channels). `off` shifts every
// big array by that many floats from a 16-byte boundary (off % 4 != 0 forces the scalar path
// even when hw % 4 == 0). `shift` is added to x: a large one checks the two-pass variance.
void test_bn(int n, int c, int hw, unsigned threads, unsigned S, unsigned eb = 3, unsigned et = 64, int off = 0, float shift = 0.5f) {
    size_t tot = (size_t)n * c * hw;
    auto xs = randn(tot + off, 2), gm = randn(c), bt = randn(c), dys = randn(tot + off);
    for (auto& v : xs) v += shift;
    const float* x = xs.data() + off;
    const float* dy = dys.data() + off;
    std::vector<float> mean = nanv(c), is = nanv(c), vu = nanv(c), ys = nanv(tot + off), dg = nanv(c), db = nanv(c), dxs = nanv(tot + off);
    std::vector<float> ps = nanv((size_t)c * S), pq = nanv((size_t)c * S);
    float* y = ys.data() + off;
    float* dxp = dxs.data() + off;
    float eps = 1e-5f;
    launch({(unsigned)c, S}, threads, bn_sum_partial_f32, x, ps.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c, S}, threads, bn_sqdev_partial_f32, x, (const float*)ps.data(), pq.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 32, bn_stats_finalize_f32, (const float*)ps.data(), (const float*)pq.data(), mean.data(), is.data(), vu.data(), (i64)n, (i64)hw, (int)S, eps);
    launch({eb}, et, bn_forward_f32, x, (const float*)mean.data(), (const float*)is.data(), (const float*)gm.data(), (const float*)bt.data(), y, (i64)n, c, (i64)hw);
    ps = nanv((size_t)c * S); pq = nanv((size_t)c * S);
    launch({(unsigned)c, S}, threads, bn_backward_partial_f32, dy, x, (const float*)mean.data(), (const float*)is.data(), ps.data(), pq.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)ps.data(), (const float*)pq.data(), dg.data(), db.data(), (int)S);
    launch({eb}, et, bn_backward_dx_f32, dy, x, (const float*)mean.data(), (const float*)is.data(), (const float*)gm.data(), (const float*)dg.data(), (const float*)db.data(), dxp, (i64)n, c, (i64)hw);
    std::vector<double> rm(c), rv(c), rvu(c), ry(tot), rdg(c), rdb(c), rdx(tot);
    double M = (double)n * hw;
    for (int ci = 0; ci < c; ++ci) {
        double s = 0, s2 = 0;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) s += x[((size_t)a * c + ci) * hw + h];
        double mu = s / M;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) { double dd = x[((size_t)a * c + ci) * hw + h] - mu; s2 += dd * dd; }
        double var = s2 / M, isd = 1 / std::sqrt(var + eps);
        rm[ci] = mu; rv[ci] = isd; rvu[ci] = M > 1 ? var * M / (M - 1) : var;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            ry[i] = (x[i] - mu) * isd * gm[ci] + bt[ci];
            rdb[ci] += dy[i]; rdg[ci] += dy[i] * (x[i] - mu) * isd;
        }
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            double xh = (x[i] - mu) * isd;
            rdx[i] = gm[ci] * isd / M * (M * dy[i] - rdb[ci] - xh * rdg[ci]);
        }
    }
    std::vector<float> yv(y, y + tot), dxv(dxp, dxp + tot);
    char tag[96];
    snprintf(tag, sizeof tag, "(%d,%d,%d) S=%u thr=%u eb=%u off=%d shift=%g", n, c, hw, S, threads, eb, off, shift);
    auto nm = [&](const char* what) { static char b[160]; snprintf(b, sizeof b, "bn %s %s", what, tag); return b; };
    // The mean's tolerance is relative to max |mean|, which the shift dominates.
    check(nm("mean"), mean, rm, 1e-5); check(nm("invstd"), is, rv, 1e-5); check(nm("var_u"), vu, rvu, 1e-5);
    check(nm("y"), yv, ry, 1e-5); check(nm("dgamma"), dg, rdg, 1e-5); check(nm("dbeta"), db, rdb, 1e-5); check(nm("dx"), dxv, rdx, 1e-4);
    // Guard bands: the elements before the offset array start were never written.
    for (int i = 0; i < off; ++i)
        if (!std::isnan(ys[i]) || !std::isnan(dxs[i])) { printf("FAIL bn wrote before y/dx %s\n", tag); fails++; break; }
}

// Eval-mode dx on both paths (float4 when hw % 4 == 0 and aligned, scalar otherwise).
void test_bn_eval_dx(int N, int C, int HW, unsigned eb, unsigned et, int off) {
    size_t tot = (size_t)N * C * HW;
    auto dys = randn(tot + off), is = randn(C), gm = randn(C);
    std::vector<float> dxs = nanv(tot + off);
    launch({eb}, et, bn_eval_backward_dx_f32, (const float*)dys.data() + off, (const float*)is.data(), (const float*)gm.data(), dxs.data() + off, (i64)N, C, (i64)HW);
    std::vector<double> rdx(tot);
    for (size_t i = 0; i < tot; ++i) rdx[i] = (double)dys[i + off] * gm[(i / HW) % C] * is[(i / HW) % C];
    std::vector<float> dx(dxs.begin() + off, dxs.end());
    char name[96];
    snprintf(name, sizeof name, "bn_eval_dx (%d,%d,%d) eb=%u off=%d", N, C, HW, eb, off);
    check(name, dx, rdx, 1e-6);
}

void test_pool(int n, int c, int H, int W, int k, int st, int p) {
    int HO = (H + 2 * p - k) / st + 1, WO = (W + 2 * p - k) / st + 1;
    size_t len = (size_t)n * c * H * W, ol = (size_t)n * c * HO * WO;
    std::vector<float> x(len);
    for (size_t i = 0; i < len; ++i) x[i] = i * 0.01f - 3;
    std::shuffle(x.begin(), x.end(), rng);
    auto dy = randn(ol);
    std::vector<float> y = nanv(ol), dx = nanv(len);
    std::vector<int> arg(ol, -7);
    launch({2}, 64, maxpool2d_fwd_f32, (const float*)x.data(), y.data(), arg.data(), (i64)n * c, H, W, HO, WO, k, st, p);
    launch({3}, 32, maxpool2d_bwd_f32, (const float*)dy.data(), (const int*)arg.data(), dx.data(), (i64)n * c, H, W, HO, WO, k, st, p);
    std::vector<double> ry(ol), rdx(len, 0);
    for (int nc = 0; nc < n * c; ++nc)
        for (int oh = 0; oh < HO; ++oh)
            for (int ow = 0; ow < WO; ++ow) {
                double best = -INFINITY; int bi = -1;
                for (int a = 0; a < k; ++a) for (int b = 0; b < k; ++b) {
                    int h = oh * st - p + a, w = ow * st - p + b;
                    if (h < 0 || w < 0 || h >= H || w >= W) continue;
                    double v = x[(size_t)nc * H * W + h * W + w];
                    if (bi < 0 || v > best) { best = v; bi = h * W + w; }
                }
                size_t o = ((size_t)nc * HO + oh) * WO + ow;
                ry[o] = best; rdx[(size_t)nc * H * W + bi] += dy[o];
            }
    check("maxpool y", y, ry, 0); check("maxpool dx", dx, rdx, 1e-6);
}

void test_wn(int rows, int cols) {
    auto v = randn((size_t)rows * cols), dw = randn((size_t)rows * cols);
    std::vector<float> nr = nanv(rows), w = nanv((size_t)rows * cols), dv = nanv((size_t)rows * cols);
    launch({2}, 64, row_norms_f32, (const float*)v.data(), nr.data(), (i64)rows, (i64)cols);
    launch({2}, 64, row_normalize_f32, (const float*)v.data(), (const float*)nr.data(), w.data(), (i64)rows, (i64)cols);
    launch({2}, 64, row_normalize_bwd_f32, (const float*)dw.data(), (const float*)w.data(), (const float*)nr.data(), dv.data(), (i64)rows, (i64)cols);
    std::vector<double> rn(rows), rw((size_t)rows * cols), rdv((size_t)rows * cols);
    for (int r = 0; r < rows; ++r) {
        double s = 0; for (int j = 0; j < cols; ++j) s += (double)v[r * cols + j] * v[r * cols + j];
        rn[r] = std::sqrt(s);
        double dot = 0;
        for (int j = 0; j < cols; ++j) { rw[r * cols + j] = v[r * cols + j] / rn[r]; dot += dw[r * cols + j] * rw[r * cols + j]; }
        for (int j = 0; j < cols; ++j) rdv[r * cols + j] = (dw[r * cols + j] - dot * rw[r * cols + j]) / rn[r];
    }
    check("row_norms", nr, rn, 1e-5); check("row_normalize", w, rw, 1e-5); check("row_normalize_bwd", dv, rdv, 1e-4);
    std::vector<float> y = nanv(37);
    auto xx = randn(37 * 11);
    launch({2}, 64, global_avgpool_fwd_f32, (const float*)xx.data(), y.data(), (i64)37, (i64)11);
    std::vector<double> ry(37);
    for (int p = 0; p < 37; ++p) { double s = 0; for (int j = 0; j < 11; ++j) s += xx[p * 11 + j]; ry[p] = s / 11; }
    check("gap", y, ry, 1e-6);
}

void test_lars() {
    struct Seg { long off, len; int one_d; };
    std::vector<Seg> segs = {{0, 1000, 0}, {1000, 37, 1}, {1037, 300, 0}, {1337, 500, 0}};
    long numel = 1900;
    auto w = randn(numel), g = randn(numel);
    for (long i = 1037; i < 1337; ++i) g[i] = 0;
    std::vector<float> mu(numel, 0);
    const long CH = 128;
    std::vector<int> cseg, clen, is1d; std::vector<i64> cst;
    for (size_t s = 0; s < segs.size(); ++s) {
        is1d.push_back(segs[s].one_d);
        for (long o = 0; o < segs[s].len; o += CH) { cseg.push_back(s); cst.push_back(segs[s].off + o); clen.push_back(std::min(CH, segs[s].len - o)); }
    }
    float lr = 0.3f, mom = 0.9f, tr = 0.001f, wd = 1e-4f;
    std::vector<double> w6(w.begin(), w.end()), mu6(numel, 0);
    for (int step = 0; step < 3; ++step) {
        // As CudaBackend::lars_step: the checked pass 1 into (3, n_segs) stats, then pass 2.
        const int ns = (int)segs.size();
        std::vector<float> st(3 * ns, 0);
        launch({(unsigned)cseg.size()}, 64, lars_norms_checked_f32, (const float*)w.data(), (const float*)g.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), wd, st.data(), ns);
        launch({(unsigned)cseg.size()}, 64, lars_update_f32, w.data(), (const float*)g.data(), mu.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), (const float*)st.data(), (const float*)(st.data() + ns), lr, mom, tr, wd);
        for (auto& s : segs) {
            std::vector<double> gp(s.len);
            double wnn = 0, gnn = 0;
            for (long i = 0; i < s.len; ++i) { gp[i] = g[s.off + i] + (s.one_d ? 0 : wd * w6[s.off + i]); wnn += w6[s.off + i] * w6[s.off + i]; gnn += gp[i] * gp[i]; }
            double q = (!s.one_d && wnn > 0 && gnn > 0) ? tr * std::sqrt(wnn) / std::sqrt(gnn) : 1;
            for (long i = 0; i < s.len; ++i) { mu6[s.off + i] = mom * mu6[s.off + i] + gp[i] * q; w6[s.off + i] -= lr * mu6[s.off + i]; }
        }
    }
    // elements beyond the last segment (1837..1900) must be untouched
    check("lars w", w, w6, 1e-5); check("lars mu", mu, mu6, 1e-4);
}

void test_misc() {
    const int n = 1003;
    auto a = randn(n), b = randn(n);
    std::vector<float> y = nanv(n);
    std::vector<double> r(n);
    launch({2}, 64, gelu_fwd_f32, (const float*)a.data(), y.data(), (i64)n);
    for (int i = 0; i < n; ++i) r[i] = 0.5 * a[i] * (1 + std::erf(a[i] / std::sqrt(2.0)));
    check("gelu", y, r, 1e-6);
    y = nanv(n);
    launch({2}, 64, gelu_bwd_f32, (const float*)a.data(), (const float*)b.data(), y.data(), (i64)n);
    for (int i = 0; i < n; ++i) {
        double x = a[i];
        r[i] = b[i] * (0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * 3.14159265358979323846));
    }
    check("gelu_bwd", y, r, 1e-6);
    y = nanv(n);
    launch({2}, 64, relu_bwd_f32, (const float*)a.data(), (const float*)b.data(), y.data(), (i64)n);
    for (int i = 0; i < n; ++i) r[i] = a[i] > 0 ? b[i] : 0;
    check("relu_bwd", y, r, 0);
    std::vector<float> t = a;
    launch({3}, 32, ema_update_f32, t.data(), (const float*)b.data(), 0.99f, (i64)n);
    for (int i = 0; i < n; ++i) r[i] = 0.99 * a[i] + 0.01 * (double)b[i];
    check("ema", t, r, 1e-6);
    // bias add / column sums over (17, 59)
    int rows = 17, cols = 59;
    auto m = randn(rows * cols), bias = randn(cols);
    std::vector<float> yy = m, cs = nanv(cols);
    std::vector<double> ry(rows * cols), rc(cols, 0);
    launch({2}, 64, bias_add_f32, yy.data(), (const float*)bias.data(), (i64)rows, (i64)cols);
    launch({1}, 32, col_sum_f32, (const float*)m.data(), cs.data(), (i64)rows, (i64)cols);
    for (int i = 0; i < rows * cols; ++i) { ry[i] = m[i] + (double)bias[i % cols]; rc[i % cols] += m[i]; }
    check("bias_add", yy, ry, 1e-6);
    check("col_sum", cs, rc, 1e-5);
    // eval-mode BN backward and running update; global average pool backward
    int C = 4;
    test_bn_eval_dx(3, C, 5, 2, 32, 0);
    test_bn_eval_dx(3, 5, 8, 2, 32, 0);
    test_bn_eval_dx(3, 5, 8, 1, 32, 1);
    std::vector<float> rm = {0, 0, 0, 0}, rv = {1, 1, 1, 1}, bm = randn(C), bv = {1.5f, 2.f, .5f, 3.f};
    launch({1}, 32, bn_running_update_f32, rm.data(), rv.data(), (const float*)bm.data(), (const float*)bv.data(), 0.1f, C);
    std::vector<double> wm(C), wv(C);
    for (int c = 0; c < C; ++c) { wm[c] = 0.1 * bm[c]; wv[c] = 0.9 + 0.1 * bv[c]; }
    check("bn_running_mean", rm, wm, 1e-6);
    check("bn_running_var", rv, wv, 1e-6);
    auto g1 = randn(7);
    std::vector<float> gx = nanv(7 * 9);
    std::vector<double> rg(7 * 9);
    launch({1}, 32, global_avgpool_bwd_f32, (const float*)g1.data(), gx.data(), (i64)7, (i64)9);
    for (int i = 0; i < 63; ++i) rg[i] = g1[i / 9] / 9.0;
    check("gap_bwd", gx, rg, 1e-6);
    // max pool ties (first max wins) and NaN propagation
    std::vector<float> px = {1, 5, 5, 5, 2, NAN, 3, 1}, py = nanv(2);
    std::vector<int> pa(2, -7);
    launch({1}, 32, maxpool2d_fwd_f32, (const float*)px.data(), py.data(), pa.data(), (i64)2, 2, 2, 1, 1, 2, 2, 0);
    bool ok = pa[0] == 1 && py[0] == 5 && std::isnan(py[1]) && pa[1] == 1;
    printf("%s maxpool ties/NaN: arg %d %d\n", ok ? "ok  " : "FAIL", pa[0], pa[1]);
    if (!ok) fails++;
}

// The view finish (kernels/augment.cu), driven by tests/gpu_kernels_sim.rs: it writes random
// crops and parameters (from the Rust sampler's types) to a file, this runs the three kernels as
// src/device/cuda/augment.rs launches them and writes the output; the Rust side compares it with
// the CPU `finish` (the specification). File layout, little-endian: i32 B, i32 S, i32 threads,
// AugNorm (7 f32), B*S*S*3 u8 crops, B ColorParams (28 bytes each). Output: B*3*S*S f32.
int run_augment(const char* in_path, const char* out_path) {
    std::ifstream in(in_path, std::ios::binary);
    int hdr[3];
    AugNorm nm;
    in.read((char*)hdr, sizeof hdr);
    in.read((char*)&nm, sizeof nm);
    const int B = hdr[0], S = hdr[1];
    const unsigned threads = (unsigned)hdr[2];
    static_assert(sizeof(ColorParams) == 28, "ColorParams must match Rust's repr(C) layout");
    static_assert(sizeof(AugNorm) == 28, "AugNorm must match Rust's repr(C) layout");
    std::vector<unsigned char> crops((size_t)B * S * S * 3);
    std::vector<ColorParams> params(B);
    in.read((char*)crops.data(), crops.size());
    in.read((char*)params.data(), params.size() * sizeof(ColorParams));
    if (!in) { printf("FAIL augment: short input file %s\n", in_path); return 1; }
    std::vector<float> out = nanv((size_t)B * 3 * S * S), tmp = nanv(out.size());
    // As the launcher: one block per image, then the two blur passes on (S, 3B) grids.
    launch({(unsigned)B}, threads, aug_color_f32, (const unsigned char*)crops.data(), (const ColorParams*)params.data(), out.data(), S, nm);
    launch({(unsigned)S, (unsigned)(3 * B)}, threads, aug_blur_h_f32, (const float*)out.data(), (const ColorParams*)params.data(), tmp.data(), S);
    launch({(unsigned)S, (unsigned)(3 * B)}, threads, aug_blur_v_f32, (const float*)tmp.data(), (const ColorParams*)params.data(), out.data(), S, nm);
    std::ofstream o(out_path, std::ios::binary);
    o.write((const char*)out.data(), out.size() * sizeof(float));
    if (!o) { printf("FAIL augment: cannot write %s\n", out_path); return 1; }
    printf("augment B=%d S=%d threads=%u written\n", B, S, threads);
    return 0;
}

// The checked pass 1 (lars_norms_checked_f32): exact per-segment counts of non-finite gradients
// over every segment (1-d included), the norms of the multi-d segments against f64, and then the
// update reading its norms from the same stats buffer (stats, stats + n_segs) against f64.
void test_lars_checked() {
    struct Seg { long off, len; int one_d; };
    // multi-d spanning 3 chunks, 1-d spanning 2, an odd multi-d, a 1-d of one element
    std::vector<Seg> segs = {{0, 300, 0}, {300, 150, 1}, {450, 77, 0}, {527, 1, 1}, {528, 201, 0}};
    const int ns = (int)segs.size();
    long numel = 740;  // 11 trailing elements outside every segment
    const long CH = 128;
    std::vector<int> cseg, clen, is1d; std::vector<i64> cst;
    for (int s = 0; s < ns; ++s) {
        is1d.push_back(segs[s].one_d);
        for (long o = 0; o < segs[s].len; o += CH) { cseg.push_back(s); cst.push_back(segs[s].off + o); clen.push_back(std::min(CH, segs[s].len - o)); }
    }
    float wd = 1e-3f;
    for (int pass = 0; pass < 2; ++pass) {
        auto w = randn(numel), g = randn(numel);
        std::vector<double> want_bad(ns, 0);
        if (pass == 0) {
            // NaN twice in the 1-d segment (second chunk), +inf in segment 2, -inf in segment 4;
            // a NaN outside every segment must not count.
            g[300 + 140] = NAN; g[300 + 3] = NAN; want_bad[1] = 2;
            g[450 + 76] = INFINITY; want_bad[2] = 1;
            g[528 + 200] = -INFINITY; want_bad[4] = 1;
            g[735] = NAN;
        }
        std::vector<float> st(3 * ns, 0.0f);
        launch({(unsigned)cseg.size()}, 64, lars_norms_checked_f32, (const float*)w.data(), (const float*)g.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), wd, st.data(), ns);
        for (int s = 0; s < ns; ++s) {
            if (st[2 * ns + s] != want_bad[s]) { printf("FAIL lars_checked pass %d seg %d: %g non-finite, want %g\n", pass, s, st[2 * ns + s], want_bad[s]); fails++; }
            if (segs[s].one_d && (st[s] != 0 || st[ns + s] != 0)) { printf("FAIL lars_checked: 1-d seg %d has norms\n", s); fails++; }
        }
        if (pass == 0) { printf("ok   lars_checked non-finite counts\n"); continue; }
        std::vector<float> nw, ng; std::vector<double> rw, rg;
        for (int s = 0; s < ns; ++s) {
            if (segs[s].one_d) continue;
            double a = 0, b = 0;
            for (long i = segs[s].off; i < segs[s].off + segs[s].len; ++i) { double gv = (double)g[i] + (double)wd * w[i]; a += (double)w[i] * w[i]; b += gv * gv; }
            nw.push_back(st[s]); rw.push_back(a); ng.push_back(st[ns + s]); rg.push_back(b);
        }
        check("lars_checked ||w||^2", nw, rw, 1e-5); check("lars_checked ||g'||^2", ng, rg, 1e-5);
        std::vector<float> mu = randn(numel, 0.1f), w0 = w, mu0 = mu;
        float lr = 0.2f, mom = 0.9f, tr = 0.001f;
        launch({(unsigned)cseg.size()}, 64, lars_update_f32, w.data(), (const float*)g.data(), mu.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), (const float*)st.data(), (const float*)(st.data() + ns), lr, mom, tr, wd);
        std::vector<double> w6(w0.begin(), w0.end()), mu6(mu0.begin(), mu0.end());
        for (auto& s : segs) {
            double wnn = 0, gnn = 0;
            for (long i = s.off; i < s.off + s.len; ++i) { double gv = g[i] + (s.one_d ? 0 : (double)wd * w0[i]); wnn += (double)w0[i] * w0[i]; gnn += gv * gv; }
            double q = (!s.one_d && wnn > 0 && gnn > 0) ? tr * std::sqrt(wnn) / std::sqrt(gnn) : 1;
            for (long i = s.off; i < s.off + s.len; ++i) { double gv = g[i] + (s.one_d ? 0 : (double)wd * w0[i]); mu6[i] = mom * mu0[i] + gv * q; w6[i] = w0[i] - lr * mu6[i]; }
        }
        check("lars_checked w", w, w6, 1e-5); check("lars_checked mu", mu, mu6, 1e-4);
    }
}

// Fused BN + ReLU (+ residual) (bn_fused.cu) as the launcher runs it: the apply pass, the masked
// partial reduction (+ dresidual) on a (C, S) grid + batchnorm.cu's finalize, the dx pass; both
// modes (training: batch statistics, full backward; eval: running statistics, constants), with
// and without a residual (null pointers), elementwise kernels on `eb` blocks of `et` threads,
// buffers `off` floats off a 16-byte boundary (off % 4 != 0: the scalar path). The reference is
// double precision; its ReLU mask is the kernel's y (checked itself against the reference).
void test_bn_act(int n, int c, int hw, unsigned threads, unsigned S, bool train, bool resid, unsigned eb = 3, unsigned et = 64, int off = 0) {
    size_t tot = (size_t)n * c * hw;
    auto xs = randn(tot + off, 2), gm = randn(c), bt = randn(c), dys = randn(tot + off), rs = randn(tot + off);
    for (auto& v : xs) v += 0.5f;
    const float* x = xs.data() + off;
    const float* dy = dys.data() + off;
    const float* r = resid ? rs.data() + off : nullptr;
    double M = (double)n * hw;
    float eps = 1e-5f;
    std::vector<double> mu(c), isd(c);
    std::vector<float> meanf(c), isf(c);
    auto rvar = randn(c);
    for (int ci = 0; ci < c; ++ci) {
        double s = 0, s2 = 0;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) s += x[((size_t)a * c + ci) * hw + h];
        double m = s / M;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) { double dd = x[((size_t)a * c + ci) * hw + h] - m; s2 += dd * dd; }
        double var = train ? s2 / M : 0.3 + (double)rvar[ci] * rvar[ci];
        if (!train) m = 0.5 + 0.3 * rvar[ci];  // a running mean near (not at) the batch mean
        meanf[ci] = (float)m; isf[ci] = (float)(1 / std::sqrt(var + eps));
        mu[ci] = meanf[ci]; isd[ci] = 1 / std::sqrt(var + eps);
    }
    std::vector<float> ys = nanv(tot + off), dxs = nanv(tot + off), drs = nanv(tot + off), dg = nanv(c), db = nanv(c);
    std::vector<float> pg = nanv((size_t)c * S), pb = nanv((size_t)c * S);
    float* y = ys.data() + off;
    float* dxp = dxs.data() + off;
    float* drp = resid ? drs.data() + off : nullptr;
    launch({eb}, et, bn_act_forward_f32, x, r, (const float*)meanf.data(), (const float*)isf.data(), (const float*)gm.data(), (const float*)bt.data(), y, (i64)n, c, (i64)hw);
    // As the launcher: with a residual the partial pass writes dresidual = dy' and the dx pass
    // reads it (y = null); without, the dx pass masks dy with y itself.
    launch({(unsigned)c, S}, threads, bn_act_backward_partial_f32, dy, (const float*)y, x, (const float*)meanf.data(), (const float*)isf.data(), pg.data(), pb.data(), drp, (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg.data(), (const float*)pb.data(), dg.data(), db.data(), (int)S);
    launch({eb}, et, bn_act_backward_dx_f32, resid ? (const float*)drp : dy, resid ? (const float*)nullptr : (const float*)y, x, (const float*)meanf.data(), (const float*)isf.data(), (const float*)gm.data(), (const float*)dg.data(), (const float*)db.data(), dxp, (i64)n, c, (i64)hw, (int)train);
    std::vector<double> ry(tot), rdg(c, 0), rdb(c, 0), rdx(tot), rdr(tot);
    size_t zeros = 0;
    for (int ci = 0; ci < c; ++ci) {
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            ry[i] = std::max((x[i] - mu[ci]) * isd[ci] * gm[ci] + bt[ci] + (resid ? r[i] : 0.0), 0.0);
            double g = y[i] > 0 ? dy[i] : 0.0;
            zeros += y[i] == 0;
            rdr[i] = g; rdb[ci] += g; rdg[ci] += g * (x[i] - mu[ci]) * isd[ci];
        }
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            double g = rdr[i], xh = (x[i] - mu[ci]) * isd[ci];
            rdx[i] = train ? gm[ci] * isd[ci] / M * (M * g - rdb[ci] - xh * rdg[ci]) : g * gm[ci] * isd[ci];
        }
    }
    char tag[128];
    snprintf(tag, sizeof tag, "(%d,%d,%d) S=%u thr=%u %s%s eb=%u off=%d", n, c, hw, S, threads, train ? "train" : "eval", resid ? " +res" : "", eb, off);
    auto nm = [&](const char* what) { static char b[192]; snprintf(b, sizeof b, "bn_act %s %s", what, tag); return b; };
    if (zeros == 0 || zeros == tot) { printf("FAIL bn_act: the ReLU cut %zu of %zu %s\n", zeros, tot, tag); fails++; }
    std::vector<float> yv(y, y + tot), dxv(dxp, dxp + tot);
    check(nm("y"), yv, ry, 1e-5); check(nm("dgamma"), dg, rdg, 1e-5); check(nm("dbeta"), db, rdb, 1e-5); check(nm("dx"), dxv, rdx, 1e-4);
    if (resid) { std::vector<float> drv(drp, drp + tot); check(nm("dresidual"), drv, rdr, 0); }
    for (int i = 0; i < off; ++i)
        if (!std::isnan(ys[i]) || !std::isnan(dxs[i]) || !std::isnan(drs[i])) { printf("FAIL bn_act wrote before y/dx/dres %s\n", tag); fails++; break; }
    if (!resid)
        for (float v : drs) if (!std::isnan(v)) { printf("FAIL bn_act wrote a null dresidual %s\n", tag); fails++; break; }
}

// The device-side step gate (lars.cu step_ok_f32 + the *_gated_f32 update kernels of lars.cu,
// ema.cu, batchnorm.cu): with ok = 1 the gated kernels give the ungated results bit for bit
// (the ungated ones are checked against f64 above) and the EMA / BN updates match f64; with
// ok = 0 (a non-finite gradient, a non-finite loss term, non-finite weights) w, mu, the teacher
// and the running statistics stay bit-identical. step_ok_f32 also on a synthetic stats buffer
// of more segments than threads (its strided loop), the offender last.
void test_step_gated() {
    struct Seg { long off, len; int one_d; };
    std::vector<Seg> segs = {{0, 300, 0}, {300, 150, 1}, {450, 77, 0}, {527, 1, 1}, {528, 201, 0}};
    const int ns = (int)segs.size();
    const long numel = 740;
    const long CH = 128;
    std::vector<int> cseg, clen, is1d; std::vector<i64> cst;
    for (int s = 0; s < ns; ++s) {
        is1d.push_back(segs[s].one_d);
        for (long o = 0; o < segs[s].len; o += CH) { cseg.push_back(s); cst.push_back(segs[s].off + o); clen.push_back(std::min(CH, segs[s].len - o)); }
    }
    const float wd = 1e-3f, lr = 0.2f, mom = 0.9f, tr = 0.001f, em = 0.99f, bnm = 0.1f;
    const int C = 13;
    // case 0: finite; 1: NaN gradient (1-d segment); 2: NaN entropy; 3: +inf consistency;
    // 4: +inf weight (multi-d segment: non-finite norms, finite gradient).
    for (int cs = 0; cs < 5; ++cs) {
        auto w = randn(numel), g = randn(numel), mu = randn(numel, 0.1f), t = randn(numel);
        auto rm = randn(C), rv = randn(C, 0.3f), bm = randn(C), bv = randn(C, 0.5f);
        for (auto& v : rv) v = 1.0f + std::fabs(v);
        for (auto& v : bv) v = std::fabs(v);
        std::vector<float> hc = {0.7f, 2.3f};
        if (cs == 1) g[300 + 17] = NAN;
        if (cs == 2) hc[0] = NAN;
        if (cs == 3) hc[1] = INFINITY;
        if (cs == 4) w[450 + 5] = INFINITY;
        std::vector<float> st(3 * ns + 3, 0.0f);
        launch({(unsigned)cseg.size()}, 64, lars_norms_checked_f32, (const float*)w.data(), (const float*)g.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), wd, st.data(), ns);
        std::vector<int> ok = {-7};
        launch({1}, 64, step_ok_f32, st.data(), (const int*)is1d.data(), ns, (const float*)hc.data(), ok.data());
        const int want_ok = cs == 0 ? 1 : 0;
        if (ok[0] != want_ok || st[3 * ns + 2] != (float)want_ok) { printf("FAIL step_ok case %d: ok %d / %g, want %d\n", cs, ok[0], st[3 * ns + 2], want_ok); fails++; }
        if (!(std::memcmp(&st[3 * ns], &hc[0], 4) == 0 && std::memcmp(&st[3 * ns + 1], &hc[1], 4) == 0)) { printf("FAIL step_ok case %d: loss terms not copied\n", cs); fails++; }
        auto w0 = w, mu0 = mu, t0 = t, rm0 = rm, rv0 = rv;
        launch({(unsigned)cseg.size()}, 64, lars_update_gated_f32, w.data(), (const float*)g.data(), mu.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), (const float*)st.data(), (const float*)(st.data() + ns), lr, mom, tr, wd, (const int*)ok.data());
        launch({3}, 32, ema_update_gated_f32, t.data(), (const float*)w.data(), em, (i64)numel, (const int*)ok.data());
        launch({1}, 32, bn_running_update_gated_f32, rm.data(), rv.data(), (const float*)bm.data(), (const float*)bv.data(), bnm, C, (const int*)ok.data());
        auto same = [](const std::vector<float>& a, const std::vector<float>& b) { return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0; };
        if (cs != 0) {
            bool all = same(w, w0) && same(mu, mu0) && same(t, t0) && same(rm, rm0) && same(rv, rv0);
            printf("%s gated updates with ok = 0 (case %d) leave every buffer bit-identical\n", all ? "ok  " : "FAIL", cs);
            if (!all) fails++;
            continue;
        }
        // ok = 1: the ungated kernels on copies, bit for bit; EMA and BN against f64.
        auto w1 = w0, mu1 = mu0, t1 = t0, rm1 = rm0, rv1 = rv0;
        launch({(unsigned)cseg.size()}, 64, lars_update_f32, w1.data(), (const float*)g.data(), mu1.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), (const float*)st.data(), (const float*)(st.data() + ns), lr, mom, tr, wd);
        launch({3}, 32, ema_update_f32, t1.data(), (const float*)w1.data(), em, (i64)numel);
        launch({1}, 32, bn_running_update_f32, rm1.data(), rv1.data(), (const float*)bm.data(), (const float*)bv.data(), bnm, C);
        bool all = same(w, w1) && same(mu, mu1) && same(t, t1) && same(rm, rm1) && same(rv, rv1) && !same(w, w0);
        printf("%s gated updates with ok = 1 equal the ungated ones bit for bit\n", all ? "ok  " : "FAIL");
        if (!all) fails++;
        std::vector<double> te(numel), rme(C), rve(C);
        for (long i = 0; i < numel; ++i) te[i] = (double)em * t0[i] + (1.0 - (double)em) * w[i];
        for (int c = 0; c < C; ++c) { rme[c] = 0.9 * rm0[c] + 0.1 * (double)bm[c]; rve[c] = 0.9 * rv0[c] + 0.1 * (double)bv[c]; }
        check("gated ema", t, te, 1e-6); check("gated bn mean", rm, rme, 1e-6); check("gated bn var", rv, rve, 1e-6);
    }
    // step_ok_f32 over 100 segments with 32 threads: clean, then one bad count in segment 97,
    // then a NaN norm of a 1-d segment (ignored: 1-d norms are not used), then of a multi-d one.
    const int nn = 100;
    std::vector<int> one(nn, 0);
    for (int s = 0; s < nn; s += 3) one[s] = 1;
    for (int cs = 0; cs < 4; ++cs) {
        std::vector<float> st(3 * nn + 3);
        for (int s = 0; s < 2 * nn; ++s) st[s] = std::fabs(randn(1)[0]);
        for (int s = 2 * nn; s < 3 * nn; ++s) st[s] = 0.0f;
        if (cs == 1) st[2 * nn + 97] = 1.0f;
        if (cs == 2) st[nn + 99] = NAN;  // segment 99 is 1-d
        if (cs == 3) st[98] = INFINITY;  // segment 98 is multi-d
        std::vector<float> hc = {0.1f, 0.2f};
        std::vector<int> ok = {-1};
        launch({1}, 32, step_ok_f32, st.data(), (const int*)one.data(), nn, (const float*)hc.data(), ok.data());
        const int want = (cs == 0 || cs == 2) ? 1 : 0;
        printf("%s step_ok over %d segments case %d: %d (want %d)\n", ok[0] == want ? "ok  " : "FAIL", nn, cs, ok[0], want);
        if (ok[0] != want) fails++;
    }
}

// The checked pass 1 and step_ok at the launchers' real configs (ops.rs: LARS chunks of 65536
// elements, THREADS = 256 per block; step_ok one block of 1024 threads), which the tests above
// run smaller: a multi-d segment of two chunks (NaN in the second), a 1-d segment, then step_ok
// over 163 segments (more than ResNet50's entry count is not needed; fewer than the threads,
// so most warps hold no segment) with the one bad entry last.
void test_launcher_configs() {
    struct Seg { long off, len; int one_d; };
    const long CH = 65536;
    std::vector<Seg> segs = {{0, CH + 1003, 0}, {CH + 1003, 517, 1}};
    const int ns = (int)segs.size();
    const long numel = CH + 1003 + 517;
    std::vector<int> cseg, clen, is1d; std::vector<i64> cst;
    for (int s = 0; s < ns; ++s) {
        is1d.push_back(segs[s].one_d);
        for (long o = 0; o < segs[s].len; o += CH) { cseg.push_back(s); cst.push_back(segs[s].off + o); clen.push_back((int)std::min(CH, segs[s].len - o)); }
    }
    const float wd = 1e-4f;
    for (int pass = 0; pass < 2; ++pass) {
        auto w = randn(numel), g = randn(numel);
        if (pass == 1) g[CH + 700] = NAN;  // second chunk of segment 0
        std::vector<float> st(3 * ns + 3, 0.0f);
        launch({(unsigned)cseg.size()}, 256, lars_norms_checked_f32, (const float*)w.data(), (const float*)g.data(), (const int*)cseg.data(), (const i64*)cst.data(), (const int*)clen.data(), (const int*)is1d.data(), wd, st.data(), ns);
        std::vector<float> hc = {1.5f, -0.25f};
        std::vector<int> ok = {-3};
        launch({1}, 1024, step_ok_f32, st.data(), (const int*)is1d.data(), ns, (const float*)hc.data(), ok.data());
        const int want = pass == 0 ? 1 : 0;
        if (ok[0] != want || st[2 * ns] != (pass == 0 ? 0.0f : 1.0f) || st[2 * ns + 1] != 0.0f) {
            printf("FAIL launcher configs pass %d: ok %d (want %d), counts %g %g\n", pass, ok[0], want, st[2 * ns], st[2 * ns + 1]);
            fails++;
        }
        if (pass == 1) continue;
        double a = 0, b = 0;
        for (long i = 0; i < segs[0].len; ++i) { double gv = (double)g[i] + (double)wd * w[i]; a += (double)w[i] * w[i]; b += gv * gv; }
        check("launcher configs ||w||^2 (2 chunks, 256 threads)", {st[0]}, {a}, 1e-5);
        check("launcher configs ||g'||^2 (2 chunks, 256 threads)", {st[ns]}, {b}, 1e-5);
    }
    const int nn = 163;
    std::vector<int> one(nn, 0);
    for (int s = 1; s < nn; s += 2) one[s] = 1;
    for (int cs = 0; cs < 3; ++cs) {
        std::vector<float> st(3 * nn + 3, 0.0f);
        for (int s = 0; s < 2 * nn; ++s) st[s] = std::fabs(randn(1)[0]);
        if (cs == 1) st[2 * nn + nn - 1] = 2.0f;  // a bad count in the last segment
        if (cs == 2) st[nn + nn - 1] = INFINITY;  // segment nn-1 (even: multi-d)
        std::vector<float> hc = {0.3f, 0.4f};
        std::vector<int> ok = {-1};
        launch({1}, 1024, step_ok_f32, st.data(), (const int*)one.data(), nn, (const float*)hc.data(), ok.data());
        const int want = cs == 0 ? 1 : 0;
        printf("%s step_ok with 1024 threads over %d segments case %d: %d (want %d)\n", ok[0] == want ? "ok  " : "FAIL", nn, cs, ok[0], want);
        if (ok[0] != want || st[3 * nn + 2] != (float)want) fails++;
    }
}

// ---------------------------------------------------------------- bf16 storage
// The `*_bf16` kernels (common.cuh "bf16 storage") against the f32 kernels run on the widened
// bf16 inputs in the same test: a bf16 kernel's stored outputs must be round_bf16(the f32
// kernel's outputs) bit for bit, and its f32 partials / statistics equal the f32 kernel's bit
// for bit (same grid, same reduction order, same vector-or-scalar path: the bf16 buffers sit
// `off` elements off an aligned start exactly as the f32 ones, and for off in {0, 1, 2, 4}
// both types take the same path: 0 and 4 vector (bf16 8-byte aligned, f32 16), 1 and 2
// scalar). Then against an f64 reference on the same widened inputs, so that a bug shared by
// both instantiations fails too: tolerance 5e-3 relative to the largest reference value on
// stored outputs (bf16 keeps 8 significant bits: rounding moves a value by at most 2^-8 = 3.9e-3 of it, plus the
// f32 kernels' own error), the f32 tests' tolerances on f32 statistics and partials.
// bf16 outputs start as the quiet-NaN pattern 0x7fc0: an unwritten element fails.

// Reference f32 -> bf16 rounding, independent of common.cuh's bit trick: the two bf16
// neighbours of x (truncation toward zero and the next one away from zero; past the largest
// finite bf16 the next one is 2^128, IEEE's overflow threshold, stored as infinity), the nearer
// one, ties to the even mantissa. NaN: the sign and the top payload bits, quiet bit set.
float widen16(unsigned b) { unsigned u = b << 16; float f; std::memcpy(&f, &u, 4); return f; }
bf16 ref_bf16(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    if (std::isnan(x)) return (bf16)((u >> 16) | 0x40u);
    const unsigned lo = u >> 16;  // also exact for +-0, +-inf
    if ((lo << 16) == u) return (bf16)lo;
    const unsigned hi = lo + 1;  // next magnitude up, same sign
    const double xl = widen16(lo);
    const double xh = (hi & 0x7fffu) == 0x7f80u ? std::copysign(std::ldexp(1.0, 128), (double)x) : (double)widen16(hi);
    const double dl = std::fabs((double)x - xl), dh = std::fabs(xh - (double)x);
    if (dl != dh) return (bf16)(dl < dh ? lo : hi);
    return (bf16)((lo & 1) ? hi : lo);
}
typedef std::vector<bf16> vb;
vb tob(const std::vector<float>& v) { vb r(v.size()); for (size_t i = 0; i < v.size(); ++i) r[i] = ref_bf16(v[i]); return r; }
std::vector<float> wid(const bf16* p, size_t n) { std::vector<float> r(n); for (size_t i = 0; i < n; ++i) r[i] = widen16(p[i]); return r; }
std::vector<float> wid(const vb& v) { return wid(v.data(), v.size()); }
vb nanb(size_t n) { return vb(n, (bf16)0x7fc0); }
// got[i] == round_bf16(want[i]) for every i (want: the f32 kernel's output).
void bits_eq(const char* name, const bf16* got, const float* want, size_t n) {
    size_t bad = 0, at = 0;
    for (size_t i = 0; i < n; ++i)
        if (got[i] != ref_bf16(want[i])) { if (!bad) at = i; bad++; }
    if (bad) { printf("FAIL %s: %zu of %zu differ from round_bf16(f32 kernel) (first %zu: %04x vs %04x from %g)\n", name, bad, n, at, got[at], ref_bf16(want[at]), want[at]); fails++; }
    else printf("ok   %s: %zu bit-exact\n", name, n);
}
// Bitwise equal f32 buffers (partials and statistics of the two instantiations).
void same_f32(const char* name, const float* a, const float* b, size_t n) {
    if (std::memcmp(a, b, 4 * n) != 0) { printf("FAIL %s: f32 results of the bf16 and f32 kernels differ\n", name); fails++; }
    else printf("ok   %s: %zu f32 values bit-identical\n", name, n);
}
void guard16(const char* name, const vb& v, int off) {
    for (int i = 0; i < off; ++i) if (v[i] != 0x7fc0) { printf("FAIL %s: wrote before the buffer start\n", name); fails++; return; }
}
void aligned_start(const void* p) {
    if (reinterpret_cast<unsigned long long>(p) & 15ull) { printf("FAIL test setup: a buffer is not 16-byte aligned\n"); fails++; }
}

// The rounding on special values (ties to even both ways and both signs, the overflow
// threshold, zeros, subnormals: ties, flush to zero, round up into the normal range; infinities;
// NaNs with payloads, signalling, negative), then common.cuh's f32_to_bf16 == the reference on
// a million random bit patterns and every bf16 widened and rounded back (the identity; NaN ->
// quiet). tests/gpu_kernels_sim.rs checks the cast kernels against the Rust round_bf16.
void test_bf16_round() {
    const unsigned table[][2] = {
        {0x3f808000u, 0x3f80}, {0x3f818000u, 0x3f82}, {0x3f808001u, 0x3f81}, {0x3f807fffu, 0x3f80},
        {0xbf808000u, 0xbf80}, {0xbf818000u, 0xbf82}, {0x3f800000u, 0x3f80}, {0x40490fdbu, 0x4049},
        {0x7f7fffffu, 0x7f80}, {0x7f7f7fffu, 0x7f7f}, {0x7f7f8000u, 0x7f80}, {0xff7fffffu, 0xff80},
        {0x7f7e8000u, 0x7f7e}, {0x00000000u, 0x0000}, {0x80000000u, 0x8000}, {0x00000001u, 0x0000},
        {0x80000001u, 0x8000}, {0x00008000u, 0x0000}, {0x00018000u, 0x0002}, {0x00008001u, 0x0001},
        {0x80008001u, 0x8001}, {0x007fffffu, 0x0080}, {0x007f7fffu, 0x007f}, {0x00800000u, 0x0080},
        {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80}, {0x7fc00000u, 0x7fc0}, {0x7f800001u, 0x7fc0},
        {0xff800001u, 0xffc0}, {0x7fa12345u, 0x7fe1}, {0xffffffffu, 0xffff}, {0x7fbfffffu, 0x7fff},
    };
    int bad = 0;
    for (auto& t : table) {
        const float x = __uint_as_float(t[0]);
        const bf16 r = ref_bf16(x), k = f32_to_bf16(x);
        if (r != t[1] || k != t[1]) { printf("FAIL bf16 rounding of %08x: reference %04x, kernel %04x, want %04x\n", t[0], r, k, t[1]); bad++; }
    }
    std::uniform_int_distribution<unsigned> bits;
    for (int i = 0; i < 1000000; ++i) {
        const unsigned u = i % 4 == 0 ? (bits(rng) & 0xffff0000u) | (0x7fffu + (i / 4) % 3) : bits(rng);
        const float x = __uint_as_float(u);
        if (ref_bf16(x) != f32_to_bf16(x)) { if (bad < 5) printf("FAIL bf16 rounding of %08x: reference %04x, kernel %04x\n", u, ref_bf16(x), f32_to_bf16(x)); bad++; }
    }
    for (unsigned b = 0; b < 65536; ++b) {
        const bool nan = (b & 0x7fffu) > 0x7f80u;
        const bf16 want = nan ? (bf16)(b | 0x40u) : (bf16)b;
        if (f32_to_bf16(bf16_to_f32((bf16)b)) != want || __float_as_uint(bf16_to_f32((bf16)b)) != b << 16) { if (bad < 10) printf("FAIL bf16 round trip of %04x\n", b); bad++; }
    }
    printf("%s bf16 rounding: %zu special values, 1e6 random patterns, all 65536 bf16 round trips\n", bad ? "FAIL" : "ok  ", sizeof table / sizeof table[0]);
    fails += bad != 0;
}

// cast_f32_bf16 / cast_bf16_f32 / add_bf16 on n elements (odd and even), grid eb x et, every
// buffer `off` elements into its allocation (0, 4: the 4-wide path plus the n % 4 tail; 1, 2:
// misaligned, element by element); add_bf16 also in place (y aliasing a, then b).
void test_elementwise_bf16(int n, unsigned eb, unsigned et, int off) {
    auto a = randn(n + off, 3), b = randn(n + off, 3);
    a[off] = NAN; a[off + 1] = INFINITY; a[off + 2] = -0.0f; a[off + 3] = 3.4e38f; a[off + 4] = 1e-42f;
    std::uniform_int_distribution<unsigned> bits;
    for (int i = off + 5; i < n + off; i += 7) a[i] = __uint_as_float(bits(rng));  // any pattern
    char name[96];
    vb ab = nanb(n + off), bb = tob(b);
    launch({eb}, et, cast_f32_bf16, (const float*)a.data() + off, ab.data() + off, (i64)n);
    snprintf(name, sizeof name, "cast_f32_bf16 n=%d eb=%u et=%u off=%d", n, eb, et, off);
    bits_eq(name, ab.data() + off, a.data() + off, n);
    guard16(name, ab, off);
    std::vector<float> aw = nanv(n + off);
    launch({eb}, et, cast_bf16_f32, (const bf16*)ab.data() + off, aw.data() + off, (i64)n);
    snprintf(name, sizeof name, "cast_bf16_f32 n=%d eb=%u et=%u off=%d", n, eb, et, off);
    auto want = wid(ab);
    same_f32(name, aw.data() + off, want.data() + off, n);
    for (int i = 0; i < off; ++i) if (!std::isnan(aw[i])) { printf("FAIL %s: wrote before the start\n", name); fails++; break; }
    // add: finite inputs (a re-drawn), f32 kernel on the widened values as the reference.
    a = randn(n + off, 3);
    ab = tob(a);
    auto a32 = wid(ab), b32 = wid(bb);
    std::vector<float> y32 = nanv(n + off);
    launch({eb}, et, add_f32, (const float*)a32.data() + off, (const float*)b32.data() + off, y32.data() + off, (i64)n);
    vb yb = nanb(n + off);
    launch({eb}, et, add_bf16, (const bf16*)ab.data() + off, (const bf16*)bb.data() + off, yb.data() + off, (i64)n);
    snprintf(name, sizeof name, "add_bf16 n=%d eb=%u et=%u off=%d", n, eb, et, off);
    bits_eq(name, yb.data() + off, y32.data() + off, n);
    guard16(name, yb, off);
    std::vector<double> r(n);
    for (int i = 0; i < n; ++i) r[i] = (double)a32[i + off] + b32[i + off];
    check(name, wid(yb.data() + off, n), r, 5e-3);
    vb ia = ab, ib = bb;
    launch({eb}, et, add_bf16, (const bf16*)ia.data() + off, (const bf16*)bb.data() + off, ia.data() + off, (i64)n);
    launch({eb}, et, add_bf16, (const bf16*)ab.data() + off, (const bf16*)ib.data() + off, ib.data() + off, (i64)n);
    const bool ok = std::equal(ia.begin() + off, ia.end(), yb.begin() + off) && std::equal(ib.begin() + off, ib.end(), yb.begin() + off);
    printf("%s add_bf16 in place (y = a, y = b) n=%d off=%d\n", ok ? "ok  " : "FAIL", n, off);
    fails += !ok;
}

// test_bn's pipeline with bf16 activations, next to the f32 kernels on the widened inputs.
void test_bn_bf16(int n, int c, int hw, unsigned threads, unsigned S, unsigned eb = 3, unsigned et = 64, int off = 0, float shift = 0.5f) {
    const size_t tot = (size_t)n * c * hw, all = tot + off;
    auto xs = randn(all, 2), gm = randn(c), bt = randn(c), dys = randn(all);
    for (auto& v : xs) v += shift;
    vb xb = tob(xs), dyb = tob(dys);
    auto xw = wid(xb), dyw = wid(dyb);
    aligned_start(xb.data()); aligned_start(xw.data());
    const float eps = 1e-5f;
    // f32 kernels on the widened inputs
    std::vector<float> ps = nanv((size_t)c * S), pq = nanv((size_t)c * S), mean = nanv(c), is = nanv(c), vu = nanv(c), y32 = nanv(all);
    std::vector<float> pg = nanv((size_t)c * S), pb = nanv((size_t)c * S), dg = nanv(c), db = nanv(c), dx32 = nanv(all);
    launch({(unsigned)c, S}, threads, bn_sum_partial_f32, (const float*)xw.data() + off, ps.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c, S}, threads, bn_sqdev_partial_f32, (const float*)xw.data() + off, (const float*)ps.data(), pq.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 32, bn_stats_finalize_f32, (const float*)ps.data(), (const float*)pq.data(), mean.data(), is.data(), vu.data(), (i64)n, (i64)hw, (int)S, eps);
    launch({eb}, et, bn_forward_f32, (const float*)xw.data() + off, (const float*)mean.data(), (const float*)is.data(), (const float*)gm.data(), (const float*)bt.data(), y32.data() + off, (i64)n, c, (i64)hw);
    launch({(unsigned)c, S}, threads, bn_backward_partial_f32, (const float*)dyw.data() + off, (const float*)xw.data() + off, (const float*)mean.data(), (const float*)is.data(), pg.data(), pb.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg.data(), (const float*)pb.data(), dg.data(), db.data(), (int)S);
    launch({eb}, et, bn_backward_dx_f32, (const float*)dyw.data() + off, (const float*)xw.data() + off, (const float*)mean.data(), (const float*)is.data(), (const float*)gm.data(), (const float*)dg.data(), (const float*)db.data(), dx32.data() + off, (i64)n, c, (i64)hw);
    // bf16 kernels (the finalize kernels are the shared f32 ones)
    std::vector<float> ps2 = nanv((size_t)c * S), pq2 = nanv((size_t)c * S), mean2 = nanv(c), is2 = nanv(c), vu2 = nanv(c);
    std::vector<float> pg2 = nanv((size_t)c * S), pb2 = nanv((size_t)c * S), dg2 = nanv(c), db2 = nanv(c);
    vb yb = nanb(all), dxb = nanb(all);
    launch({(unsigned)c, S}, threads, bn_sum_partial_bf16, (const bf16*)xb.data() + off, ps2.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c, S}, threads, bn_sqdev_partial_bf16, (const bf16*)xb.data() + off, (const float*)ps2.data(), pq2.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 32, bn_stats_finalize_f32, (const float*)ps2.data(), (const float*)pq2.data(), mean2.data(), is2.data(), vu2.data(), (i64)n, (i64)hw, (int)S, eps);
    launch({eb}, et, bn_forward_bf16, (const bf16*)xb.data() + off, (const float*)mean2.data(), (const float*)is2.data(), (const float*)gm.data(), (const float*)bt.data(), yb.data() + off, (i64)n, c, (i64)hw);
    launch({(unsigned)c, S}, threads, bn_backward_partial_bf16, (const bf16*)dyb.data() + off, (const bf16*)xb.data() + off, (const float*)mean2.data(), (const float*)is2.data(), pg2.data(), pb2.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg2.data(), (const float*)pb2.data(), dg2.data(), db2.data(), (int)S);
    launch({eb}, et, bn_backward_dx_bf16, (const bf16*)dyb.data() + off, (const bf16*)xb.data() + off, (const float*)mean2.data(), (const float*)is2.data(), (const float*)gm.data(), (const float*)dg2.data(), (const float*)db2.data(), dxb.data() + off, (i64)n, c, (i64)hw);
    char tag[96];
    snprintf(tag, sizeof tag, "(%d,%d,%d) S=%u thr=%u eb=%u et=%u off=%d shift=%g", n, c, hw, S, threads, eb, et, off, shift);
    auto nm = [&](const char* what) { static char b[192]; snprintf(b, sizeof b, "bn_bf16 %s %s", what, tag); return b; };
    same_f32(nm("part_sum"), ps2.data(), ps.data(), ps.size()); same_f32(nm("part_sq"), pq2.data(), pq.data(), pq.size());
    same_f32(nm("mean"), mean2.data(), mean.data(), c); same_f32(nm("invstd"), is2.data(), is.data(), c); same_f32(nm("var_u"), vu2.data(), vu.data(), c);
    bits_eq(nm("y"), yb.data() + off, y32.data() + off, tot);
    same_f32(nm("part_g"), pg2.data(), pg.data(), pg.size()); same_f32(nm("part_b"), pb2.data(), pb.data(), pb.size());
    same_f32(nm("dgamma"), dg2.data(), dg.data(), c); same_f32(nm("dbeta"), db2.data(), db.data(), c);
    bits_eq(nm("dx"), dxb.data() + off, dx32.data() + off, tot);
    guard16(nm("y"), yb, off); guard16(nm("dx"), dxb, off);
    // f64 reference on the widened inputs
    const float* x = xw.data() + off;
    const float* dy = dyw.data() + off;
    std::vector<double> rm(c), ry(tot), rdg(c), rdb(c), rdx(tot);
    const double M = (double)n * hw;
    for (int ci = 0; ci < c; ++ci) {
        double s = 0, s2 = 0;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) s += x[((size_t)a * c + ci) * hw + h];
        const double mu = s / M;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) { double dd = x[((size_t)a * c + ci) * hw + h] - mu; s2 += dd * dd; }
        const double isd = 1 / std::sqrt(s2 / M + eps);
        rm[ci] = mu;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            ry[i] = (x[i] - mu) * isd * gm[ci] + bt[ci];
            rdb[ci] += dy[i]; rdg[ci] += dy[i] * (x[i] - mu) * isd;
        }
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            rdx[i] = gm[ci] * isd / M * (M * dy[i] - rdb[ci] - (x[i] - mu) * isd * rdg[ci]);
        }
    }
    check(nm("mean vs f64"), mean2, rm, 1e-5); check(nm("dgamma vs f64"), dg2, rdg, 1e-5); check(nm("dbeta vs f64"), db2, rdb, 1e-5);
    check(nm("y vs f64"), wid(yb.data() + off, tot), ry, 5e-3); check(nm("dx vs f64"), wid(dxb.data() + off, tot), rdx, 5e-3);
}

void test_bn_eval_dx_bf16(int N, int C, int HW, unsigned eb, unsigned et, int off) {
    const size_t tot = (size_t)N * C * HW, all = tot + off;
    vb dyb = tob(randn(all));
    auto dyw = wid(dyb), is = randn(C), gm = randn(C);
    std::vector<float> dx32 = nanv(all);
    vb dxb = nanb(all);
    launch({eb}, et, bn_eval_backward_dx_f32, (const float*)dyw.data() + off, (const float*)is.data(), (const float*)gm.data(), dx32.data() + off, (i64)N, C, (i64)HW);
    launch({eb}, et, bn_eval_backward_dx_bf16, (const bf16*)dyb.data() + off, (const float*)is.data(), (const float*)gm.data(), dxb.data() + off, (i64)N, C, (i64)HW);
    char name[96];
    snprintf(name, sizeof name, "bn_eval_dx_bf16 (%d,%d,%d) eb=%u et=%u off=%d", N, C, HW, eb, et, off);
    bits_eq(name, dxb.data() + off, dx32.data() + off, tot);
    guard16(name, dxb, off);
    std::vector<double> r(tot);
    for (size_t i = 0; i < tot; ++i) r[i] = (double)dyw[i + off] * gm[(i / HW) % C] * is[(i / HW) % C];
    check(name, wid(dxb.data() + off, tot), r, 5e-3);
}

// test_bn_act's pipeline with bf16 activations, next to the f32 kernels on the widened inputs
// (the f32 backward reads the widened bf16 output y: the mask both instantiations see).
void test_bn_act_bf16(int n, int c, int hw, unsigned threads, unsigned S, bool train, bool resid, unsigned eb = 3, unsigned et = 64, int off = 0) {
    const size_t tot = (size_t)n * c * hw, all = tot + off;
    auto xs = randn(all, 2), gm = randn(c), bt = randn(c), dys = randn(all), rs = randn(all);
    for (auto& v : xs) v += 0.5f;
    vb xb = tob(xs), dyb = tob(dys), rb = tob(rs);
    auto xw = wid(xb), dyw = wid(dyb), rw = wid(rb);
    const float* x = xw.data() + off;
    const float* dy = dyw.data() + off;
    const double M = (double)n * hw;
    const float eps = 1e-5f;
    std::vector<double> mu(c), isd(c);
    std::vector<float> meanf(c), isf(c);
    auto rvar = randn(c);
    for (int ci = 0; ci < c; ++ci) {
        double s = 0, s2 = 0;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) s += x[((size_t)a * c + ci) * hw + h];
        double m = s / M;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) { double dd = x[((size_t)a * c + ci) * hw + h] - m; s2 += dd * dd; }
        double var = train ? s2 / M : 0.3 + (double)rvar[ci] * rvar[ci];
        if (!train) m = 0.5 + 0.3 * rvar[ci];
        meanf[ci] = (float)m; isf[ci] = (float)(1 / std::sqrt(var + eps));
        mu[ci] = meanf[ci]; isd[ci] = isf[ci];
    }
    const float* mf = meanf.data();
    const float* sf = isf.data();
    // forward
    std::vector<float> y32 = nanv(all);
    vb yb = nanb(all);
    launch({eb}, et, bn_act_forward_f32, x, resid ? (const float*)rw.data() + off : (const float*)nullptr, mf, sf, (const float*)gm.data(), (const float*)bt.data(), y32.data() + off, (i64)n, c, (i64)hw);
    launch({eb}, et, bn_act_forward_bf16, (const bf16*)xb.data() + off, resid ? (const bf16*)rb.data() + off : (const bf16*)nullptr, mf, sf, (const float*)gm.data(), (const float*)bt.data(), yb.data() + off, (i64)n, c, (i64)hw);
    auto yw = wid(yb);  // what the f32 backward reads
    // backward partials (+ dresidual), finalize
    std::vector<float> pg = nanv((size_t)c * S), pb = nanv((size_t)c * S), dm32 = nanv(all), dg = nanv(c), db = nanv(c);
    std::vector<float> pg2 = nanv((size_t)c * S), pb2 = nanv((size_t)c * S), dg2 = nanv(c), db2 = nanv(c);
    vb dmb = nanb(all);
    launch({(unsigned)c, S}, threads, bn_act_backward_partial_f32, dy, (const float*)yw.data() + off, x, mf, sf, pg.data(), pb.data(), resid ? dm32.data() + off : (float*)nullptr, (i64)n, c, (i64)hw);
    launch({(unsigned)c, S}, threads, bn_act_backward_partial_bf16, (const bf16*)dyb.data() + off, (const bf16*)yb.data() + off, (const bf16*)xb.data() + off, mf, sf, pg2.data(), pb2.data(), resid ? dmb.data() + off : (bf16*)nullptr, (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg.data(), (const float*)pb.data(), dg.data(), db.data(), (int)S);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg2.data(), (const float*)pb2.data(), dg2.data(), db2.data(), (int)S);
    // dx: with a residual from the masked dresidual (y = null), else masking dy with y
    std::vector<float> dx32 = nanv(all);
    vb dxb = nanb(all);
    launch({eb}, et, bn_act_backward_dx_f32, resid ? (const float*)dm32.data() + off : dy, resid ? (const float*)nullptr : (const float*)yw.data() + off, x, mf, sf, (const float*)gm.data(), (const float*)dg.data(), (const float*)db.data(), dx32.data() + off, (i64)n, c, (i64)hw, (int)train);
    launch({eb}, et, bn_act_backward_dx_bf16, resid ? (const bf16*)dmb.data() + off : (const bf16*)dyb.data() + off, resid ? (const bf16*)nullptr : (const bf16*)yb.data() + off, (const bf16*)xb.data() + off, mf, sf, (const float*)gm.data(), (const float*)dg2.data(), (const float*)db2.data(), dxb.data() + off, (i64)n, c, (i64)hw, (int)train);
    char tag[128];
    snprintf(tag, sizeof tag, "(%d,%d,%d) S=%u thr=%u %s%s eb=%u et=%u off=%d", n, c, hw, S, threads, train ? "train" : "eval", resid ? " +res" : "", eb, et, off);
    auto nm = [&](const char* what) { static char b[192]; snprintf(b, sizeof b, "bn_act_bf16 %s %s", what, tag); return b; };
    bits_eq(nm("y"), yb.data() + off, y32.data() + off, tot);
    same_f32(nm("part_g"), pg2.data(), pg.data(), pg.size()); same_f32(nm("part_b"), pb2.data(), pb.data(), pb.size());
    same_f32(nm("dgamma"), dg2.data(), dg.data(), c); same_f32(nm("dbeta"), db2.data(), db.data(), c);
    if (resid) { bits_eq(nm("dresidual"), dmb.data() + off, dm32.data() + off, tot); guard16(nm("dresidual"), dmb, off); }
    else for (bf16 v : dmb) if (v != 0x7fc0) { printf("FAIL %s\n", nm("wrote a null dresidual")); fails++; break; }
    bits_eq(nm("dx"), dxb.data() + off, dx32.data() + off, tot);
    guard16(nm("y"), yb, off); guard16(nm("dx"), dxb, off);
    // f64 reference on the widened inputs, the ReLU mask from the stored bf16 y
    std::vector<double> ry(tot), rdg(c, 0), rdb(c, 0), rdx(tot), rdr(tot);
    const float* r = rw.data() + off;
    const float* y = yw.data() + off;
    size_t zeros = 0;
    for (int ci = 0; ci < c; ++ci) {
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            ry[i] = std::max((x[i] - mu[ci]) * isd[ci] * gm[ci] + bt[ci] + (resid ? r[i] : 0.0), 0.0);
            double g = y[i] > 0 ? dy[i] : 0.0;
            zeros += y[i] == 0;
            rdr[i] = g; rdb[ci] += g; rdg[ci] += g * (x[i] - mu[ci]) * isd[ci];
        }
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            size_t i = ((size_t)a * c + ci) * hw + h;
            double g = rdr[i], xh = (x[i] - mu[ci]) * isd[ci];
            rdx[i] = train ? gm[ci] * isd[ci] / M * (M * g - rdb[ci] - xh * rdg[ci]) : g * gm[ci] * isd[ci];
        }
    }
    if (zeros == 0 || zeros == tot) { printf("FAIL bn_act_bf16: the ReLU cut %zu of %zu %s\n", zeros, tot, tag); fails++; }
    check(nm("y vs f64"), wid(yb.data() + off, tot), ry, 5e-3); check(nm("dgamma vs f64"), dg2, rdg, 1e-5); check(nm("dbeta vs f64"), db2, rdb, 1e-5);
    check(nm("dx vs f64"), wid(dxb.data() + off, tot), rdx, 5e-3);
    if (resid) check(nm("dresidual vs f64"), wid(dmb.data() + off, tot), rdr, 0);
}

// Max pool and global average pool, bf16 next to f32 on the widened inputs. The max pool input
// is shuffled from 23 values, so windows hold ties (first maximum wins); buffers `off`
// elements into their allocation.
void test_pool_bf16(int n, int c, int H, int W, int k, int st, int p, int off, unsigned eb, unsigned et) {
    const int HO = (H + 2 * p - k) / st + 1, WO = (W + 2 * p - k) / st + 1;
    const size_t len = (size_t)n * c * H * W, ol = (size_t)n * c * HO * WO;
    std::vector<float> xs(len + off);
    for (size_t i = 0; i < xs.size(); ++i) xs[i] = (float)(i % 23) * 0.37f - 3;
    std::shuffle(xs.begin(), xs.end(), rng);
    vb xb = tob(xs), dyb = tob(randn(ol + off));
    auto xw = wid(xb), dyw = wid(dyb);
    std::vector<float> y32 = nanv(ol + off), dx32 = nanv(len + off);
    vb yb = nanb(ol + off), dxb = nanb(len + off);
    std::vector<int> a32(ol, -7), ab(ol, -7);
    launch({eb}, et, maxpool2d_fwd_f32, (const float*)xw.data() + off, y32.data() + off, a32.data(), (i64)n * c, H, W, HO, WO, k, st, p);
    launch({eb}, et, maxpool2d_fwd_bf16, (const bf16*)xb.data() + off, yb.data() + off, ab.data(), (i64)n * c, H, W, HO, WO, k, st, p);
    launch({eb + 1}, 32, maxpool2d_bwd_f32, (const float*)dyw.data() + off, (const int*)a32.data(), dx32.data() + off, (i64)n * c, H, W, HO, WO, k, st, p);
    launch({eb + 1}, 32, maxpool2d_bwd_bf16, (const bf16*)dyb.data() + off, (const int*)ab.data(), dxb.data() + off, (i64)n * c, H, W, HO, WO, k, st, p);
    char tag[96];
    snprintf(tag, sizeof tag, "(%d,%d,%d,%d) k=%d s=%d p=%d off=%d eb=%u et=%u", n, c, H, W, k, st, p, off, eb, et);
    auto nm = [&](const char* what) { static char b[160]; snprintf(b, sizeof b, "pool_bf16 %s %s", what, tag); return b; };
    const bool same_arg = a32 == ab;
    printf("%s %s\n", same_arg ? "ok  " : "FAIL", nm("argmax == f32 kernel's"));
    fails += !same_arg;
    bits_eq(nm("maxpool y"), yb.data() + off, y32.data() + off, ol);
    bits_eq(nm("maxpool dx"), dxb.data() + off, dx32.data() + off, len);
    guard16(nm("maxpool y"), yb, off); guard16(nm("maxpool dx"), dxb, off);
    const float* x = xw.data() + off;
    std::vector<double> ry(ol), rdx(len, 0);
    size_t ties = 0;
    for (int nc = 0; nc < n * c; ++nc)
        for (int oh = 0; oh < HO; ++oh)
            for (int ow = 0; ow < WO; ++ow) {
                double best = -INFINITY; int bi = -1;
                for (int a = 0; a < k; ++a) for (int b = 0; b < k; ++b) {
                    int h = oh * st - p + a, w = ow * st - p + b;
                    if (h < 0 || w < 0 || h >= H || w >= W) continue;
                    double v = x[(size_t)nc * H * W + h * W + w];
                    if (bi >= 0 && v == best) ties++;
                    if (bi < 0 || v > best) { best = v; bi = h * W + w; }
                }
                size_t o = ((size_t)nc * HO + oh) * WO + ow;
                ry[o] = best; rdx[(size_t)nc * H * W + bi] += dyw[o + off];
                if (ab[o] != bi) { printf("FAIL %s: argmax %zu = %d, want %d\n", nm("maxpool"), o, ab[o], bi); fails++; }
            }
    if (!ties) { printf("FAIL %s: no ties in any window\n", nm("maxpool")); fails++; }
    check(nm("maxpool y vs f64 (exact)"), wid(yb.data() + off, ol), ry, 0);
    check(nm("maxpool dx vs f64"), wid(dxb.data() + off, len), rdx, 5e-3);
    // global average pool over (n * c, H * W) planes
    const i64 NC = (i64)n * c, HW = (i64)H * W;
    vb gx = tob(randn(len + off)), gdy = tob(randn(NC + off));
    auto gxw = wid(gx), gdyw = wid(gdy);
    std::vector<float> gy32 = nanv(NC + off), gdx32 = nanv(len + off);
    vb gyb = nanb(NC + off), gdxb = nanb(len + off);
    launch({eb}, et, global_avgpool_fwd_f32, (const float*)gxw.data() + off, gy32.data() + off, NC, HW);
    launch({eb}, et, global_avgpool_fwd_bf16, (const bf16*)gx.data() + off, gyb.data() + off, NC, HW);
    launch({eb}, et, global_avgpool_bwd_f32, (const float*)gdyw.data() + off, gdx32.data() + off, NC, HW);
    launch({eb}, et, global_avgpool_bwd_bf16, (const bf16*)gdy.data() + off, gdxb.data() + off, NC, HW);
    bits_eq(nm("gap y"), gyb.data() + off, gy32.data() + off, NC);
    bits_eq(nm("gap dx"), gdxb.data() + off, gdx32.data() + off, len);
    guard16(nm("gap y"), gyb, off); guard16(nm("gap dx"), gdxb, off);
    std::vector<double> rgy(NC), rgdx(len);
    for (i64 q = 0; q < NC; ++q) {
        double s = 0;
        for (i64 j = 0; j < HW; ++j) { s += gxw[off + q * HW + j]; rgdx[q * HW + j] = gdyw[off + q] / (double)HW; }
        rgy[q] = s / HW;
    }
    check(nm("gap y vs f64"), wid(gyb.data() + off, NC), rgy, 5e-3);
    check(nm("gap dx vs f64"), wid(gdxb.data() + off, len), rgdx, 5e-3);
}

// Max pool ties and NaN in bf16 (the f32 case of test_misc): first maximum wins, a NaN wins
// and is stored as the same quiet NaN.
void test_pool_bf16_special() {
    vb px = tob({1, 5, 5, 5, 2, NAN, 3, 1}), py = {0x1234, 0x1234};
    std::vector<int> pa(2, -7);
    launch({1}, 32, maxpool2d_fwd_bf16, (const bf16*)px.data(), py.data(), pa.data(), (i64)2, 2, 2, 1, 1, 2, 2, 0);
    const bool ok = pa[0] == 1 && py[0] == 0x40a0 && py[1] == 0x7fc0 && pa[1] == 1;
    printf("%s maxpool_bf16 ties/NaN: arg %d %d, y %04x %04x\n", ok ? "ok  " : "FAIL", pa[0], pa[1], py[0], py[1]);
    fails += !ok;
}

// Driven by tests/gpu_kernels_sim.rs: reads u32 f32 bit patterns, runs cast_f32_bf16 then
// cast_bf16_f32 on them (as the launcher would: a grid-stride grid smaller than n), writes the
// u16 results and then the u32 widened results; the Rust side compares them with round_bf16.
int run_bf16_round(const char* in_path, const char* out_path) {
    std::ifstream in(in_path, std::ios::binary | std::ios::ate);
    const size_t n = (size_t)in.tellg() / 4;
    in.seekg(0);
    std::vector<float> x(n);
    in.read((char*)x.data(), 4 * n);
    if (!in) { printf("FAIL bf16round: cannot read %s\n", in_path); return 1; }
    vb y = nanb(n);
    std::vector<float> w = nanv(n);
    launch({3}, 64, cast_f32_bf16, (const float*)x.data(), y.data(), (i64)n);
    launch({2}, 96, cast_bf16_f32, (const bf16*)y.data(), w.data(), (i64)n);
    std::ofstream o(out_path, std::ios::binary);
    o.write((const char*)y.data(), 2 * n);
    o.write((const char*)w.data(), 4 * n);
    if (!o) { printf("FAIL bf16round: cannot write %s\n", out_path); return 1; }
    printf("bf16round: %zu values written\n", n);
    return 0;
}

void test_bf16_all() {
    test_bf16_round();
    test_elementwise_bf16(1003, 2, 64, 0);
    test_elementwise_bf16(64, 1, 32, 0);
    test_elementwise_bf16(517, 5, 96, 4);
    test_elementwise_bf16(1003, 3, 32, 1);
    test_elementwise_bf16(66, 2, 64, 2);
    test_elementwise_bf16(7, 1, 32, 0);
    // As test_bn: S = 1 and uneven multi-block slices (cutting planes, empty trailing ones, more
    // slices than the finalize threads), HW = 1, HW % 4 == 0 at off 0 and 4 (vector path; off 4
    // = 8 bytes: bf16-aligned only) and off 1, 2 (2- and 4-byte misaligned: scalar path), odd HW,
    // the unrolled walk, a large mean.
    test_bn_bf16(3, 5, 7, 64, 1);
    test_bn_bf16(6, 10, 1, 32, 4, 2, 32);
    test_bn_bf16(3, 2, 3, 32, 6, 1, 32, 1);
    test_bn_bf16(5, 3, 16, 64, 3, 2, 64);
    test_bn_bf16(5, 3, 16, 64, 3, 2, 64, 1);
    test_bn_bf16(5, 3, 16, 64, 3, 3, 32, 2);
    test_bn_bf16(2, 7, 12, 32, 5, 3, 32, 4);
    test_bn_bf16(4, 6, 20, 64, 9, 2, 96, 0, 100.0f);
    test_bn_bf16(3, 2, 150, 32, 2, 2, 32, 1);
    test_bn_bf16(2, 2, 152, 32, 70, 3, 32, 4, 20.0f);
    test_bn_eval_dx_bf16(3, 4, 5, 2, 32, 0);
    test_bn_eval_dx_bf16(3, 5, 8, 2, 32, 0);
    test_bn_eval_dx_bf16(3, 5, 8, 1, 64, 1);
    test_bn_eval_dx_bf16(3, 5, 8, 3, 32, 4);
    test_bn_eval_dx_bf16(2, 3, 12, 2, 32, 2);
    for (bool train : {true, false})
        for (bool resid : {false, true}) {
            test_bn_act_bf16(3, 5, 7, 64, 1, train, resid);
            test_bn_act_bf16(6, 10, 1, 32, 4, train, resid, 2, 32, 1);
            test_bn_act_bf16(5, 3, 16, 64, 3, train, resid, 2, 64);
            test_bn_act_bf16(5, 3, 16, 64, 3, train, resid, 2, 64, 1);
            test_bn_act_bf16(5, 3, 16, 64, 3, train, resid, 3, 32, 4);
            test_bn_act_bf16(3, 2, 150, 32, 7, train, resid, 2, 32, 2);
            test_bn_act_bf16(2, 2, 152, 32, 70, train, resid, 3, 32);
        }
    test_pool_bf16(2, 3, 11, 9, 3, 2, 1, 0, 2, 64);
    test_pool_bf16(3, 2, 8, 7, 2, 2, 0, 1, 1, 32);
    test_pool_bf16(1, 5, 7, 7, 3, 1, 1, 3, 3, 96);
    test_pool_bf16_special();
}

// ---------------------------------------------------------------- NHWC (channels-last)
// The `*_nhwc_*` kernels and the layout conversions, for both storage types (T = float: the
// `_f32` instantiation on f32 data; T = bf16: `_bf16` on bf16 data, whose f32 reference data
// are the widened values). Each NHWC kernel runs next to its NCHW twin on the same values
// (NHWC = the NCHW buffer transposed per image): elementwise results and max pool must be
// bit-identical after transposing back; reductions differ only in summation order, so their
// partials and finalized statistics must agree to 1e-6 relative to the largest value, and to a
// double-precision reference to the f32 tests' tolerances. Outputs start as NaN (0x7fc0 for
// bf16): an unwritten element fails.
#include <type_traits>

// Picks the `_f32` or `_bf16` instantiation of kernel `name` for the test's storage type T.
#define KT(name) [] { if constexpr (std::is_same_v<T, float>) return name##_f32; else return name##_bf16; }()

// (N, C, HW) NCHW -> (N, HW, C) NHWC and back.
template <class V>
V to_nhwc(const V& v, int N, int C, size_t HW) {
    V r(v.size());
    for (int n = 0; n < N; ++n) for (int c = 0; c < C; ++c) for (size_t h = 0; h < HW; ++h)
        r[((size_t)n * HW + h) * C + c] = v[((size_t)n * C + c) * HW + h];
    return r;
}
template <class V>
V to_nchw(const V& v, int N, int C, size_t HW) {
    V r(v.size());
    for (int n = 0; n < N; ++n) for (int c = 0; c < C; ++c) for (size_t h = 0; h < HW; ++h)
        r[((size_t)n * C + c) * HW + h] = v[((size_t)n * HW + h) * C + c];
    return r;
}
// Storage-type helpers: random values stored as T (bf16: rounded), T -> f32, NaN-filled T.
template <class T> std::vector<T> store(const std::vector<float>& v) { if constexpr (std::is_same_v<T, float>) return v; else return tob(v); }
template <class T> std::vector<float> widen(const std::vector<T>& v) { if constexpr (std::is_same_v<T, float>) return v; else return wid(v); }
template <class T> std::vector<T> nant(size_t n) { if constexpr (std::is_same_v<T, float>) return nanv(n); else return nanb(n); }
template <class T> const char* tname() { return std::is_same_v<T, float> ? "f32" : "bf16"; }
// Bitwise equality of two buffers of the same type.
template <class T>
void same_bits(const char* name, const std::vector<T>& got, const std::vector<T>& want) {
    size_t bad = 0, at = 0;
    for (size_t i = 0; i < want.size(); ++i)
        if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) { if (!bad) at = i; bad++; }
    if (bad || got.size() != want.size()) { printf("FAIL %s: %zu of %zu differ (first at %zu)\n", name, bad, want.size(), at); fails++; }
    else printf("ok   %s: %zu bit-identical\n", name, want.size());
}
std::vector<double> dbl(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
// The host's channels-last reduction geometry (src/device/cuda/ops.rs bn_nhwc_reduce_cfg): G
// groups of 4 channels when C % 4 == 0 (the test buffers are aligned), else of 1; blocks of
// (tx, 256 / tx) with tx = min(32, G rounded up to a power of two); (ceil(G / tx), S) blocks.
int nhwc_groups(int C) { return C % 4 == 0 ? C / 4 : C; }
unsigned nhwc_tx(int C) { unsigned t = 1; while (t < (unsigned)nhwc_groups(C) && t < 32) t <<= 1; return t; }
dim3s nhwc_grid(int C, unsigned S) { return {(nhwc_groups(C) + nhwc_tx(C) - 1) / nhwc_tx(C), S, 1}; }
dim3s nhwc_block(int C) { return {nhwc_tx(C), 256 / nhwc_tx(C), 1}; }
const dim3s NHWC_BLOCK = {32, 8, 1};  // the layout transposes' block (kernels/elementwise.cu)

// The NHWC per-channel reductions (statistics, BN backward, fused BN + ReLU backward) against the
// NCHW kernels on the same values, then f64. R = n * hw rows, S slices, NCHW blocks of `threads`.
template <class T>
void test_bn_nhwc(int n, int c, int hw, unsigned S, unsigned threads = 32) {
    const int R = n * hw;
    const size_t tot = (size_t)R * c;
    auto xr = randn(tot, 2), dyr = randn(tot), yr = randn(tot);
    for (auto& v : xr) v += 0.5f;
    for (auto& v : yr) v = std::max(v, 0.0f);  // a ReLU output: about half zeros
    auto xT = store<T>(xr), dyT = store<T>(dyr), yT = store<T>(yr);
    auto xN = to_nhwc(xT, n, c, hw), dyN = to_nhwc(dyT, n, c, hw), yN = to_nhwc(yT, n, c, hw);
    const auto x = widen(xT), dy = widen(dyT), y = widen(yT);  // NCHW f32 values
    const float eps = 1e-5f;
    const size_t cs = (size_t)c * S;
    char tag[96];
    snprintf(tag, sizeof tag, "%s (n=%d,c=%d,hw=%d) R=%d S=%u", tname<T>(), n, c, hw, R, S);
    auto nm = [&](const char* what) { static char b[192]; snprintf(b, sizeof b, "bn_nhwc %s %s", what, tag); return b; };
    // statistics: NCHW
    std::vector<float> ps = nanv(cs), pq = nanv(cs), mean = nanv(c), is = nanv(c), vu = nanv(c);
    launch({(unsigned)c, S}, threads, KT(bn_sum_partial), (const T*)xT.data(), ps.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c, S}, threads, KT(bn_sqdev_partial), (const T*)xT.data(), (const float*)ps.data(), pq.data(), (i64)n, c, (i64)hw);
    launch({(unsigned)c}, 32, bn_stats_finalize_f32, (const float*)ps.data(), (const float*)pq.data(), mean.data(), is.data(), vu.data(), (i64)n, (i64)hw, (int)S, eps);
    // statistics: NHWC, finalized as (N = R, HW = 1)
    std::vector<float> ps2 = nanv(cs), pq2 = nanv(cs), mean2 = nanv(c), is2 = nanv(c), vu2 = nanv(c);
    launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_sum_partial_nhwc), (const T*)xN.data(), ps2.data(), (i64)R, c);
    launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_sqdev_partial_nhwc), (const T*)xN.data(), (const float*)ps2.data(), pq2.data(), (i64)R, c);
    launch({(unsigned)c}, 32, bn_stats_finalize_f32, (const float*)ps2.data(), (const float*)pq2.data(), mean2.data(), is2.data(), vu2.data(), (i64)R, (i64)1, (int)S, eps);
    check(nm("part_sum vs NCHW"), ps2, dbl(ps), 1e-6); check(nm("part_sq vs NCHW"), pq2, dbl(pq), 1e-6);
    check(nm("mean vs NCHW"), mean2, dbl(mean), 1e-6); check(nm("invstd vs NCHW"), is2, dbl(is), 1e-6); check(nm("var_u vs NCHW"), vu2, dbl(vu), 1e-6);
    // statistics: NHWC in one pass (shifted sums), against the two-pass NCHW ones and below f64
    std::vector<float> ps1 = nanv(cs), pq1 = nanv(cs), sh1 = nanv(c), mean1 = nanv(c), is1 = nanv(c), vu1 = nanv(c);
    launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_stats_partial_nhwc), (const T*)xN.data(), ps1.data(), pq1.data(), sh1.data(), (i64)R, c);
    launch({(unsigned)c}, 32, bn_stats_finalize_shifted_f32, (const float*)ps1.data(), (const float*)pq1.data(), (const float*)sh1.data(), mean1.data(), is1.data(), vu1.data(), (i64)R, (int)S, eps);
    check(nm("one-pass mean vs NCHW"), mean1, dbl(mean), 1e-6); check(nm("one-pass invstd vs NCHW"), is1, dbl(is), 1e-5); check(nm("one-pass var_u vs NCHW"), vu1, dbl(vu), 1e-5);
    if constexpr (!std::is_same_v<T, float>) {
        // the f32 instantiation on the widened values: the same partials and shift bit for bit
        const auto xw1 = widen(xN);
        std::vector<float> g1 = nanv(cs), g2 = nanv(cs), g3 = nanv(c);
        launch(nhwc_grid(c, S), nhwc_block(c), bn_stats_partial_nhwc_f32, (const float*)xw1.data(), g1.data(), g2.data(), g3.data(), (i64)R, c);
        same_f32(nm("one-pass part_sum == f32 kernel's"), ps1.data(), g1.data(), cs); same_f32(nm("one-pass part_sq == f32 kernel's"), pq1.data(), g2.data(), cs);
        same_f32(nm("one-pass shift == f32 kernel's"), sh1.data(), g3.data(), c);
    }
    // backward partials, both layouts on the NCHW kernels' statistics
    std::vector<float> pg = nanv(cs), pb = nanv(cs), dg = nanv(c), db = nanv(c), pg2 = nanv(cs), pb2 = nanv(cs), dg2 = nanv(c), db2 = nanv(c);
    launch({(unsigned)c, S}, threads, KT(bn_backward_partial), (const T*)dyT.data(), (const T*)xT.data(), (const float*)mean.data(), (const float*)is.data(), pg.data(), pb.data(), (i64)n, c, (i64)hw);
    launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_backward_partial_nhwc), (const T*)dyN.data(), (const T*)xN.data(), (const float*)mean.data(), (const float*)is.data(), pg2.data(), pb2.data(), (i64)R, c);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg.data(), (const float*)pb.data(), dg.data(), db.data(), (int)S);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg2.data(), (const float*)pb2.data(), dg2.data(), db2.data(), (int)S);
    check(nm("part_g vs NCHW"), pg2, dbl(pg), 1e-6); check(nm("part_b vs NCHW"), pb2, dbl(pb), 1e-6);
    check(nm("dgamma vs NCHW"), dg2, dbl(dg), 1e-6); check(nm("dbeta vs NCHW"), db2, dbl(db), 1e-6);
    // fused BN + ReLU backward partials, with dmasked and without (null)
    std::vector<float> ag = nanv(cs), ab = nanv(cs), ag2 = nanv(cs), ab2 = nanv(cs), ag3 = nanv(cs), ab3 = nanv(cs), adg2 = nanv(c), adb2 = nanv(c);
    auto dm = nant<T>(tot), dmN = nant<T>(tot);
    launch({(unsigned)c, S}, threads, KT(bn_act_backward_partial), (const T*)dyT.data(), (const T*)yT.data(), (const T*)xT.data(), (const float*)mean.data(), (const float*)is.data(), ag.data(), ab.data(), dm.data(), (i64)n, c, (i64)hw);
    launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_act_backward_partial_nhwc), (const T*)dyN.data(), (const T*)yN.data(), (const T*)xN.data(), (const float*)mean.data(), (const float*)is.data(), ag2.data(), ab2.data(), dmN.data(), (i64)R, c);
    launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_act_backward_partial_nhwc), (const T*)dyN.data(), (const T*)yN.data(), (const T*)xN.data(), (const float*)mean.data(), (const float*)is.data(), ag3.data(), ab3.data(), (T*)nullptr, (i64)R, c);
    launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)ag2.data(), (const float*)ab2.data(), adg2.data(), adb2.data(), (int)S);
    check(nm("act part_g vs NCHW"), ag2, dbl(ag), 1e-6); check(nm("act part_b vs NCHW"), ab2, dbl(ab), 1e-6);
    same_bits(nm("act dmasked == NCHW's transposed"), to_nchw(dmN, n, c, hw), dm);
    same_f32(nm("act partials with dmasked null == with dmasked"), ag3.data(), ag2.data(), cs);
    same_f32(nm("act part_b with dmasked null"), ab3.data(), ab2.data(), cs);
    if constexpr (!std::is_same_v<T, float>) {
        // the f32 instantiation on the widened NHWC values: the same partials bit for bit
        const auto xw = widen(xN), dyw = widen(dyN), yw = widen(yN);
        std::vector<float> f1 = nanv(cs), f2 = nanv(cs), f3 = nanv(cs), f4 = nanv(cs), f5 = nanv(cs), f6 = nanv(cs);
        launch(nhwc_grid(c, S), nhwc_block(c), bn_sum_partial_nhwc_f32, (const float*)xw.data(), f1.data(), (i64)R, c);
        launch(nhwc_grid(c, S), nhwc_block(c), bn_sqdev_partial_nhwc_f32, (const float*)xw.data(), (const float*)ps2.data(), f2.data(), (i64)R, c);
        launch(nhwc_grid(c, S), nhwc_block(c), bn_backward_partial_nhwc_f32, (const float*)dyw.data(), (const float*)xw.data(), (const float*)mean.data(), (const float*)is.data(), f3.data(), f4.data(), (i64)R, c);
        launch(nhwc_grid(c, S), nhwc_block(c), bn_act_backward_partial_nhwc_f32, (const float*)dyw.data(), (const float*)yw.data(), (const float*)xw.data(), (const float*)mean.data(), (const float*)is.data(), f5.data(), f6.data(), (float*)nullptr, (i64)R, c);
        same_f32(nm("part_sum == f32 kernel's"), ps2.data(), f1.data(), cs); same_f32(nm("part_sq == f32 kernel's"), pq2.data(), f2.data(), cs);
        same_f32(nm("part_g == f32 kernel's"), pg2.data(), f3.data(), cs); same_f32(nm("part_b == f32 kernel's"), pb2.data(), f4.data(), cs);
        same_f32(nm("act part_g == f32 kernel's"), ag2.data(), f5.data(), cs); same_f32(nm("act part_b == f32 kernel's"), ab2.data(), f6.data(), cs);
    }
    // f64 reference (NCHW indexing of the f32 values)
    std::vector<double> rm(c), ris(c), rvu(c), rdg(c, 0), rdb(c, 0), radg(c, 0), radb(c, 0);
    const double M = R;
    size_t zeros = 0;
    for (int ci = 0; ci < c; ++ci) {
        double s = 0, s2 = 0;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) s += x[((size_t)a * c + ci) * hw + h];
        const double mu = s / M;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) { double d = x[((size_t)a * c + ci) * hw + h] - mu; s2 += d * d; }
        rm[ci] = mu; ris[ci] = 1 / std::sqrt(s2 / M + eps); rvu[ci] = M > 1 ? s2 / (M - 1) : s2 / M;
        for (int a = 0; a < n; ++a) for (int h = 0; h < hw; ++h) {
            const size_t i = ((size_t)a * c + ci) * hw + h;
            const double xh = (x[i] - (double)mean[ci]) * is[ci];
            rdb[ci] += dy[i]; rdg[ci] += dy[i] * xh;
            const double g = y[i] > 0 ? dy[i] : 0.0;
            zeros += y[i] == 0;
            radb[ci] += g; radg[ci] += g * xh;
        }
    }
    if (zeros == 0 || zeros == tot) { printf("FAIL %s: the mask cut %zu of %zu\n", nm("act"), zeros, tot); fails++; }
    check(nm("mean vs f64"), mean2, rm, 1e-5); check(nm("invstd vs f64"), is2, ris, 1e-5); check(nm("var_u vs f64"), vu2, rvu, 1e-5);
    check(nm("one-pass mean vs f64"), mean1, rm, 1e-5); check(nm("one-pass invstd vs f64"), is1, ris, 1e-5); check(nm("one-pass var_u vs f64"), vu1, rvu, 1e-5);
    check(nm("dgamma vs f64"), dg2, rdg, 1e-5); check(nm("dbeta vs f64"), db2, rdb, 1e-5);
    check(nm("act dgamma vs f64"), adg2, radg, 1e-5); check(nm("act dbeta vs f64"), adb2, radb, 1e-5);
}

// The elementwise BN kernels on NHWC data launched as (N = R, C, HW = 1) == the same kernels on
// the NCHW data (N, C, HW), element by element after transposing back. Grid eb x et.
// `offn` shifts every NHWC buffer by that many elements from an aligned start: with c % 4 == 0,
// offn = 0 takes the kernels' 4-channel path for HW == 1, offn = 1 their one-element path.
template <class T>
void test_bn_elem_nhwc(int n, int c, int hw, unsigned eb, unsigned et, int offn = 0) {
    const int R = n * hw;
    const size_t tot = (size_t)R * c;
    auto yr = randn(tot);
    for (auto& v : yr) v = std::max(v, 0.0f);
    auto xT = store<T>(randn(tot, 2)), dyT = store<T>(randn(tot)), rT = store<T>(randn(tot)), yT = store<T>(yr);
    // The NHWC buffers live `offn` elements into their allocations (a view: .data() is moved).
    struct Shifted {
        std::vector<T> v;
        int off;
        T* data() { return v.data() + off; }
        const T* data() const { return v.data() + off; }
    };
    auto shift = [&](const std::vector<T>& a) { Shifted r{nant<T>(a.size() + offn), offn}; std::copy(a.begin(), a.end(), r.v.begin() + offn); return r; };
    auto unshift = [&](const Shifted& a) { return std::vector<T>(a.v.begin() + a.off, a.v.end()); };
    auto xN = shift(to_nhwc(xT, n, c, hw)), dyN = shift(to_nhwc(dyT, n, c, hw)), rN = shift(to_nhwc(rT, n, c, hw)), yN = shift(to_nhwc(yT, n, c, hw));
    auto mean = randn(c), is = randn(c), gm = randn(c), bt = randn(c), dg = randn(c, 3), db = randn(c, 3);
    for (auto& v : is) v = 0.2f + std::fabs(v);
    const float *mf = mean.data(), *sf = is.data(), *gf = gm.data(), *bf = bt.data(), *dgf = dg.data(), *dbf = db.data();
    char tag[112];
    snprintf(tag, sizeof tag, "%s (n=%d,c=%d,hw=%d) as (R=%d,c,1) eb=%u et=%u offn=%d", tname<T>(), n, c, hw, R, eb, et, offn);
    auto nm = [&](const char* what) { static char b[192]; snprintf(b, sizeof b, "bn_elem_nhwc %s %s", what, tag); return b; };
    auto cmp = [&](const char* what, const Shifted& outN, const std::vector<T>& out) {
        same_bits(nm(what), to_nchw(unshift(outN), n, c, hw), out);
        for (int i = 0; i < offn; ++i) if (std::memcmp(&outN.v[i], &nant<T>(1)[0], sizeof(T)) != 0) { printf("FAIL %s: wrote before the start\n", nm(what)); fails++; break; }
    };
    std::vector<T> a = nant<T>(tot);
    Shifted b = shift(nant<T>(tot));
    launch({eb}, et, KT(bn_forward), (const T*)xT.data(), mf, sf, gf, bf, a.data(), (i64)n, c, (i64)hw);
    launch({eb}, et, KT(bn_forward), (const T*)xN.data(), mf, sf, gf, bf, b.data(), (i64)R, c, (i64)1);
    cmp("bn_forward", b, a);
    for (bool resid : {false, true}) {
        a = nant<T>(tot); b = shift(nant<T>(tot));
        launch({eb}, et, KT(bn_act_forward), (const T*)xT.data(), resid ? (const T*)rT.data() : (const T*)nullptr, mf, sf, gf, bf, a.data(), (i64)n, c, (i64)hw);
        launch({eb}, et, KT(bn_act_forward), (const T*)xN.data(), resid ? (const T*)rN.data() : (const T*)nullptr, mf, sf, gf, bf, b.data(), (i64)R, c, (i64)1);
        cmp(resid ? "bn_act_forward +res" : "bn_act_forward", b, a);
    }
    a = nant<T>(tot); b = shift(nant<T>(tot));
    launch({eb}, et, KT(bn_backward_dx), (const T*)dyT.data(), (const T*)xT.data(), mf, sf, gf, dgf, dbf, a.data(), (i64)n, c, (i64)hw);
    launch({eb}, et, KT(bn_backward_dx), (const T*)dyN.data(), (const T*)xN.data(), mf, sf, gf, dgf, dbf, b.data(), (i64)R, c, (i64)1);
    cmp("bn_backward_dx", b, a);
    // bn_eval_backward_dx_T's 4-wide NCHW path (hw % 4 == 0, aligned) computes dy * (gamma *
    // invstd), its one-element path (dy * gamma) * invstd: they may differ in the last bit. HW = 1
    // takes the one-element path, so the NHWC result is compared bit for bit with the NCHW
    // kernel forced onto that path (buffers one element off alignment), and with the aligned NCHW
    // run to 1e-6 relative.
    a = nant<T>(tot); b = shift(nant<T>(tot));
    auto dy1 = nant<T>(tot + 1), a1 = nant<T>(tot + 1);
    std::copy(dyT.begin(), dyT.end(), dy1.begin() + 1);
    launch({eb}, et, KT(bn_eval_backward_dx), (const T*)dyT.data(), sf, gf, a.data(), (i64)n, c, (i64)hw);
    launch({eb}, et, KT(bn_eval_backward_dx), (const T*)dy1.data() + 1, sf, gf, a1.data() + 1, (i64)n, c, (i64)hw);
    launch({eb}, et, KT(bn_eval_backward_dx), (const T*)dyN.data(), sf, gf, b.data(), (i64)R, c, (i64)1);
    cmp("bn_eval_backward_dx (== NCHW one-element path)", b, std::vector<T>(a1.begin() + 1, a1.end()));
    check(nm("bn_eval_backward_dx vs NCHW aligned"), widen(to_nchw(unshift(b), n, c, hw)), dbl(widen(a)), std::is_same_v<T, float> ? 1e-6 : 5e-3);
    for (int train : {0, 1})
        for (bool masked : {false, true}) {  // masked: dy is already dy' (y = null)
            a = nant<T>(tot); b = shift(nant<T>(tot));
            launch({eb}, et, KT(bn_act_backward_dx), (const T*)dyT.data(), masked ? (const T*)nullptr : (const T*)yT.data(), (const T*)xT.data(), mf, sf, gf, dgf, dbf, a.data(), (i64)n, c, (i64)hw, train);
            launch({eb}, et, KT(bn_act_backward_dx), (const T*)dyN.data(), masked ? (const T*)nullptr : (const T*)yN.data(), (const T*)xN.data(), mf, sf, gf, dgf, dbf, b.data(), (i64)R, c, (i64)1, train);
            char what[64];
            snprintf(what, sizeof what, "bn_act_backward_dx %s%s", train ? "train" : "eval", masked ? " y=null" : "");
            cmp(what, b, a);
        }
    // the NHWC forward against f64 too (so a bug shared by both layouts fails)
    std::vector<double> ry(tot);
    const auto xw = widen(unshift(xN));
    for (size_t i = 0; i < tot; ++i) { const int ci = (int)(i % c); ry[i] = ((double)xw[i] - mean[ci]) * is[ci] * gm[ci] + bt[ci]; }
    launch({eb}, et, KT(bn_forward), (const T*)xN.data(), mf, sf, gf, bf, b.data(), (i64)R, c, (i64)1);
    check(nm("bn_forward NHWC vs f64"), widen(unshift(b)), ry, std::is_same_v<T, float> ? 1e-5 : 5e-3);
}

// NHWC max pool and global average pool against the NCHW kernels on the same values. The max
// pool input comes from 23 values (ties in the windows) with one NaN; grid eb x et.
template <class T>
void test_pool_nhwc(int n, int c, int H, int W, int k, int st, int p, unsigned eb, unsigned et) {
    const int HO = (H + 2 * p - k) / st + 1, WO = (W + 2 * p - k) / st + 1;
    const size_t len = (size_t)n * c * H * W, ol = (size_t)n * c * HO * WO;
    std::vector<float> xr(len);
    for (size_t i = 0; i < len; ++i) xr[i] = (float)(i % 23) * 0.37f - 3;
    std::shuffle(xr.begin(), xr.end(), rng);
    xr[len / 2] = NAN;
    auto xT = store<T>(xr), dyT = store<T>(randn(ol));
    auto xN = to_nhwc(xT, n, c, (size_t)H * W), dyN = to_nhwc(dyT, n, c, (size_t)HO * WO);
    char tag[112];
    snprintf(tag, sizeof tag, "%s (%d,%d,%d,%d) k=%d s=%d p=%d eb=%u et=%u", tname<T>(), n, c, H, W, k, st, p, eb, et);
    auto nm = [&](const char* what) { static char b[192]; snprintf(b, sizeof b, "pool_nhwc %s %s", what, tag); return b; };
    auto y = nant<T>(ol), yN = nant<T>(ol), dx = nant<T>(len), dxN = nant<T>(len);
    std::vector<int> a(ol, -7), aN(ol, -7);
    launch({eb}, et, KT(maxpool2d_fwd), (const T*)xT.data(), y.data(), a.data(), (i64)n * c, H, W, HO, WO, k, st, p);
    launch({eb}, et, KT(maxpool2d_fwd_nhwc), (const T*)xN.data(), yN.data(), aN.data(), (i64)n, c, H, W, HO, WO, k, st, p);
    // the backward on the NHWC kernel's own argmax (checked equal to the NCHW one)
    launch({eb + 1}, et, KT(maxpool2d_bwd), (const T*)dyT.data(), (const int*)a.data(), dx.data(), (i64)n * c, H, W, HO, WO, k, st, p);
    launch({eb + 1}, et, KT(maxpool2d_bwd_nhwc), (const T*)dyN.data(), (const int*)aN.data(), dxN.data(), (i64)n, c, H, W, HO, WO, k, st, p);
    same_bits(nm("maxpool y"), to_nchw(yN, n, c, (size_t)HO * WO), y);
    same_bits(nm("maxpool argmax"), to_nchw(aN, n, c, (size_t)HO * WO), a);
    same_bits(nm("maxpool dx"), to_nchw(dxN, n, c, (size_t)H * W), dx);
    size_t nans = 0;
    for (auto v : widen(y)) nans += std::isnan(v);
    if (nans == 0) { printf("FAIL %s: the NaN reached no output\n", nm("maxpool")); fails++; }
    // f64 reference of the max pool (windows holding the NaN skipped) and of its backward, so a
    // bug shared by both layouts fails.
    const auto xw = widen(xT), yw = widen(y), dyw = widen(dyT);
    std::vector<double> rdx(len, 0.0);  // dy scattered to the argmax (checked against bi)
    size_t bad = 0;
    for (int q = 0; q < n * c; ++q)
        for (int oh = 0; oh < HO; ++oh) for (int ow = 0; ow < WO; ++ow) {
            double best = -INFINITY; int bi = -1; bool has_nan = false;
            for (int u = 0; u < k; ++u) for (int v = 0; v < k; ++v) {
                const int h = oh * st - p + u, w = ow * st - p + v;
                if (h < 0 || w < 0 || h >= H || w >= W) continue;
                const double xv = xw[(size_t)q * H * W + h * W + w];
                has_nan |= std::isnan(xv);
                if (bi < 0 || xv > best) { best = xv; bi = h * W + w; }
            }
            const size_t o = ((size_t)q * HO + oh) * WO + ow;
            if (!has_nan && (yw[o] != best || a[o] != bi)) bad++;
            if (a[o] >= 0) rdx[(size_t)q * H * W + a[o]] += dyw[o];
        }
    printf("%s %s\n", bad ? "FAIL" : "ok  ", nm("maxpool vs f64 reference (first max wins)"));
    fails += bad != 0;
    check(nm("maxpool dx vs f64"), widen(to_nchw(dxN, n, c, (size_t)H * W)), rdx, std::is_same_v<T, float> ? 1e-6 : 5e-3);
    // global average pool over (n, c, H * W)
    const i64 HW = (i64)H * W, NC = (i64)n * c;
    auto gT = store<T>(randn(len)), gdT = store<T>(randn(NC));
    auto gN = to_nhwc(gT, n, c, HW);
    auto gy = nant<T>(NC), gyN = nant<T>(NC), gdx = nant<T>(len), gdxN = nant<T>(len);
    launch({eb}, et, KT(global_avgpool_fwd), (const T*)gT.data(), gy.data(), NC, HW);
    launch({eb}, et, KT(global_avgpool_fwd_nhwc), (const T*)gN.data(), gyN.data(), (i64)n, c, HW);
    launch({eb}, et, KT(global_avgpool_bwd), (const T*)gdT.data(), gdx.data(), NC, HW);
    launch({eb}, et, KT(global_avgpool_bwd_nhwc), (const T*)gdT.data(), gdxN.data(), (i64)n, c, HW);
    same_bits(nm("gap dx"), to_nchw(gdxN, n, c, HW), gdx);
    const auto gw = widen(gT);
    std::vector<double> rgy(NC);
    for (i64 q = 0; q < NC; ++q) { double s = 0; for (i64 j = 0; j < HW; ++j) s += gw[q * HW + j]; rgy[q] = s / HW; }
    if constexpr (std::is_same_v<T, float>) {
        check(nm("gap y vs NCHW"), gyN, dbl(gy), 1e-6);
        check(nm("gap y vs f64"), gyN, rgy, 1e-6);
    } else {
        // bf16: round_bf16 of the f32 NHWC kernel on the widened values, bit for bit (the f32
        // NHWC sum and the NCHW one may differ in their last bit, which can flip a rounding)
        const auto gNw = widen(gN);
        std::vector<float> f = nanv(NC);
        launch({eb}, et, global_avgpool_fwd_nhwc_f32, (const float*)gNw.data(), f.data(), (i64)n, c, HW);
        bits_eq(nm("gap y == round_bf16(f32 NHWC kernel)"), gyN.data(), f.data(), NC);
        check(nm("gap y vs NCHW"), widen(gyN), dbl(widen(gy)), 5e-3);
        check(nm("gap y vs f64"), widen(gyN), rgy, 5e-3);
    }
}

// The layout conversions against a C++ transposition and ref_bf16, bit for bit, on the launch
// geometry the kernels state (block (32, 8), grid (ceil(HW / 32), ceil(C / 32), gz), gz <= N).
// f32 inputs include NaN (with payload), infinities, -0, rounding ties and subnormals; bf16
// inputs are random bit patterns (NaNs with payloads included: copied, not quieted).
// gz: the tile grid's z size; grid1d > 0: a 1-d grid of that many 256-thread blocks instead
// (the host's geometry for C <= 8, the per-pixel path; fewer blocks than pixels: it wraps).
void test_convert_nhwc(int n, int c, int hw, unsigned gz, unsigned grid1d = 0) {
    const size_t tot = (size_t)n * c * hw;
    auto x = randn(tot, 3);
    const unsigned sp[] = {0x7fa12345u, 0xff800001u, 0x7f800000u, 0xff800000u, 0x80000000u, 0x3f808000u, 0x3f818000u, 0x00018000u, 0x7f7fffffu, 0x00000001u};
    for (size_t j = 0; j < sizeof sp / sizeof sp[0] && j < tot; ++j) x[(j * 7919) % tot] = __uint_as_float(sp[j]);
    std::uniform_int_distribution<unsigned> bits;
    vb xb(tot);
    for (auto& v : xb) v = (bf16)bits(rng);
    const dim3s g = grid1d ? dim3s{grid1d, 1, 1} : dim3s{(unsigned)((hw + 31) / 32), (unsigned)((c + 31) / 32), gz};
    const dim3s blk = grid1d ? dim3s{256, 1, 1} : NHWC_BLOCK;
    char tag[64];
    snprintf(tag, sizeof tag, "(n=%d,c=%d,hw=%d) gz=%u grid1d=%u", n, c, hw, gz, grid1d);
    auto nm = [&](const char* what) { static char b[160]; snprintf(b, sizeof b, "%s %s", what, tag); return b; };
    // f32 NCHW -> bf16 NHWC
    vb y = nanb(tot);
    launch(g, blk, nchw_to_nhwc_f32_bf16, (const float*)x.data(), y.data(), (i64)n, c, (i64)hw);
    same_bits(nm("nchw_to_nhwc_f32_bf16"), y, to_nhwc(tob(x), n, c, hw));
    // bf16 NCHW -> bf16 NHWC, and back
    vb yb = nanb(tot), back = nanb(tot);
    launch(g, blk, nchw_to_nhwc_bf16_bf16, (const bf16*)xb.data(), yb.data(), (i64)n, c, (i64)hw);
    same_bits(nm("nchw_to_nhwc_bf16_bf16"), yb, to_nhwc(xb, n, c, hw));
    // NHWC inputs: the bf16 pattern buffer read as (n, hw, c)
    launch(g, blk, nhwc_to_nchw_bf16_bf16, (const bf16*)xb.data(), back.data(), (i64)n, c, (i64)hw);
    same_bits(nm("nhwc_to_nchw_bf16_bf16"), back, to_nchw(xb, n, c, hw));
    std::vector<float> yf = nanv(tot);
    launch(g, blk, nhwc_to_nchw_bf16_f32, (const bf16*)xb.data(), yf.data(), (i64)n, c, (i64)hw);
    same_bits(nm("nhwc_to_nchw_bf16_f32"), yf, to_nchw(wid(xb), n, c, hw));
    // round trip
    launch(g, blk, nhwc_to_nchw_bf16_bf16, (const bf16*)yb.data(), back.data(), (i64)n, c, (i64)hw);
    same_bits(nm("nchw -> nhwc -> nchw (bf16)"), back, xb);
}

// The one-pass NHWC statistics where E[x^2] - E[x]^2 would fail: a mean far from 0 next to a
// small spread (f32: 1000 + N(0, 0.01^2), bf16: 50 + N(0, 1): bf16's spacing at 50 is 0.25), a
// constant channel (variance 0, not negative), against f64 on the stored values.
template <class T>
void test_bn_stats_onepass_offset(int n, int c, int hw, unsigned S) {
    const bool f = std::is_same_v<T, float>;
    const int R = n * hw;
    const size_t tot = (size_t)R * c;
    auto xr = randn(tot, f ? 0.01f : 1.0f);
    for (size_t i = 0; i < tot; ++i) xr[i] = (i % c == 1) ? 7.0f : xr[i] + (f ? 1000.0f : 50.0f);  // NHWC: channel i % c
    const auto xN = store<T>(xr);
    const auto x = widen(xN);
    std::vector<float> ps = nanv((size_t)c * S), pq = nanv((size_t)c * S), sh = nanv(c), mean = nanv(c), is = nanv(c), vu = nanv(c);
    launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_stats_partial_nhwc), (const T*)xN.data(), ps.data(), pq.data(), sh.data(), (i64)R, c);
    launch({(unsigned)c}, 32, bn_stats_finalize_shifted_f32, (const float*)ps.data(), (const float*)pq.data(), (const float*)sh.data(), mean.data(), is.data(), vu.data(), (i64)R, (int)S, 1e-12f);
    std::vector<double> rm(c), rv(c);
    for (int ci = 0; ci < c; ++ci) {
        double s1 = 0, s2 = 0;
        for (int r = 0; r < R; ++r) s1 += x[(size_t)r * c + ci];
        const double mu = s1 / R;
        for (int r = 0; r < R; ++r) { const double d = x[(size_t)r * c + ci] - mu; s2 += d * d; }
        rm[ci] = mu; rv[ci] = s2 / (R - 1);
    }
    char tag[96];
    snprintf(tag, sizeof tag, "bn_stats one-pass offset %s (R=%d,c=%d) S=%u", tname<T>(), R, c, S);
    std::string t(tag);
    check((t + " mean").c_str(), mean, rm, 1e-6);
    // the variance per channel (its scale differs by orders of magnitude from the constant one)
    for (int ci = 0; ci < c; ++ci) {
        const double err = std::fabs(vu[ci] - rv[ci]), tol = ci == 1 ? 0.0 : 1e-4 * rv[ci];
        if (!(err <= tol)) { printf("FAIL %s var channel %d: %g vs %g\n", tag, ci, vu[ci], rv[ci]); fails++; return; }
    }
    printf("ok   %s var (constant channel exactly 0, the others within 1e-4 relative)\n", tag);
}

void test_nhwc_all() {
    test_bn_stats_onepass_offset<float>(4, 5, 37, 3);
    test_bn_stats_onepass_offset<bf16>(4, 5, 37, 3);
    test_bn_stats_onepass_offset<float>(4, 8, 37, 3);  // 4 channels per thread
    test_bn_stats_onepass_offset<bf16>(4, 8, 37, 3);
    // Reductions: C = 3, 5, 33 (one channel per thread: 4 x 64, 8 x 32 and 32 x 8 blocks), 64 and
    // 100 (4 channels per thread: 16 x 16 and 32 x 8 blocks; a partial last block),
    // odd R (21, 45, 147), S = 1, 3, 7, 20, slices of more than 32 rows (the 4-row unrolled walk),
    // empty trailing slices (R = 9, S = 7). The NCHW reference kernels run C x S blocks: sizes
    // are kept small for the emulator's time.
    for (int t = 0; t < 2; ++t) {
        auto run = [&](int n, int c, int hw, unsigned S) { if (t == 0) test_bn_nhwc<float>(n, c, hw, S); else test_bn_nhwc<bf16>(n, c, hw, S); };
        run(3, 3, 7, 1);
        run(3, 64, 7, 3);
        run(3, 100, 7, 3);
        run(5, 100, 9, 1);
        run(3, 3, 49, 7);
        run(1, 33, 9, 7);
        run(2, 5, 36, 7);
        run(3, 33, 49, 20);  // S > 8: the mean's partials split over the row threads
        // 4 channels per thread with the 4-row unrolled walk (16 x 16 and 32 x 8 blocks)
        run(4, 64, 49, 2);
        run(3, 100, 36, 1);
    }
    // Elementwise BN as (R, C, 1): odd C and C % 4 == 0 (the 4-channel path aligned; the
    // one-element path at offn 1, 2), NCHW hw % 4 == 0 (its 4-wide path) and not; a grid-stride
    // loop that wraps (R * C / 4 units > the threads) and one that does not.
    for (int t = 0; t < 2; ++t) {
        auto run = [&](int n, int c, int hw, unsigned eb, unsigned et, int offn) { if (t == 0) test_bn_elem_nhwc<float>(n, c, hw, eb, et, offn); else test_bn_elem_nhwc<bf16>(n, c, hw, eb, et, offn); };
        run(3, 3, 7, 2, 64, 0);
        run(3, 5, 8, 3, 32, 0);
        run(2, 64, 9, 3, 64, 0);
        run(2, 64, 9, 3, 64, 1);
        run(3, 100, 4, 2, 96, 0);
        run(3, 100, 4, 2, 96, 2);
        run(1, 8, 1, 1, 32, 0);
        run(5, 12, 3, 1, 32, 0);
        run(1, 7, 1, 1, 32, 0);
    }
    for (int t = 0; t < 2; ++t) {
        auto run = [&](int n, int c, int H, int W, int k, int s, int p, unsigned eb, unsigned et) { if (t == 0) test_pool_nhwc<float>(n, c, H, W, k, s, p, eb, et); else test_pool_nhwc<bf16>(n, c, H, W, k, s, p, eb, et); };
        run(2, 3, 11, 9, 3, 2, 1, 2, 64);
        run(3, 64, 8, 7, 2, 2, 0, 3, 96);
        run(1, 100, 7, 7, 3, 1, 1, 2, 64);
        run(3, 5, 1, 1, 1, 1, 0, 1, 32);
    }
    test_convert_nhwc(2, 3, 49, 2);
    test_convert_nhwc(3, 64, 9, 2);
    test_convert_nhwc(2, 100, 33, 1);
    test_convert_nhwc(5, 7, 1, 3);    // HW == 1: the layouts coincide (a cast)
    test_convert_nhwc(300, 40, 1, 7); // HW == 1 with the grid's z loop
    test_convert_nhwc(3, 1, 45, 2);   // C == 1
    test_convert_nhwc(1, 33, 64, 1);
    // the per-pixel path (C <= 8): on the host's 1-d grid (wrapping), and on the tile grid
    test_convert_nhwc(3, 3, 1000, 0, 5);
    test_convert_nhwc(2, 8, 37, 0, 1);
    test_convert_nhwc(4, 5, 33, 0, 2);
    test_convert_nhwc(3, 3, 70, 2);
    test_convert_nhwc(2, 9, 49, 2);  // C = 9: the tiles again
    test_convert_nhwc(3, 3, 70, 3);
}

// Synchronized batch norm across `ranks` data-parallel ranks as the CUDA backend runs it
// (src/device/cuda/ops/batchnorm.rs batch_norm_stats_sync and bn_sync_dx_sums, the host's
// all-reduces done here in f64 in rank order): the statistics from two launches of the
// bn_shifted_partial kernels per rank (shift 0, then the global mean rounded to f32) and
// bn_backward_finalize_f32, the host's mean and variance, then the backward's per-rank
// partials, the global sums scaled by m_local / M and the single-rank dx kernel. Compared with
// f64 batch norm over the ranks' values together (the global batch). Rank r's values have mean
// r - 1.5 and scale 0.5 + 0.4 r: per-rank statistics would be far off.
template <class T>
void test_bn_sync(int nr, int c, int hw, int ranks, unsigned S, bool nhwc, unsigned threads = 32) {
    const size_t per = (size_t)nr * c * hw, cs = (size_t)c * S;
    const int R = nr * hw;  // values per channel on one rank
    const double M = (double)R * ranks;
    const float eps = 1e-5f;
    std::vector<std::vector<T>> xs(ranks), dys(ranks);      // as stored, in the tested layout
    std::vector<std::vector<float>> xw(ranks), dyw(ranks);  // NCHW f32 values
    for (int r = 0; r < ranks; ++r) {
        auto x = randn(per, 0.5f + 0.4f * r), dy = randn(per);
        for (auto& v : x) v += (float)r - 1.5f;
        auto xT = store<T>(x), dyT = store<T>(dy);
        xw[r] = widen(xT);
        dyw[r] = widen(dyT);
        xs[r] = nhwc ? to_nhwc(xT, nr, c, hw) : xT;
        dys[r] = nhwc ? to_nhwc(dyT, nr, c, hw) : dyT;
    }
    const auto gm = randn(c);
    // Rank r's per-channel sums of (x - k) and (x - k)^2.
    auto sums = [&](int r, const std::vector<float>& k, std::vector<float>& s1, std::vector<float>& s2) {
        std::vector<float> ps = nanv(cs), pq = nanv(cs);
        s1 = nanv(c);
        s2 = nanv(c);
        if (nhwc)
            launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_shifted_partial_nhwc), (const T*)xs[r].data(), (const float*)k.data(), ps.data(), pq.data(), (i64)R, c);
        else
            launch({(unsigned)c, S}, threads, KT(bn_shifted_partial), (const T*)xs[r].data(), (const float*)k.data(), ps.data(), pq.data(), (i64)nr, c, (i64)hw);
        launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)ps.data(), (const float*)pq.data(), s1.data(), s2.data(), (int)S);
    };
    std::vector<float> zero(c, 0.0f), shift(c), s1, s2;
    std::vector<double> a1(c, 0.0), b1(c, 0.0), b2(c, 0.0);
    for (int r = 0; r < ranks; ++r) {
        sums(r, zero, s1, s2);
        for (int ch = 0; ch < c; ++ch) a1[ch] += s1[ch];
    }
    for (int ch = 0; ch < c; ++ch) shift[ch] = (float)(a1[ch] / M);
    for (int r = 0; r < ranks; ++r) {
        sums(r, shift, s1, s2);
        for (int ch = 0; ch < c; ++ch) { b1[ch] += s1[ch]; b2[ch] += s2[ch]; }
    }
    std::vector<float> mean(c), is(c), vu(c);
    for (int ch = 0; ch < c; ++ch) {
        const double dm = b1[ch] / M;
        mean[ch] = (float)(shift[ch] + dm);
        const float var = (float)std::max(b2[ch] / M - dm * dm, 0.0);
        is[ch] = (float)(1.0 / std::sqrt((double)var + eps));
        vu[ch] = var * ((float)M / (float)(M - 1));
    }
    // f64 over the global batch
    std::vector<double> rm(c), ris(c), rvu(c), rb(c, 0.0), rg(c, 0.0);
    auto at = [&](int ch, int a, int h) { return ((size_t)a * c + ch) * hw + h; };
    for (int ch = 0; ch < c; ++ch) {
        double s = 0, q = 0;
        for (int r = 0; r < ranks; ++r) for (int a = 0; a < nr; ++a) for (int h = 0; h < hw; ++h) s += xw[r][at(ch, a, h)];
        const double mu = s / M;
        for (int r = 0; r < ranks; ++r) for (int a = 0; a < nr; ++a) for (int h = 0; h < hw; ++h) { const double d = xw[r][at(ch, a, h)] - mu; q += d * d; }
        rm[ch] = mu; ris[ch] = 1 / std::sqrt(q / M + eps); rvu[ch] = q / (M - 1);
        for (int r = 0; r < ranks; ++r) for (int a = 0; a < nr; ++a) for (int h = 0; h < hw; ++h) {
            const size_t i = at(ch, a, h);
            rb[ch] += dyw[r][i];
            rg[ch] += dyw[r][i] * (xw[r][i] - mu) * ris[ch];
        }
    }
    char tag[128];
    snprintf(tag, sizeof tag, "bn_sync %s %s (%d ranks of n=%d,c=%d,hw=%d) S=%u", tname<T>(), nhwc ? "nhwc" : "nchw", ranks, nr, c, hw, S);
    std::string t(tag);
    check((t + " mean").c_str(), mean, rm, 1e-5);
    check((t + " invstd").c_str(), is, ris, 1e-5);
    check((t + " var_u").c_str(), vu, rvu, 1e-5);
    // backward: every rank's parameter-gradient sums with the global statistics, all-reduced
    std::vector<double> gg(c, 0.0), gb(c, 0.0);
    for (int r = 0; r < ranks; ++r) {
        std::vector<float> pg = nanv(cs), pb = nanv(cs), dg = nanv(c), db = nanv(c);
        if (nhwc)
            launch(nhwc_grid(c, S), nhwc_block(c), KT(bn_backward_partial_nhwc), (const T*)dys[r].data(), (const T*)xs[r].data(), (const float*)mean.data(), (const float*)is.data(), pg.data(), pb.data(), (i64)R, c);
        else
            launch({(unsigned)c, S}, threads, KT(bn_backward_partial), (const T*)dys[r].data(), (const T*)xs[r].data(), (const float*)mean.data(), (const float*)is.data(), pg.data(), pb.data(), (i64)nr, c, (i64)hw);
        launch({(unsigned)c}, 64, bn_backward_finalize_f32, (const float*)pg.data(), (const float*)pb.data(), dg.data(), db.data(), (int)S);
        for (int ch = 0; ch < c; ++ch) { gg[ch] += dg[ch]; gb[ch] += db[ch]; }
    }
    std::vector<float> sg(c), sb(c);
    for (int ch = 0; ch < c; ++ch) { sg[ch] = (float)(gg[ch] * R / M); sb[ch] = (float)(gb[ch] * R / M); }
    check((t + " global sum dy").c_str(), std::vector<float>(gb.begin(), gb.end()), rb, 1e-5);
    check((t + " global sum dy xhat").c_str(), std::vector<float>(gg.begin(), gg.end()), rg, 1e-4);
    for (int r = 0; r < ranks; ++r) {
        auto dx = nant<T>(per);
        launch({3}, 64, KT(bn_backward_dx), (const T*)dys[r].data(), (const T*)xs[r].data(), (const float*)mean.data(), (const float*)is.data(), (const float*)gm.data(), (const float*)sg.data(), (const float*)sb.data(), dx.data(), (i64)(nhwc ? R : nr), c, (i64)(nhwc ? 1 : hw));
        const auto dxv = widen(nhwc ? to_nchw(dx, nr, c, hw) : dx);
        std::vector<double> rdx(per);
        for (int ch = 0; ch < c; ++ch) for (int a = 0; a < nr; ++a) for (int h = 0; h < hw; ++h) {
            const size_t i = at(ch, a, h);
            const double xh = (xw[r][i] - rm[ch]) * ris[ch];
            rdx[i] = gm[ch] * ris[ch] * (dyw[r][i] - rb[ch] / M - xh * rg[ch] / M);
        }
        check((t + " dx rank " + std::to_string(r)).c_str(), dxv, rdx, std::is_same_v<T, float> ? 1e-4 : 1e-2);
    }
}

void test_bn_sync_all() {
    for (bool nhwc : {false, true}) {
        test_bn_sync<float>(2, 5, 7, 2, 3, nhwc);
        test_bn_sync<float>(3, 8, 9, 4, 2, nhwc);  // NHWC: 4 channels per thread
        test_bn_sync<float>(4, 3, 1, 2, 1, nhwc);  // (N, C): HW = 1
        test_bn_sync<bf16>(2, 8, 9, 2, 3, nhwc);
    }
}

int main(int argc, char** argv) {
    if (argc == 4 && std::strcmp(argv[1], "augment") == 0) return run_augment(argv[2], argv[3]);
    if (argc == 4 && std::strcmp(argv[1], "bf16round") == 0) return run_bf16_round(argv[2], argv[3]);
    test_misc();
    test_carp(2, 3, 48, 16, 32);
    test_carp(4, 3, 80, 40, 32);
    test_carp(2, 2, 1024, 512, 512);
    test_carp(3, 2, 96, 24, 64);
    // Multi-crop as SPEC.md's option: 2 global + 6 local student views, odd n.
    test_carp(8, 3, 60, 20, 32);
    // S = 1 (one block per channel), S > 1 with uneven slices, slices that cut through a
    // plane, S > N, empty trailing slices (M = 9, S = 6), HW = 1 ((N, C) after a linear layer),
    // float4 elementwise paths (hw % 4 == 0) aligned and misaligned, a large mean.
    test_bn(3, 5, 7, 64, 1);
    test_bn(6, 10, 1, 32, 1);
    test_bn(3, 5, 7, 64, 4);
    test_bn(6, 10, 1, 32, 4, 2, 32);
    test_bn(3, 2, 3, 32, 6);
    test_bn(4, 3, 33, 32, 7, 1, 32);
    test_bn(5, 3, 16, 64, 3, 2, 64);
    test_bn(5, 3, 16, 64, 3, 2, 64, 1);
    test_bn(2, 7, 12, 32, 5, 3, 32, 2);
    test_bn(4, 6, 20, 64, 9, 2, 96, 0, 100.0f);
    test_bn(1, 3, 200, 128, 11, 4, 32);
    // Slices of >= 4 * threads elements: the 4-way unrolled walk, wrapping planes (hw > and <
    // the block size).
    test_bn(3, 2, 150, 32, 2, 2, 32);
    test_bn(40, 2, 10, 32, 3, 3, 32, 0, 20.0f);
    // More slices than the finalize kernels' threads (S = 70 > 64): their strided partial loop.
    test_bn(2, 2, 150, 32, 70);
    test_pool(2, 3, 11, 9, 3, 2, 1);
    test_pool(3, 2, 8, 7, 2, 2, 0);
    test_wn(37, 45);
    test_lars();
    test_lars_checked();
    test_step_gated();
    test_launcher_configs();
    // Fused BN + ReLU (+ residual): S = 1 and multi-block splits (uneven, cutting planes, more
    // slices than the finalize threads), HW = 1, float4 paths aligned and misaligned, both modes.
    for (bool train : {true, false})
        for (bool resid : {false, true}) {
            test_bn_act(3, 5, 7, 64, 1, train, resid);
            test_bn_act(6, 10, 1, 32, 4, train, resid, 2, 32);
            test_bn_act(5, 3, 16, 64, 3, train, resid, 2, 64);
            test_bn_act(5, 3, 16, 64, 3, train, resid, 2, 64, 1);
            test_bn_act(3, 2, 150, 32, 7, train, resid, 2, 32, 2);
            test_bn_act(2, 2, 150, 32, 70, train, resid, 3, 32);
        }
    // bf16 storage (after the f32 tests: their random draws are unchanged).
    test_bf16_all();
    // channels-last kernels (after the others: their random draws are unchanged)
    test_nhwc_all();
    // synchronized batch norm across ranks (after the others: their random draws are unchanged)
    test_bn_sync_all();
    printf(fails ? "FAILURES: %d\n" : "ALL OK\n", fails);
    return fails != 0;
}
