// lipfast::persample_linear.sums for every backend without a kernel of its own (the CPU has one, in
// csrc/cpu/persample_linear_cpu.cpp): the backend's persample_linear, then the sums Σ_i G_i v1 = Dᵀ(X v1)
// and Σ_i G_iᵀ u1 = Xᵀ(D u1) over the B·T rows of X and D, four GEMVs in the inputs' dtype.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lipfast {
namespace {

using Stats4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats4 call_persample_linear(const at::Tensor& X, const at::Tensor& D, const at::Tensor& U, const at::Tensor& S,
                             const at::Tensor& V, double sigma_next) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::persample_linear", "")
                       .typed<Stats4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, double)>();
  return op.call(X, D, U, S, V, sigma_next);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> persample_linear_sums(
    const at::Tensor& X, const at::Tensor& D, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
    double sigma_next) {
  auto [proj, hess, lo, hi] = call_persample_linear(X, D, U, S, V, sigma_next);  // checks the inputs
  const int64_t n = X.size(-1), m = D.size(-1);  // X [B, T, n] or [B, n]
  const auto X2 = X.reshape({-1, n}), D2 = D.reshape({-1, m});
  const auto xv = at::mv(X2, V.select(1, 0).to(X.scalar_type()).contiguous());
  const auto du = at::mv(D2, U.select(1, 0).to(X.scalar_type()).contiguous());
  return {proj, hess, lo, hi, at::mv(D2.t(), xv).to(at::kDouble), at::mv(X2.t(), du).to(at::kDouble)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("persample_linear.sums", &persample_linear_sums);
}

}  // namespace lipfast
