// CPU kernel of lipfast::track_update: the composite kernel's work (csrc/composite/track_update.cpp, which
// other backends run) with the CPU kernels called as C++ functions rather than through the dispatcher, and
// the glue between them (ΔW v1, ΔWᵀu1, σ_{k+1}, the stats vector) in plain loops instead of some twenty
// small ATen calls: on the tracked step each of those pays the cold caches the training step's GEMMs left
// (~40 µs per layer). Same kernels, same arithmetic, so the results equal the composite kernel's; only for a
// small exact layer (below) are the residuals and the ΔW probes taken another way, to rounding.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "block_size.h"
#include "checks.h"
#include "math.h"
#include "row_kernels.h"
#include "../small_linalg.h"
#include "op_interfaces.h"

namespace lipfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
subspace_iteration_cpu(const at::Tensor& W, const at::Tensor& V0, int64_t k, int64_t max_iters, double tol,
                       const c10::optional<at::Tensor>& right, const c10::optional<at::Tensor>& left);
at::Tensor update_statistics_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U, const at::Tensor& S,
                                 const at::Tensor& V, double sigma_next);
at::Tensor hessian_tail_cpu(const at::Tensor& W, const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                            const at::Tensor& S, const at::Tensor& V, double sigma_next, int64_t max_iters,
                            double tol, double atol);

namespace {

// Column 0 of t [rows, cols] as float64 values.
std::vector<double> first_column(const at::Tensor& t) {
  const auto c = t.select(1, 0).to(at::kDouble).contiguous();
  const double* p = c.data_ptr<double>();
  return std::vector<double>(p, p + c.numel());
}

// The exact spectrum of a matrix whose short side r is at most small::kJacobiMaxSize (a classifier head),
// without the sweep's two GEMMs and their copies. It is the arithmetic of the identity-block sweep that
// lipfast::subspace_iteration runs for it (and Tracker's first spectrum takes), step for step: that sweep's
// block is the identity, so its Gram matrix is R Rᵀ of the short side's rows R [r, L] exactly, its
// orthonormaliser the identity, and its Ritz pairs the eigenpairs of R Rᵀ (the same Jacobi), the long-side
// vectors (1/σ_j) Rᵀ q_j (the same row combination). So a step that leaves W unchanged reads the same σ1.
struct SmallExact {
  at::Tensor short_rows, long_rows;  // [r, r] and [r, L]: the singular vectors as rows, in W's dtype
  std::vector<double> sigma, residual;  // [r] each; residual_j = ‖R·long_j − σ_j short_j‖
};

SmallExact small_exact(const at::Tensor& R) {  // [r, L] contiguous
  const int64_t r = R.size(0), L = R.size(1);
  small::Mat M(r * r), Q;
  std::vector<double> lambda;
  SmallExact out{at::empty({r, r}, R.options()), at::empty({r, L}, R.options()), std::vector<double>(r),
                 std::vector<double>(r)};
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "track_update_small_exact", [&] {
    const scalar_t* pr = R.data_ptr<scalar_t>();
    rows::gram(pr, r, L, M.data());
    LIPFAST_CHECK(std::all_of(M.begin(), M.end(), [](double x) { return std::isfinite(x); }),
                  "lipfast::track_update: W must be finite, got a matrix with NaN or Inf entries");
    small::Mat A = M;
    small::jacobi_eigh(A, r, lambda, Q);
    small::Mat Qt(r * r), Qt_inv(r * r);
    for (int64_t j = 0; j < r; ++j) {
      const double s = std::sqrt(std::max(lambda[j], 0.0));
      const double inv = s > 0.0 ? 1.0 / s : 0.0;  // σ_j = 0: a zero long-side vector, as the sweep gives it
      out.sigma[j] = s;
      for (int64_t i = 0; i < r; ++i) {
        Qt[j * r + i] = Q[i * r + j];
        Qt_inv[j * r + i] = Q[i * r + j] * inv;
      }
    }
    scalar_t* ps = out.short_rows.data_ptr<scalar_t>();
    for (int64_t i = 0; i < r * r; ++i) ps[i] = static_cast<scalar_t>(Qt[i]);
    rows::combine(Qt_inv.data(), r, pr, r, L, out.long_rows.data_ptr<scalar_t>());
    // Residuals of the vectors as returned (rounded to W's dtype), as the sweep measures them: one small GEMM.
    const auto RL = out.long_rows.mm(R.t()).contiguous();  // [r, r]: row j = R·long_j
    const scalar_t* prl = RL.data_ptr<scalar_t>();
    for (int64_t j = 0; j < r; ++j) {
      double res2 = 0.0;
      for (int64_t i = 0; i < r; ++i) {
        const double d = static_cast<double>(prl[j * r + i]) - out.sigma[j] * static_cast<double>(ps[j * r + i]);
        res2 += d * d;
      }
      out.residual[j] = std::sqrt(res2);
    }
  });
  return out;
}

