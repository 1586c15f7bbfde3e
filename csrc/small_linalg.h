// Dense linear algebra on tiny p×p float64 matrices (p = a subspace block, ~13 columns), shared by the CPU
// kernels and the CUDA kernels (a thread block runs it there, in shared memory). At this size LAPACK through
// ATen costs more in dispatch, allocation and info checks than the arithmetic (a 13×13 eigh is ~20 µs
// through at::linalg_eigh on a CPU and a few µs here; on a GPU, cuSOLVER's eigh also waits for the host).
// Row-major storage; the pointer functions take caller-owned scratch, the Mat overloads are for the CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__CUDACC__)
#define LIPFAST_SMALL_HD __host__ __device__
#else
#define LIPFAST_SMALL_HD
#endif

namespace lipfast {
namespace small {

using Mat = std::vector<double>;  // p×p, row-major

// Above this size a cyclic Jacobi sweep (~3p³) costs more than LAPACK's dispatch overhead.
constexpr int64_t kJacobiMaxSize = 32;

LIPFAST_SMALL_HD inline double root(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

LIPFAST_SMALL_HD inline double magnitude(double x) { return x < 0.0 ? -x : x; }

LIPFAST_SMALL_HD inline bool finite(double x) { return x - x == 0.0; }  // false for NaN and ±Inf

// The functions below run on a team of workers that share the matrices: one on the CPU (SerialTeam), a
// thread block on a GPU (the CUDA kernels' team). Each worker takes the rows or columns r = lane(),
// lane() + size(), ...; sync() is a barrier with memory ordering. Every entry is computed by one worker with
// the same arithmetic in the same order whatever the team, so a GPU block and the CPU agree to the bit.
// Decisions (a pivot, convergence) are computed by every worker from the same entries after a barrier,
// so all of them take the same branch and meet at the same barriers.
struct SerialTeam {
  LIPFAST_SMALL_HD int64_t lane() const { return 0; }
  LIPFAST_SMALL_HD int64_t size() const { return 1; }
  LIPFAST_SMALL_HD void sync() const {}
};

// Lower Cholesky factor of a symmetric matrix, in place (upper part left as is). False when the matrix
// is not numerically positive definite: a pivot not above `min_pivot` (NaN included).
template <typename Team>
LIPFAST_SMALL_HD bool cholesky(const Team& team, double* A, int64_t p, double min_pivot) {
  for (int64_t j = 0; j < p; ++j) {
    double d = A[j * p + j];
    for (int64_t c = 0; c < j; ++c) d -= A[j * p + c] * A[j * p + c];
    if (!(d > min_pivot)) return false;
    const double ljj = root(d);
    team.sync();  // every worker has read row j before it changes
    if (team.lane() == 0) A[j * p + j] = ljj;
    for (int64_t i = j + 1 + team.lane(); i < p; i += team.size()) {
      double s = A[i * p + j];
      for (int64_t c = 0; c < j; ++c) s -= A[i * p + c] * A[j * p + c];
      A[i * p + j] = s / ljj;
    }
    team.sync();
  }
  return true;
}

// X = L⁻¹ for the lower triangular factor L (lower part of L), written as a full p×p matrix (a column per
// worker: forward substitution).
template <typename Team>
LIPFAST_SMALL_HD void lower_inverse(const Team& team, const double* L, int64_t p, double* X) {
  for (int64_t j = team.lane(); j < p; j += team.size()) {
    for (int64_t i = 0; i < p; ++i) X[i * p + j] = 0.0;
    X[j * p + j] = 1.0 / L[j * p + j];
    for (int64_t i = j + 1; i < p; ++i) {
      double s = 0.0;
      for (int64_t c = j; c < i; ++c) s -= L[i * p + c] * X[c * p + j];
      X[i * p + j] = s / L[i * p + i];
    }
  }
  team.sync();
}

// C = Aᵀ B A for p×p matrices; BA is p×p scratch. (Rows per worker; each entry sums over c in order.)
template <typename Team>
LIPFAST_SMALL_HD void congruence(const Team& team, const double* A, const double* B, int64_t p, double* BA,
                                 double* C) {
  for (int64_t i = team.lane(); i < p; i += team.size()) {
    for (int64_t j = 0; j < p; ++j) BA[i * p + j] = 0.0;
    for (int64_t c = 0; c < p; ++c) {
      const double b = B[i * p + c];
      for (int64_t j = 0; j < p; ++j) BA[i * p + j] += b * A[c * p + j];
    }
  }
  team.sync();
  for (int64_t i = team.lane(); i < p; i += team.size()) {
    for (int64_t j = 0; j < p; ++j) C[i * p + j] = 0.0;
    for (int64_t c = 0; c < p; ++c) {
      const double a = A[c * p + i];
      for (int64_t j = 0; j < p; ++j) C[i * p + j] += a * BA[c * p + j];
    }
  }
  team.sync();
}

// C = A B for p×p matrices.
template <typename Team>
LIPFAST_SMALL_HD void matmul(const Team& team, const double* A, const double* B, int64_t p, double* C) {
  for (int64_t i = team.lane(); i < p; i += team.size()) {
    for (int64_t j = 0; j < p; ++j) C[i * p + j] = 0.0;
    for (int64_t c = 0; c < p; ++c) {
      const double a = A[i * p + c];
      for (int64_t j = 0; j < p; ++j) C[i * p + j] += a * B[c * p + j];
    }
  }
  team.sync();
}

// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations: A (overwritten) = Q diag(w) Qᵀ,
// w descending, eigenvectors in the columns of Q. Jacobi is backward stable like LAPACK's eigh (absolute
// accuracy eps·‖A‖ on every eigenvalue) and converges quadratically; on the nearly diagonal matrices of a
// warm-started Rayleigh–Ritz step it needs two or three sweeps. Cost ~3p³ per sweep: for small p only.
// Scratch: `order` p entries, `sorted` p×p.
template <typename Team>
LIPFAST_SMALL_HD void jacobi_eigh(const Team& team, double* A, int64_t p, double* w, double* Q, int64_t* order,
                                  double* sorted) {
  const int64_t lane = team.lane(), size = team.size();
  for (int64_t r = lane; r < p; r += size)
    for (int64_t j = 0; j < p; ++j) Q[r * p + j] = r == j ? 1.0 : 0.0;
  team.sync();
  const double eps = std::numeric_limits<double>::epsilon();
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int64_t i = 0; i < p; ++i) {
      diag += A[i * p + i] * A[i * p + i];
      for (int64_t j = i + 1; j < p; ++j) off += A[i * p + j] * A[i * p + j];
    }
    if (!(off > eps * eps * diag)) break;  // also stops on an all-zero matrix
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t j = i + 1; j < p; ++j) {
        const double aij = A[i * p + j];
        // An entry below rounding of both diagonal entries changes no eigenvalue: drop it, no rotation.
        const bool drop = magnitude(aij) <= 0.25 * eps * root(magnitude(A[i * p + i] * A[j * p + j]));
        double c = 1.0, s = 0.0;
        if (!drop) {
          const double theta = (A[j * p + j] - A[i * p + i]) / (2.0 * aij);
          double t;
          if (magnitude(theta) > 1e150) {
            t = 0.5 / theta;  // θ² would overflow; tan of the rotation angle ≈ 1/(2θ)
          } else {
            t = (theta >= 0.0 ? 1.0 : -1.0) / (magnitude(theta) + root(theta * theta + 1.0));
          }
          c = 1.0 / root(t * t + 1.0);
          s = t * c;
        }
        team.sync();  // every worker has read the pivot entries
        if (!drop) {
          for (int64_t r = lane; r < p; r += size) {  // A ← A P (columns i, j)
            const double ari = A[r * p + i], arj = A[r * p + j];
            A[r * p + i] = c * ari - s * arj;
            A[r * p + j] = s * ari + c * arj;
          }
          team.sync();
          for (int64_t r = lane; r < p; r += size) {  // A ← Pᵀ A (rows i, j)
            const double air = A[i * p + r], ajr = A[j * p + r];
            A[i * p + r] = c * air - s * ajr;
            A[j * p + r] = s * air + c * ajr;
          }
          for (int64_t r = lane; r < p; r += size) {  // Q ← Q P
            const double qri = Q[r * p + i], qrj = Q[r * p + j];
            Q[r * p + i] = c * qri - s * qrj;
            Q[r * p + j] = s * qri + c * qrj;
          }
          team.sync();
        }
        if (lane == 0) A[i * p + j] = A[j * p + i] = 0.0;
        team.sync();
      }
    }
  }
  // Descending by eigenvalue, ties in index order (a stable insertion sort: p is small).
  if (lane == 0) {
    for (int64_t i = 0; i < p; ++i) {
      int64_t j = i;
      while (j > 0 && A[order[j - 1] * p + order[j - 1]] < A[i * p + i]) {
        order[j] = order[j - 1];
        --j;
      }
      order[j] = i;
    }
  }
  team.sync();
  for (int64_t j = lane; j < p; j += size) {
    w[j] = A[order[j] * p + order[j]];
    for (int64_t r = 0; r < p; ++r) sorted[r * p + j] = Q[r * p + order[j]];
  }
  team.sync();
  for (int64_t r = lane; r < p; r += size)
    for (int64_t j = 0; j < p; ++j) Q[r * p + j] = sorted[r * p + j];
  team.sync();
}

