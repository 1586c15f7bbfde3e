// CPU kernel of lipfast::hessian_tail: the composite kernel's conjugate gradients (csrc/composite/hessian_tail.cpp)
// as float64 loops around two BLAS GEMVs a step, stopping as soon as the bracket meets the tolerance.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "math.h"
#include "op_interfaces.h"

namespace lipfast {

namespace {

// z −= Q (Qᵀ z) for the k rows of Qt [k, len] (the known singular vectors).
void project_out(const double* Qt, int64_t k, int64_t len, double* z) {
  for (int64_t j = 0; j < k; ++j) {
    const double* q = Qt + j * len;
    double c = 0.0;
    for (int64_t i = 0; i < len; ++i) c += q[i] * z[i];
    for (int64_t i = 0; i < len; ++i) z[i] -= c * q[i];
  }
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

at::Tensor hessian_tail_cpu(const at::Tensor& W, const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                            const at::Tensor& S, const at::Tensor& V, double sigma_next, int64_t max_iters,
                            double tol, double atol) {
  check_hessian_tail_inputs(W, x, y, U, S, V, max_iters, tol, atol);
  const int64_t m = W.size(0), n = W.size(1), k = U.size(1);
  const auto Ut = U.t().to(at::kDouble).contiguous(), Vt = V.t().to(at::kDouble).contiguous();
  const double *pu = Ut.data_ptr<double>(), *pv = Vt.data_ptr<double>();
  const double s1 = S.to(at::kDouble).data_ptr<double>()[0];
  const auto xc = x.to(at::kDouble).contiguous(), yc = y.to(at::kDouble).contiguous();
  std::vector<double> r1(xc.data_ptr<double>(), xc.data_ptr<double>() + m);
  std::vector<double> r2(yc.data_ptr<double>(), yc.data_ptr<double>() + n);
  project_out(pu, k, m, r1.data());
  project_out(pv, k, n, r2.data());
  std::vector<double> p1 = r1, p2 = r2, q1(m), q2(n);
  double rr = dot(r1, r1) + dot(r2, r2);
  const double mass = rr, inv_hi = 1.0 / (s1 - sigma_next), inv_lo = 1.0 / (s1 + sigma_next);
  double T = 0.0, steps = 0.0;
  auto meets_tol = [&] { return rr * (inv_hi - inv_lo) <= std::max(tol * (T + rr * inv_lo), atol); };
  // q = P(σ1 p − [W p2; Wᵀ p1]): the two GEMVs in W's dtype through ATen (BLAS: ~10× a plain float64 loop
  // here; rounding p to float32 costs ~1e-7 relative, far below the 1e-3 the solve is asked for).
  const auto dtype = W.scalar_type();
  auto p1t = at::empty({m}, W.options()), p2t = at::empty({n}, W.options());
  auto apply = [&] {
    AT_DISPATCH_FLOATING_TYPES(dtype, "hessian_tail_apply", [&] {
      std::copy(p1.begin(), p1.end(), p1t.data_ptr<scalar_t>());
      std::copy(p2.begin(), p2.end(), p2t.data_ptr<scalar_t>());
      const auto Wp2 = at::mv(W, p2t).contiguous(), Wtp1 = at::mv(W.t(), p1t).contiguous();
      const scalar_t *a = Wp2.data_ptr<scalar_t>(), *b = Wtp1.data_ptr<scalar_t>();
      for (int64_t i = 0; i < m; ++i) q1[i] = s1 * p1[i] - static_cast<double>(a[i]);
      for (int64_t c = 0; c < n; ++c) q2[c] = s1 * p2[c] - static_cast<double>(b[c]);
    });
    project_out(pu, k, m, q1.data());
    project_out(pv, k, n, q2.data());
  };
  bool broke = false;
  if (s1 > sigma_next && !meets_tol()) {
    for (int64_t it = 0; it < max_iters; ++it) {
      apply();
      const double pq = dot(p1, q1) + dot(p2, q2);
      if (!(pq > 0.0)) {  // M not positive on the iterate: W after the step has a pair at or above σ1
        broke = true;
        break;
      }
      const double alpha = rr / pq;
      T += alpha * rr;
      for (int64_t i = 0; i < m; ++i) r1[i] -= alpha * q1[i];
      for (int64_t c = 0; c < n; ++c) r2[c] -= alpha * q2[c];
      const double rr_new = dot(r1, r1) + dot(r2, r2), beta = rr_new / rr;
      rr = rr_new;
      steps += 1.0;
      if (meets_tol()) break;
      for (int64_t i = 0; i < m; ++i) p1[i] = r1[i] + beta * p1[i];
      for (int64_t c = 0; c < n; ++c) p2[c] = r2[c] + beta * p2[c];
    }
  }
  const auto result = tail_result(T, rr, mass, s1, sigma_next, steps, broke);
  auto out = at::empty({5}, W.options().dtype(at::kDouble));
  std::copy(result.begin(), result.end(), out.data_ptr<double>());
  return out;
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("hessian_tail", &hessian_tail_cpu); }

}  // namespace lipfast
