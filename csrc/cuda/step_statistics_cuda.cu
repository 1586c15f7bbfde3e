// CUDA kernels of lipfast::gradient_statistics and lipfast::update_statistics (MATH.md §2–§3): the
// tracker's per-layer reductions before and after a step, each one thread block, one launch. The composite
// kernels they replace on CUDA ran ~25 ATen ops each (conversions, dots, a Hessian contraction, stacks),
// which cost the host more than the GPU spent on them. Every sum is in float64; the Hessian terms come from
// lipfast::hessian_terms (csrc/math.h), as on the CPU. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../math.h"
#include "launch.cuh"
#include "reduce.cuh"
#include "../op_interfaces.h"

namespace lipfast {

namespace {

constexpr int kThreads = 256;
// a = Uᵀx and b = Vᵀy live in dynamic shared memory; beyond this k the composite kernel serves the call.
constexpr int64_t kMaxK = 2048;

struct Matrix {  // a strided [rows, k] view (U and V arrive as transposed row blocks or contiguous)
  const void* data;
  int64_t s0, s1;
};

__device__ __forceinline__ bool is_finite(double v) { return v - v == 0.0; }

// The projections of one direction (x [m], y [n], each scaled by `xs`) on the spectrum: a_j = u_jᵀx,
// b_j = v_jᵀy into ab[0..k) and ab[k..2k), and (valid in thread 0) ‖x‖², ‖y‖² and the count of non-finite
// entries. Every thread calls it; it ends with a barrier, after which ab is visible to the block.
template <typename scalar_t>
__device__ void project_direction(const double* __restrict__ x, int64_t m, const double* __restrict__ y, int64_t n,
                                  double xs, Matrix U, Matrix V, int64_t k, double* ab, double& xx, double& yy,
                                  double& bad) {
  const auto* u = static_cast<const scalar_t*>(U.data);
  const auto* v = static_cast<const scalar_t*>(V.data);
  double px = 0.0, py = 0.0, pb = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const double e = x[i] * xs;
    px += e * e;
    pb += is_finite(e) ? 0.0 : 1.0;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double e = y[i] * xs;
    py += e * e;
    pb += is_finite(e) ? 0.0 : 1.0;
  }
  cuda::block_sum2(px, py);
  double unused = 0.0;
  cuda::block_sum2(pb, unused);
  xx = px;
  yy = py;
  bad = pb;
  for (int64_t j = 0; j < k; ++j) {
    double pa = 0.0, pbj = 0.0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) pa += static_cast<double>(u[i * U.s0 + j * U.s1]) * (x[i] * xs);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) pbj += static_cast<double>(v[i * V.s0 + j * V.s1]) * (y[i] * xs);
    cuda::block_sum2(pa, pbj);
    if (threadIdx.x == 0) {
      ab[j] = pa;
      ab[k + j] = pbj;
    }
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void update_statistics_kernel(const double* __restrict__ x, int64_t m, const double* __restrict__ y,
                                         int64_t n, Matrix U, Matrix V, const double* __restrict__ S, int64_t k,
                                         double sigma_next, double* __restrict__ out) {
  extern __shared__ double ab[];
  double xx, yy, bad;
  project_direction<scalar_t>(x, m, y, n, 1.0, U, V, k, ab, xx, yy, bad);
  if (threadIdx.x != 0) return;
  const HessianTerms h = hessian_terms(ab, ab + k, 1, S, k, sigma_next, xx, yy);
  out[0] = ab[0];  // ⟨J, ΔW⟩ = u1ᵀ ΔW v1
  out[1] = 0.5 * h.value;
  out[2] = 0.5 * h.lo;
  out[3] = 0.5 * h.hi;
  out[4] = bad == 0.0 ? 1.0 : 0.0;
  out[5] = sqrt(xx);
  out[6] = sqrt(yy);
}

template <typename scalar_t>
__global__ void gradient_statistics_kernel(const double* __restrict__ proj, const double* __restrict__ hess,
                                           const double* __restrict__ hess_lo, const double* __restrict__ hess_hi,
                                           int64_t N, const double* __restrict__ x, int64_t m,
                                           const double* __restrict__ y, int64_t n, double inv_loss_factor, Matrix U,
                                           Matrix V, const double* __restrict__ S, int64_t k, double sigma_next,
                                           double scale, const double* __restrict__ z, double known_scale,
                                           double* __restrict__ out) {
  extern __shared__ double ab[];
  double xx, yy, bad;
  project_direction<scalar_t>(x, m, y, n, inv_loss_factor, U, V, k, ab, xx, yy, bad);
  const double K = ab[0];  // u1ᵀ ḡ v1: the per-sample projections are centred on it
  double s1 = 0.0, s2 = 0.0, sh = 0.0, sl = 0.0, su = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const double s = scale * proj[i] - K;
    s1 += s;
    s2 += s * s;
    sh += hess[i];
    sl += hess_lo[i];
    su += hess_hi[i];
  }
  cuda::block_sum2(s1, s2);
  // The known step's projection u1ᵀz, z = M v1 [m] (float64; null without a known step).
  double kz = 0.0;
  if (z != nullptr) {
    const auto* u = static_cast<const scalar_t*>(U.data);
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) kz += static_cast<double>(u[i * U.s0]) * z[i];
  }
  cuda::block_sum2(sh, sl);
  cuda::block_sum2(su, kz);
  if (threadIdx.x != 0) return;
  const double sc2 = scale * scale;
  const double sums[5] = {s1, s2, sh * sc2, sl * sc2, su * sc2};
  bool finite = bad == 0.0;
  for (double v : sums) finite = finite && is_finite(v);
  const HessianTerms h = hessian_terms(ab, ab + k, 1, S, k, sigma_next, xx, yy);
  out[0] = static_cast<double>(N);
  for (int j = 0; j < 5; ++j) out[1 + j] = sums[j];
  out[6] = K;
  out[7] = h.value;
  out[8] = h.lo;
  out[9] = h.hi;
  out[10] = finite ? 1.0 : 0.0;
  out[11] = z != nullptr ? known_scale * kz : 0.0;
}