// Smallest squared pivot of the equilibrated Gram matrix's Cholesky factor that keeps the block's basis
// orthonormal to float64 rounding times 1e6: a block closer to rank-deficient needs another route.
constexpr double kMinPivot = 1e-12;

// T = D L⁻ᵀ for the Gram matrix M = ZᵀZ of a block Z, with D⁻¹MD⁻¹ = LLᵀ (D the column equilibration), so
// that Z·T is orthonormal. M is overwritten; scratch `d` p entries, `Linv` p×p. False when the block is
// (numerically) rank-deficient or not finite.
template <typename Team>
LIPFAST_SMALL_HD bool orthonormalizer(const Team& team, double* M, int64_t p, double* d, double* Linv, double* T) {
  for (int64_t i = 0; i < p; ++i) {
    const double mii = M[i * p + i];
    if (!(mii > 0.0) || !finite(mii)) return false;
  }
  for (int64_t i = team.lane(); i < p; i += team.size()) d[i] = 1.0 / root(M[i * p + i]);
  team.sync();
  for (int64_t i = team.lane(); i < p; i += team.size())
    for (int64_t j = 0; j < p; ++j) M[i * p + j] *= d[i] * d[j];
  team.sync();
  if (!cholesky(team, M, p, kMinPivot)) return false;
  lower_inverse(team, M, p, Linv);
  for (int64_t i = team.lane(); i < p; i += team.size())
    for (int64_t j = 0; j < p; ++j) T[i * p + j] = d[i] * Linv[j * p + i];
  team.sync();
  return true;
}

