// Columns of a warm-start block kept for k triplets of a matrix of rank <= r: k + 1 + max(4, k/2), at most r.
// The rule of lipfast.functional.block_size (MATH.md §5), for the kernels that hand a block back.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lipfast {

inline int64_t block_size(int64_t k, int64_t r) { return std::min(r, k + 1 + std::max<int64_t>(4, k / 2)); }

// Singular pairs whose residuals end a tracker's warm sweeps (lipfast::track_update): σ1 and σ2, which the
// records' σ1, its accuracy and the gap are read from. The lower pairs only enter the Hessian terms, whose
// truncation bracket stays valid at any accuracy; waiting for them cost up to the whole sweep budget on flat
// spectra. The rule of lipfast.functional.TRACKED_PAIRS.
inline int64_t tracked_pairs(int64_t k) { return std::min<int64_t>(2, k + 1); }

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

}  // namespace lipfast
