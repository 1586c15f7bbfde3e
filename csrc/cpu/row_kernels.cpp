// See row_kernels.h. Each entry point is compiled three times (AVX-512, AVX2+FMA, baseline) with GCC's
// target_clones and picked at load time for the running CPU, so a portable wheel still vectorises.
// The reductions use four independent accumulators: one would wait on the FMA latency.
#include "row_kernels.h"
#include "target_clones.h"

#include <algorithm>
#include <cmath>


namespace lipfast {
namespace rows {
namespace {

template <typename T>
inline __attribute__((always_inline)) void gram_impl(const T* Z, int64_t p, int64_t n, double* M) {
  for (int64_t i = 0; i < p; ++i) {
    const T* a = Z + i * n;
    for (int64_t j = i; j < p; j += 4) {
      // Rows j..j+3 (clamped at the last row; the duplicates are computed and dropped).
      const T* b0 = Z + j * n;
      const T* b1 = Z + std::min(j + 1, p - 1) * n;
      const T* b2 = Z + std::min(j + 2, p - 1) * n;
      const T* b3 = Z + std::min(j + 3, p - 1) * n;
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t c = 0; c < n; ++c) {
        const double x = a[c];
        s0 += x * static_cast<double>(b0[c]);
        s1 += x * static_cast<double>(b1[c]);
        s2 += x * static_cast<double>(b2[c]);
        s3 += x * static_cast<double>(b3[c]);
      }
      const double s[4] = {s0, s1, s2, s3};
      for (int64_t q = 0; q < 4 && j + q < p; ++q) M[i * p + j + q] = M[(j + q) * p + i] = s[q];
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void combine_impl(const double* C, int64_t q, const T* Z, int64_t p,
                                                        int64_t n, T* out) {
  for (int64_t j = 0; j < q; ++j) {
    const double* w = C + j * p;
    T* o = out + j * n;
    // Blocks of columns summed down the p rows in registers (an axpy per row would reload and store a
    // float64 row p times).
    constexpr int64_t kBlock = 32;
    for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
      const int64_t len = std::min(kBlock, n - c0);
      double acc[kBlock] = {};
      if (len == kBlock) {
        for (int64_t i = 0; i < p; ++i) {
          const double wi = w[i];
          const T* z = Z + i * n + c0;
#pragma omp simd
          for (int64_t t = 0; t < kBlock; ++t) acc[t] += wi * static_cast<double>(z[t]);
        }
      } else {
        for (int64_t i = 0; i < p; ++i) {
          const double wi = w[i];
          const T* z = Z + i * n + c0;
          for (int64_t t = 0; t < len; ++t) acc[t] += wi * static_cast<double>(z[t]);
        }
      }
      for (int64_t t = 0; t < len; ++t) o[c0 + t] = static_cast<T>(acc[t]);
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void residual_impl(const T* Z, const T* V, const double* s, int64_t p,
                                                         int64_t n, double* out) {
  for (int64_t j = 0; j < p; ++j) {
    const T* z = Z + j * n;
    const T* v = V + j * n;
    const double sj = s[j];
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < n; ++c) {
      const double r = static_cast<double>(z[c]) - sj * static_cast<double>(v[c]);
      acc += r * r;
    }
    out[j] = std::sqrt(acc);
  }
}

template <typename T>
inline __attribute__((always_inline)) double sum_squares_impl(const T* x, int64_t n) {
  double s0 = 0.0, s1 = 0.0;
  const int64_t half = n / 2;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t c = 0; c < half; ++c) {
    const double a = x[c], b = x[half + c];
    s0 += a * a;
    s1 += b * b;
  }
  if (n % 2) s0 += static_cast<double>(x[n - 1]) * static_cast<double>(x[n - 1]);
  return s0 + s1;
}

template <typename T>
inline __attribute__((always_inline)) void add_scaled_impl(double* out, double w, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] += w * static_cast<double>(x[c]);
}

template <typename T>
inline __attribute__((always_inline)) void dots4_impl(const T* const x[4], const T* P, int64_t k, int64_t n, T* out) {
  const T *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  for (int64_t j = 0; j < k; j += 4) {
    // Rows j..j+3 of P (clamped at the last row; the duplicates are computed and dropped): 16 accumulators.
    const T* p0 = P + j * n;
    const T* p1 = P + std::min(j + 1, k - 1) * n;
    const T* p2 = P + std::min(j + 2, k - 1) * n;
    const T* p3 = P + std::min(j + 3, k - 1) * n;
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    T c0 = 0, c1 = 0, c2 = 0, c3 = 0, d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3)
    for (int64_t c = 0; c < n; ++c) {
      const T q0 = p0[c], q1 = p1[c], q2 = p2[c], q3 = p3[c];
      const T u = x0[c], v = x1[c], w = x2[c], z = x3[c];
      a0 += u * q0, a1 += u * q1, a2 += u * q2, a3 += u * q3;
      b0 += v * q0, b1 += v * q1, b2 += v * q2, b3 += v * q3;
      c0 += w * q0, c1 += w * q1, c2 += w * q2, c3 += w * q3;
      d0 += z * q0, d1 += z * q1, d2 += z * q2, d3 += z * q3;
    }
    const T s[4][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}, {c0, c1, c2, c3}, {d0, d1, d2, d3}};
    for (int r = 0; r < 4; ++r)
      for (int64_t q = 0; q < 4 && j + q < k; ++q) out[r * k + j + q] = s[r][q];
  }
}

template <typename T>
inline void transpose_impl(const T* Y, int64_t r, int64_t ld, int64_t q, T* out) {
  // Output rows written one at a time: interleaving q output rows a power-of-two stride apart maps
  // them onto the same cache sets.
  for (int64_t j = 0; j < q; ++j)
    for (int64_t i = 0; i < r; ++i) out[j * r + i] = Y[i * ld + j];
}

}  // namespace

void transpose(const float* Y, int64_t r, int64_t ld, int64_t q, float* out) { transpose_impl(Y, r, ld, q, out); }
void transpose(const double* Y, int64_t r, int64_t ld, int64_t q, double* out) { transpose_impl(Y, r, ld, q, out); }

LIPFAST_CPU_CLONES double sum_squares(const float* x, int64_t n) { return sum_squares_impl(x, n); }
LIPFAST_CPU_CLONES double sum_squares(const double* x, int64_t n) { return sum_squares_impl(x, n); }

LIPFAST_CPU_CLONES void add_scaled(double* out, double w, const float* x, int64_t n) { add_scaled_impl(out, w, x, n); }
LIPFAST_CPU_CLONES void add_scaled(double* out, double w, const double* x, int64_t n) {
  add_scaled_impl(out, w, x, n);
}

LIPFAST_CPU_CLONES void dots4(const float* const x[4], const float* P, int64_t k, int64_t n, float* out) {
  dots4_impl(x, P, k, n, out);
}
LIPFAST_CPU_CLONES void dots4(const double* const x[4], const double* P, int64_t k, int64_t n, double* out) {
  dots4_impl(x, P, k, n, out);
}

LIPFAST_CPU_CLONES void gram(const float* Z, int64_t p, int64_t n, double* M) { gram_impl(Z, p, n, M); }
LIPFAST_CPU_CLONES void gram(const double* Z, int64_t p, int64_t n, double* M) { gram_impl(Z, p, n, M); }

LIPFAST_CPU_CLONES void combine(const double* C, int64_t q, const float* Z, int64_t p, int64_t n, float* out) {
  combine_impl(C, q, Z, p, n, out);
}
LIPFAST_CPU_CLONES void combine(const double* C, int64_t q, const double* Z, int64_t p, int64_t n, double* out) {
  combine_impl(C, q, Z, p, n, out);
}

LIPFAST_CPU_CLONES void residual_norms(const float* Z, const float* V, const double* s, int64_t p, int64_t n,
                                       double* out) {
  residual_impl(Z, V, s, p, n, out);
}
LIPFAST_CPU_CLONES void residual_norms(const double* Z, const double* V, const double* s, int64_t p, int64_t n,
                                       double* out) {
  residual_impl(Z, V, s, p, n, out);
}

}  // namespace rows
}  // namespace lipfast
