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

void check_persample_linear_inputs(const at::Tensor& X_, const at::Tensor& D_, const at::Tensor& U,
                                   const at::Tensor& S, const at::Tensor& V, bool half_ok, bool rows_ok) {
  constexpr const char* op = "lipfast::persample_linear";
  if (rows_ok && X_.dim() == 2) {  // [B, n]: one position per sample
    LIPFAST_CHECK(D_.dim() == 2, op, ": D must have shape [B, m] (2 dims) to match X ", X_.sizes(), ", got ",
                  D_.sizes());
  } else {
    LIPFAST_CHECK_DIM("lipfast::persample_linear", X_, "X", 3, "[B, T, n]");
    LIPFAST_CHECK_DIM("lipfast::persample_linear", D_, "D", 3, "[B, T, m]");
  }
  const auto X = as_positions(X_), D = as_positions(D_);
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

// The statistics of sample i into the outputs, and with `gv` its share of the sums: Σ_i G_i v1 into gv [m],
// Σ_i G_iᵀ u1 into gtu [n]. XV_i = X_i·V and DU_i = D_i·U: XVi[j * ld + t] for position t, vector j (ld = B·T
// from the GEMMs, 1 from the rank-one pass), likewise DUi. T == 1 (an MLP): one pass over the row of X and of D
// gives its squared norm (float64) and, while the row sits in L1, its share of the sums (four GEMVs over the
// whole batch cost 2–3× more). T > 1: one pass over the sample's rows forms x_i = D_iᵀ(X_i v1) and
// y_i = X_iᵀ(D_i u1), which are also its shares of the sums.
template <typename scalar_t>
void sample_statistics(const scalar_t* Xi, const scalar_t* Di, const scalar_t* XVi, const scalar_t* DUi, int64_t ld,
                       const double* ps, int64_t T, int64_t n, int64_t m, int64_t k, double sigma_next, int64_t i,
                       double* out_proj, double* out_hess, double* out_lo, double* out_hi, double* gv, double* gtu,
                       std::vector<double>& a, std::vector<double>& b, std::vector<double>& xbuf,
                       std::vector<double>& ybuf) {
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
    xbuf.assign(m, 0.0);
    ybuf.assign(n, 0.0);
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

Stats6 persample_linear_impl(const at::Tensor& X2, const at::Tensor& D2, const at::Tensor& U, const at::Tensor& S_,
                             const at::Tensor& V, double sigma_next, bool sums) {
  check_persample_linear_inputs(X2, D2, U, S_, V, /*half_ok=*/false, /*rows_ok=*/true);
  const auto X_ = as_positions(X2), D_ = as_positions(D2);  // [B, n] as [B, 1, n]
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

  // X·V and D·U: with T == 1 (an MLP) in the pass over the rows below, four samples at a time, so that the
  // rows of X and D come from memory once, for their products, norms and shares of the sums (ATen's GEMM
  // first and the pass after read X and D twice: the op took 1.25× as long for B=256, n = m = 2048, k = 8 on
  // two threads, 1.5× on one; 1.1–1.25× for the MLP shapes of bench/RESULTS.md). With T > 1
  // from ATen's GEMM, as Vᵀ·Xᵀ rather than X·V: MKL's kernel for a row block times a transposed matrix is
  // up to 2× faster on these shapes, and Vᵀ is free when V is a transposed view, as spectra hand it over.
  const bool rank_one = T == 1;
  const auto Vt = V.t().to(dtype).contiguous();  // [k, n]
  const auto Ut = U.t().to(dtype).contiguous();  // [k, m]
  at::Tensor XVt, DUt;  // [k, B·T]
  if (!rank_one) {
    XVt = Vt.mm(X.reshape({B * T, n}).t()).contiguous();
    DUt = Ut.mm(D.reshape({B * T, m}).t()).contiguous();
  }
  // Samples go to chunks, one per thread at most, each with its own partial sums (added up below), and
  // each worth ~32k multiply-adds at least.
  const int64_t per_sample = std::max<int64_t>(1, T * (m + n) * (k + 2));
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * per_sample / 32768));
  std::vector<double> partial(sums ? chunks * (m + n) : 0, 0.0);
  const double* ps = S.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "persample_linear", [&] {
    const scalar_t* px = X.data_ptr<scalar_t>();
    const scalar_t* pd = D.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> a(k), b(k), xbuf, ybuf;
      std::vector<scalar_t> xv(4 * k), du(4 * k);
      for (int64_t c = c0; c < c1; ++c) {
        double* gv = sums ? partial.data() + c * (m + n) : nullptr;
        double* gtu = sums ? gv + m : nullptr;
        const int64_t begin = B * c / chunks, end = B * (c + 1) / chunks;
        auto one = [&](int64_t i, const scalar_t* XVi, const scalar_t* DUi, int64_t ld) {
          sample_statistics(px + i * T * n, pd + i * T * m, XVi, DUi, ld, ps, T, n, m, k, sigma_next, i,
                            proj.data_ptr<double>(), hess.data_ptr<double>(), hess_lo.data_ptr<double>(),
                            hess_hi.data_ptr<double>(), gv, gtu, a, b, xbuf, ybuf);
        };
        for (int64_t i = begin; i < end; i += rank_one ? 4 : 1) {
          if (!rank_one) {
            one(i, XVt.data_ptr<scalar_t>() + i * T, DUt.data_ptr<scalar_t>() + i * T, B * T);
            continue;
          }
          // Four samples at a time (the last ones of a chunk repeat the chunk's last sample).
          const scalar_t* xr[4];
          const scalar_t* dr[4];
          for (int64_t r = 0; r < 4; ++r) {
            xr[r] = px + std::min(i + r, end - 1) * n;
            dr[r] = pd + std::min(i + r, end - 1) * m;
          }
          rows::dots4(xr, Vt.data_ptr<scalar_t>(), k, n, xv.data());
          rows::dots4(dr, Ut.data_ptr<scalar_t>(), k, m, du.data());
          for (int64_t r = 0; r < 4 && i + r < end; ++r) one(i + r, xv.data() + r * k, du.data() + r * k, 1);
        }
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