// For a block the Cholesky route refuses (a rank-deficient W collapses it), where no Householder QR is at
// hand (a GPU block): T = D Q Λ^{-1/2} from the eigenpairs of the equilibrated Gram matrix, keeping the
// directions with λ > kMinPivot·λmax and zeroing the others (Z·T is then orthonormal on the block's numerical
// range, zero elsewhere: those Ritz values come out 0, as σ_j of W there is ~0). M is overwritten;
// scratch `d`, `w`, `order` p entries, `Q`, `sorted` p×p. All-zero or non-finite M: T = 0.
template <typename Team>
LIPFAST_SMALL_HD void orthonormalizer_by_eigh(const Team& team, double* M, int64_t p, double* d, double* w,
                                              int64_t* order, double* Q, double* sorted, double* T) {
  for (int64_t i = team.lane(); i < p; i += team.size()) {
    for (int64_t j = 0; j < p; ++j) T[i * p + j] = 0.0;
    const double mii = M[i * p + i];
    d[i] = mii > 0.0 && finite(mii) ? 1.0 / root(mii) : 0.0;
  }
  team.sync();
  for (int64_t i = team.lane(); i < p; i += team.size())
    for (int64_t j = 0; j < p; ++j) M[i * p + j] *= d[i] * d[j];
  team.sync();
  for (int64_t i = 0; i < p * p; ++i)
    if (!finite(M[i])) return;
  jacobi_eigh(team, M, p, w, Q, order, sorted);
  if (!(w[0] > 0.0)) return;
  for (int64_t j = team.lane(); j < p; j += team.size()) {
    if (!(w[j] > kMinPivot * w[0])) continue;
    const double scale = 1.0 / root(w[j]);
    for (int64_t i = 0; i < p; ++i) T[i * p + j] = d[i] * Q[i * p + j] * scale;
  }
  team.sync();
}

