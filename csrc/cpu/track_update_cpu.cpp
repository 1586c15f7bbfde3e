// CPU kernel of lipfast::track_update: the composite kernel's work (csrc/composite/track_update.cpp, which
// other backends run) with the CPU kernels called as C++ functions rather than through the dispatcher, and
// the glue between them (ΔW v1, ΔWᵀu1, σ_{k+1}, the stats vector) in plain loops instead of some twenty
// small ATen calls: on the tracked step each of those pays the cold caches the training step's GEMMs left
// (~40 µs per layer). Same kernels, same arithmetic, so the results equal the composite kernel's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace lipfast {

void check_track_update_inputs(const at::Tensor& W, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                               const at::Tensor& Wt_u1, bool exact);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
subspace_iteration_cpu(const at::Tensor& W, const at::Tensor& V0, int64_t k, int64_t max_iters, double tol,
                       const c10::optional<at::Tensor>& right, const c10::optional<at::Tensor>& left);
at::Tensor update_statistics_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U, const at::Tensor& S,
                                 const at::Tensor& V, double sigma_next);

namespace {

// Column 0 of t [rows, cols] as float64 values.
std::vector<double> first_column(const at::Tensor& t) {
  const auto c = t.select(1, 0).to(at::kDouble).contiguous();
  const double* p = c.data_ptr<double>();
  return std::vector<double>(p, p + c.numel());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
track_update_cpu(const at::Tensor& W, const at::Tensor& basis, const at::Tensor& U, const at::Tensor& S,
                 const at::Tensor& V, double sigma_next, const at::Tensor& Wt_u1, int64_t max_iters, double tol,
                 bool exact) {
  check_track_update_inputs(W, U, S, V, Wt_u1, exact);
  const int64_t m = W.size(0), n = W.size(1), k = U.size(1), r = std::min(m, n);
  const auto dtype = W.scalar_type();
  const auto f64 = W.options().dtype(at::kDouble);
  const auto v1 = V.slice(1, 0, 1).to(dtype), u1 = U.slice(1, 0, 1).to(dtype);

  at::Tensor Un, Sn, Vn, res, basis_new, Wt_u1_new, W_v1, Wt_u1_probe;
  double sigma_next_new, iters;
  int64_t kk = k;
  if (exact) {
    // As the composite kernel: one sweep with the identity block on the tall orientation is the exact SVD.
    const bool tall = m >= n;
    const auto A = tall ? W : W.t();
    auto [Ua, Sa, Va, resa, ita, nexta, A_right, At_left] =
        subspace_iteration_cpu(A, at::eye(r, W.options()), r, 1, 0.0, tall ? v1 : u1, tall ? u1 : v1);
    kk = std::min(k, r);
    const auto& Ufull = tall ? Ua : Va;
    const auto& Vfull = tall ? Va : Ua;
    Un = Ufull.slice(1, 0, kk);
    Vn = Vfull.slice(1, 0, kk);
    Sn = Sa.slice(0, 0, kk);
    res = resa.slice(0, 0, kk);
    iters = static_cast<double>(ita.item<int64_t>());
    W_v1 = tall ? A_right : At_left;
    Wt_u1_probe = tall ? At_left : A_right;
    sigma_next_new = k >= r ? 0.0 : Sa.data_ptr<double>()[kk];
    basis_new = Vfull.slice(1, 0, std::min(r, kk + 1 + std::max<int64_t>(4, kk / 2))).clone();
    Wt_u1_new = Vfull.select(1, 0).to(at::kDouble).mul(Sa.data_ptr<double>()[0]);  // a float64 .to() is no copy
  } else {
    auto [Ui, Si, Vi, resi, iti, nexti, Wv, Wtu] =
        subspace_iteration_cpu(W, basis.to(dtype), k + 1, max_iters, tol, v1, u1);
    Un = Ui.slice(1, 0, k);
    Vn = Vi.slice(1, 0, k);
    Sn = Si.slice(0, 0, k);
    res = resi.slice(0, 0, k);
    iters = static_cast<double>(iti.item<int64_t>());
    W_v1 = Wv;
    Wt_u1_probe = Wtu;
    // The Ritz value of σ_{k+1} lies below the true one; adding its residual keeps the truncation bracket
    // honest (a singular value lies within the residual of every Ritz value).
    const double* ps = Si.data_ptr<double>();
    sigma_next_new = std::min(ps[k] + resi.data_ptr<double>()[k], ps[k - 1]);
    basis_new = nexti;
    Wt_u1_new = nexti.select(1, 0).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  }
  // ΔW v1 = W_after v1 − σ1 u1 (W_before v1 = σ1 u1 for a Ritz pair) and ΔWᵀ u1 = W_afterᵀ u1 − W_beforeᵀ u1.
  const double s1_old = S.to(at::kDouble).data_ptr<double>()[0];
  const auto u1_old = first_column(U), wv = first_column(W_v1), wtu = first_column(Wt_u1_probe);
  const auto wtu_old = Wt_u1.to(at::kDouble).contiguous();
  auto x = at::empty({m}, f64), y = at::empty({n}, f64);
  double *px = x.data_ptr<double>(), *py = y.data_ptr<double>();
  const double* pw = wtu_old.data_ptr<double>();
  for (int64_t i = 0; i < m; ++i) px[i] = wv[i] - u1_old[i] * s1_old;
  for (int64_t c = 0; c < n; ++c) py[c] = wtu[c] - pw[c];
  const auto upd = update_statistics_cpu(x, y, U, S, V, sigma_next);

  auto stats = at::empty({12}, f64);
  double* st = stats.data_ptr<double>();
  std::copy(upd.data_ptr<double>(), upd.data_ptr<double>() + 7, st);
  const double* sn = Sn.data_ptr<double>();
  const double* pr = res.data_ptr<double>();
  st[7] = sn[0];
  st[8] = kk > 1 ? sn[1] : sigma_next_new;
  st[9] = sigma_next_new;
  st[10] = *std::max_element(pr, pr + kk);
  st[11] = iters;
  return {Un, Sn, Vn, at::scalar_tensor(sigma_next_new, f64), res, basis_new, Wt_u1_new, stats};
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("track_update", &track_update_cpu); }

}  // namespace lipfast
