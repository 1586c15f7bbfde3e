// CPU kernel of lipfast::persample_linear (MATH.md §4): per-sample projections s_i = u1ᵀ G_i v1 and
// H[G_i, G_i] of a Linear layer, with G_i = D_iᵀ X_i never formed; the `.sums` overload also returns
// Σ_i G_i v1 and Σ_i G_iᵀ u1 (the tracker's gradient products), formed in the same pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "math.h"
#include "row_kernels.h"
#include "op_interfaces.h"

namespace lipfast {

void check_persample_linear_inputs(const at::Tensor& X, const at::Tensor& D, const at::Tensor& U,
                                   const at::Tensor& S, const at::Tensor& V, bool half_ok) {
  constexpr const char* op = "lipfast::persample_linear";
  LIPFAST_CHECK_DIM("lipfast::persample_linear", X, "X", 3, "[B, T, n]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", D, "D", 3, "[B, T, m]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", U, "U", 2, "[m, k]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", S, "S", 1, "[k]");
  LIPFAST_CHECK_DIM("lipfast::persample_linear", V, "V", 2, "[n, k]");
  if (half_ok) {
    const auto dtype = X.scalar_type();
    LIPFAST_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                  ": X must be float32, float64, float16 or bfloat16 on ", X.device(), ", got ", dtype);
  } else {
    LIPFAST_CHECK_FLOAT("lipfast::persample_linear", X, "X");
  }
  LIPFAST_CHECK_FLOAT("lipfast::persample_linear", S, "S");
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&U, "U"}, std::pair{&V, "V"}}) {
    LIPFAST_CHECK(t->scalar_type() == X.scalar_type(), op, ": ", name, " must have X's dtype ",
                  X.scalar_type(), ", got ", t->scalar_type());
  }
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&U, "U"}, std::pair{&V, "V"}, std::pair{&S, "S"}}) {
    LIPFAST_CHECK(t->device() == X.device(), op, ": ", name, " must be on ", X.device(), ", got ", t->device());
  }
  const int64_t B = X.size(0), T = X.size(1), n = X.size(2), m = D.size(2), k = U.size(1);
  LIPFAST_CHECK(k >= 1, op, ": U must have at least one column (k >= 1), got shape ", U.sizes());
  LIPFAST_CHECK(D.size(0) == B && D.size(1) == T, op, ": D must have shape [B, T, m] = [", B, ", ", T,
                ", m] to match X ", X.sizes(), ", got ", D.sizes());
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", U, "U", 0, m, "D.size(2) = m");
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", V, "V", 0, n, "X.size(2) = n");
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", V, "V", 1, k, "U.size(1) = k");
  LIPFAST_CHECK_SIZE("lipfast::persample_linear", S, "S", 0, k, "U.size(1) = k");
}

namespace {

using Stats4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Stats6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The statistics of samples [begin, end), and with `sums` their Σ_i G_i v1 into gv [m], Σ_i G_iᵀ u1 into
// gtu [n].
// XV = X·V and DU = D·U come from ATen's GEMM, as rows: XVt [k, B·T] (row j: X v_j), likewise DUt. T == 1 (an MLP): one pass over each row of X and
// of D gives its squared norm (float64) and, while the row sits in L1, its share of the sums (four GEMVs
// over the whole batch cost 2–3× more). T > 1: one pass over each sample's rows forms x_i = D_iᵀ(X_i v1)
// and y_i = X_iᵀ(D_i u1), which are also its shares of the sums.
template <typename scalar_t>
void samples(const scalar_t* px, const scalar_t* pd, const scalar_t* pxv, const scalar_t* pdu, int64_t ld,
             const double* ps, int64_t T, int64_t n, int64_t m, int64_t k, double sigma_next, int64_t begin, int64_t end, double* out_proj, double* out_hess, double* out_lo, double* out_hi,
             double* gv, double* gtu) {
  std::vector<double> a(k), b(k), xbuf, ybuf;
  if (T != 1) {
    xbuf.resize(m);
    ybuf.resize(n);
  }
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* Xi = px + i * T * n;
    const scalar_t* Di = pd + i * T * m;
    // XV of sample i, position t, vector j: XVi[j * ld + t] (ld = B·T), likewise DU.
    const scalar_t* XVi = pxv + i * T;
    const scalar_t* DUi = pdu + i * T;
    double xnorm2, ynorm2;
    if (T == 1) {
      // G_i = D_i X_iᵀ is rank one: x_i = (X_i·v1) D_i and y_i = (D_i·u1) X_i.
      const double xx = rows::sum_squares(Xi, n);
      const double dd = rows::sum_squares(Di, m);
      const double xv0 = XVi[0], du0 = DUi[0];
      for (int64_t j = 0; j < k; ++j) {
        a[j] = static_cast<double>(DUi[j * ld]) * xv0;
        b[j] = static_cast<double>(XVi[j * ld]) * du0;
      }
      xnorm2 = dd * xv0 * xv0;
      ynorm2 = xx * du0 * du0;
      if (gv != nullptr) {
        rows::add_scaled(gv, xv0, Di, m);
        rows::add_scaled(gtu, du0, Xi, n);
      }
    } else {
      // x_i = D_iᵀ (X_i v1) [m], y_i = X_iᵀ (D_i u1) [n], a_i = DU_iᵀ XV_i[:,0], b_i = XV_iᵀ DU_i[:,0].
      std::fill(xbuf.begin(), xbuf.end(), 0.0);
      std::fill(ybuf.begin(), ybuf.end(), 0.0);
      std::fill(a.begin(), a.end(), 0.0);
      std::fill(b.begin(), b.end(), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const double xv0 = XVi[t], du0 = DUi[t];
        rows::add_scaled(xbuf.data(), xv0, Di + t * m, m);
        rows::add_scaled(ybuf.data(), du0, Xi + t * n, n);
        for (int64_t j = 0; j < k; ++j) {
          a[j] += static_cast<double>(DUi[j * ld + t]) * xv0;
          b[j] += static_cast<double>(XVi[j * ld + t]) * du0;
        }
      }
      xnorm2 = rows::sum_squares(xbuf.data(), m);
      ynorm2 = rows::sum_squares(ybuf.data(), n);
      if (gv != nullptr) {
        for (int64_t r = 0; r < m; ++r) gv[r] += xbuf[r];
        for (int64_t c = 0; c < n; ++c) gtu[c] += ybuf[c];
      }
    }
    const auto h = hessian_terms(a.data(), b.data(), 1, ps, k, sigma_next, xnorm2, ynorm2);
    out_proj[i] = a[0];
    out_hess[i] = h.value;
    out_lo[i] = h.lo;
    out_hi[i] = h.hi;
  }
}

