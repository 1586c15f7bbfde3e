// lipfast::hessian_tail, composite kernel (what CUDA runs): the second-order term's unknown tail by conjugate
// gradients (MATH.md §1, "Solving the tail instead") written with ATen ops. It reads two scalars back a
// step to stop as soon as the bracket meets the tolerance, as the CPU kernel (csrc/cpu/hessian_tail_cpu.cpp)
// does: a fixed, sync-free count would cost every layer the full budget of launches. A fused device kernel
// is the way to a tracked step without host reads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "math.h"
#include "op_interfaces.h"

namespace lipfast {

// Shared with the CPU kernel.
void check_hessian_tail_inputs(const at::Tensor& W, const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                               const at::Tensor& S, const at::Tensor& V, int64_t max_iters, double tol, double atol) {
  constexpr const char* op = "lipfast::hessian_tail";
  LIPFAST_CHECK_DIM("lipfast::hessian_tail", W, "W", 2, "[m, n]");
  LIPFAST_CHECK_FLOAT("lipfast::hessian_tail", W, "W");
  LIPFAST_CHECK_DIM("lipfast::hessian_tail", x, "x", 1, "[m]");
  LIPFAST_CHECK_DIM("lipfast::hessian_tail", y, "y", 1, "[n]");
  const int64_t m = W.size(0), n = W.size(1);
  LIPFAST_CHECK(x.size(0) == m, op, ": x must have shape [m=", m, "] (W's rows), got ", x.sizes());
  LIPFAST_CHECK(y.size(0) == n, op, ": y must have shape [n=", n, "] (W's columns), got ", y.sizes());
  LIPFAST_CHECK(U.dim() == 2 && U.size(0) == m && U.size(1) >= 1, op, ": U must have shape [m=", m,
                ", k >= 1], got ", U.sizes());
  LIPFAST_CHECK(V.dim() == 2 && V.size(0) == n && V.size(1) == U.size(1), op, ": V must have shape [n=", n,
                ", k=", U.size(1), "], got ", V.sizes());
  LIPFAST_CHECK(S.dim() == 1 && S.size(0) == U.size(1), op, ": S must have shape [k=", U.size(1), "], got ",
                S.sizes());
  for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{&y, "y"}, std::pair{&U, "U"}, std::pair{&S, "S"},
                                 std::pair{&V, "V"}}) {
    LIPFAST_CHECK(t->device() == W.device(), op, ": ", name, " must be on ", W.device(), " (W's device), got ",
                  t->device());
  }
  LIPFAST_CHECK(max_iters >= 0, op, ": max_iters must be >= 0, got ", max_iters);
  LIPFAST_CHECK(tol >= 0.0, op, ": tol must be >= 0, got ", tol);
  LIPFAST_CHECK(atol >= 0.0, op, ": atol must be >= 0, got ", atol);
}

namespace {

at::Tensor hessian_tail(const at::Tensor& W,  // [m, n] the matrix whose unknown singular pairs are solved for
                        const at::Tensor& x,  // [m] float64, E v1
                        const at::Tensor& y,  // [n] float64, Eᵀ u1
                        const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,  // the k known triplets
                        double sigma_next, int64_t max_iters, double tol, double atol) {
  check_hessian_tail_inputs(W, x, y, U, S, V, max_iters, tol, atol);
  const auto U64 = U.to(at::kDouble), V64 = V.to(at::kDouble), x64 = x.to(at::kDouble), y64 = y.to(at::kDouble);
  const auto dtype = W.scalar_type();
  const double s1h = S.select(0, 0).item<double>();
  // The residual of [x; y] off the known pairs, and the operator M = σ1 I − [[0, W], [Wᵀ, 0]] on that space.
  auto project = [&](const at::Tensor& z1, const at::Tensor& z2) {
    return std::pair{z1 - at::mv(U64, at::mv(U64.t(), z1)), z2 - at::mv(V64, at::mv(V64.t(), z2))};
  };
  auto apply = [&](const at::Tensor& p1, const at::Tensor& p2) {
    const auto Wp2 = at::mv(W, p2.to(dtype)).to(at::kDouble), Wtp1 = at::mv(W.t(), p1.to(dtype)).to(at::kDouble);
    return project(p1 * s1h - Wp2, p2 * s1h - Wtp1);
  };
  auto [b1, b2] = project(x64, y64);
  // On the unknown pairs M's eigenvalues σ1 ∓ σ_j lie in [σ1 − σ_{k+1}, σ1 + σ_{k+1}] (σ1 for a null space):
  // what CG has not summed yet, rᵀM⁻¹r, lies in [‖r‖²/(σ1 + σ_{k+1}), ‖r‖²/(σ1 − σ_{k+1})]. Before the first
  // step (r = b) that is the truncation bracket of MATH.md §1, and ‖r‖²/σ1 its estimate.
  const double inv_hi = 1.0 / (s1h - sigma_next), inv_lo = 1.0 / (s1h + sigma_next);
  auto r1 = b1.clone(), r2 = b2.clone(), p1 = b1.clone(), p2 = b2.clone();
  double rr = (b1.dot(b1) + b2.dot(b2)).item<double>();
  const double mass = rr;
  double T = 0.0, steps = 0.0;
  auto meets_tol = [&] { return rr * (inv_hi - inv_lo) <= std::max(tol * (T + rr * inv_lo), atol); };
  bool broke = false;
  if (s1h > sigma_next && !meets_tol()) {
    for (int64_t it = 0; it < max_iters; ++it) {
      auto [q1, q2] = apply(p1, p2);
      const double pq = (p1.dot(q1) + p2.dot(q2)).item<double>();
      if (!(pq > 0.0)) {  // M not positive on the iterate: W after the step has a pair at or above σ1
        broke = true;
        break;
      }
      const double alpha = rr / pq;
      T += alpha * rr;
      r1.sub_(q1, alpha);
      r2.sub_(q2, alpha);
      const double rr_new = (r1.dot(r1) + r2.dot(r2)).item<double>(), beta = rr_new / rr;
      rr = rr_new;
      steps += 1.0;
      if (meets_tol()) break;
      p1 = r1 + beta * p1;
      p2 = r2 + beta * p2;
    }
  }
  const auto result = tail_result(T, rr, mass, s1h, sigma_next, steps, broke);
  return at::tensor(std::vector<double>(result.begin(), result.end()), x.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) { m.impl("hessian_tail", &hessian_tail); }

}  // namespace lipfast
