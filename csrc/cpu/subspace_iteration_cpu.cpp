// CPU kernel of lipfast::subspace_iteration (MATH.md §5): the same iteration as the composite kernel
// (csrc/composite/subspace_iteration.cpp, which serves the other backends), arranged for a CPU where the
// tracker runs one warm sweep per layer per training step and every microsecond counts:
// - The block is never orthonormalised on its own. Rayleigh–Ritz on a non-orthonormal block Z only needs
//   its p×p Gram matrix M = ZᵀZ = LLᵀ: the Ritz pairs of WᵀW in span(Z) are the eigenpairs of
//   L⁻¹ (WZ)ᵀ(WZ) L⁻ᵀ, and V = Z L⁻ᵀQ, U = WZ L⁻ᵀQ / S. All O(p³) work is on p×p matrices (small_linalg.h,
//   no LAPACK dispatch); the O(p²·n) products run in float64 through ATen.
// - Blocks are kept as rows ([p, n] row-major): MKL's GEMM of a row block with W (Uᵀ·W) is ~4× faster
//   than W.mT·U on the skinny shapes of a sweep (bench/RESULTS.md).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "row_kernels.h"
#include "../small_linalg.h"
#include "op_interfaces.h"

namespace lipfast {

namespace {

constexpr const char* kOp = "lipfast::subspace_iteration";

small::Mat to_small(const at::Tensor& t, int64_t p) {
  auto c = t.contiguous();
  const double* d = c.data_ptr<double>();
  return small::Mat(d, d + p * p);
}

at::Tensor from_small(const small::Mat& A, int64_t rows, int64_t cols) {
  auto t = at::empty({rows, cols}, at::TensorOptions().dtype(at::kDouble));
  std::copy(A.begin(), A.begin() + rows * cols, t.data_ptr<double>());
  return t;
}

// small::orthonormalizer's T, or empty when the block is (numerically) rank-deficient.
small::Mat orthonormalizer(small::Mat M, int64_t p) {
  std::vector<double> d(p);
  small::Mat Linv(p * p), T(p * p);
  if (!small::orthonormalizer(small::SerialTeam{}, M.data(), p, d.data(), Linv.data(), T.data())) return {};
  return T;
}

// Eigenpairs of a symmetric p×p matrix, eigenvalues descending, by LAPACK (blocks wider than Jacobi suits).
void lapack_eigh_desc(small::Mat& C, int64_t p, std::vector<double>& w, small::Mat& Q) {
  auto [theta, vecs] = at::linalg_eigh(from_small(C, p, p));  // ascending
  theta = theta.flip({0}).contiguous();
  vecs = vecs.flip({1}).contiguous();
  w.assign(theta.data_ptr<double>(), theta.data_ptr<double>() + p);
  Q = to_small(vecs, p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
subspace_iteration_cpu(const at::Tensor& W_,                    // [m, n]
                       const at::Tensor& V0,                    // [n, p]
                       int64_t k, int64_t max_iters, double tol,
                       const c10::optional<at::Tensor>& right,  // [n, a] probes: W·right
                       const c10::optional<at::Tensor>& left) { // [m, b] probes: Wᵀ·left
  check_subspace_iteration_inputs(W_, V0, k, max_iters, tol, right, left);
  const auto W = W_.contiguous();
  const auto dtype = W.scalar_type();
  const int64_t m = W.size(0), n = W.size(1), p = V0.size(1);
  const auto f64 = W.options().dtype(at::kDouble);
  auto Rt = right.has_value() ? right->to(dtype).t() : at::empty({0, n}, W.options());  // [a, n]
  auto Lt = left.has_value() ? left->to(dtype).t() : at::empty({0, m}, W.options());    // [b, m]
  const int64_t a = Rt.size(0), b = Lt.size(0);

  // Blocks live as rows: a block handed back from an earlier call (a transposed view) costs no copy.
  at::Tensor Zt = V0.t().contiguous();  // [p, n] the current block
  at::Tensor Ucat, Vt, W_right, Wt_left;
  auto S = at::empty({p}, f64), residual = at::empty({p}, f64);
  double* ps = S.data_ptr<double>();
  double* pr = residual.data_ptr<double>();
  std::vector<double> theta(p);
  std::vector<int64_t> order(p);
  small::Mat M(p * p), Gy(p * p), Q(p * p), TQt(p * p), TQt_inv(p * p), BA(p * p), C(p * p), TQ(p * p);
  auto Yt = at::empty({p, m}, W.options());  // Y's columns as rows
  int64_t it = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "subspace_iteration", [&] {
    while (true) {
      ++it;
      rows::gram(Zt.data_ptr<scalar_t>(), p, n, M.data());
      small::Mat T = orthonormalizer(M, p);
      if (T.empty()) {  // a collapsed block (rank-deficient W): Householder QR, as the composite kernel does
        Zt = std::get<0>(at::linalg_qr(Zt.t().to(at::kDouble), "reduced")).t().to(dtype).contiguous();
        T.assign(p * p, 0.0);
        for (int64_t i = 0; i < p; ++i) T[i * p + i] = 1.0;
      }
      // Y = W Z, with the probes riding along in the first sweep's GEMM. W·(rows)ᵀ, not (rows)·Wᵀ: MKL's
      // kernel for the latter is up to 2× slower on these shapes (bench/RESULTS.md).
      const int64_t cols_y = it == 1 ? p + a : p;
      auto Y = W.mm((it == 1 && a > 0 ? at::cat({Zt, Rt}) : Zt).t());  // [m, p (+a)]
      if (it == 1) W_right = Y.slice(1, p, cols_y).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
      rows::transpose(Y.data_ptr<scalar_t>(), m, cols_y, p, Yt.data_ptr<scalar_t>());
      const scalar_t* py = Yt.data_ptr<scalar_t>();
      rows::gram(py, p, m, Gy.data());
      bool finite;
      if (p <= small::kJacobiMaxSize) {  // the same code the CUDA kernel runs (small_linalg.h)
        finite = small::rayleigh_ritz(small::SerialTeam{}, T.data(), Gy.data(), p, ps, TQt.data(), TQt_inv.data(), theta.data(),
                                      order.data(), BA.data(), C.data(), Q.data(), TQ.data());
      } else {
        C = small::congruence(T, Gy, p);  // Tᵀ (YᵀY) T
        finite = std::all_of(C.begin(), C.end(), [](double x) { return std::isfinite(x); });
        if (finite) {
          lapack_eigh_desc(C, p, theta, Q);
          TQ = small::matmul(T, Q, p);  // Ritz vectors: V = Z·TQ, U = Y·TQ / S
          for (int64_t j = 0; j < p; ++j) {
            ps[j] = std::sqrt(std::max(theta[j], 0.0));
            // Columns with σ_j == 0 (rank-deficient W) get u_j = 0: their Hessian weight is then carried,
            // exactly, by the unknown-mass term (MATH.md §1).
            const double inv = ps[j] > 0.0 ? 1.0 / ps[j] : 0.0;
            for (int64_t i = 0; i < p; ++i) {
              TQt[j * p + i] = TQ[i * p + j];
              TQt_inv[j * p + i] = TQ[i * p + j] * inv;
            }
          }
        }
      }
      LIPFAST_CHECK(finite, kOp, ": W must be finite, got a matrix with NaN or Inf entries (shape ", W.sizes(), ")");
      Vt = at::empty({p, n}, W.options());
      rows::combine(TQt.data(), p, Zt.data_ptr<scalar_t>(), p, n, Vt.data_ptr<scalar_t>());
      // Uᵀ and the left probes stacked in one buffer: Z = Wᵀ U (rows: Uᵀ W) is the next block, ≈ σ_j v_j.
      const int64_t rows_u = it == 1 ? p + b : p;
      Ucat = at::empty({rows_u, m}, W.options());
      rows::combine(TQt_inv.data(), p, py, p, m, Ucat.data_ptr<scalar_t>());
      if (rows_u > p) Ucat.slice(0, p, rows_u).copy_(Lt);
      auto Zn = Ucat.mm(W);  // [p (+b), n]
      if (it == 1) Wt_left = Zn.slice(0, p, rows_u).t().to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
      Zt = Zn.slice(0, 0, p);
      rows::residual_norms(Zt.data_ptr<scalar_t>(), Vt.data_ptr<scalar_t>(), ps, p, n, pr);
      if (it >= max_iters) break;
      if (tol > 0.0 && *std::max_element(pr, pr + k) <= tol * ps[0]) break;
    }
  });
  // U, V and the next block go back as transposed views of row blocks ([m, p] with strides (1, m)); the
  // fake kernel in lipfast/ops.py declares the same layout. Zt = (WᵀW V / S)ᵀ has advanced one power
  // step past the Ritz block V: the next call's warm start.
  return {Ucat.slice(0, 0, p).t(), S, Vt.t(), residual, at::scalar_tensor(it, W.options().dtype(at::kLong)), Zt.t(),
          W_right, Wt_left};
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("subspace_iteration", &subspace_iteration_cpu); }

}  // namespace lipfast
