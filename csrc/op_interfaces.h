// Functions one kernel file defines and others call: the input checks every backend of an op shares
// (defined beside the CPU or composite kernel; one set of rules and messages per op), and the composite
// kernels the CUDA kernels hand the cases they do not take (csrc/composite).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lipfast {

// --- input checks ----------------------------------------------------------------------------------------
// half_ok: the CUDA kernel also takes float16/bfloat16 X, D, U, V (the CPU kernel float32/float64 only).
void check_persample_linear_inputs(const at::Tensor& X, const at::Tensor& D, const at::Tensor& U,
                                   const at::Tensor& S, const at::Tensor& V, bool half_ok,
                                   bool rows_ok = false);

void check_hessian_contract_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& xnorm2,
                                   const at::Tensor& ynorm2, const at::Tensor& S);

void check_subspace_iteration_inputs(const at::Tensor& W, const at::Tensor& V0, int64_t k, int64_t max_iters,
                                     double tol, const c10::optional<at::Tensor>& right,
                                     const c10::optional<at::Tensor>& left);

void check_gradient_statistics_inputs(const at::Tensor& proj, const at::Tensor& hess, const at::Tensor& hess_lo,
                                      const at::Tensor& hess_hi, const at::Tensor& G, const at::Tensor& U,
                                      const at::Tensor& S, const at::Tensor& V, const c10::optional<at::Tensor>& Gv1,
                                      const c10::optional<at::Tensor>& Gtu1, const c10::optional<at::Tensor>& known);

// persample_linear's X [B, n] / D [B, m] (one position per sample, an MLP) as [B, 1, n] / [B, 1, m] (a view).
inline at::Tensor as_positions(const at::Tensor& t) { return t.dim() == 2 ? t.unsqueeze(1) : t; }

// A gradient or optimizer buffer in a weight's shape [m, ...] as the matrix [m, n] (a view; [m, n] as it is).
at::Tensor as_matrix(const at::Tensor& t);

void check_update_statistics_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                                    const at::Tensor& S, const at::Tensor& V);

void check_hessian_tail_inputs(const at::Tensor& W, const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                               const at::Tensor& S, const at::Tensor& V, int64_t max_iters, double tol,
                               double atol);

void check_track_update_inputs(const at::Tensor& W, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                               const at::Tensor& Wt_u1, bool exact);

// --- track_update's cluster expansion (csrc/composite/track_update.cpp; the CPU kernel calls it too) -------
// A pair j joins the top cluster when σ1 − σ_j <= kClusterTau · max(‖ΔW v1‖, ‖ΔWᵀu1‖) (RELIABILITY.md §3.5).
constexpr double kClusterTau = 4.0;

// The degenerate expansion on the top c pairs (MATH.md §2), from the probes W_VC = W' V_C [m, c] and
// Wt_UC = W'ᵀ U_C [n, c] (float64) after the step, Wᵀ U_C before it (the old block `basis`, or V_C S_C when
// `exact`; Wt_u1 its first column) and the spectrum before the step. Returns float64 [6]: μ − σ1 (μ the top
// singular value of U_Cᵀ W' V_C), ½H of the rotated pair's coupling to the pairs outside C and the tail (value,
// lo, hi), max(‖ΔW V_C‖₂, ‖ΔWᵀU_C‖₂), and the gap σ_c − σ_{c+1} (σ_{k+1} = sigma_next when c = k).
at::Tensor cluster_statistics(const at::Tensor& W_VC, const at::Tensor& Wt_UC, const at::Tensor& basis,
                              const at::Tensor& Wt_u1, bool exact, const at::Tensor& U, const at::Tensor& S,
                              const at::Tensor& V, double sigma_next);

// Pairs of the spectrum S [k] (float64, descending) within kClusterTau·step of S[0] (at least 1): the cluster
// the next step's expansion takes.
int64_t cluster_size(const double* S, int64_t k, double step);

void check_conv2d_projections_inputs(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& u1,
                                     const at::Tensor& v1, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation);

void check_persample_conv2d_inputs(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& U,
                                   const at::Tensor& S, const at::Tensor& V, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

void check_persample_linear_precond_inputs(const at::Tensor& X, const at::Tensor& D, const at::Tensor& P,
                                           const at::Tensor& U, const at::Tensor& S, const at::Tensor& V);

// --- composite kernels, for the CUDA kernels' fallbacks ------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
subspace_iteration_composite(const at::Tensor& W, const at::Tensor& V0, int64_t k, int64_t max_iters, double tol,
                             const c10::optional<at::Tensor>& right, const c10::optional<at::Tensor>& left);

at::Tensor gradient_statistics_composite(const at::Tensor& proj, const at::Tensor& hess, const at::Tensor& hess_lo,
                                         const at::Tensor& hess_hi, const at::Tensor& G, const at::Tensor& U,
                                         const at::Tensor& S, const at::Tensor& V, double sigma_next, double scale,
                                         double loss_factor, const c10::optional<at::Tensor>& Gv1,
                                         const c10::optional<at::Tensor>& Gtu1, const c10::optional<at::Tensor>& known,
                                         double known_scale);

at::Tensor update_statistics_composite(const at::Tensor& x, const at::Tensor& y, const at::Tensor& U,
                                       const at::Tensor& S, const at::Tensor& V, double sigma_next);

}  // namespace lipfast
