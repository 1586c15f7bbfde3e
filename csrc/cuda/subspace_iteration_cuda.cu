// CUDA kernel of lipfast::subspace_iteration (MATH.md §5): the CPU kernel's arrangement
// (csrc/cpu/subspace_iteration_cpu.cpp) on the GPU, with no host synchronisation in a warm sweep. The block
// is never orthonormalised on its own: the GEMMs with W and the float64 Gram matrices run on cuBLAS, and
// all p×p work (the equilibrated Cholesky of ZᵀZ, the Rayleigh–Ritz eigenproblem by Jacobi rotations) runs
// in two one-warp kernels executing small_linalg.h, the code the CPU kernel runs for the same step (a row
// per thread, each entry computed as on the CPU: from the same Gram matrices, the same bits). The
// composite kernel it replaces here waited for the GPU three times per sweep (Cholesky's info flag,
// cuSOLVER's eigh, the finiteness check), which stalled every tracked step.
// Where it differs from the CPU kernel, for want of a host read:
// - a collapsed block (rank-deficient W) is orthonormalised through the eigenpairs of its Gram matrix
//   (small::orthonormalizer_by_eigh: the block's numerical range, zero columns elsewhere) instead of by
//   Householder QR;
// - a W with NaN/Inf gives NaN singular values instead of an error, except where the iteration reads its
//   convergence test anyway (tol > 0 and sweeps to go), which checks σ1 in the same read.
// Blocks wider than kJacobiMaxSize columns take the composite kernel (cuSOLVER, with its syncs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "../small_linalg.h"
#include "launch.cuh"
#include "../op_interfaces.h"

