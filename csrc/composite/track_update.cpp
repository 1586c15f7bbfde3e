// lipfast::track_update: everything the tracker does for one layer after an optimizer step, in one call
// (MATH.md §2, §5): the new spectrum, warm-started from the old block, with the old top pair as probes
// riding in its GEMMs, then ΔW v1 and ΔWᵀ u1 from those probes and the step's first- and second-order
// prediction (with a top cluster of c > 1 pairs: the old cluster's pairs as probes and the cluster expansion,
// cluster_statistics below; its three small eigh synchronise with the host on CUDA, on cluster steps only).
// Composed from lipfast::subspace_iteration and lipfast::update_statistics through the dispatcher, so every
// backend runs its own kernels; results stay on the device until the caller reads the one `stats` vector (one
// call instead of some forty Python-level tensor operations per layer and step). The CPU has its own kernel
// with the same arithmetic (csrc/cpu/track_update_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "math.h"
#include "block_size.h"
#include "op_interfaces.h"

namespace lipfast {

// Shared with the CPU kernel (csrc/cpu/track_update_cpu.cpp).
void check_track_update_inputs(const at::Tensor& W, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                               const at::Tensor& Wt_u1, bool exact) {
  constexpr const char* op = "lipfast::track_update";
  LIPFAST_CHECK_DIM("lipfast::track_update", W, "W", 2, "[m, n]");
  LIPFAST_CHECK_FLOAT("lipfast::track_update", W, "W");
  const int64_t m = W.size(0), n = W.size(1), k = U.dim() == 2 ? U.size(1) : 0, r = std::min(m, n);
  LIPFAST_CHECK(U.dim() == 2 && U.size(0) == m && k >= 1, op, ": U must have shape [m=", m, ", k >= 1], got ",
                U.sizes());
  LIPFAST_CHECK(V.dim() == 2 && V.size(0) == n && V.size(1) == k, op, ": V must have shape [n=", n, ", k=", k,
                "], got ", V.sizes());
  LIPFAST_CHECK(S.dim() == 1 && S.size(0) == k, op, ": S must have shape [k=", k, "], got ", S.sizes());
  LIPFAST_CHECK(Wt_u1.dim() == 1 && Wt_u1.size(0) == n, op, ": Wt_u1 must have shape [n=", n, "], got ",
                Wt_u1.sizes());
  LIPFAST_CHECK(exact || k < r, op, ": an iterated spectrum needs k < min(m, n) = ", r, ", got k = ", k);
}

int64_t cluster_size(const double* S, int64_t k, double step) {
  int64_t c = 1;
  while (c < k && S[0] - S[c] <= kClusterTau * step) ++c;
  return c;
}

namespace {
at::Tensor call_update_statistics(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U, const at::Tensor& S,
                                  const at::Tensor& V, double sigma_next);
}  // namespace

at::Tensor cluster_statistics(const at::Tensor& W_VC, const at::Tensor& Wt_UC, const at::Tensor& basis,
                              const at::Tensor& Wt_u1, bool exact, const at::Tensor& U, const at::Tensor& S,
                              const at::Tensor& V, double sigma_next) {
  const int64_t c = W_VC.size(1), k = U.size(1), n = V.size(0);
  const auto U64 = U.to(at::kDouble), V64 = V.to(at::kDouble), S64 = S.to(at::kDouble);
  const auto UC = U64.slice(1, 0, c), VC = V64.slice(1, 0, c);
  // ΔW V_C = W' V_C − U_C S_C; ΔWᵀ U_C = W'ᵀ U_C − Wᵀ U_C, Wᵀ U_C before the step from the old block (an
  // iterated block is Wᵀ U of its last sweep) or V_C S_C (exact), its first column the Wt_u1 given.
  const auto DV = W_VC - UC * S64.slice(0, 0, c);
  const auto WtU = exact ? V64.slice(1, 1, c) * S64.slice(0, 1, c) : basis.slice(1, 1, c).to(at::kDouble);
  const auto DU = Wt_UC - at::cat({Wt_u1.to(at::kDouble).reshape({n, 1}), WtU}, 1);
  // M = U_Cᵀ W' V_C = diag(S_C) + U_Cᵀ ΔW V_C (W V_C = U_C S_C for Ritz pairs) and its top singular triplet.
  const auto M = at::diag(S64.slice(0, 0, c)) + UC.t().mm(DV);
  auto [evals, evecs] = at::linalg_eigh(M.t().mm(M));  // ascending
  const auto b = evecs.select(1, c - 1);
  const auto mu = evals.select(0, c - 1).clamp_min(0.0).sqrt();
  const auto a = M.mv(b).div(mu);
  // The rotated pair's coupling to everything outside the cluster: ΔW V_C b and ΔWᵀ U_C a without their parts
  // in the cluster's span, contracted against u1 (carrying σ1) and the pairs j >= c, the rest the tail.
  auto x = DV.mv(b), y = DU.mv(a);
  x = x - UC.mv(UC.t().mv(x));
  y = y - VC.mv(VC.t().mv(y));
  const auto Uo = at::cat({U64.slice(1, 0, 1), U64.slice(1, c, k)}, 1);
  const auto Vo = at::cat({V64.slice(1, 0, 1), V64.slice(1, c, k)}, 1);
  const auto So = at::cat({S64.slice(0, 0, 1), S64.slice(0, c, k)});
  const auto upd = call_update_statistics(x, y, Uo, So, Vo, sigma_next);
  // ‖ΔW V_C‖₂ and ‖ΔWᵀ U_C‖₂ from the c×c Grams; the gap that separates the cluster from the rest.
  const auto step = at::maximum(at::linalg_eigvalsh(DV.t().mm(DV)).select(0, c - 1),
                                at::linalg_eigvalsh(DU.t().mm(DU)).select(0, c - 1))
                        .clamp_min(0.0)
                        .sqrt();
  const auto below = c < k ? S64.select(0, c) : at::scalar_tensor(sigma_next, S64.options());
  const auto gap = S64.select(0, c - 1) - below;
  return at::cat({(mu - S64.select(0, 0)).reshape({1}), upd.slice(0, 1, 4), step.reshape({1}), gap.reshape({1})});
}

namespace {

using SubspaceResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SubspaceResult call_subspace_iteration(const at::Tensor& W, const at::Tensor& V0, int64_t k, int64_t max_iters,
                                       double tol, const at::Tensor& right, const at::Tensor& left) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::subspace_iteration", "")
                       .typed<SubspaceResult(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                                             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&)>();
  return op.call(W, V0, k, max_iters, tol, right, left);
}

at::Tensor call_hessian_tail(const at::Tensor& W, const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                             const at::Tensor& S, const at::Tensor& V, double sigma_next, double atol) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::hessian_tail", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double, int64_t, double,
                                         double)>();
  return op.call(W, x, y, U, S, V, sigma_next, kTailMaxSteps, kTailTol, atol);
}

