// One direction E's projections onto a spectrum's top-k triplets and H[E,E] from them (MATH.md §1), from
// x = E v1 [m] and y = Eᵀ u1 [n] in float64: used for the batch gradient and the step (step_statistics_cpu.cpp)
// and for each sample of a Conv2d (conv2d_projections_cpu.cpp). Defined in step_statistics_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "math.h"

namespace lipfast {

struct Direction {
  double first;  // u1ᵀ x = ⟨J, E⟩
  HessianTerms h;
  double xnorm2, ynorm2;
  bool finite;  // x and y finite
};

// U [m, k] and V [n, k] are read in their own dtype through their strides and summed in float64.
Direction project_direction(const double* x, int64_t m, const double* y, int64_t n, const at::Tensor& U,
                            const at::Tensor& V, const double* S, int64_t k, double sigma_next);

}  // namespace lipfast
