// duo_fast::rb_stats_cpu / duo_fast::rb_grad_cpu: the Rao-Blackwellized NELBO's per-row statistics
// and elementwise gradient (docs/math.md section 3) for float32 CPU rows, fused into three passes
// (forward) and one pass (backward) per row. The same quantities, in the same float32 arithmetic,
// as the PyTorch path duo_fast/ops/rb_loss.py (_stats_torch, _grad_torch): that path makes ~20
// passes over each row and allocates a row-sized temporary for most of them.
//
// The vector code is compiled for AVX2+FMA only inside the functions marked DUO_FAST_AVX2 and
// calls the same SLEEF exp/log1p (1-ulp) that PyTorch's own CPU kernels call, taken from libtorch
// as weak symbols: rb_cpu_supported() is false (and Python keeps its PyTorch path) on a CPU
// without AVX2/FMA or a torch build that does not export them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
extern "C" {
__m256 Sleef_expf8_u10avx2(__m256) __attribute__((weak));
__m256 Sleef_log1pf8_u10avx2(__m256) __attribute__((weak));
}
#pragma GCC pop_options

#define DUO_FAST_AVX2 __attribute__((target("avx2,fma")))

namespace duo_fast {
namespace {

constexpr int64_t kW = 8;            // floats per AVX2 vector
constexpr int64_t kBlock = 1024;     // elements summed in float lanes before a float64 add

bool cpu_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && Sleef_expf8_u10avx2 != nullptr &&
         Sleef_log1pf8_u10avx2 != nullptr;
}

DUO_FAST_AVX2 inline __m256i tail_mask(int64_t n) {     // lanes [0, n) set
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), iota);
}

// Row l[0..K) loaded 8 at a time; lanes past K read as -inf (they then add exactly 0 to every sum).
DUO_FAST_AVX2 inline __m256 load_row(const float* l, int64_t j, int64_t K) {
  if (j + kW <= K) return _mm256_loadu_ps(l + j);
  const __m256i m = tail_mask(K - j);
  const __m256 v = _mm256_maskload_ps(l + j, m);
  return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), v, _mm256_castsi256_ps(m));
}

DUO_FAST_AVX2 inline double hsum(__m256 v) {
  alignas(32) float t[kW];
  _mm256_store_ps(t, v);
  double s = 0;
  for (int i = 0; i < kW; ++i) s += t[i];
  return s;
}

// stats row: [lse, l_i, l_x, rem, s1d, Q, bT2, cpi, cpx] (see kernels/rb_loss.py for their use).
DUO_FAST_AVX2 void stats_row(const float* l, int64_t K, int64_t zi, int64_t xi, float beta, float* out,
                             int64_t stride) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < K; j += kW) vmax = _mm256_max_ps(vmax, load_row(l, j, K));
  alignas(32) float t[kW];
  _mm256_store_ps(t, vmax);
  float m = t[0];
  for (int i = 1; i < kW; ++i) m = std::max(m, t[i]);
  const __m256 vm = _mm256_set1_ps(m);
  double se = 0;
  for (int64_t b = 0; b < K; b += kBlock) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = b; j < std::min(K, b + kBlock); j += kW)
      acc = _mm256_add_ps(acc, Sleef_expf8_u10avx2(_mm256_sub_ps(load_row(l, j, K), vm)));
    se += hsum(acc);
  }
  const float lse = m + static_cast<float>(std::log(se));
  const __m256 vlse = _mm256_set1_ps(lse), vbeta = _mm256_set1_ps(beta), one = _mm256_set1_ps(1.0f);
  const __m256i vzi = _mm256_set1_epi32(static_cast<int>(zi)), vxi = _mm256_set1_epi32(static_cast<int>(xi));
  const bool need_rem = beta <= 1.0f;
  double s1d = 0, q = 0, bt2 = 0, cpi = 0, cpx = 0, rem = 0;
  for (int64_t b = 0; b < K; b += kBlock) {
    __m256 a_s1d = _mm256_setzero_ps(), a_q = a_s1d, a_bt2 = a_s1d, a_cpi = a_s1d, a_cpx = a_s1d;
    for (int64_t j = b; j < std::min(K, b + kBlock); j += kW) {
      const __m256 p = Sleef_expf8_u10avx2(_mm256_sub_ps(load_row(l, j, K), vlse));
      const __m256 x = _mm256_mul_ps(vbeta, p);
      const __m256 pr = _mm256_div_ps(p, _mm256_add_ps(one, x));        // p r
      a_s1d = _mm256_add_ps(a_s1d, Sleef_log1pf8_u10avx2(x));
      a_q = _mm256_add_ps(a_q, pr);
      a_bt2 = _mm256_add_ps(a_bt2, _mm256_mul_ps(x, pr));
      // sums of p over j != z_t and j != x, without forming 1 - p_id
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      a_cpi = _mm256_add_ps(a_cpi, _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, vzi)), p));
      a_cpx = _mm256_add_ps(a_cpx, _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, vxi)), p));
      if (need_rem) {      // rare rows (a < 1/(K + 1)): log1p(x) - x in float64 per element
        _mm256_store_ps(t, x);
        for (int i = 0; i < kW && j + i < K; ++i) rem += std::log1p(static_cast<double>(t[i])) - t[i];
      }
    }
    s1d += hsum(a_s1d);
    q += hsum(a_q);
    bt2 += hsum(a_bt2);
    cpi += hsum(a_cpi);
    cpx += hsum(a_cpx);
  }
  const float vals[9] = {lse, l[zi], l[xi], static_cast<float>(rem), static_cast<float>(s1d), static_cast<float>(q),
                         static_cast<float>(bt2), static_cast<float>(cpi), static_cast<float>(cpx)};
  for (int s = 0; s < 9; ++s) out[s * stride] = vals[s];
}

