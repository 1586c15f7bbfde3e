// Per-element math shared by the CPU loops and the CUDA kernels (MATH.md §1, "Hessian quadratic form"
// and "Truncated spectrum"). Everything here is double: the denominators σ1² − σj² lose digits in float.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define LIPFAST_HOST_DEVICE __host__ __device__
#else
#define LIPFAST_HOST_DEVICE
#endif

namespace lipfast {

struct HessianTerms {
  double value;  // core_k + R/σ1           (the estimate; exact when the spectrum is)
  double lo;     // core_k + R/(σ1+σ_{k+1}) (lower end of the truncation bracket)
  double hi;     // core_k + R/(σ1−σ_{k+1}) (upper end)
};

// H[E,E] from the projections of one direction E onto the known top-k triplets.
//   a[j] = u_jᵀ (E v1), b[j] = v_jᵀ (Eᵀ u1)   (strided by `stride`, j = 0..k-1)
//   xnorm2 = ‖E v1‖², ynorm2 = ‖Eᵀ u1‖², S[0..k-1] descending, sigma_next = σ_{k+1} (0 when exact).
// A zero gap (σ1 == σ2) or σ1 == 0 has no finite Hessian: NaN is returned and the caller flags it.
LIPFAST_HOST_DEVICE inline HessianTerms hessian_terms(const double* a, const double* b, int64_t stride,
                                                      const double* S, int64_t k, double sigma_next,
                                                      double xnorm2, double ynorm2) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double s1 = S[0];
  if (!(s1 > 0.0) || (k > 1 && !(S[1] < s1))) return {nan, nan, nan};
  double core = 0.0;
  double known = a[0] * a[0] + b[0] * b[0];
  for (int64_t j = 1; j < k; ++j) {
    const double aj = a[j * stride], bj = b[j * stride], sj = S[j];
    core += (s1 * (aj * aj + bj * bj) + 2.0 * sj * aj * bj) / ((s1 - sj) * (s1 + sj));
    known += aj * aj + bj * bj;
  }
  // The unknown mass is non-negative in exact arithmetic; rounding can push it a hair below 0.
  double rest = xnorm2 + ynorm2 - known;
  if (rest < 0.0) rest = 0.0;
  if (!(sigma_next < s1)) return {nan, nan, nan};
  return {core + rest / s1, core + rest / (s1 + sigma_next), core + rest / (s1 - sigma_next)};
}

// The step's second-order term solves its unknown tail (lipfast::hessian_tail) inside lipfast::track_update:
// at most this many conjugate-gradient steps (each reads W once), stopping when the tail's bracket is within
// this relative width. Measured on flat spectra (a random initialisation: σ_{k+1} ≈ 0.97 σ1) it takes ~20 steps;
// with a gap of 20% about 6 (MATH.md §1).
constexpr int64_t kTailMaxSteps = 32;
constexpr double kTailTol = 1e-3;
// ... or when the bracket moves the step's prediction first + second by less than kTailTol of its size: a tail
// small against the first-order term needs no more digits than that (the bracket is in H's units, twice the
// second-order term's).
inline double tail_atol(double first, double second_truncated) {
  return 2.0 * kTailTol * (std::abs(first) + std::abs(second_truncated));
}


// lipfast::hessian_tail's result [value, lo, hi, steps, mass] from its conjugate-gradient state: partial sum
// T, residual ‖r‖² = rr, unknown mass R, σ1, σ_{k+1} (MATH.md §1, "Solving the tail instead"). The solve runs
// on W after the step; the tail at W before it lies in the truncation bracket R/(σ1 ± σ_{k+1}) whatever the
// step, so the solved bracket is intersected with it, and a solve that broke down (W after the step has a pair
// at or above σ1) or left the bracket (a step large against the gap) gives the truncation estimate back.
inline std::array<double, 5> tail_result(double T, double rr, double mass, double s1, double sigma_next, double steps,
                                         bool broke) {
  const double inv_lo = 1.0 / (s1 + sigma_next), inv_hi = 1.0 / (s1 - sigma_next);
  const std::array<double, 5> truncated{mass / s1, mass * inv_lo, mass * inv_hi, 0.0, mass};
  if (broke || !(s1 > sigma_next)) return truncated;
  const double lo = std::max(T + rr * inv_lo, truncated[1]), hi = std::min(T + rr * inv_hi, truncated[2]);
  if (!(lo <= hi)) return truncated;
  return {std::min(std::max(T + rr / s1, lo), hi), lo, hi, steps, mass};
}

}  // namespace lipfast
