// Warm-started block subspace iteration with Rayleigh–Ritz (MATH.md §5). Built from ATen calls only
// (GEMM, Cholesky, a p×p eigh), so one registration serves every backend without a kernel of its own
// (the CPU and CUDA have one each). It synchronises with the host a few times per sweep: the Cholesky
// QR's info flag, the finiteness check of σ1 and (tol > 0 only) the convergence test are read with .item().
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "op_interfaces.h"

namespace lipfast {

// Shared with the CPU kernel (csrc/cpu/subspace_iteration_cpu.cpp).
void check_subspace_iteration_inputs(const at::Tensor& W, const at::Tensor& V0, int64_t k, int64_t max_iters,
                                     double tol, const c10::optional<at::Tensor>& right,
                                     const c10::optional<at::Tensor>& left) {
  constexpr const char* op = "lipfast::subspace_iteration";
  LIPFAST_CHECK_DIM("lipfast::subspace_iteration", W, "W", 2, "[m, n]");
  LIPFAST_CHECK_DIM("lipfast::subspace_iteration", V0, "V0", 2, "[n, p]");
  LIPFAST_CHECK_FLOAT("lipfast::subspace_iteration", W, "W");
  LIPFAST_CHECK(V0.scalar_type() == W.scalar_type(), op, ": V0 must have W's dtype ", W.scalar_type(),
                ", got ", V0.scalar_type());
  LIPFAST_CHECK_SAME_DEVICE("lipfast::subspace_iteration", V0, "V0", W);
  const int64_t m = W.size(0), n = W.size(1), p = V0.size(1);
  LIPFAST_CHECK_SIZE("lipfast::subspace_iteration", V0, "V0", 0, n, "W.size(1)");
  LIPFAST_CHECK(p >= 1 && p <= std::min(m, n), op, ": V0 must have between 1 and min(m, n) = ",
                std::min(m, n), " columns, got ", p);
  LIPFAST_CHECK(k >= 1 && k <= p, op, ": k must be in [1, V0.size(1) = ", p, "], got ", k);
  LIPFAST_CHECK(max_iters >= 1, op, ": max_iters must be >= 1, got ", max_iters);
  LIPFAST_CHECK(tol >= 0.0, op, ": tol must be >= 0, got ", tol);
  if (right.has_value()) {
    LIPFAST_CHECK(right->dim() == 2 && right->size(0) == n, op, ": right must have shape [n=", n, ", a], got ",
                  right->sizes());
    LIPFAST_CHECK_SAME_DEVICE("lipfast::subspace_iteration", *right, "right", W);
  }
  if (left.has_value()) {
    LIPFAST_CHECK(left->dim() == 2 && left->size(0) == m, op, ": left must have shape [m=", m, ", b], got ",
                  left->sizes());
    LIPFAST_CHECK_SAME_DEVICE("lipfast::subspace_iteration", *left, "left", W);
  }
}

namespace {

// Orthonormal basis of the columns of Z [n, p] by Cholesky QR in float64: a Gram matrix, its Cholesky
// factor and one triangular solve cost far less than Householder QR on a tall-skinny block (measured: QR was
// most of a plain-torch sweep of the 784x9 block of an MLP).
// Done in float64, it loses orthogonality only as κ(Z)²·1e-16, so one pass suffices even for float32
// weights (whose rounding of the result, ~1e-7, is the only error left). A block too ill-conditioned for
// Cholesky (rank-deficient W, a collapsed block) falls back to Householder QR.
at::Tensor orthonormalize(const at::Tensor& Z) {
  auto Zd = Z.to(at::kDouble);
  auto [L, info] = at::linalg_cholesky_ex(Zd.t().mm(Zd));
  if (info.item<int64_t>() != 0) {
    return std::get<0>(at::linalg_qr(Z, "reduced"));
  }
  // Z L^{-T}: solve L X = Zᵀ for X, then transpose back.
  return at::linalg_solve_triangular(L, Zd.t(), /*upper=*/false).t().to(Z.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
subspace_iteration(const at::Tensor& W,                     // [m, n]
                   const at::Tensor& V0,                    // [n, p]
                   int64_t k, int64_t max_iters, double tol,
                   const c10::optional<at::Tensor>& right,  // [n, a] probes: W·right
                   const c10::optional<at::Tensor>& left) { // [m, b] probes: Wᵀ·left
  check_subspace_iteration_inputs(W, V0, k, max_iters, tol, right, left);
  constexpr const char* op = "lipfast::subspace_iteration";
  const int64_t m = W.size(0), n = W.size(1), p = V0.size(1);
  const auto dtype = W.scalar_type();
  auto R = right.has_value() ? right->to(dtype) : at::empty({n, 0}, W.options());
  auto L = left.has_value() ? left->to(dtype) : at::empty({m, 0}, W.options());
  const int64_t a = R.size(1), b = L.size(1);
  at::Tensor W_right, Wt_left;

  at::Tensor V = orthonormalize(V0.contiguous());
  at::Tensor U, S, residual, Z;
  int64_t it = 0;
  while (true) {
    ++it;
    // The probes ride along in the first sweep's GEMMs: W is read once for both.
    auto Y = W.mm(it == 1 && a > 0 ? at::cat({V, R}, 1) : V);  // [m, p (+a)]
    if (it == 1) {
      W_right = Y.slice(1, p, p + a).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
      Y = Y.slice(1, 0, p);
    }
    auto Yd = Y.to(at::kDouble);
    auto [theta, Q] = at::linalg_eigh(Yd.t().mm(Yd));  // ascending
    theta = theta.flip({0}).clamp_min(0.0);
    Q = Q.flip({1});
    S = theta.sqrt();                             // [p] float64, descending
    LIPFAST_CHECK(std::isfinite(S[0].item<double>()), op,
                  ": W must be finite, got a matrix with NaN or Inf entries (shape ", W.sizes(), ")");
    // Columns with σ_j == 0 (rank-deficient W) get u_j = 0: their Hessian weight is then carried,
    // exactly, by the unknown-mass term (MATH.md §1).
    auto inv = at::where(S > 0.0, S.reciprocal(), at::zeros_like(S));
    auto Qw = Q.to(dtype);
    V = V.mm(Qw);                                 // [n, p] Ritz vectors
    U = Yd.mm(Q).mul(inv).to(dtype);              // [m, p]
    Z = W.t().mm(it == 1 && b > 0 ? at::cat({U, L}, 1) : U);  // [n, p (+b)] ≈ σ_j v_j: next block
    if (it == 1) {
      Wt_left = Z.slice(1, p, p + b).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
      Z = Z.slice(1, 0, p);
    }
    residual = (Z.to(at::kDouble) - V.to(at::kDouble).mul(S)).norm(2, {0});  // [p]
    if (it >= max_iters) break;
    if (tol > 0.0 && residual.slice(0, 0, k).max().item<double>() <= tol * S[0].item<double>()) break;
    V = orthonormalize(Z);
  }
  // Z = WᵀW V / S has advanced one power step past the Ritz block V: returned as the next call's warm
  // start, so a tracker calling once per training step advances the subspace every step at the cost of
  // one sweep (two GEMMs), instead of re-running Rayleigh–Ritz on the block it already had.
  // iters lives on W's device, and U, V, next are transposed views of row blocks (the CPU kernel's
  // layout), as the fake kernel (lipfast/ops.py) declares.
  auto rows = [](const at::Tensor& t) { return t.t().contiguous().t(); };
  return {rows(U), S, rows(V), residual, at::scalar_tensor(it, W.options().dtype(at::kLong)), rows(Z), W_right,
          Wt_left};
}

}  // namespace

// For the CUDA kernel's blocks wider than its in-kernel Jacobi takes (csrc/cuda/subspace_iteration_cuda.cu).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
subspace_iteration_composite(const at::Tensor& W, const at::Tensor& V0, int64_t k, int64_t max_iters, double tol,
                             const c10::optional<at::Tensor>& right, const c10::optional<at::Tensor>& left) {
  return subspace_iteration(W, V0, k, max_iters, tol, right, left);
}

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) {
  m.impl("subspace_iteration", &subspace_iteration);
}

}  // namespace lipfast