// p and d = r - Q of a vector of logits (r = 1/(1 + beta p)); without cancellation, d = bT2 - x r
// where r >= 1/2 (section 3).
DUO_FAST_AVX2 inline __m256 grad_pd(__m256 lv, float lse, float beta, float Q, float bt2, __m256* p_out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 p = Sleef_expf8_u10avx2(_mm256_sub_ps(lv, _mm256_set1_ps(lse)));
  const __m256 x = _mm256_mul_ps(p, _mm256_set1_ps(beta));
  const __m256 r = _mm256_div_ps(one, _mm256_add_ps(x, one));
  *p_out = p;
  return _mm256_blendv_ps(_mm256_sub_ps(r, _mm256_set1_ps(Q)), _mm256_sub_ps(_mm256_set1_ps(bt2), _mm256_mul_ps(x, r)),
                          _mm256_cmp_ps(r, _mm256_set1_ps(0.5f), _CMP_GE_OQ));
}

// d loss / d logits of one row: cd p (r - Q) - p (ce + cx), then the z_t and x entries.
DUO_FAST_AVX2 void grad_row(const float* l, float* g, int64_t K, int64_t zi, int64_t xi, float beta, float lse,
                            float Q, float bt2, const float* c) {
  const float cd = c[0], ce = c[1], cx = c[2], ce_c = c[3], cx_c = c[4];
  const __m256 vcd = _mm256_set1_ps(cd), vcecx = _mm256_set1_ps(ce + cx);
  // the z_t and x entries first: the row may be overwritten in place below
  alignas(32) float tp[kW], td[kW];
  __m256 p;
  _mm256_store_ps(td, grad_pd(_mm256_set1_ps(l[zi]), lse, beta, Q, bt2, &p));
  _mm256_store_ps(tp, p);
  const float g_i = cd * tp[0] * td[0] + ce_c - tp[0] * cx;
  _mm256_store_ps(td, grad_pd(_mm256_set1_ps(l[xi]), lse, beta, Q, bt2, &p));
  _mm256_store_ps(tp, p);
  const float g_x = cd * tp[0] * td[0] + cx_c - tp[0] * ce;
  for (int64_t j = 0; j < K; j += kW) {
    const __m256 d = grad_pd(load_row(l, j, K), lse, beta, Q, bt2, &p);
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(d, vcd), vcecx), p);
    if (j + kW <= K) {
      _mm256_storeu_ps(g + j, v);
    } else {
      _mm256_maskstore_ps(g + j, tail_mask(K - j), v);
    }
  }
  g[zi] = g_i;
  if (xi != zi) g[xi] = g_x;
}

