// lipfast::conv2d_projections for every backend, from ATen convolutions (the CPU has its own kernel,
// csrc/cpu/conv2d_projections_cpu.cpp). Per sample i, with D_i [C_out, T] the output-gradient and X_i
// [C_in·kh·kw, T] the unfolded input (T output positions), G_i = D_i X_iᵀ and
//   G_i v1  = D_i (X_iᵀ v1):  X_iᵀ v1 is x convolved with v1 as one filter;
//   G_iᵀ u1 = X_i (D_iᵀ u1):  a correlation of x_i with its own map D_iᵀ u1, which one grouped convolution
//                             does for every sample at once (samples as the groups, channels as the batch,
//                             so stride and dilation swap roles). Nothing is unfolded.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "op_interfaces.h"

namespace lipfast {

// Shared with the CPU kernel.
void check_conv2d_projections_inputs(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& u1,
                                     const at::Tensor& v1, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "lipfast::conv2d_projections";
  LIPFAST_CHECK_DIM("lipfast::conv2d_projections", x, "x", 4, "[B, C_in, H, W]");
  LIPFAST_CHECK_DIM("lipfast::conv2d_projections", grad_out, "grad_out", 4, "[B, C_out, H', W']");
  LIPFAST_CHECK_DIM("lipfast::conv2d_projections", u1, "u1", 1, "[C_out]");
  LIPFAST_CHECK_DIM("lipfast::conv2d_projections", v1, "v1", 1, "[C_in·kh·kw]");
  LIPFAST_CHECK_FLOAT("lipfast::conv2d_projections", x, "x");
  LIPFAST_CHECK_FLOAT("lipfast::conv2d_projections", u1, "u1");
  LIPFAST_CHECK_FLOAT("lipfast::conv2d_projections", v1, "v1");
  LIPFAST_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have x's dtype ", x.scalar_type(),
                ", got ", grad_out.scalar_type());
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&u1, "u1"}, std::pair{&v1, "v1"}}) {
    LIPFAST_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t->device());
  }
  for (const auto& [a, name, least] : {std::tuple{kernel_size, "kernel_size", 1}, std::tuple{stride, "stride", 1},
                                       std::tuple{padding, "padding", 0}, std::tuple{dilation, "dilation", 1}}) {
    LIPFAST_CHECK(a.size() == 2 && a[0] >= least && a[1] >= least, op, ": ", name, " must be two ints >= ", least,
                  ", got ", a);
  }
  const int64_t B = x.size(0), C = x.size(1), m = grad_out.size(1);
  const int64_t n = C * kernel_size[0] * kernel_size[1];
  LIPFAST_CHECK(grad_out.size(0) == B, op, ": grad_out must have x's batch size B = ", B, ", got shape ",
                grad_out.sizes());
  LIPFAST_CHECK_SIZE("lipfast::conv2d_projections", u1, "u1", 0, m, "grad_out.size(1) = C_out");
  LIPFAST_CHECK(v1.size(0) == n, op, ": v1 must have C_in·kh·kw = ", C, "·", kernel_size[0], "·", kernel_size[1],
                " = ", n, " entries, got ", v1.size(0));
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (kernel_size[d] - 1) + 1, padded = x.size(2 + d) + 2 * padding[d];
    LIPFAST_CHECK(span <= padded, op, ": the kernel spans ", span, " pixels along dim ", 2 + d,
                  " (kernel_size ", kernel_size, ", dilation ", dilation, ") but x is only ", padded,
                  " pixels wide there with padding ", padding);
    out[d] = (padded - span) / stride[d] + 1;
  }
  LIPFAST_CHECK(grad_out.size(2) == out[0] && grad_out.size(3) == out[1], op, ": grad_out must have spatial size [",
                out[0], ", ", out[1], "] for x of shape ", x.sizes(), " with kernel_size ", kernel_size, ", stride ",
                stride, ", padding ", padding, ", dilation ", dilation, "; got ", grad_out.sizes());
}