Stats6 persample_linear_impl(const at::Tensor& X_, const at::Tensor& D_, const at::Tensor& U, const at::Tensor& S_,
                             const at::Tensor& V, double sigma_next, bool sums) {
  check_persample_linear_inputs(X_, D_, U, S_, V, /*half_ok=*/false);
  const int64_t B = X_.size(0), T = X_.size(1), n = X_.size(2), m = D_.size(2), k = U.size(1);
  const auto dtype = X_.scalar_type();
  auto X = X_.contiguous();
  auto D = D_.contiguous();
  auto S = S_.to(at::kDouble).contiguous();
  auto opts = S.options();
  auto proj = at::empty({B}, opts), hess = at::empty({B}, opts);
  auto hess_lo = at::empty({B}, opts), hess_hi = at::empty({B}, opts);
  auto Gv1 = at::zeros({sums ? m : 0}, opts), Gtu1 = at::zeros({sums ? n : 0}, opts);
  if (B == 0) return {proj, hess, hess_lo, hess_hi, Gv1, Gtu1};

  // The two skinny GEMMs go to ATen's BLAS (a hand-written pass over the rows, fused with the rest, measured
  // no faster: it is bound by reading V and U from L2 for every row), as Vᵀ·Xᵀ rather than X·V: MKL's kernel
  // for a row block times a transposed matrix is up to 2× faster on these shapes (27 vs 54 µs for B=256,
  // n=784, k=8), and Vᵀ is free when V is a transposed view, as spectra hand it over.
  const auto XVt = V.t().to(dtype).mm(X.reshape({B * T, n}).t()).contiguous();  // [k, B·T]
  const auto DUt = U.t().to(dtype).mm(D.reshape({B * T, m}).t()).contiguous();  // [k, B·T]
  // Samples go to chunks, one per thread at most, each with its own partial sums (added up below), and
  // each worth ~32k multiply-adds at least.
  const int64_t per_sample = std::max<int64_t>(1, T * (m + n) * (k + 2));
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * per_sample / 32768));
  std::vector<double> partial(sums ? chunks * (m + n) : 0, 0.0);
  const double* ps = S.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "persample_linear", [&] {
    const scalar_t* pxv = XVt.data_ptr<scalar_t>();
    const scalar_t* pdu = DUt.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double* gv = sums ? partial.data() + c * (m + n) : nullptr;
        samples(X.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(), pxv, pdu, B * T, ps, T, n, m, k, sigma_next,
                B * c / chunks, B * (c + 1) / chunks, proj.data_ptr<double>(), hess.data_ptr<double>(),
                hess_lo.data_ptr<double>(), hess_hi.data_ptr<double>(), gv, sums ? gv + m : nullptr);
      }
    });
  });
  if (sums) {
    double *pg = Gv1.data_ptr<double>(), *pt = Gtu1.data_ptr<double>();
    for (int64_t c = 0; c < chunks; ++c) {
      const double* part = partial.data() + c * (m + n);
      for (int64_t r = 0; r < m; ++r) pg[r] += part[r];
      for (int64_t j = 0; j < n; ++j) pt[j] += part[m + j];
    }
  }
  return {proj, hess, hess_lo, hess_hi, Gv1, Gtu1};
}

}  // namespace

Stats4 persample_linear_cpu(const at::Tensor& X, const at::Tensor& D, const at::Tensor& U, const at::Tensor& S,
                            const at::Tensor& V, double sigma_next) {
  auto [proj, hess, lo, hi, gv, gtu] = persample_linear_impl(X, D, U, S, V, sigma_next, /*sums=*/false);
  return {proj, hess, lo, hi};
}

Stats6 persample_linear_sums_cpu(const at::Tensor& X, const at::Tensor& D, const at::Tensor& U, const at::Tensor& S,
                                 const at::Tensor& V, double sigma_next) {
  return persample_linear_impl(X, D, U, S, V, sigma_next, /*sums=*/true);
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("persample_linear", &persample_linear_cpu);
  m.impl("persample_linear.sums", &persample_linear_sums_cpu);
}

}  // namespace lipfast
