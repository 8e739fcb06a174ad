// Cubic Hermite lookup of the T-operator table (docs/math.md section 4), shared by the CPU
// implementation and the CUDA kernel so that both compute exactly the same arithmetic.
//
// The table holds q = 1 - p(gamma) and dq/dgamma at n evenly spaced gamma in [gmin, gmax].
// alpha = 1 - scale * q and dalpha/dgamma = -scale * dq, with scale = K / (K - 1).
// gamma outside [gmin, gmax], or NaN, gives NaN (never a silent clamp).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DUO_FAST_HD __host__ __device__ __forceinline__
#else
#define DUO_FAST_HD inline
#endif

namespace duo_fast {

DUO_FAST_HD void ttable_point(double g, const double* q, const double* dq, int64_t n, double gmin, double gmax,
                              double scale, double* alpha, double* dalpha) {
  if (!(g >= gmin && g <= gmax)) {
    *alpha = NAN;
    *dalpha = NAN;
    return;
  }
  const double h = (gmax - gmin) / static_cast<double>(n - 1);
  const double inv_h = static_cast<double>(n - 1) / (gmax - gmin);
  const double pos = (g - gmin) * inv_h;
  // pos >= 0 here, so truncation is floor (no libm call on the per-point path).
  int64_t i = static_cast<int64_t>(pos);
  if (i > n - 2) i = n - 2;
  const double s = pos - static_cast<double>(i);
  const double p0 = q[i], p1 = q[i + 1];
  const double m0 = dq[i] * h, m1 = dq[i + 1] * h;
  const double s2 = s * s, s3 = s2 * s;
  const double val = (2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * m1;
  const double der =
      ((6 * s2 - 6 * s) * p0 + (3 * s2 - 4 * s + 1) * m0 + (-6 * s2 + 6 * s) * p1 + (3 * s2 - 2 * s) * m1) * inv_h;
  *alpha = 1.0 - scale * val;
  *dalpha = -scale * der;
}

}  // namespace duo_fast