at::Tensor call_update_statistics(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U, const at::Tensor& S,
                                  const at::Tensor& V, double sigma_next) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lipfast::update_statistics", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double)>();
  return op.call(x, y, U, S, V, sigma_next);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
track_update(const at::Tensor& W,      // [m, n] the weight after the step
             const at::Tensor& basis,  // [n, p] the old spectrum's warm-start block (ignored when exact)
             const at::Tensor& U,      // [m, k] the old spectrum
             const at::Tensor& S,      // [k]
             const at::Tensor& V,      // [n, k]
             double sigma_next,        // its σ_{k+1}
             const at::Tensor& Wt_u1,  // [n] float64, Wᵀu1 before the step
             int64_t max_iters, double tol, bool exact,
             int64_t cluster,         // pairs in the top cluster (1: the pair expansion)
             bool solve_tail) {       // false: the tail's truncation estimate (the new spectrum is all wanted)
  check_track_update_inputs(W, U, S, V, Wt_u1, exact);
  const int64_t m = W.size(0), n = W.size(1), k = U.size(1), r = std::min(m, n);
  const int64_t c = std::clamp<int64_t>(cluster, 1, k);
  const auto dtype = W.scalar_type();
  // The old cluster's pairs ride along as probes (c = 1: the top pair).
  const auto v1 = V.slice(1, 0, c).to(dtype), u1 = U.slice(1, 0, c).to(dtype);

  at::Tensor Un, Sn, Vn, res, iters, next, W_v1, Wt_u1n_probe, sigma_next_new, basis_new, Wt_u1_new;
  int64_t kk = k;
  if (exact) {
    // One sweep whose block is the identity on the smaller side is the exact SVD (its Rayleigh–Ritz step
    // sees the whole row space): iterate on the tall orientation, A = W or Wᵀ.
    const bool tall = m >= n;
    const auto A = tall ? W : W.t();
    const auto eye = at::eye(r, W.options());
    auto [Ua, Sa, Va, resa, ita, nexta, A_right, At_left] =
        call_subspace_iteration(A, eye, r, 1, 0.0, tall ? v1 : u1, tall ? u1 : v1);
    kk = std::min(k, r);
    Un = (tall ? Ua : Va).slice(1, 0, kk);
    Vn = (tall ? Va : Ua).slice(1, 0, kk);
    Sn = Sa.slice(0, 0, kk);
    res = resa.slice(0, 0, kk);
    iters = ita;
    W_v1 = tall ? A_right : At_left;
    Wt_u1n_probe = tall ? At_left : A_right;
    // Fresh tensors where a view would alias another output.
    sigma_next_new = k >= r ? at::zeros({}, Sa.options()) : Sa.select(0, kk).clone();
    const auto Vfull = tall ? Va : Ua;
    basis_new = Vfull.slice(1, 0, block_size(kk, r)).clone();
    Wt_u1_new = Vfull.select(1, 0).to(at::kDouble).mul(Sa.select(0, 0));
  } else {
    auto [Ui, Si, Vi, resi, iti, nexti, Wv, Wtu] =
        call_subspace_iteration(W, basis.to(dtype), tracked_pairs(k), max_iters, tol, v1, u1);
    Un = Ui.slice(1, 0, k);
    Vn = Vi.slice(1, 0, k);
    Sn = Si.slice(0, 0, k);
    res = resi.slice(0, 0, k);
    iters = iti;
    W_v1 = Wv;
    Wt_u1n_probe = Wtu;
    // The Ritz value of σ_{k+1} lies below the true one; adding its residual keeps the truncation bracket
    // honest (a singular value lies within the residual of every Ritz value).
    sigma_next_new = at::minimum(Si.select(0, k) + resi.select(0, k), Si.select(0, k - 1));
    basis_new = nexti;
    Wt_u1_new = nexti.select(1, 0).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  }
  // ΔW v1 = W_after v1 − σ1 u1 (W_before v1 = σ1 u1 for a Ritz pair) and ΔWᵀ u1 = W_afterᵀ u1 − W_beforeᵀ u1.
  const auto S64 = S.to(at::kDouble);
  const auto x = W_v1.select(1, 0) - U.select(1, 0).to(at::kDouble) * S64.select(0, 0);
  const auto y = Wt_u1n_probe.select(1, 0) - Wt_u1.to(at::kDouble);
  auto upd = call_update_statistics(x, y, U, S64, V, sigma_next);
  at::Tensor step_gap;  // the step on the cluster, and the gap below it
  if (c > 1) {
    const auto cs = cluster_statistics(W_v1, Wt_u1n_probe, basis, Wt_u1, exact, U, S64, V, sigma_next);
    upd = at::cat({cs.slice(0, 0, 4), upd.slice(0, 4, 7)});
    step_gap = cs.slice(0, 4, 6);
  } else {
    // ½H[ΔW,ΔW]'s unknown tail solved instead of estimated: replace ½R/σ1 and the bracket's ½R/(σ1 ± σ_{k+1}) by
    // the solved tail and its bracket (unchanged when the solve takes no step). The solve runs on W after the
    // step, a difference of the expansion's own third order (MATH.md §1). The cluster expansion above keeps
    // its truncation bracket.
    if (solve_tail) {
      const auto tail = call_hessian_tail(W, x, y, U, S64, V, sigma_next,
                                          tail_atol(upd.select(0, 0).item<double>(), upd.select(0, 1).item<double>()));
      const auto s1 = S64.select(0, 0), mass = tail.select(0, 4);
      const auto truncated = at::stack({mass / s1, mass / (s1 + sigma_next), mass / (s1 - sigma_next)});
      upd = at::cat({upd.slice(0, 0, 1), upd.slice(0, 1, 4) + 0.5 * (tail.slice(0, 0, 3) - truncated),
                     upd.slice(0, 4)});
    }
    const auto below = k > 1 ? S64.select(0, 1) : at::scalar_tensor(sigma_next, S64.options());
    step_gap = at::stack({at::maximum(upd.select(0, 5), upd.select(0, 6)), S64.select(0, 0) - below});
  }
  const auto s2 = kk > 1 ? Sn.select(0, 1) : sigma_next_new;
  // ‖U_Cᵀu1'‖, ‖V_Cᵀv1'‖: how much of the new top pair lies in the old cluster's span (c = 1: |u1ᵀu1'|,
  // |v1ᵀv1'|; the `crossing` flag), and the new spectrum's top two residuals r1, r2 (r2 = r1 when k = 1; the
  // next step's sigma_err).
  const auto overlap = at::stack({U.slice(1, 0, c).to(at::kDouble).t().mv(Un.select(1, 0).to(at::kDouble)).norm(),
                                  V.slice(1, 0, c).to(at::kDouble).t().mv(Vn.select(1, 0).to(at::kDouble)).norm()});
  const auto r12 = kk > 1 ? res.slice(0, 0, 2).to(at::kDouble) : res.slice(0, 0, 1).to(at::kDouble).repeat({2});
  // The cluster the next step takes: the new spectrum's pairs within kClusterTau times this step of σ1'.
  // (On the device, with no host read: S' is descending, so the count is cluster_size's.)
  const auto Sn64 = Sn.to(at::kDouble);
  const auto c_next = (Sn64.select(0, 0) - Sn64 <= at::maximum(upd.select(0, 5), upd.select(0, 6)) * kClusterTau)
                          .sum()
                          .to(at::kDouble)
                          .clamp_min(1.0);
  const auto counts = at::stack({at::scalar_tensor(static_cast<double>(c), S64.options()), c_next});
  const auto stats = at::cat({upd, Sn.slice(0, 0, 1), s2.reshape({1}), sigma_next_new.reshape({1}),
                              res.max().reshape({1}), iters.to(at::kDouble).reshape({1}), overlap, r12, step_gap,
                              counts});
  return {Un, Sn, Vn, sigma_next_new, res, basis_new, Wt_u1_new, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CompositeExplicitAutograd, m) { m.impl("track_update", &track_update); }

}  // namespace lipfast