namespace lipfast {

namespace {

constexpr const char* kOp = "lipfast::subspace_iteration";

// The p×p kernels work in shared memory (a Jacobi rotation is a few dependent reads and writes of a row:
// from global memory each costs hundreds of cycles): four p×p matrices and three p-vectors of doubles,
// and p indices. 33 KB at p = 32, below the 48 KB a kernel gets without asking.
size_t shared_bytes(int64_t p) { return (4 * p * p + 3 * p) * sizeof(double) + p * sizeof(int64_t); }

// The p×p kernels' team (small_linalg.h): one thread block, a row or column per thread.
struct BlockTeam {
  LIPFAST_SMALL_HD int64_t lane() const {
#if defined(__CUDA_ARCH__)
    return threadIdx.x;
#else
    return 0;
#endif
  }
  LIPFAST_SMALL_HD int64_t size() const {
#if defined(__CUDA_ARCH__)
    return blockDim.x;
#else
    return 1;
#endif
  }
  LIPFAST_SMALL_HD void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

// One warp: p <= kJacobiMaxSize = 32 rows, one per thread.
constexpr int kSmallThreads = 32;
static_assert(small::kJacobiMaxSize <= kSmallThreads, "one thread per row of the p×p matrices");

// T with Z·T orthonormal, from the Gram matrix M = ZᵀZ [p, p] (small::orthonormalizer, else the eigh route).
__global__ void orthonormalizer_kernel(const double* __restrict__ gram, int64_t p, double* __restrict__ T) {
  extern __shared__ double shared[];
  const BlockTeam team;
  double* M = shared;
  double* Linv = M + p * p;
  double* Q = Linv + p * p;
  double* sorted = Q + p * p;
  double* d = sorted + p * p;
  double* w = d + p;
  auto* order = reinterpret_cast<int64_t*>(shared + 4 * p * p + 3 * p);
  for (int64_t i = team.lane(); i < p * p; i += team.size()) M[i] = gram[i];
  team.sync();
  if (small::orthonormalizer(team, M, p, d, Linv, T)) return;
  team.sync();
  for (int64_t i = team.lane(); i < p * p; i += team.size()) M[i] = gram[i];
  team.sync();
  small::orthonormalizer_by_eigh(team, M, p, d, w, order, Q, sorted, T);
}

// Ritz values S [p] and the coefficient blocks TQt, TQt_inv [p, p] from T and Gy = (WZ)ᵀ(WZ); NaN when Gy
// is not finite (W holds NaN/Inf).
__global__ void rayleigh_ritz_kernel(const double* __restrict__ T, const double* __restrict__ Gy, int64_t p,
                                     double* __restrict__ S, double* __restrict__ TQt, double* __restrict__ TQt_inv) {
  extern __shared__ double shared[];
  const BlockTeam team;
  double* BA = shared;
  double* C = BA + p * p;
  double* Q = C + p * p;
  double* TQ = Q + p * p;
  double* theta = TQ + p * p;
  auto* order = reinterpret_cast<int64_t*>(shared + 4 * p * p + 3 * p);
  if (small::rayleigh_ritz(team, T, Gy, p, S, TQt, TQt_inv, theta, order, BA, C, Q, TQ)) return;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t j = team.lane(); j < p; j += team.size()) S[j] = nan;
  for (int64_t i = team.lane(); i < p * p; i += team.size()) TQt[i] = TQt_inv[i] = nan;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
subspace_iteration_cuda(const at::Tensor& W_,                    // [m, n]
                        const at::Tensor& V0,                    // [n, p]
                        int64_t k, int64_t max_iters, double tol,
                        const c10::optional<at::Tensor>& right,  // [n, a] probes: W·right
                        const c10::optional<at::Tensor>& left) { // [m, b] probes: Wᵀ·left
  check_subspace_iteration_inputs(W_, V0, k, max_iters, tol, right, left);
  const int64_t p = V0.size(1);
  if (p > small::kJacobiMaxSize) return subspace_iteration_composite(W_, V0, k, max_iters, tol, right, left);
  const c10::cuda::CUDAGuard device_guard(W_.device());
  const auto W = W_.contiguous();
  const auto dtype = W.scalar_type();
  const int64_t m = W.size(0), n = W.size(1);
  const auto f64 = W.options().dtype(at::kDouble);
  auto Rt = right.has_value() ? right->to(dtype).t() : at::empty({0, n}, W.options());  // [a, n]
  auto Lt = left.has_value() ? left->to(dtype).t() : at::empty({0, m}, W.options());    // [b, m]
  const int64_t a = Rt.size(0), b = Lt.size(0);

  const size_t smem = shared_bytes(p);
  auto T = at::empty({p, p}, f64), S = at::empty({p}, f64);
  auto TQt = at::empty({p, p}, f64), TQt_inv = at::empty({p, p}, f64);
  at::Tensor Zt = V0.t().contiguous();  // [p, n] the current block, as rows (the CPU kernel's layout)
  at::Tensor Ucat, Vt, W_right, Wt_left, residual;
  int64_t it = 0;
  while (true) {
    ++it;
    const auto Zd = Zt.to(at::kDouble);
    const auto M = Zd.mm(Zd.t());  // [p, p]
    LIPFAST_CUDA_LAUNCH(orthonormalizer_kernel, 1, kSmallThreads, smem, M.data_ptr<double>(), p, T.data_ptr<double>());
    // Y = W Z, with the probes riding along in the first sweep's GEMM.
    const int64_t cols_y = it == 1 ? p + a : p;
    const auto Y = W.mm((it == 1 && a > 0 ? at::cat({Zt, Rt}) : Zt).t());  // [m, p (+a)]
    if (it == 1) W_right = Y.slice(1, p, cols_y).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
    const auto Yd = Y.slice(1, 0, p).to(at::kDouble);  // [m, p]
    const auto Gy = Yd.t().mm(Yd);                     // [p, p]
    LIPFAST_CUDA_LAUNCH(rayleigh_ritz_kernel, 1, kSmallThreads, smem, T.data_ptr<double>(), Gy.data_ptr<double>(), p,
                        S.data_ptr<double>(), TQt.data_ptr<double>(), TQt_inv.data_ptr<double>());
    const auto Vt64 = TQt.mm(Zd);  // [p, n] Ritz vectors as rows
    Vt = Vt64.to(dtype);
    // Uᵀ and the left probes stacked: Z = Wᵀ U (rows: Uᵀ W) is the next block, ≈ σ_j v_j.
    const auto Ut = TQt_inv.mm(Yd.t()).to(dtype);  // [p, m]
    Ucat = it == 1 && b > 0 ? at::cat({Ut, Lt}) : Ut;
    const auto Zn = Ucat.mm(W);  // [p (+b), n]
    if (it == 1) Wt_left = Zn.slice(0, p, p + b).t().to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
    Zt = Zn.slice(0, 0, p);
    residual = (Zt.to(at::kDouble) - Vt64 * S.unsqueeze(1)).norm(2, {1});  // [p]
    if (it >= max_iters) break;
    if (tol > 0.0) {
      // The only host read: the convergence test, with the finiteness check of σ1 in the same copy.
      const auto probe = at::stack({S[0], residual.slice(0, 0, k).max()}).cpu();
      const double s1 = probe[0].item<double>(), worst = probe[1].item<double>();
      LIPFAST_CHECK(std::isfinite(s1), kOp, ": W must be finite, got a matrix with NaN or Inf entries (shape ",
                    W.sizes(), ")");
      if (worst <= tol * s1) break;
    }
  }
  // The CPU kernel's layout: U, V and the next block as transposed views of row blocks (ops.py's fake).
  return {Ucat.slice(0, 0, p).t(), S, Vt.t(), residual, at::scalar_tensor(it, W.options().dtype(at::kLong)), Zt.t(),
          W_right, Wt_left};
}

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) { m.impl("subspace_iteration", &subspace_iteration_cuda); }

}  // namespace lipfast
