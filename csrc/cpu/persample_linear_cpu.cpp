// CPU kernel of lipfast::persample_linear (MATH.md §4): per-sample projections s_i = u1ᵀ G_i v1 and
// H[G_i, G_i] of a Linear layer, with G_i = D_iᵀ X_i never formed. The two skinny GEMMs X·V and D·U go
// to ATen (its BLAS beats a hand loop); one fused pass over X and D then produces everything else.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "math.h"
#include "row_kernels.h"

namespace lipfast {

void check_persample_linear_inputs(const at::Tensor& X, const at::Tensor& D, const at::Tensor& U,
                                   const at::Tensor& S, const at::Tensor& V) {
  constexpr const char* op = "lipfast::persample_linear";
  LIPFAST_CHECK_DIM("lipfast::persample_linear", X, "X", 3, "[B, T, n]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", D, "D", 3, "[B, T, m]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", U, "U", 2, "[m, k]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", S, "S", 1, "[k]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", V, "V", 2, "[n, k]");
  LIPFAST_CHECK_FLOAT("lipfast::persample_linear", X, "X");
  LIPFAST_CHECK_FLOAT("lipfast::persample_linear", S, "S");
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&U, "U"}, std::pair{&V, "V"}}) {
    TORCH_CHECK(t->scalar_type() == X.scalar_type(), op, ": ", name, " must have X's dtype ",
                X.scalar_type(), ", got ", t->scalar_type());
  }
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&U, "U"}, std::pair{&V, "V"}, std::pair{&S, "S"}}) {
    TORCH_CHECK(t->device() == X.device(), op, ": ", name, " must be on ", X.device(), ", got ", t->device());
  }
  const int64_t B = X.size(0), T = X.size(1), n = X.size(2), m = D.size(2), k = U.size(1);
  TORCH_CHECK(k >= 1, op, ": U must have at least one column (k >= 1), got shape ", U.sizes());
  TORCH_CHECK(D.size(0) == B && D.size(1) == T, op, ": D must have shape [B, T, m] = [", B, ", ", T,
              ", m] to match X ", X.sizes(), ", got ", D.sizes());
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", U, "U", 0, m, "D.size(2) = m");
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", V, "V", 0, n, "X.size(2) = n");
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", V, "V", 1, k, "U.size(1) = k");
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", S, "S", 0, k, "U.size(1) = k");
}

namespace {

// out[c] += w * row[c], in double.
template <typename scalar_t>
void axpy(double* out, const scalar_t* row, double w, int64_t len) {
  for (int64_t c = 0; c < len; ++c) out[c] += w * static_cast<double>(row[c]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> persample_linear_cpu(
    const at::Tensor& X_,  // [B, T, n]
    const at::Tensor& D_,  // [B, T, m]
    const at::Tensor& U,   // [m, k]
    const at::Tensor& S_,  // [k]
    const at::Tensor& V,   // [n, k]
    double sigma_next) {
  check_persample_linear_inputs(X_, D_, U, S_, V);
  const int64_t B = X_.size(0), T = X_.size(1), n = X_.size(2), m = D_.size(2), k = U.size(1);
  auto X = X_.contiguous();
  auto D = D_.contiguous();
  auto S = S_.to(at::kDouble).contiguous();
  auto opts = S.options();
  // outputs
  auto proj = at::empty({B}, opts), hess = at::empty({B}, opts);
  auto hess_lo = at::empty({B}, opts), hess_hi = at::empty({B}, opts);
  if (B == 0) return {proj, hess, hess_lo, hess_hi};

  auto XV = at::matmul(X, V.to(X.scalar_type())).contiguous();  // [B, T, k]
  auto DU = at::matmul(D, U.to(X.scalar_type())).contiguous();  // [B, T, k]
  const double* ps = S.data_ptr<double>();
  double *pproj = proj.data_ptr<double>(), *phess = hess.data_ptr<double>();
  double *plo = hess_lo.data_ptr<double>(), *phi = hess_hi.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, T * (m + n + 2 * k)));

  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "persample_linear", [&] {
    const scalar_t* px = X.data_ptr<scalar_t>();
    const scalar_t* pd = D.data_ptr<scalar_t>();
    const scalar_t* pxv = XV.data_ptr<scalar_t>();
    const scalar_t* pdu = DU.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> a(k), b(k), xbuf, ybuf;
      if (T != 1) {  // T > 1, or T == 0 (every G_i an empty sum: the general path gives zeros)
        xbuf.resize(m);
        ybuf.resize(n);
      }
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* Xi = px + i * T * n;
        const scalar_t* Di = pd + i * T * m;
        const scalar_t* XVi = pxv + i * T * k;
        const scalar_t* DUi = pdu + i * T * k;
        double xnorm2, ynorm2;
        if (T == 1) {
          // G_i = D_i X_iᵀ is rank one: x_i = (X_i·v1) D_i and y_i = (D_i·u1) X_i.
          const double xv0 = XVi[0], du0 = DUi[0];
          for (int64_t j = 0; j < k; ++j) {
            a[j] = static_cast<double>(DUi[j]) * xv0;
            b[j] = static_cast<double>(XVi[j]) * du0;
          }
          xnorm2 = rows::sum_squares(Di, m) * xv0 * xv0;
          ynorm2 = rows::sum_squares(Xi, n) * du0 * du0;
        } else {
          // x_i = D_iᵀ (X_i v1) [m], y_i = X_iᵀ (D_i u1) [n], a_i = DU_iᵀ XV_i[:,0], b_i = XV_iᵀ DU_i[:,0].
          std::fill(xbuf.begin(), xbuf.end(), 0.0);
          std::fill(ybuf.begin(), ybuf.end(), 0.0);
          std::fill(a.begin(), a.end(), 0.0);
          std::fill(b.begin(), b.end(), 0.0);
          for (int64_t t = 0; t < T; ++t) {
            const double xv0 = XVi[t * k], du0 = DUi[t * k];
            axpy(xbuf.data(), Di + t * m, xv0, m);
            axpy(ybuf.data(), Xi + t * n, du0, n);
            for (int64_t j = 0; j < k; ++j) {
              a[j] += static_cast<double>(DUi[t * k + j]) * xv0;
              b[j] += static_cast<double>(XVi[t * k + j]) * du0;
            }
          }
          xnorm2 = rows::sum_squares(xbuf.data(), m);
          ynorm2 = rows::sum_squares(ybuf.data(), n);
        }
        const auto h = hessian_terms(a.data(), b.data(), 1, ps, k, sigma_next, xnorm2, ynorm2);
        pproj[i] = a[0];
        phess[i] = h.value;
        plo[i] = h.lo;
        phi[i] = h.hi;
      }
    });
  });
  return {proj, hess, hess_lo, hess_hi};
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("persample_linear", &persample_linear_cpu); }

}  // namespace lipfast
