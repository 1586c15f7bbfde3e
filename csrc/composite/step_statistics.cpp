// The tracker's per-layer, per-step reductions (MATH.md §2–§3) as two ops, so a tracked step costs a
// handful of dispatcher calls instead of dozens of small Python-level tensor ops. A weight is never
// copied: ΔW is seen only through W·v1 and Wᵀ·u1 before the step (free from the spectrum) and after it
// (probes riding along in the next spectrum's GEMMs, lipfast::subspace_iteration). Built from ATen calls and
// lipfast::hessian_contract, so one registration serves every backend without a kernel of its own (the CPU
// and CUDA have one each: csrc/cpu/step_statistics_cpu.cpp, csrc/cuda/step_statistics_cuda.cu); the
// results stay on the device (no host synchronisation) until the caller reads them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "op_interfaces.h"

namespace lipfast {
namespace {

// H[E,E] (value, lo, hi) of the one direction whose projections are x = E v1 [m], y = Eᵀ u1 [n] (float64).
at::Tensor hessian_of_direction(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U64,
                                const at::Tensor& S, const at::Tensor& V64, double sigma_next) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::hessian_contract", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double)>();
  auto a = at::mv(U64.t(), x).unsqueeze(0);  // [1, k]
  auto b = at::mv(V64.t(), y).unsqueeze(0);  // [1, k]
  auto [value, lo, hi] = op.call(a, b, x.dot(x).reshape({1}), y.dot(y).reshape({1}), S, sigma_next);
  return at::cat({value, lo, hi});           // [3]
}

void check_spectrum_inputs(const char* op, int64_t m, int64_t n, const at::Tensor& U, const at::Tensor& S,
                           const at::Tensor& V) {
  LIPFAST_CHECK(U.dim() == 2 && U.size(0) == m, op, ": U must have shape [m=", m, ", k], got ", U.sizes());
  LIPFAST_CHECK(V.dim() == 2 && V.size(0) == n && V.size(1) == U.size(1), op, ": V must have shape [n=", n,
                ", k=", U.size(1), "], got ", V.sizes());
  LIPFAST_CHECK(S.dim() == 1 && S.size(0) == U.size(1), op, ": S must have shape [k=", U.size(1), "], got ",
                S.sizes());
  LIPFAST_CHECK(U.size(1) >= 1, op, ": U must have at least one column (k >= 1), got shape ", U.sizes());
}

}  // namespace

// Shared with the CPU kernels (csrc/cpu/step_statistics_cpu.cpp).
at::Tensor as_matrix(const at::Tensor& t) { return t.dim() == 2 ? t : t.reshape({t.size(0), -1}); }