// Rayleigh–Ritz of a block Z with orthonormalizer T, from Gy = (WZ)ᵀ(WZ): C = Tᵀ Gy T = Q diag(θ) Qᵀ, σ_j = √θ_j,
// and the row-major coefficient blocks TQt = (TQ)ᵀ (V's rows: Vᵀ = TQt·Zᵀ) and TQt_inv = diag(1/σ)·(TQ)ᵀ (U's
// rows from (WZ)ᵀ; 0 where σ_j = 0, whose u_j = 0 leaves the Hessian weight to the unknown-mass term,
// MATH.md §1). False (outputs untouched) when C is not finite: W holds NaN/Inf. Needs p <= kJacobiMaxSize.
// Scratch `order` p entries; `BA`, `C`, `Q`, `TQ` p×p; `theta` p entries.
template <typename Team>
LIPFAST_SMALL_HD bool rayleigh_ritz(const Team& team, const double* T, const double* Gy, int64_t p, double* S,
                                    double* TQt, double* TQt_inv, double* theta, int64_t* order, double* BA,
                                    double* C, double* Q, double* TQ) {
  congruence(team, T, Gy, p, BA, C);
  for (int64_t i = 0; i < p * p; ++i)
    if (!finite(C[i])) return false;
  jacobi_eigh(team, C, p, theta, Q, order, BA);
  matmul(team, T, Q, p, TQ);
  for (int64_t j = team.lane(); j < p; j += team.size()) {
    S[j] = root(theta[j] > 0.0 ? theta[j] : 0.0);
    const double inv = S[j] > 0.0 ? 1.0 / S[j] : 0.0;
    for (int64_t i = 0; i < p; ++i) {
      TQt[j * p + i] = TQ[i * p + j];
      TQt_inv[j * p + i] = TQ[i * p + j] * inv;
    }
  }
  team.sync();
  return true;
}

// --- CPU conveniences over std::vector ---------------------------------------------------------------
inline Mat congruence(const Mat& A, const Mat& B, int64_t p) {
  Mat BA(p * p), C(p * p);
  congruence(SerialTeam{}, A.data(), B.data(), p, BA.data(), C.data());
  return C;
}

inline Mat matmul(const Mat& A, const Mat& B, int64_t p) {
  Mat C(p * p);
  matmul(SerialTeam{}, A.data(), B.data(), p, C.data());
  return C;
}

inline void jacobi_eigh(Mat& A, int64_t p, std::vector<double>& w, Mat& Q) {
  w.resize(p);
  Q.resize(p * p);
  std::vector<int64_t> order(p);
  Mat sorted(p * p);
  jacobi_eigh(SerialTeam{}, A.data(), p, w.data(), Q.data(), order.data(), sorted.data());
}

}  // namespace small
}  // namespace lipfast
