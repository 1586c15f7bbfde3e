// CUDA kernel of lipfast::persample_linear (MATH.md §4): per-sample projections s_i = u1ᵀ G_i v1 and
// H[G_i, G_i] of a Linear layer, with G_i = D_iᵀ X_i never formed. As on the CPU, the two skinny GEMMs
// X·V and D·U go to ATen (cuBLAS); one fused kernel, one block per sample, then produces the norms,
// the projections a_i, b_i and the Hessian terms (lipfast::hessian_terms, csrc/math.h, shared with the
// CPU kernel). Float32/float64 inputs, and float16/bfloat16 ones whose GEMMs write float32 (cuBLAS reads
// the half-precision inputs and accumulates in float32: rounding XV and DU back to half precision would
// cost as much accuracy as doing everything in half precision). Every sum in the kernel is in float64;
// outputs are float64. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/version.h>

#include <type_traits>

#include "../checks.h"
#include "launch.cuh"
#include "reduce.cuh"
#include "../math.h"
#include "../op_interfaces.h"

namespace lipfast {

namespace {

constexpr const char* kOp = "lipfast::persample_linear";

// T == 1: G_i = D_i X_iᵀ is rank one, so x_i = (X_i·v1) D_i and y_i = (D_i·u1) X_i, and their norms are
// products of row norms. One block per sample reduces ‖D_i‖² and ‖X_i‖²; O(m + n + k) per sample.
template <typename scalar_t, typename proj_t>
__global__ void persample_linear_rank1_kernel(
    // inputs
    const scalar_t* __restrict__ X,   // [B, n]
    const scalar_t* __restrict__ D,   // [B, m]
    const proj_t* __restrict__ XV,    // [B, k]
    const proj_t* __restrict__ DU,    // [B, k]
    const double* __restrict__ S,     // [k]
    int64_t B, int64_t n, int64_t m, int64_t k, double sigma_next,
    // scratch
    double* __restrict__ ab,          // [B, 2, k]: a_i, b_i
    // outputs
    double* __restrict__ proj,        // [B]
    double* __restrict__ hess,        // [B]
    double* __restrict__ hess_lo,     // [B]
    double* __restrict__ hess_hi) {   // [B]
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const scalar_t* Xi = X + i * n;
    const scalar_t* Di = D + i * m;
    const proj_t* XVi = XV + i * k;
    const proj_t* DUi = DU + i * k;
    double dd = 0.0, xx = 0.0;  // ‖D_i‖², ‖X_i‖²
    for (int64_t c = threadIdx.x; c < m; c += blockDim.x) {
      const double d = static_cast<double>(Di[c]);
      dd += d * d;
    }
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const double x = static_cast<double>(Xi[c]);
      xx += x * x;
    }
    const double xv0 = static_cast<double>(XVi[0]), du0 = static_cast<double>(DUi[0]);
    double* a = ab + i * 2 * k;
    double* b = a + k;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      a[j] = static_cast<double>(DUi[j]) * xv0;
      b[j] = static_cast<double>(XVi[j]) * du0;
    }
    cuda::block_sum2(dd, xx);  // ends with a barrier: a, b are complete
    if (threadIdx.x == 0) {
      const HessianTerms h = hessian_terms(a, b, 1, S, k, sigma_next, dd * xv0 * xv0, xx * du0 * du0);
      proj[i] = a[0];
      hess[i] = h.value;
      hess_lo[i] = h.lo;
      hess_hi[i] = h.hi;
    }
  }
}

// T > 1: x_i = D_iᵀ XV_i[:,0] [m], y_i = X_iᵀ DU_i[:,0] [n], a_i = DU_iᵀ XV_i[:,0], b_i = XV_iᵀ DU_i[:,0] [k].
// One block per sample: thread c builds x_i[c] (and y_i[c]) over t, reading the rows of D_i (X_i)
// coalesced, and keeps only its square; warp w builds a_i[j], b_i[j] for j = w, w + warps, ...
template <typename scalar_t, typename proj_t>
__global__ void persample_linear_seq_kernel(
    // inputs
    const scalar_t* __restrict__ X,   // [B, T, n]
    const scalar_t* __restrict__ D,   // [B, T, m]
    const proj_t* __restrict__ XV,    // [B, T, k]
    const proj_t* __restrict__ DU,    // [B, T, k]
    const double* __restrict__ S,     // [k]
    int64_t B, int64_t T, int64_t n, int64_t m, int64_t k, double sigma_next,
    // scratch
    double* __restrict__ ab,          // [B, 2, k]: a_i, b_i
    // outputs
    double* __restrict__ proj,        // [B]
    double* __restrict__ hess,        // [B]
    double* __restrict__ hess_lo,     // [B]
    double* __restrict__ hess_hi) {   // [B]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const scalar_t* Xi = X + i * T * n;
    const scalar_t* Di = D + i * T * m;
    const proj_t* XVi = XV + i * T * k;
    const proj_t* DUi = DU + i * T * k;
    double xnorm2 = 0.0, ynorm2 = 0.0;
    for (int64_t c = threadIdx.x; c < m; c += blockDim.x) {
      double xc = 0.0;
      for (int64_t t = 0; t < T; ++t) xc += static_cast<double>(Di[t * m + c]) * static_cast<double>(XVi[t * k]);
      xnorm2 += xc * xc;
    }
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      double yc = 0.0;
      for (int64_t t = 0; t < T; ++t) yc += static_cast<double>(Xi[t * n + c]) * static_cast<double>(DUi[t * k]);
      ynorm2 += yc * yc;
    }
    double* a = ab + i * 2 * k;
    double* b = a + k;
    for (int64_t j = warp; j < k; j += warps) {
      double aj = 0.0, bj = 0.0;
      for (int64_t t = lane; t < T; t += 32) {
        aj += static_cast<double>(DUi[t * k + j]) * static_cast<double>(XVi[t * k]);
        bj += static_cast<double>(XVi[t * k + j]) * static_cast<double>(DUi[t * k]);
      }
      aj = cuda::warp_sum(aj);
      bj = cuda::warp_sum(bj);
      if (lane == 0) {
        a[j] = aj;
        b[j] = bj;
      }
    }
    cuda::block_sum2(xnorm2, ynorm2);  // ends with a barrier: a, b are complete
    if (threadIdx.x == 0) {
      const HessianTerms h = hessian_terms(a, b, 1, S, k, sigma_next, xnorm2, ynorm2);
      proj[i] = a[0];
      hess[i] = h.value;
      hess_lo[i] = h.lo;
      hess_hi[i] = h.hi;
    }
  }
}

