// Columns of a warm-start block kept for k triplets of a matrix of rank <= r: k + 1 + max(4, k/2), at most r.
// The rule of lipfast.functional.block_size (MATH.md §5), for the kernels that hand a block back.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lipfast {

inline int64_t block_size(int64_t k, int64_t r) { return std::min(r, k + 1 + std::max<int64_t>(4, k / 2)); }

// Singular pairs whose residuals end a tracker's warm sweeps (lipfast::track_update): σ1 and σ2, which the
// records' σ1, its accuracy and the gap are read from. The lower pairs only enter the Hessian terms, whose
// truncation bracket stays valid at any accuracy; waiting for them cost up to the whole sweep budget on flat
// spectra. The rule of lipfast.functional.TRACKED_PAIRS.
inline int64_t tracked_pairs(int64_t k) { return std::min<int64_t>(2, k + 1); }

}  // namespace lipfast
