// CPU kernel of lipfast::persample_linear_precond (MATH.md §7): per-sample statistics of the preconditioned
// gradients E_i = P ⊙ G_i of a Linear layer, G_i = D_iᵀ X_i never formed. Since
// u_jᵀ(P ⊙ d xᵀ)v_k = (u_j ⊙ d)ᵀ P (v_k ⊙ x), two GEMMs of the weight-gradient's size give everything:
//   Y = (X ⊙ v1) Pᵀ [B·T, m],  Z = (D ⊙ u1) P [B·T, n],
//   x_i = E_i v1 = Σ_t D_it ⊙ Y_it [m],  y_i = E_iᵀ u1 = Σ_t X_it ⊙ Z_it [n],
// then a_i = Uᵀ x_i, b_i = Vᵀ y_i, the norms and the Hessian contraction, per sample, in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "math.h"
#include "op_interfaces.h"

namespace lipfast {

void check_persample_linear_precond_inputs(const at::Tensor& X, const at::Tensor& D, const at::Tensor& P,
                                           const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  constexpr const char* op = "lipfast::persample_linear_precond";
  check_persample_linear_inputs(X, D, U, S, V, /*half_ok=*/false, /*rows_ok=*/true);
  LIPFAST_CHECK_DIM("lipfast::persample_linear_precond", P, "P", 2, "[m, n]");
  const int64_t n = X.size(-1), m = D.size(-1);
  LIPFAST_CHECK(P.size(0) == m && P.size(1) == n, op, ": P must have the weight's shape [m, n] = [", m, ", ", n,
                "], got ", P.sizes());
  LIPFAST_CHECK(P.scalar_type() == X.scalar_type(), op, ": P must have X's dtype ", X.scalar_type(), ", got ",
                P.scalar_type());
  LIPFAST_CHECK(P.device() == X.device(), op, ": P must be on ", X.device(), ", got ", P.device());
}

namespace {

using Stats6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
void accumulate(double* out, const scalar_t* a, const scalar_t* b, int64_t len) {
  for (int64_t r = 0; r < len; ++r) out[r] += static_cast<double>(a[r]) * static_cast<double>(b[r]);
}

// a[j] = Σ_r M[j, r] x[r] for the k rows of M [k, len] (float64).
void project(const double* M, const double* x, int64_t k, int64_t len, double* a) {
  for (int64_t j = 0; j < k; ++j) {
    double s = 0.0;
    const double* row = M + j * len;
    for (int64_t r = 0; r < len; ++r) s += row[r] * x[r];
    a[j] = s;
  }
}

Stats6 persample_linear_precond_cpu(const at::Tensor& X2, const at::Tensor& D2, const at::Tensor& P_,
                                    const at::Tensor& U, const at::Tensor& S_, const at::Tensor& V,
                                    double sigma_next) {
  check_persample_linear_precond_inputs(X2, D2, P_, U, S_, V);
  const auto X_ = as_positions(X2), D_ = as_positions(D2);  // [B, n] as [B, 1, n]
  const int64_t B = X_.size(0), T = X_.size(1), n = X_.size(2), m = D_.size(2), k = U.size(1);
  const auto dtype = X_.scalar_type();
  auto S = S_.to(at::kDouble).contiguous();
  auto opts = S.options();
  auto proj = at::empty({B}, opts), hess = at::empty({B}, opts);
  auto hess_lo = at::empty({B}, opts), hess_hi = at::empty({B}, opts);
  auto Gv1 = at::zeros({m}, opts), Gtu1 = at::zeros({n}, opts);
  if (B == 0) return {proj, hess, hess_lo, hess_hi, Gv1, Gtu1};

  const auto X = X_.reshape({B * T, n}).contiguous();
  const auto D = D_.reshape({B * T, m}).contiguous();
  const auto P = P_.to(dtype);
  // The two GEMMs (ATen's BLAS): Y = (X ⊙ v1) Pᵀ, Z = (D ⊙ u1) P, in the inputs' dtype.
  const auto Y = at::mm(X * V.select(1, 0).to(dtype), P.t()).contiguous();  // [B·T, m]
  const auto Z = at::mm(D * U.select(1, 0).to(dtype), P).contiguous();      // [B·T, n]
  const auto Ut = U.t().to(at::kDouble).contiguous();                       // [k, m]
  const auto Vt = V.t().to(at::kDouble).contiguous();                       // [k, n]
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  std::vector<double> partial(chunks * (m + n), 0.0);
  const double* ps = S.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "persample_linear_precond", [&] {
    const scalar_t *px = X.data_ptr<scalar_t>(), *pd = D.data_ptr<scalar_t>();
    const scalar_t *py = Y.data_ptr<scalar_t>(), *pz = Z.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> x(m), y(n), a(k), b(k);
      for (int64_t c = c0; c < c1; ++c) {
        double* gv = partial.data() + c * (m + n);
        double* gtu = gv + m;
        for (int64_t i = B * c / chunks; i < B * (c + 1) / chunks; ++i) {
          std::fill(x.begin(), x.end(), 0.0);
          std::fill(y.begin(), y.end(), 0.0);
          for (int64_t t = i * T; t < (i + 1) * T; ++t) {
            accumulate(x.data(), pd + t * m, py + t * m, m);
            accumulate(y.data(), px + t * n, pz + t * n, n);
          }
          project(Ut.data_ptr<double>(), x.data(), k, m, a.data());
          project(Vt.data_ptr<double>(), y.data(), k, n, b.data());
          double xn = 0.0, yn = 0.0;
          for (int64_t r = 0; r < m; ++r) { xn += x[r] * x[r]; gv[r] += x[r]; }
          for (int64_t r = 0; r < n; ++r) { yn += y[r] * y[r]; gtu[r] += y[r]; }
          const auto h = hessian_terms(a.data(), b.data(), 1, ps, k, sigma_next, xn, yn);
          proj.data_ptr<double>()[i] = a[0];
          hess.data_ptr<double>()[i] = h.value;
          hess_lo.data_ptr<double>()[i] = h.lo;
          hess_hi.data_ptr<double>()[i] = h.hi;
        }
      }
    });
  });
  double *pg = Gv1.data_ptr<double>(), *pt = Gtu1.data_ptr<double>();
  for (int64_t c = 0; c < chunks; ++c) {  // the chunks' partial sums, in a fixed order (reproducible)
    const double* part = partial.data() + c * (m + n);
    for (int64_t r = 0; r < m; ++r) pg[r] += part[r];
    for (int64_t j = 0; j < n; ++j) pt[j] += part[m + j];
  }
  return {proj, hess, hess_lo, hess_hi, Gv1, Gtu1};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("persample_linear_precond", &persample_linear_precond_cpu);
}

}  // namespace lipfast