// The dtype of the GEMM outputs XV, DU: the input's for float32/float64, float32 for half precision.
template <typename scalar_t>
using proj_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
void launch_persample_linear_kernel(
    // inputs
    const at::Tensor& X,   // [B, T, n] contiguous
    const at::Tensor& D,   // [B, T, m] contiguous
    const at::Tensor& XV,  // [B, T, k] contiguous, proj_type<scalar_t>
    const at::Tensor& DU,  // [B, T, k] contiguous, proj_type<scalar_t>
    const at::Tensor& S,   // [k] float64
    double sigma_next,
    // scratch
    at::Tensor& ab,        // [B, 2, k] float64
    // outputs
    at::Tensor& proj, at::Tensor& hess, at::Tensor& hess_lo, at::Tensor& hess_hi) {  // [B] float64 each
  using proj_t = proj_type<scalar_t>;
  const int64_t B = X.size(0), T = X.size(1), n = X.size(2), m = D.size(2), k = XV.size(2);
  const auto grid = cuda::blocks_per_item(B);
  const int threads = cuda::reduce_threads_for(std::max(std::max(m, n), T > 1 ? k * cuda::kWarpSize : k));
  if (T == 1) {
    auto kernel = &persample_linear_rank1_kernel<scalar_t, proj_t>;
    LIPFAST_CUDA_LAUNCH(kernel, grid, threads, 0, X.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(),
                        XV.data_ptr<proj_t>(), DU.data_ptr<proj_t>(), S.data_ptr<double>(), B, n, m, k,
                        sigma_next, ab.data_ptr<double>(), proj.data_ptr<double>(), hess.data_ptr<double>(),
                        hess_lo.data_ptr<double>(), hess_hi.data_ptr<double>());
  } else {
    auto kernel = &persample_linear_seq_kernel<scalar_t, proj_t>;
    LIPFAST_CUDA_LAUNCH(kernel, grid, threads, 0, X.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(),
                        XV.data_ptr<proj_t>(), DU.data_ptr<proj_t>(), S.data_ptr<double>(), B, T, n, m, k,
                        sigma_next, ab.data_ptr<double>(), proj.data_ptr<double>(), hess.data_ptr<double>(),
                        hess_lo.data_ptr<double>(), hess_hi.data_ptr<double>());
  }
}

// A [R, c] · Bm [c, k] on cuBLAS, written in proj_type: float32 output for float16/bfloat16 inputs.
at::Tensor skinny_gemm(const at::Tensor& A, const at::Tensor& Bm) {
  if (A.scalar_type() != at::kHalf && A.scalar_type() != at::kBFloat16) return at::mm(A, Bm).contiguous();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(A, Bm, at::kFloat).contiguous();  // mm.dtype: half inputs, float32 accumulation and output
#else
  return at::mm(A.to(at::kFloat), Bm.to(at::kFloat)).contiguous();  // older torch: a float32 copy instead
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> persample_linear_cuda(
    const at::Tensor& X_,  // [B, T, n]
    const at::Tensor& D_,  // [B, T, m]
    const at::Tensor& U,   // [m, k]
    const at::Tensor& S_,  // [k]
    const at::Tensor& V,   // [n, k]
    double sigma_next) {
  check_persample_linear_inputs(X_, D_, U, S_, V, /*half_ok=*/true, /*rows_ok=*/true);
  TORCH_INTERNAL_ASSERT(X_.is_cuda(), kOp, ": CUDA kernel called with a ", X_.device(), " tensor");
  const c10::cuda::CUDAGuard device_guard(X_.device());
  const int64_t B = X_.size(0), k = U.size(1);
  auto X = as_positions(X_).contiguous();  // [B, n] as [B, 1, n]
  auto D = as_positions(D_).contiguous();
  auto S = S_.to(at::kDouble).contiguous();
  auto opts = S.options();
  // outputs
  auto proj = at::empty({B}, opts), hess = at::empty({B}, opts);
  auto hess_lo = at::empty({B}, opts), hess_hi = at::empty({B}, opts);
  if (B == 0) return {proj, hess, hess_lo, hess_hi};

  const int64_t T = X.size(1), n = X.size(2), m = D.size(2);
  auto XV = skinny_gemm(X.view({B * T, n}), V.to(X.scalar_type())).view({B, T, k});  // [B, T, k]
  auto DU = skinny_gemm(D.view({B * T, m}), U.to(X.scalar_type())).view({B, T, k});  // [B, T, k]
  auto ab = at::empty({B, 2, k}, opts);                          // a_i, b_i: read back by the same block
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "persample_linear", [&] {
    launch_persample_linear_kernel<scalar_t>(X, D, XV, DU, S, sigma_next, ab, proj, hess, hess_lo, hess_hi);
  });
  return {proj, hess, hess_lo, hess_hi};
}

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) { m.impl("persample_linear", &persample_linear_cuda); }

}  // namespace lipfast
