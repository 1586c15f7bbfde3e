// CPU kernels of lipfast::gradient_statistics and lipfast::update_statistics (layouts and meaning in
// csrc/composite/step_statistics.cpp, whose ATen-composed kernels serve the other backends). On a CPU the
// composed versions spend their time dispatching some thirty tiny ATen ops per layer and step; here the
// two products with the gradient go to BLAS and everything else is one loop over m + n entries.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "direction.h"
#include "math.h"
#include "op_interfaces.h"

namespace lipfast {

namespace {

// out[j] = Σ_r M[r, j] x[r] for the k columns of M [len, k]. Read in M's dtype through its strides (a float64
// copy of U and V cost ~25 µs a call on the tracked step).
void project_columns(const at::Tensor& M, const double* x, int64_t len, int64_t k, double* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, M.scalar_type(), "project_columns", [&] {
    const scalar_t* p = M.data_ptr<scalar_t>();
    const int64_t s0 = M.stride(0), s1 = M.stride(1);
    // Four columns per pass: four independent sums (one alone waits on each add's latency), each summed
    // over r in order. Columns past k are clamped to the last one, computed and dropped.
    for (int64_t j = 0; j < k; j += 4) {
      const scalar_t* c0 = p + j * s1;
      const scalar_t* c1 = p + std::min(j + 1, k - 1) * s1;
      const scalar_t* c2 = p + std::min(j + 2, k - 1) * s1;
      const scalar_t* c3 = p + std::min(j + 3, k - 1) * s1;
      double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
      for (int64_t r = 0; r < len; ++r) {
        const double xr = x[r];
        a0 += static_cast<double>(c0[r * s0]) * xr;
        a1 += static_cast<double>(c1[r * s0]) * xr;
        a2 += static_cast<double>(c2[r * s0]) * xr;
        a3 += static_cast<double>(c3[r * s0]) * xr;
      }
      const double a[4] = {a0, a1, a2, a3};
      for (int64_t q = 0; q < 4 && j + q < k; ++q) out[j + q] = a[q];
    }
  });
}

}  // namespace

Direction project_direction(const double* x, int64_t m, const double* y, int64_t n, const at::Tensor& U,
                            const at::Tensor& V, const double* S, int64_t k, double sigma_next) {
  std::vector<double> a(k), b(k);
  project_columns(U, x, m, k, a.data());
  project_columns(V, y, n, k, b.data());
  double xx = 0.0, yy = 0.0;
  for (int64_t r = 0; r < m; ++r) xx += x[r] * x[r];
  for (int64_t c = 0; c < n; ++c) yy += y[c] * y[c];
  Direction d;
  d.first = a[0];
  d.h = hessian_terms(a.data(), b.data(), 1, S, k, sigma_next, xx, yy);
  d.xnorm2 = xx;
  d.ynorm2 = yy;
  d.finite = std::isfinite(xx) && std::isfinite(yy);  // NaN/Inf anywhere in x or y shows in its norm
  return d;
}

namespace {

at::Tensor vector_f64(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

}  // namespace

at::Tensor gradient_statistics_cpu(const at::Tensor& proj, const at::Tensor& hess, const at::Tensor& hess_lo,
                                   const at::Tensor& hess_hi, const at::Tensor& G_, const at::Tensor& U,
                                   const at::Tensor& S_, const at::Tensor& V, double sigma_next, double scale,
                                   double loss_factor, const c10::optional<at::Tensor>& Gv1,
                                   const c10::optional<at::Tensor>& Gtu1, const c10::optional<at::Tensor>& known,
                                   double known_scale) {
  check_gradient_statistics_inputs(proj, hess, hess_lo, hess_hi, G_, U, S_, V, Gv1, Gtu1, known);
  const auto G = as_matrix(G_);  // a weight-shaped gradient [m, ...] read as [m, n]
  const int64_t m = G.size(0), n = G.size(1), k = U.size(1), N = proj.size(0);
  const auto S = vector_f64(S_);
  // ḡ v1 and ḡᵀ u1: given, or two GEMVs with the gradient in its dtype, through BLAS (contiguous vectors: a
  // strided one costs MKL twice the time).
  const auto dt = G.scalar_type();
  const auto x = vector_f64(Gv1.has_value() ? *Gv1 : at::mv(G, V.select(1, 0).to(dt).contiguous())).div(loss_factor);
  const auto y =
      vector_f64(Gtu1.has_value() ? *Gtu1 : at::mv(G.t(), U.select(1, 0).to(dt).contiguous())).div(loss_factor);
  const Direction g = project_direction(x.data_ptr<double>(), m, y.data_ptr<double>(), n, U, V, S.data_ptr<double>(), k,
                              sigma_next);
  const double K = g.first;
  const auto p = vector_f64(proj), h = vector_f64(hess), lo = vector_f64(hess_lo), hi = vector_f64(hess_hi);
  const double *pp = p.data_ptr<double>(), *ph = h.data_ptr<double>(), *pl = lo.data_ptr<double>(),
               *pq = hi.data_ptr<double>();
  double s1 = 0.0, s2 = 0.0, sh = 0.0, sl = 0.0, su = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    const double s = scale * pp[i] - K;
    s1 += s;
    s2 += s * s;
    sh += ph[i];
    sl += pl[i];
    su += pq[i];
  }
  const double sc2 = scale * scale;
  // The known step's projection u1ᵀ M v1: M v1 by one GEMV in M's dtype, then u1ᵀ(·) in float64.
  double kn = 0.0;
  if (known.has_value()) {
    const auto z = vector_f64(at::mv(as_matrix(*known), V.select(1, 0).to(known->scalar_type()).contiguous()));
    project_columns(U, z.data_ptr<double>(), m, 1, &kn);
    kn *= known_scale;
  }
  auto out = at::empty({12}, G.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = static_cast<double>(N);
  o[1] = s1;
  o[2] = s2;
  o[3] = sh * sc2;
  o[4] = sl * sc2;
  o[5] = su * sc2;
  o[6] = K;
  o[7] = g.h.value;
  o[8] = g.h.lo;
  o[9] = g.h.hi;
  bool finite = g.finite;
  for (int i = 1; i <= 6; ++i) finite = finite && std::isfinite(o[i]);
  o[10] = finite ? 1.0 : 0.0;
  o[11] = kn;
  return out;
}

at::Tensor update_statistics_cpu(const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& U,
                                 const at::Tensor& S_, const at::Tensor& V, double sigma_next) {
  check_update_statistics_inputs(x_, y_, U, S_, V);
  const int64_t m = x_.size(0), n = y_.size(0), k = U.size(1);
  const auto x = vector_f64(x_), y = vector_f64(y_), S = vector_f64(S_);
  const Direction d = project_direction(x.data_ptr<double>(), m, y.data_ptr<double>(), n, U, V, S.data_ptr<double>(), k,
                              sigma_next);
  auto out = at::empty({7}, x_.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = d.first;
  o[1] = 0.5 * d.h.value;
  o[2] = 0.5 * d.h.lo;
  o[3] = 0.5 * d.h.hi;
  o[4] = d.finite && std::isfinite(d.first) ? 1.0 : 0.0;
  o[5] = std::sqrt(d.xnorm2);
  o[6] = std::sqrt(d.ynorm2);
  return out;
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("gradient_statistics", &gradient_statistics_cpu);
  m.impl("update_statistics", &update_statistics_cpu);
}

}  // namespace lipfast