void check_gradient_statistics_inputs(const at::Tensor& proj, const at::Tensor& hess, const at::Tensor& hess_lo,
                                      const at::Tensor& hess_hi, const at::Tensor& G_, const at::Tensor& U,
                                      const at::Tensor& S, const at::Tensor& V, const c10::optional<at::Tensor>& Gv1,
                                      const c10::optional<at::Tensor>& Gtu1, const c10::optional<at::Tensor>& known) {
  constexpr const char* op = "lipfast::gradient_statistics";
  LIPFAST_CHECK(G_.dim() >= 2 && G_.size(0) > 0, op, ": G must have shape [m, n] (or a weight's shape [m, ...], read as "
                "[m, n]), got ", G_.sizes());
  const auto G = as_matrix(G_);
  check_spectrum_inputs(op, G.size(0), G.size(1), U, S, V);
  if (known.has_value()) {
    LIPFAST_CHECK(known->dim() >= 2 && known->size(0) == G.size(0) && known->numel() == G.numel(), op,
                  ": known must have G's shape ", G_.sizes(), " (or [m, n]), got ", known->sizes());
    LIPFAST_CHECK_SAME_DEVICE("lipfast::gradient_statistics", *known, "known", G);
    LIPFAST_CHECK(at::isFloatingType(known->scalar_type()), op, ": known must be a floating-point tensor, got ",
                  known->scalar_type());
  }
  LIPFAST_CHECK(proj.dim() == 1 && hess.sizes() == proj.sizes() && hess_lo.sizes() == proj.sizes() &&
                    hess_hi.sizes() == proj.sizes(),
                op, ": proj, hess, hess_lo, hess_hi must all have shape [N], got ", proj.sizes(), ", ",
                hess.sizes(), ", ", hess_lo.sizes(), ", ", hess_hi.sizes());
  LIPFAST_CHECK(Gv1.has_value() == Gtu1.has_value(), op, ": Gv1 and Gtu1 must be given together (or neither)");
  if (Gv1.has_value()) {
    LIPFAST_CHECK(Gv1->dim() == 1 && Gv1->size(0) == G.size(0), op, ": Gv1 must have shape [m=", G.size(0),
                  "], got ", Gv1->sizes());
    LIPFAST_CHECK(Gtu1->dim() == 1 && Gtu1->size(0) == G.size(1), op, ": Gtu1 must have shape [n=", G.size(1),
                  "], got ", Gtu1->sizes());
    LIPFAST_CHECK_SAME_DEVICE("lipfast::gradient_statistics", *Gv1, "Gv1", G);
    LIPFAST_CHECK_SAME_DEVICE("lipfast::gradient_statistics", *Gtu1, "Gtu1", G);
    LIPFAST_CHECK_FLOAT("lipfast::gradient_statistics", *Gv1, "Gv1");
    LIPFAST_CHECK_FLOAT("lipfast::gradient_statistics", *Gtu1, "Gtu1");
  }
}

void check_update_statistics_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                                    const at::Tensor& S, const at::Tensor& V) {
  constexpr const char* op = "lipfast::update_statistics";
  LIPFAST_CHECK_DIM("lipfast::update_statistics", x, "x", 1, "[m]");
  LIPFAST_CHECK_DIM("lipfast::update_statistics", y, "y", 1, "[n]");
  check_spectrum_inputs(op, x.size(0), y.size(0), U, S, V);
}

