// lipfast::persample_linear_precond for every backend without a kernel of its own (the CPU has one, in
// csrc/cpu/persample_precond_cpu.cpp; CUDA runs this: two cuBLAS GEMMs, then batched reductions and the
// backend's hessian_contract), and lipfast::persample_conv2d_precond for every backend (MATH.md §7): a
// convolution and kh·kw GEMMs, nothing unfolded.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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

Stats6 persample_linear_precond_composite(const at::Tensor& X_, const at::Tensor& D_, const at::Tensor& P,
                                          const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                          double sigma_next) {
  check_persample_linear_precond_inputs(X_, D_, P, U, S, V);
  const auto X = as_positions(X_), D = as_positions(D_);  // [B, n] as [B, 1, n]
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

// Conv2d without unfolding (m = C_out, n = C_in·kh·kw, T output positions, col_i(p) the patch at p):
//   x_i = E_i v1 = Σ_p d_i(p) ⊙ Y_i(p) with Y = conv2d(x, P ⊙ v1ᵀ as the filters): one convolution, [B, m, T];
//   y_i = E_iᵀ u1, entry (c, kh, kw) = Σ_p x_i[c, p + offset(kh, kw)] · Z_i[(c, kh, kw), p] with
//         Z_i(p) = Pᵀ(d_i(p) ⊙ u1). Taken one kernel offset at a time: Z_off = P_offᵀ-times-(u1 ⊙ D) [B, C_in, T]
//         (a GEMM with the [C_out, C_in] slice of P at that offset) against the input shifted by the offset
//         (a strided view of the padded input). The kh·kw GEMMs together cost one weight-gradient GEMM.
// Extra memory: Y (the size of grad_out), one Z_off and its product with the shifted input (each the size of
// x's output-resolution view), a padded copy of x; never the kh·kw-times larger unfolded input.
Stats6 persample_conv2d_precond(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& P,
                                const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, double sigma_next,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  check_persample_conv2d_precond_inputs(x, grad_out, P, U, S, V, kernel_size, stride, padding, dilation);
  const int64_t B = x.size(0), C = x.size(1), m = grad_out.size(1), n = P.size(1);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], Ho = grad_out.size(2), Wo = grad_out.size(3);
  const auto dtype = x.scalar_type();
  const auto f64 = x.options().dtype(at::kDouble);
  if (B == 0) {
    auto e = at::empty({0}, f64);
    return {e, e.clone(), e.clone(), e.clone(), at::zeros({m}, f64), at::zeros({n}, f64)};
  }
  const auto u1 = U.select(1, 0).to(dtype), v1 = V.select(1, 0).to(dtype);
  const auto D = grad_out.reshape({B, m, Ho * Wo});                                          // [B, m, T]
  const auto filters = (P * v1.unsqueeze(0)).reshape({m, C, kh, kw});
  const auto Y = at::conv2d(x, filters, {}, stride, padding, dilation).reshape({B, m, Ho * Wo});
  const auto xvec = (D * Y).sum(2, false, at::kDouble);                                      // [B, m]
  const auto Du = D * u1.view({1, m, 1});                                                    // [B, m, T]
  // [kh, kw, C_in, m]: each offset's slice contiguous (a strided one makes the batched GEMM copy per sample).
  const auto Pk = P.reshape({m, C, kh, kw}).permute({2, 3, 1, 0}).contiguous();
  const auto xp = at::constant_pad_nd(x, {padding[1], padding[1], padding[0], padding[0]}, 0);
  auto yvec = at::empty({B, C, kh, kw}, f64);
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t r0 = i * dilation[0], c0 = j * dilation[1];
      const auto shifted = xp.slice(2, r0, r0 + stride[0] * (Ho - 1) + 1, stride[0])
                               .slice(3, c0, c0 + stride[1] * (Wo - 1) + 1, stride[1]);      // [B, C_in, H', W']
      const auto Pt = Pk.select(0, i).select(0, j);                                          // [C_in, m]
      const auto Z = at::matmul(Pt, Du).view({B, C, Ho, Wo});                                // [B, C_in, H', W']
      // On the strided view (no copy), summed in the inputs' dtype (a float64 sum of float32 products
      // converts the whole product first: 70× slower); T products per entry.
      yvec.select(3, j).select(2, i).copy_((shifted * Z).sum({2, 3}));
    }
  }
  const auto y = yvec.reshape({B, n});
  const auto a = at::mm(xvec, U.to(at::kDouble)), b = at::mm(y, V.to(at::kDouble));
  auto [h, lo, hi] = call_hessian_contract(a, b, (xvec * xvec).sum(1), (y * y).sum(1), S.to(at::kDouble), sigma_next);
  return {a.select(1, 0).contiguous(), h, lo, hi, xvec.sum(0), y.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("persample_linear_precond", &persample_linear_precond_composite);
  m.impl("persample_conv2d_precond", &persample_conv2d_precond);
}

}  // namespace lipfast