void check_rows(const at::Tensor& logits, const at::Tensor& zt, const at::Tensor& x0, const at::Tensor& beta,
                const char* op) {
  TORCH_CHECK(cpu_supported(), op, ": needs an AVX2+FMA CPU and a torch build exporting SLEEF (see rb_cpu_supported)");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1, op,
              ": logits must be (n, K) float32 with unit stride along K");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), op, ": K must fit in int32");
  const int64_t n = logits.size(0);
  TORCH_CHECK(zt.dim() == 1 && x0.dim() == 1 && zt.size(0) == n && x0.size(0) == n &&
                  zt.scalar_type() == at::kLong && x0.scalar_type() == at::kLong,
              op, ": zt and x0 must be (n,) int64");
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == n && beta.scalar_type() == at::kFloat, op,
              ": beta must be (n,) float32");
}

at::Tensor rb_stats_cpu(const at::Tensor& logits, const at::Tensor& zt, const at::Tensor& x0,
                        const at::Tensor& beta) {
  check_rows(logits, zt, x0, beta, "rb_stats_cpu");
  const int64_t n = logits.size(0), K = logits.size(1), ld = logits.stride(0);
  const at::Tensor z = zt.contiguous(), x = x0.contiguous(), b = beta.contiguous();
  at::Tensor out = at::empty({9, n}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const int64_t *zp = z.data_ptr<int64_t>(), *xp = x.data_ptr<int64_t>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(zp[r] >= 0 && zp[r] < K && xp[r] >= 0 && xp[r] < K, "rb_stats_cpu: token ids out of range [0, ", K, ")");
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) stats_row(lp + r * ld, K, zp[r], xp[r], bp[r], op + r, n);
  });
  return out;
}

// Writes the gradient into `out` (n, K) float32 (may be `logits` itself: each row is read before
// it is written, element by element), returns `out`.
at::Tensor rb_grad_cpu(const at::Tensor& logits, const at::Tensor& zt, const at::Tensor& x0, const at::Tensor& beta,
                       const at::Tensor& stats, const at::Tensor& coefs, at::Tensor out) {
  check_rows(logits, zt, x0, beta, "rb_grad_cpu");
  const int64_t n = logits.size(0), K = logits.size(1), ld = logits.stride(0);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 9 && stats.size(1) == n && stats.scalar_type() == at::kFloat,
              "rb_grad_cpu: stats must be (9, n) float32");
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == 5 && coefs.size(1) == n && coefs.scalar_type() == at::kFloat,
              "rb_grad_cpu: coefs must be (5, n) float32");
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == at::kFloat && out.stride(1) == 1,
              "rb_grad_cpu: out must be (n, K) float32 with unit stride along K");
  const at::Tensor z = zt.contiguous(), x = x0.contiguous(), b = beta.contiguous();
  const at::Tensor s = stats.contiguous(), c = coefs.t().contiguous();      // (n, 5)
  const float* lp = logits.data_ptr<float>();
  float* gp = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const int64_t *zp = z.data_ptr<int64_t>(), *xp = x.data_ptr<int64_t>();
  const float *bp = b.data_ptr<float>(), *sp = s.data_ptr<float>(), *cp = c.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(zp[r] >= 0 && zp[r] < K && xp[r] >= 0 && xp[r] < K, "rb_grad_cpu: token ids out of range [0, ", K, ")");
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      grad_row(lp + r * ld, gp + r * ldo, K, zp[r], xp[r], bp[r], sp[r], sp[5 * n + r], sp[6 * n + r], cp + 5 * r);
  });
  return out;
}

bool rb_cpu_supported() { return cpu_supported(); }

}  // namespace
}  // namespace duo_fast

TORCH_LIBRARY_FRAGMENT(duo_fast, m) {
  m.def("rb_cpu_supported() -> bool", &duo_fast::rb_cpu_supported);
  m.def("rb_stats_cpu(Tensor logits, Tensor zt, Tensor x0, Tensor beta) -> Tensor");
  m.def("rb_grad_cpu(Tensor logits, Tensor zt, Tensor x0, Tensor beta, Tensor stats, Tensor coefs, Tensor(a!) out)"
        " -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) {
  m.impl("rb_stats_cpu", &duo_fast::rb_stats_cpu);
  m.impl("rb_grad_cpu", &duo_fast::rb_grad_cpu);
}
