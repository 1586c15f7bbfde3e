// lipfast::persample_linear_precond for every backend without a kernel of its own (the CPU has one, in
// csrc/cpu/persample_precond_cpu.cpp; CUDA runs this: two cuBLAS GEMMs, then batched reductions and the
// backend's hessian_contract), and lipfast::persample_conv2d_precond for every backend (MATH.md §7).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "op_interfaces.h"

namespace lipfast {
namespace {

using Stats3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Stats6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats3 call_hessian_contract(const at::Tensor& a, const at::Tensor& b, const at::Tensor& xn, const at::Tensor& yn,
                             const at::Tensor& S, double sigma_next) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::hessian_contract", "")
                       .typed<Stats3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, double)>();
  return op.call(a, b, xn, yn, S, sigma_next);
}

Stats6 call_linear_precond(const at::Tensor& X, const at::Tensor& D, const at::Tensor& P, const at::Tensor& U,
                           const at::Tensor& S, const at::Tensor& V, double sigma_next) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::persample_linear_precond", "")
                       .typed<Stats6(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, double)>();
  return op.call(X, D, P, U, S, V, sigma_next);
}

Stats6 persample_linear_precond_composite(const at::Tensor& X, const at::Tensor& D, const at::Tensor& P,
                                          const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                          double sigma_next) {
  check_persample_linear_precond_inputs(X, D, P, U, S, V);
  const int64_t B = X.size(0), T = X.size(1), n = X.size(2), m = D.size(2);
  const auto dtype = X.scalar_type();
  const auto X2 = X.reshape({B * T, n}), D2 = D.reshape({B * T, m});
  const auto Y = at::mm(X2 * V.select(1, 0).to(dtype), P.t());  // [B·T, m] = (X ⊙ v1) Pᵀ
  const auto Z = at::mm(D2 * U.select(1, 0).to(dtype), P);      // [B·T, n] = (D ⊙ u1) P
  // x_i = Σ_t D_it ⊙ Y_it, y_i = Σ_t X_it ⊙ Z_it, summed in float64.
  const auto x = (D2 * Y).reshape({B, T, m}).sum(1, false, at::kDouble);
  const auto y = (X2 * Z).reshape({B, T, n}).sum(1, false, at::kDouble);
  const auto a = at::mm(x, U.to(at::kDouble)), b = at::mm(y, V.to(at::kDouble));
  auto [h, lo, hi] = call_hessian_contract(a, b, (x * x).sum(1), (y * y).sum(1), S.to(at::kDouble), sigma_next);
  return {a.select(1, 0).contiguous(), h, lo, hi, x.sum(0), y.sum(0)};
}

void check_persample_conv2d_precond_inputs(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& P,
                                           const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "lipfast::persample_conv2d_precond";
  check_persample_conv2d_inputs(x, grad_out, U, S, V, kernel_size, stride, padding, dilation);
  LIPFAST_CHECK_DIM("lipfast::persample_conv2d_precond", P, "P", 2, "[C_out, C_in·kh·kw]");
  const int64_t m = grad_out.size(1), n = x.size(1) * kernel_size[0] * kernel_size[1];
  LIPFAST_CHECK(P.size(0) == m && P.size(1) == n, op, ": P must have the reshaped weight's shape [C_out, C_in·kh·kw] = [",
                m, ", ", n, "], got ", P.sizes());
  LIPFAST_CHECK(P.scalar_type() == x.scalar_type(), op, ": P must have x's dtype ", x.scalar_type(), ", got ",
                P.scalar_type());
  LIPFAST_CHECK(P.device() == x.device(), op, ": P must be on ", x.device(), ", got ", P.device());
}

// Conv2d through the unfolded input: X_i [T, C_in·kh·kw] (T output positions), D_i [T, C_out], then the Linear
// op. Y = (X ⊙ v1) Pᵀ could be a convolution, but y_i = Σ_t X_it ⊙ Z_it needs each patch beside its own
// Z_it = Pᵀ(D_it ⊙ u1), a tensor of the unfolded size in any case. Samples go in chunks of at most
// kChunkElems unfolded elements, so the extra memory is about 3·kChunkElems elements (unfold, Z, a copy),
// whatever the batch.
constexpr int64_t kChunkElems = int64_t{1} << 23;

Stats6 persample_conv2d_precond(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& P,
                                const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, double sigma_next,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  check_persample_conv2d_precond_inputs(x, grad_out, P, U, S, V, kernel_size, stride, padding, dilation);
  const int64_t B = x.size(0), m = grad_out.size(1), n = P.size(1);
  const int64_t T = grad_out.size(2) * grad_out.size(3);
  const int64_t per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, T * n));
  std::vector<at::Tensor> parts[4];
  auto opts = S.options().dtype(at::kDouble);
  at::Tensor Gv1 = at::zeros({m}, opts.device(x.device())), Gtu1 = at::zeros({n}, opts.device(x.device()));
  for (int64_t i0 = 0; i0 < B || (B == 0 && i0 == 0); i0 += per_chunk) {
    const int64_t len = std::min(per_chunk, B - i0);
    const auto xc = x.narrow(0, i0, len), dc = grad_out.narrow(0, i0, len);
    const auto cols = at::im2col(xc, kernel_size, dilation, padding, stride).transpose(1, 2);  // [b, T, n]
    const auto D = dc.reshape({len, m, T}).transpose(1, 2);                                      // [b, T, m]
    auto [proj, h, lo, hi, gv, gtu] = call_linear_precond(cols, D, P, U, S, V, sigma_next);
    parts[0].push_back(proj);
    parts[1].push_back(h);
    parts[2].push_back(lo);
    parts[3].push_back(hi);
    Gv1.add_(gv);
    Gtu1.add_(gtu);
    if (B == 0) break;
  }
  return {at::cat(parts[0]), at::cat(parts[1]), at::cat(parts[2]), at::cat(parts[3]), Gv1, Gtu1};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("persample_linear_precond", &persample_linear_precond_composite);
  m.impl("persample_conv2d_precond", &persample_conv2d_precond);
}

}  // namespace lipfast
