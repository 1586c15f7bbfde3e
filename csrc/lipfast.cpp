// Every op schema of lipfast, in one place. Kernels register themselves next to their code
// (csrc/cpu/*.cpp, csrc/cuda/*.cu). The Python wrappers, fake kernels and docs are in lipfast/ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

TORCH_LIBRARY(lipfast, m) {
  m.set_python_module("lipfast.ops");
  // subspace_iteration: warm-started block subspace iteration on WᵀW with Rayleigh–Ritz every sweep.
  //   W [m, n], V0 [n, p] starting block (any full-rank block; orthonormalised inside), k <= p triplets
  //   whose residual decides convergence. Stops when max_{j<k} ‖Wᵀu_j − σ_j v_j‖ <= tol·σ1 or after
  //   max_iters sweeps. Returns U [m, p], S [p] (descending, float64), V [n, p], residual [p] (float64),
  //   iters [] (int64, sweeps done), next [n, p] = WᵀU (one power step past V: the next warm start), and
  //   W·right [m, a], Wᵀ·left [n, b] (float64) for optional probe blocks, computed in the first sweep's GEMMs.
  m.def("subspace_iteration(Tensor W, Tensor V0, int k, int max_iters, float tol, Tensor? right=None, "
        "Tensor? left=None) -> (Tensor U, Tensor S, Tensor V, Tensor residual, Tensor iters, Tensor next, "
        "Tensor W_right, Tensor Wt_left)");
  // hessian_contract: H[E_i,E_i] (value, lo, hi of the truncation bracket) from the projections of each
  //   direction E_i onto the top-k triplets: a [N, k] = Uᵀ(E_i v1), b [N, k] = Vᵀ(E_iᵀ u1),
  //   xnorm2 [N] = ‖E_i v1‖², ynorm2 [N] = ‖E_iᵀ u1‖², S [k] descending, sigma_next = σ_{k+1}.
  //   Outputs [N] float64 each.
  m.def("hessian_contract(Tensor a, Tensor b, Tensor xnorm2, Tensor ynorm2, Tensor S, float sigma_next) -> "
        "(Tensor value, Tensor lo, Tensor hi)");
  // persample_linear: fused per-sample statistics of a Linear layer, G_i = D_iᵀ X_i never formed.
  //   X [B, T, n] inputs, D [B, T, m] output-gradients of each sample's own loss ([B, n], [B, m]: T = 1), U [m, k], S [k], V [n, k],
  //   sigma_next = σ_{k+1}. Returns proj [B] = u1ᵀ G_i v1 and hess, hess_lo, hess_hi [B] = H[G_i, G_i],
  //   all float64.
  m.def("persample_linear(Tensor X, Tensor D, Tensor U, Tensor S, Tensor V, float sigma_next) -> "
        "(Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi)");
  //   .sums also returns Gv1 [m] = Σ_i G_i v1 and Gtu1 [n] = Σ_i G_iᵀ u1 (float64): the gradient's products
  //   with the top pair, from the rows of X and D (no pass over the gradient itself).
  m.def("persample_linear.sums(Tensor X, Tensor D, Tensor U, Tensor S, Tensor V, float sigma_next) -> "
        "(Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)");
  // gradient_statistics: the tracker's reductions before a step, from per-sample statistics proj/hess/
  //   hess_lo/hess_hi [N] (float64, as persample_linear returns them), the weight gradient G [m, n] and the
  //   spectrum U [m, k], S [k], V [n, k]. Returns float64 [12]: N, Σ(s−K), Σ(s−K)², ΣH, ΣH_lo, ΣH_hi
  //   (additive across data-parallel ranks), K = u1ᵀḡv1, H[ḡ,ḡ] (value, lo, hi), all-finite flag; with
  //   s = scale·proj, H = scale²·hess, ḡ = G / loss_factor). Gv1 [m], Gtu1 [n], when given, are G·v1 and
  //   Gᵀ·u1 formed elsewhere (from the per-sample sums), and G is then not read. G may have the weight's shape
  //   [m, ...] (a convolution's gradient as stored), read as [m, n]. known, when given (G's shape), is the
  //   optimizer buffer of the step's deterministic part: element [11] is known_scale·u1ᵀ(known)v1 (else 0), so
  //   the result is float64 [12].
  m.def("gradient_statistics(Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor G, Tensor U, "
        "Tensor S, Tensor V, float sigma_next, float scale, float loss_factor, Tensor? Gv1=None, "
        "Tensor? Gtu1=None, Tensor? known=None, float known_scale=0.0) -> Tensor");
  // update_statistics: after a step, from x = ΔW v1 [m], y = ΔWᵀ u1 [n] (float64) and the spectrum before
  //   the step. Returns float64 [7]: u1ᵀΔWv1, ½H[ΔW,ΔW] (value, lo, hi), all-finite flag, ‖x‖, ‖y‖.
  m.def("update_statistics(Tensor x, Tensor y, Tensor U, Tensor S, Tensor V, float sigma_next) -> Tensor");
  // hessian_tail: the part of H[E,E] (MATH.md §1) beyond the k known triplets, solved rather than bracketed:
  //   x = E v1 [m], y = Eᵀu1 [n] (float64), the spectrum U [m, k], S [k], V [n, k] and sigma_next (an upper
  //   bound of the unknown singular values), W [m, n] the matrix whose tail is solved. Conjugate gradients on
  //   (σ1 I − [[0, W], [Wᵀ, 0]]) restricted to the unknown pairs, at most max_iters steps, stopping when the
  //   bracket is within tol of its lower end, or within atol. Returns float64 [5]: the tail's value, its lower and upper bound,
  //   the steps taken, and R = the unknown mass ‖[x; y] off the known pairs‖² (0 steps: the truncation
  //   bracket R/(σ1 ± σ_{k+1}) and estimate R/σ1 of MATH.md §1, as when that bracket already meets tol).
  m.def("hessian_tail(Tensor W, Tensor x, Tensor y, Tensor U, Tensor S, Tensor V, float sigma_next, "
        "int max_iters, float tol, float atol=0.) -> Tensor");
  // track_update: one layer's work after an optimizer step, in one call: the new spectrum of W [m, n]
  //   (warm-started from basis [n, p], or exact when `exact`), with the old spectrum U [m, k], S [k],
  //   V [n, k], sigma_next and Wt_u1 = Wᵀu1 [n] before the step giving ΔW v1, ΔWᵀ u1 through probes.
  //   Returns the new U [m, k], S [k], V [n, k], sigma_next [], residuals [k], basis [n, p], Wt_u1 [n], and
  //   stats [20] float64: update_statistics' 7 values (the first four from the cluster expansion when
  //   cluster > 1), new σ1, σ2 (σ_{k+1} when k = 1), σ_{k+1}, max residual, sweeps, ‖U_Cᵀu1'‖, ‖V_Cᵀv1'‖
  //   (the new top pair in the old cluster's span), new r1, r2 (r2 = r1 when k = 1), max(‖ΔW V_C‖₂,
  //   ‖ΔWᵀU_C‖₂), the cluster's gap σ_c − σ_{c+1}, the cluster size c used, and the next step's.
  //   solve_tail=False leaves ½H[ΔW,ΔW]'s unknown tail at its truncation estimate (lipfast::hessian_tail not
  //   run): for a caller that wants the new spectrum only.
  m.def("track_update(Tensor W, Tensor basis, Tensor U, Tensor S, Tensor V, float sigma_next, Tensor Wt_u1, "
        "int max_iters, float tol, bool exact, int cluster=1, bool solve_tail=True) -> (Tensor U, Tensor S, Tensor V, Tensor sigma_next, "
        "Tensor residuals, Tensor basis, Tensor Wt_u1, Tensor stats)");
  // conv2d_projections: the per-sample products of a Conv2d (groups=1, zero padding) with the weight's top
  //   singular pair, G_i = Σ_positions d_i(p) x_i(p)ᵀ never formed and x never unfolded: x [B, C_in, H, W],
  //   grad_out [B, C_out, H', W'] (x's dtype), u1 [C_out], v1 [C_in·kh·kw] (the weight's flattening order),
  //   kernel_size, stride, padding, dilation as pairs. Returns Gv1 [B, C_out] = G_i v1 and
  //   Gtu1 [B, C_in·kh·kw] = G_iᵀ u1, float64.
  m.def("conv2d_projections(Tensor x, Tensor grad_out, Tensor u1, Tensor v1, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation) -> (Tensor Gv1, Tensor Gtu1)");
  // persample_conv2d: conv2d_projections contracted with the spectrum U [m, k], S [k], V [n, k], sigma_next, as
  //   persample_linear.sums does for a Linear layer: proj, hess, hess_lo, hess_hi [B] and Gv1 [m] = Σ_i G_i v1,
  //   Gtu1 [n] = Σ_i G_iᵀ u1, all float64 (m = C_out, n = C_in·kh·kw).
  m.def("persample_conv2d(Tensor x, Tensor grad_out, Tensor U, Tensor S, Tensor V, float sigma_next, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor proj, Tensor hess, "
        "Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)");
  // persample_linear_precond: persample_linear.sums for the preconditioned per-sample gradients
  //   E_i = P ⊙ G_i (MATH.md §7): X [B, T, n], D [B, T, m], P [m, n] (X's dtype), U [m, k], S [k], V [n, k].
  //   Returns proj [B] = u1ᵀE_i v1, hess, hess_lo, hess_hi [B] = H[E_i, E_i], Gv1 [m] = Σ_i E_i v1,
  //   Gtu1 [n] = Σ_i E_iᵀ u1, all float64. Two GEMMs with P; no E_i or G_i is formed.
  m.def("persample_linear_precond(Tensor X, Tensor D, Tensor P, Tensor U, Tensor S, Tensor V, float sigma_next) "
        "-> (Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)");
  // persample_conv2d_precond: the same for a Conv2d (groups=1, zero padding): x [B, C_in, H, W],
  //   grad_out [B, C_out, H', W'], P [C_out, C_in·kh·kw] (the reshaped weight's shape), geometry as pairs.
  //   One convolution and kh·kw GEMMs, nothing unfolded (csrc/composite/persample_precond.cpp).
  m.def("persample_conv2d_precond(Tensor x, Tensor grad_out, Tensor P, Tensor U, Tensor S, Tensor V, "
        "float sigma_next, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor proj, "
        "Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)");
}

namespace {

// Every lipfast op measures training and is never part of it. This Autograd kernel runs the op below
// autograd, so its outputs carry no grad_fn: they are plain, non-differentiable results, at the cost of
// one C++ redispatch (a Python-level autograd registration costs ~10 µs a call on the tracked step).
void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, Autograd, m) {
  for (const char* name : {"subspace_iteration", "hessian_contract", "persample_linear", "persample_linear.sums",
                           "gradient_statistics", "update_statistics", "track_update", "conv2d_projections",
                           "persample_conv2d", "persample_linear_precond", "persample_conv2d_precond"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_below_autograd>());
  }
}

#ifndef LIPFAST_TORCH_VERSION
#define LIPFAST_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "lipfast compiled ops (registered under torch.ops.lipfast) and build facts";
#ifdef LIPFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = LIPFAST_TORCH_VERSION;
  m.attr("version") = "0.1.0";
}