at::Tensor vector_f64(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

Matrix strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

}  // namespace

at::Tensor gradient_statistics_cuda(const at::Tensor& proj, const at::Tensor& hess, const at::Tensor& hess_lo,
                                    const at::Tensor& hess_hi, const at::Tensor& G_, const at::Tensor& U,
                                    const at::Tensor& S_, const at::Tensor& V, double sigma_next, double scale,
                                    double loss_factor, const c10::optional<at::Tensor>& Gv1,
                                    const c10::optional<at::Tensor>& Gtu1, const c10::optional<at::Tensor>& known,
                                    double known_scale) {
  check_gradient_statistics_inputs(proj, hess, hess_lo, hess_hi, G_, U, S_, V, Gv1, Gtu1, known);
  const auto G = as_matrix(G_);  // a weight-shaped gradient [m, ...] read as [m, n]
  const int64_t m = G.size(0), n = G.size(1), k = U.size(1), N = proj.size(0);
  if (k > kMaxK || U.scalar_type() != V.scalar_type()) {
    return gradient_statistics_composite(proj, hess, hess_lo, hess_hi, G_, U, S_, V, sigma_next, scale, loss_factor,
                                         Gv1, Gtu1, known, known_scale);
  }
  const c10::cuda::CUDAGuard device_guard(G.device());
  const auto dt = G.scalar_type();
  // ḡ v1 and ḡᵀ u1: given (the per-sample sums), or two GEMVs with the gradient on cuBLAS.
  const auto x = vector_f64(Gv1.has_value() ? *Gv1 : at::mv(G, V.select(1, 0).to(dt)));
  const auto y = vector_f64(Gtu1.has_value() ? *Gtu1 : at::mv(G.t(), U.select(1, 0).to(dt)));
  const auto S = vector_f64(S_);
  const auto p = vector_f64(proj), h = vector_f64(hess), lo = vector_f64(hess_lo), hi = vector_f64(hess_hi);
  // The known step's M v1 by one GEMV in M's dtype (cuBLAS); the kernel contracts it with u1 in float64.
  const auto z = known.has_value()
                     ? vector_f64(at::mv(as_matrix(*known), V.select(1, 0).to(known->scalar_type())))
                     : at::Tensor();
  auto out = at::empty({12}, G.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "gradient_statistics", [&] {
    LIPFAST_CUDA_LAUNCH(gradient_statistics_kernel<scalar_t>, 1, kThreads, 2 * k * sizeof(double), p.data_ptr<double>(),
                        h.data_ptr<double>(), lo.data_ptr<double>(), hi.data_ptr<double>(), N, x.data_ptr<double>(), m,
                        y.data_ptr<double>(), n, 1.0 / loss_factor, strided(U), strided(V), S.data_ptr<double>(), k,
                        sigma_next, scale, z.defined() ? z.data_ptr<double>() : nullptr, known_scale,
                        out.data_ptr<double>());
  });
  return out;
}

at::Tensor update_statistics_cuda(const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& U, const at::Tensor& S_,
                                  const at::Tensor& V, double sigma_next) {
  check_update_statistics_inputs(x_, y_, U, S_, V);
  const int64_t m = x_.size(0), n = y_.size(0), k = U.size(1);
  if (k > kMaxK || U.scalar_type() != V.scalar_type()) {
    return update_statistics_composite(x_, y_, U, S_, V, sigma_next);
  }
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const auto x = vector_f64(x_), y = vector_f64(y_), S = vector_f64(S_);
  auto out = at::empty({7}, x.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "update_statistics", [&] {
    LIPFAST_CUDA_LAUNCH(update_statistics_kernel<scalar_t>, 1, kThreads, 2 * k * sizeof(double), x.data_ptr<double>(), m,
                        y.data_ptr<double>(), n, strided(U), strided(V), S.data_ptr<double>(), k, sigma_next,
                        out.data_ptr<double>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) {
  m.impl("gradient_statistics", &gradient_statistics_cuda);
  m.impl("update_statistics", &update_statistics_cuda);
}

}  // namespace lipfast