namespace {

// gradient_statistics: before the step. Returns float64 [12]:
//   0 N, 1 Σ(s_i − K), 2 Σ(s_i − K)², 3 Σ H[G_i,G_i], 4 Σ lo, 5 Σ hi   (additive across ranks)
//   6 K = u1ᵀ ḡ v1 (the shift, ≈ mean s_i), 7 H[ḡ,ḡ], 8 lo, 9 hi, 10 1.0 if everything is finite else 0.0,
//   11 known_scale·u1ᵀ M v1 for the known (momentum) step's buffer M (0 without one)
// with s_i = scale·proj_i, H[G_i,G_i] = scale²·hess_i, ḡ = G / loss_factor (G·v1 and Gᵀ·u1 read from Gv1,
// Gtu1 when given). G and M may have a weight's shape [m, ...]: they are read as [m, n].
at::Tensor gradient_statistics(const at::Tensor& proj,     // [N] float64
                                                       const at::Tensor& hess,     // [N]
                                                       const at::Tensor& hess_lo,  // [N]
                                                       const at::Tensor& hess_hi,  // [N]
                                                       const at::Tensor& G_,       // [m, n] weight gradient
                                                       const at::Tensor& U,        // [m, k]
                                                       const at::Tensor& S,        // [k]
                                                       const at::Tensor& V,        // [n, k]
                                                       double sigma_next, double scale, double loss_factor,
                                                       const c10::optional<at::Tensor>& Gv1,
                                                       const c10::optional<at::Tensor>& Gtu1,
                                                       const c10::optional<at::Tensor>& known, double known_scale) {
  check_gradient_statistics_inputs(proj, hess, hess_lo, hess_hi, G_, U, S, V, Gv1, Gtu1, known);
  const auto G = as_matrix(G_);
  auto U64 = U.to(at::kDouble), V64 = V.to(at::kDouble), S64 = S.to(at::kDouble);
  auto u1 = U.select(1, 0).to(G.scalar_type()), v1 = V.select(1, 0).to(G.scalar_type());
  auto x = (Gv1.has_value() ? *Gv1 : at::mv(G, v1)).to(at::kDouble).div(loss_factor);       // ḡ v1
  auto y = (Gtu1.has_value() ? *Gtu1 : at::mv(G.t(), u1)).to(at::kDouble).div(loss_factor);  // ḡᵀ u1
  auto K = U64.select(1, 0).dot(x);
  auto hg = hessian_of_direction(x, y, U64, S64, V64, sigma_next);
  auto s = proj.to(at::kDouble).mul(scale).sub(K);
  const double s2 = scale * scale;
  auto sums = at::stack({s.sum(), s.mul(s).sum(), hess.to(at::kDouble).sum().mul(s2),
                         hess_lo.to(at::kDouble).sum().mul(s2), hess_hi.to(at::kDouble).sum().mul(s2)});
  auto finite = at::cat({x, y, sums}).isfinite().all().to(at::kDouble).reshape({1});
  auto n = at::full({1}, static_cast<double>(proj.size(0)), sums.options());
  // The known step's projection u1ᵀ M v1: M v1 in M's dtype, the rest in float64.
  auto kn = known.has_value()
                ? U64.select(1, 0).dot(at::mv(as_matrix(*known), V.select(1, 0).to(known->scalar_type())).to(at::kDouble))
                      .mul(known_scale)
                      .reshape({1})
                : at::zeros({1}, sums.options());
  return at::cat({n, sums, K.reshape({1}), hg, finite, kn});
}

// update_statistics: after the step, from x = ΔW v1 [m] and y = ΔWᵀ u1 [n] (float64) and the spectrum
// before the step. Returns float64 [5]: ⟨J, ΔW⟩ = u1ᵀ x, ½H[ΔW,ΔW] (value, lo, hi), 1.0 if finite else 0.0.
at::Tensor update_statistics(const at::Tensor& x,  // [m] float64
                             const at::Tensor& y,  // [n] float64
                             const at::Tensor& U,  // [m, k]
                             const at::Tensor& S,  // [k]
                             const at::Tensor& V,  // [n, k]
                             double sigma_next) {
  check_update_statistics_inputs(x, y, U, S, V);
  auto U64 = U.to(at::kDouble), V64 = V.to(at::kDouble), S64 = S.to(at::kDouble);
  auto x64 = x.to(at::kDouble), y64 = y.to(at::kDouble);
  auto first = U64.select(1, 0).dot(x64).reshape({1});
  auto second = hessian_of_direction(x64, y64, U64, S64, V64, sigma_next).mul(0.5);
  auto finite = at::cat({x64, y64}).isfinite().all().to(at::kDouble).reshape({1});
  return at::cat({first, second, finite, x64.norm().reshape({1}), y64.norm().reshape({1})});
}

}  // namespace

// For the CUDA kernels' cases they leave to ATen (csrc/cuda/step_statistics_cuda.cu).
at::Tensor gradient_statistics_composite(const at::Tensor& proj, const at::Tensor& hess, const at::Tensor& hess_lo,
                                         const at::Tensor& hess_hi, const at::Tensor& G, const at::Tensor& U,
                                         const at::Tensor& S, const at::Tensor& V, double sigma_next, double scale,
                                         double loss_factor, const c10::optional<at::Tensor>& Gv1,
                                         const c10::optional<at::Tensor>& Gtu1, const c10::optional<at::Tensor>& known,
                                         double known_scale) {
  return gradient_statistics(proj, hess, hess_lo, hess_hi, G, U, S, V, sigma_next, scale, loss_factor, Gv1, Gtu1,
                             known, known_scale);
}

at::Tensor update_statistics_composite(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                                       const at::Tensor& S, const at::Tensor& V, double sigma_next) {
  return update_statistics(x, y, U, S, V, sigma_next);
}

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("gradient_statistics", &gradient_statistics);
  m.impl("update_statistics", &update_statistics);
}

}  // namespace lipfast