// Shared with the CPU kernel: conv2d_projections' rules with u1, v1 the first columns of U, V.
void check_persample_conv2d_inputs(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& U,
                                   const at::Tensor& S, const at::Tensor& V, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "lipfast::persample_conv2d";
  LIPFAST_CHECK_DIM("lipfast::persample_conv2d", U, "U", 2, "[C_out, k]");
  LIPFAST_CHECK_DIM("lipfast::persample_conv2d", V, "V", 2, "[C_in·kh·kw, k]");
  LIPFAST_CHECK_DIM("lipfast::persample_conv2d", S, "S", 1, "[k]");
  LIPFAST_CHECK_FLOAT("lipfast::persample_conv2d", S, "S");
  const int64_t k = U.size(1);
  LIPFAST_CHECK(k >= 1, op, ": U must have at least one column (k >= 1), got shape ", U.sizes());
  LIPFAST_CHECK_SIZE("lipfast::persample_conv2d", V, "V", 1, k, "U.size(1) = k");
  LIPFAST_CHECK_SIZE("lipfast::persample_conv2d", S, "S", 0, k, "U.size(1) = k");
  LIPFAST_CHECK_SAME_DEVICE("lipfast::persample_conv2d", S, "S", x);
  check_conv2d_projections_inputs(x, grad_out, U.select(1, 0), V.select(1, 0), kernel_size, stride, padding,
                                  dilation);
}

namespace {

std::tuple<at::Tensor, at::Tensor> conv2d_projections(const at::Tensor& x, const at::Tensor& grad_out,
                                                      const at::Tensor& u1, const at::Tensor& v1,
                                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv2d_projections_inputs(x, grad_out, u1, v1, kernel_size, stride, padding, dilation);
  const int64_t B = x.size(0), C = x.size(1), m = grad_out.size(1), Ho = grad_out.size(2), Wo = grad_out.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const auto dtype = x.scalar_type();
  const auto f64 = x.options().dtype(at::kDouble);
  if (B == 0) return {at::zeros({0, m}, f64), at::zeros({0, C * kh * kw}, f64)};  // no groups to convolve
  const auto g = grad_out.reshape({B, m, Ho * Wo});
  // X_iᵀ v1 at every output position, and D_iᵀ u1 likewise: [B, T].
  const auto xv = at::conv2d(x, v1.to(dtype).reshape({1, C, kh, kw}), {}, stride, padding, dilation).reshape({B, -1});
  const auto du = at::matmul(u1.to(dtype), g);
  const auto Gv1 = at::bmm(g, xv.unsqueeze(2)).squeeze(2);
  const auto xp = at::constant_pad_nd(x.transpose(0, 1), {padding[1], padding[1], padding[0], padding[0]});
  const auto yc = at::conv2d(xp, du.reshape({B, 1, Ho, Wo}), {}, /*stride=*/dilation, /*padding=*/at::IntArrayRef{0, 0},
                             /*dilation=*/stride, /*groups=*/B)
                      .slice(2, 0, kh)
                      .slice(3, 0, kw);  // [C_in, B, kh, kw]
  return {Gv1.to(at::kDouble), yc.permute({1, 0, 2, 3}).reshape({B, C * kh * kw}).to(at::kDouble)};
}

using Stats6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats6 persample_conv2d(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& U, const at::Tensor& S,
                        const at::Tensor& V, double sigma_next, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_persample_conv2d_inputs(x, grad_out, U, S, V, kernel_size, stride, padding, dilation);
  static auto project = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lipfast::conv2d_projections", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  static auto contract = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lipfast::hessian_contract", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, double)>();
  const auto [xv, yv] =
      project.call(x, grad_out, U.select(1, 0), V.select(1, 0), kernel_size, stride, padding, dilation);
  const auto a = xv.mm(U.to(at::kDouble)), b = yv.mm(V.to(at::kDouble));  // [B, k]
  auto [value, lo, hi] = contract.call(a, b, xv.square().sum(1), yv.square().sum(1), S, sigma_next);
  return {a.select(1, 0).contiguous(), value, lo, hi, xv.sum(0), yv.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("conv2d_projections", &conv2d_projections);
  m.impl("persample_conv2d", &persample_conv2d);
}

}  // namespace lipfast
