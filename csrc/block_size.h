// Columns of a warm-start block kept for k triplets of a matrix of rank <= r: k + 1 + max(4, k/2), at most r.
// The rule of lipfast.functional.block_size (MATH.md §5), for the kernels that hand a block back.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lipfast {

inline int64_t block_size(int64_t k, int64_t r) { return std::min(r, k + 1 + std::max<int64_t>(4, k / 2)); }

}  // namespace lipfast
