// CUDA kernel of lipfast::hessian_contract: H[E_i, E_i] from projections (MATH.md §1), one thread per
// row i. The math is lipfast::hessian_terms (csrc/math.h), shared verbatim with the CPU kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "launch.cuh"
#include "../math.h"
#include "../op_interfaces.h"

namespace lipfast {

namespace {

__global__ void hessian_contract_kernel(
    // inputs
    const double* __restrict__ a,       // [N, k]
    const double* __restrict__ b,       // [N, k]
    const double* __restrict__ xnorm2,  // [N]
    const double* __restrict__ ynorm2,  // [N]
    const double* __restrict__ S,       // [k]
    int64_t N, int64_t k, double sigma_next,
    // outputs
    double* __restrict__ value,         // [N]
    double* __restrict__ lo,            // [N]
    double* __restrict__ hi) {          // [N]
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const HessianTerms h = hessian_terms(a + i * k, b + i * k, 1, S, k, sigma_next, xnorm2[i], ynorm2[i]);
    value[i] = h.value;
    lo[i] = h.lo;
    hi[i] = h.hi;
  }
}

void launch_hessian_contract_kernel(const at::Tensor& a, const at::Tensor& b, const at::Tensor& xnorm2,
                                    const at::Tensor& ynorm2, const at::Tensor& S, double sigma_next,
                                    at::Tensor& value, at::Tensor& lo, at::Tensor& hi) {
  const int64_t N = a.size(0), k = a.size(1);
  auto kernel = &hessian_contract_kernel;
  LIPFAST_CUDA_LAUNCH(kernel, cuda::blocks_for(N), cuda::kThreadsPerBlock, 0,
                      a.data_ptr<double>(), b.data_ptr<double>(), xnorm2.data_ptr<double>(),
                      ynorm2.data_ptr<double>(), S.data_ptr<double>(), N, k, sigma_next,
                      value.data_ptr<double>(), lo.data_ptr<double>(), hi.data_ptr<double>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> hessian_contract_cuda(
    const at::Tensor& a,       // [N, k]
    const at::Tensor& b,       // [N, k]
    const at::Tensor& xnorm2,  // [N]
    const at::Tensor& ynorm2,  // [N]
    const at::Tensor& S,       // [k]
    double sigma_next) {
  check_hessian_contract_inputs(a, b, xnorm2, ynorm2, S);
  TORCH_INTERNAL_ASSERT(a.is_cuda(), "lipfast::hessian_contract: CUDA kernel called with a ", a.device(), " tensor");
  const c10::cuda::CUDAGuard device_guard(a.device());
  const int64_t N = a.size(0);
  // The contraction runs in float64 (math.h): the denominators σ1² − σj² lose digits in float32.
  // Converting here is a no-op for the float64 callers (the functional layer, the tracker).
  auto ad = a.to(at::kDouble).contiguous();
  auto bd = b.to(at::kDouble).contiguous();
  auto xd = xnorm2.to(at::kDouble).contiguous();
  auto yd = ynorm2.to(at::kDouble).contiguous();
  auto Sd = S.to(at::kDouble).contiguous();
  auto opts = ad.options();
  // outputs
  auto value = at::empty({N}, opts), lo = at::empty({N}, opts), hi = at::empty({N}, opts);
  if (N == 0) return {value, lo, hi};
  launch_hessian_contract_kernel(ad, bd, xd, yd, Sd, sigma_next, value, lo, hi);
  return {value, lo, hi};
}

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) { m.impl("hessian_contract", &hessian_contract_cuda); }

}  // namespace lipfast