// The first c columns of t [rows, k] as float64, one column after another.
std::vector<double> columns(const at::Tensor& t, int64_t c) {
  std::vector<double> out;
  out.reserve(t.size(0) * c);
  for (int64_t j = 0; j < c; ++j) {
    const auto col = t.select(1, j).to(at::kDouble).contiguous();
    out.insert(out.end(), col.data_ptr<double>(), col.data_ptr<double>() + col.numel());
  }
  return out;
}

// W V_C [m, c] and Wᵀ U_C [n, c] in float64 (V_C, U_C as from columns()), one pass over the rows of W [m, n]
// (contiguous).
std::pair<at::Tensor, at::Tensor> probes(const at::Tensor& W, const std::vector<double>& v,
                                         const std::vector<double>& u, int64_t c) {
  const int64_t m = W.size(0), n = W.size(1);
  auto Wv = at::empty({c, m}, W.options().dtype(at::kDouble)), Wtu = at::zeros({c, n}, Wv.options());
  double *pwv = Wv.data_ptr<double>(), *pwtu = Wtu.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "track_update_probes", [&] {
    const scalar_t* pw = W.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m; ++i) {
      const scalar_t* row = pw + i * n;
      for (int64_t j = 0; j < c; ++j) {
        const double* vj = v.data() + j * n;
        double dot = 0.0;
        for (int64_t col = 0; col < n; ++col) dot += static_cast<double>(row[col]) * vj[col];
        pwv[j * m + i] = dot;
        rows::add_scaled(pwtu + j * n, u[j * m + i], row, n);
      }
    }
  });
  return {Wv.t(), Wtu.t()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
track_update_cpu(const at::Tensor& W, const at::Tensor& basis, const at::Tensor& U, const at::Tensor& S,
                 const at::Tensor& V, double sigma_next, const at::Tensor& Wt_u1, int64_t max_iters, double tol,
                 bool exact, int64_t cluster, bool solve_tail) {
  check_track_update_inputs(W, U, S, V, Wt_u1, exact);
  const int64_t m = W.size(0), n = W.size(1), k = U.size(1), r = std::min(m, n);
  const int64_t c = std::clamp<int64_t>(cluster, 1, k);
  const auto dtype = W.scalar_type();
  const auto f64 = W.options().dtype(at::kDouble);
  // The old cluster's pairs ride along as probes (c = 1: the top pair).
  const auto v1 = V.slice(1, 0, c).to(dtype), u1 = U.slice(1, 0, c).to(dtype);

  at::Tensor Un, Sn, Vn, res, basis_new, Wt_u1_new, W_v1, Wt_u1_probe;
  double sigma_next_new, iters;
  int64_t kk = k;
  if (exact && r <= small::kJacobiMaxSize) {
    const bool wide = m < n;  // R = the short side's rows: W itself, or Wᵀ (as the sweep orients a square W)
    const auto Wc = W.contiguous();
    const auto exact_svd = small_exact(wide ? Wc : Wc.t().contiguous());
    const auto& Urows = wide ? exact_svd.short_rows : exact_svd.long_rows;  // [r, m]
    const auto& Vrows = wide ? exact_svd.long_rows : exact_svd.short_rows;  // [r, n]
    kk = std::min(k, r);
    const auto& sig = exact_svd.sigma;
    Un = Urows.slice(0, 0, kk).t();
    Vn = Vrows.slice(0, 0, kk).t();
    Sn = at::empty({kk}, f64);
    res = at::empty({kk}, f64);
    std::copy(sig.begin(), sig.begin() + kk, Sn.data_ptr<double>());
    std::copy(exact_svd.residual.begin(), exact_svd.residual.begin() + kk, res.data_ptr<double>());
    iters = 1.0;
    sigma_next_new = k >= r ? 0.0 : sig[kk];
    basis_new = Vrows.slice(0, 0, block_size(kk, r)).clone().t();
    Wt_u1_new = Vrows.select(0, 0).to(at::kDouble).mul(sig[0]);
    std::tie(W_v1, Wt_u1_probe) = probes(Wc, columns(V, c), columns(U, c), c);
  } else if (exact) {
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
    basis_new = Vfull.slice(1, 0, block_size(kk, r)).clone();
    Wt_u1_new = Vfull.select(1, 0).to(at::kDouble).mul(Sa.data_ptr<double>()[0]);  // a float64 .to() is no copy
  } else {
    auto [Ui, Si, Vi, resi, iti, nexti, Wv, Wtu] =
        subspace_iteration_cpu(W, basis.to(dtype), tracked_pairs(k), max_iters, tol, v1, u1);
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
  for (int64_t col = 0; col < n; ++col) py[col] = wtu[col] - pw[col];
  const auto upd = update_statistics_cpu(x, y, U, S, V, sigma_next);

  auto stats = at::empty({20}, f64);
  double* st = stats.data_ptr<double>();
  std::copy(upd.data_ptr<double>(), upd.data_ptr<double>() + 7, st);
  if (c == 1 && solve_tail) {  // ½H[ΔW,ΔW]'s unknown tail solved instead of estimated, as in the composite kernel
    const auto tail = hessian_tail_cpu(W, x, y, U, S, V, sigma_next, kTailMaxSteps, kTailTol,
                                       tail_atol(st[0], st[1]));
    const double* tl = tail.data_ptr<double>();
    const double mass = tl[4];
    st[1] += 0.5 * (tl[0] - mass / s1_old);
    st[2] += 0.5 * (tl[1] - mass / (s1_old + sigma_next));
    st[3] += 0.5 * (tl[2] - mass / (s1_old - sigma_next));
  }
  const double* sn = Sn.data_ptr<double>();
  const double* pr = res.data_ptr<double>();
  st[7] = sn[0];
  st[8] = kk > 1 ? sn[1] : sigma_next_new;
  st[9] = sigma_next_new;
  st[10] = *std::max_element(pr, pr + kk);
  st[11] = iters;
  const auto S_old = S.to(at::kDouble).contiguous();
  const double* s_old = S_old.data_ptr<double>();
  if (c > 1) {  // the cluster expansion, the composite kernel's arithmetic (shared)
    const auto cs = cluster_statistics(W_v1, Wt_u1_probe, basis, Wt_u1, exact, U, S_old, V, sigma_next).contiguous();
    const double* pc = cs.data_ptr<double>();
    std::copy(pc, pc + 4, st);
    st[16] = pc[4];
    st[17] = pc[5];
  } else {
    st[16] = std::max(st[5], st[6]);
    st[17] = s_old[0] - (k > 1 ? s_old[1] : sigma_next);
  }
  // ‖U_Cᵀu1'‖, ‖V_Cᵀv1'‖: the new top pair in the old cluster's span (c = 1: |u1ᵀu1'|, |v1ᵀv1'|), and the
  // new spectrum's top two residuals.
  const auto u_old = columns(U, c), v_old = columns(V, c), u1_new = first_column(Un), v1_new = first_column(Vn);
  double ou = 0.0, ov = 0.0;
  for (int64_t j = 0; j < c; ++j) {
    double du = 0.0, dv = 0.0;
    for (int64_t i = 0; i < m; ++i) du += u_old[j * m + i] * u1_new[i];
    for (int64_t col = 0; col < n; ++col) dv += v_old[j * n + col] * v1_new[col];
    ou += du * du;
    ov += dv * dv;
  }
  st[12] = std::sqrt(ou);
  st[13] = std::sqrt(ov);
  st[14] = pr[0];
  st[15] = kk > 1 ? pr[1] : pr[0];
  st[18] = static_cast<double>(c);
  st[19] = static_cast<double>(cluster_size(sn, kk, std::max(st[5], st[6])));
  return {Un, Sn, Vn, at::scalar_tensor(sigma_next_new, f64), res, basis_new, Wt_u1_new, stats};
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("track_update", &track_update_cpu); }

}  // namespace lipfast
