// Dense linear algebra on tiny p×p float64 matrices (p = a subspace block, ~13 columns), on the host.
// At this size LAPACK through ATen costs more in dispatch, allocation and info checks than the
// arithmetic: a 13×13 eigh is ~20 µs through at::linalg_eigh and a few µs here. Row-major storage.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace lipfast {
namespace small {

using Mat = std::vector<double>;  // p×p, row-major

// Above this size a cyclic Jacobi sweep (~3p³) costs more than LAPACK's dispatch overhead.
constexpr int64_t kJacobiMaxSize = 32;

// Lower Cholesky factor of a symmetric matrix, in place (upper part left as is). False when the matrix
// is not numerically positive definite: a pivot not above `min_pivot` (NaN included).
inline bool cholesky(Mat& A, int64_t p, double min_pivot) {
  for (int64_t j = 0; j < p; ++j) {
    double d = A[j * p + j];
    for (int64_t c = 0; c < j; ++c) d -= A[j * p + c] * A[j * p + c];
    if (!(d > min_pivot)) return false;
    const double ljj = std::sqrt(d);
    A[j * p + j] = ljj;
    for (int64_t i = j + 1; i < p; ++i) {
      double s = A[i * p + j];
      for (int64_t c = 0; c < j; ++c) s -= A[i * p + c] * A[j * p + c];
      A[i * p + j] = s / ljj;
    }
  }
  return true;
}

// Inverse of the lower triangular factor L (lower part of A), returned as a full p×p matrix.
inline Mat lower_inverse(const Mat& L, int64_t p) {
  Mat X(p * p, 0.0);
  for (int64_t j = 0; j < p; ++j) {
    X[j * p + j] = 1.0 / L[j * p + j];
    for (int64_t i = j + 1; i < p; ++i) {
      double s = 0.0;
      for (int64_t c = j; c < i; ++c) s -= L[i * p + c] * X[c * p + j];
      X[i * p + j] = s / L[i * p + i];
    }
  }
  return X;
}

// C = Aᵀ B A for p×p matrices.
inline Mat congruence(const Mat& A, const Mat& B, int64_t p) {
  Mat BA(p * p, 0.0), C(p * p, 0.0);
  for (int64_t i = 0; i < p; ++i)
    for (int64_t c = 0; c < p; ++c) {
      const double b = B[i * p + c];
      for (int64_t j = 0; j < p; ++j) BA[i * p + j] += b * A[c * p + j];
    }
  for (int64_t c = 0; c < p; ++c)
    for (int64_t i = 0; i < p; ++i) {
      const double a = A[c * p + i];
      for (int64_t j = 0; j < p; ++j) C[i * p + j] += a * BA[c * p + j];
    }
  return C;
}

// C = A B for p×p matrices.
inline Mat matmul(const Mat& A, const Mat& B, int64_t p) {
  Mat C(p * p, 0.0);
  for (int64_t i = 0; i < p; ++i)
    for (int64_t c = 0; c < p; ++c) {
      const double a = A[i * p + c];
      for (int64_t j = 0; j < p; ++j) C[i * p + j] += a * B[c * p + j];
    }
  return C;
}

// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations: A (overwritten) = Q diag(w) Qᵀ,
// w descending, eigenvectors in the columns of Q. Jacobi is backward stable like LAPACK's eigh (absolute
// accuracy eps·‖A‖ on every eigenvalue) and converges quadratically; on the nearly diagonal matrices of a
// warm-started Rayleigh–Ritz step it needs two or three sweeps. Cost ~3p³ per sweep: for small p only.
inline void jacobi_eigh(Mat& A, int64_t p, std::vector<double>& w, Mat& Q) {
  Q.assign(p * p, 0.0);
  for (int64_t i = 0; i < p; ++i) Q[i * p + i] = 1.0;
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
        if (std::abs(aij) <= 0.25 * eps * std::sqrt(std::abs(A[i * p + i] * A[j * p + j]))) {
          A[i * p + j] = A[j * p + i] = 0.0;
          continue;
        }
        const double theta = (A[j * p + j] - A[i * p + i]) / (2.0 * aij);
        double t;
        if (std::abs(theta) > 1e150) {
          t = 0.5 / theta;  // θ² would overflow; tan of the rotation angle ≈ 1/(2θ)
        } else {
          t = (theta >= 0.0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        }
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int64_t r = 0; r < p; ++r) {  // A ← A P (columns i, j)
          const double ari = A[r * p + i], arj = A[r * p + j];
          A[r * p + i] = c * ari - s * arj;
          A[r * p + j] = s * ari + c * arj;
        }
        for (int64_t r = 0; r < p; ++r) {  // A ← Pᵀ A (rows i, j)
          const double air = A[i * p + r], ajr = A[j * p + r];
          A[i * p + r] = c * air - s * ajr;
          A[j * p + r] = s * air + c * ajr;
        }
        A[i * p + j] = A[j * p + i] = 0.0;
        for (int64_t r = 0; r < p; ++r) {  // Q ← Q P
          const double qri = Q[r * p + i], qrj = Q[r * p + j];
          Q[r * p + i] = c * qri - s * qrj;
          Q[r * p + j] = s * qri + c * qrj;
        }
      }
    }
  }
  std::vector<int64_t> order(p);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return A[a * p + a] > A[b * p + b]; });
  Mat sorted(p * p);
  w.resize(p);
  for (int64_t j = 0; j < p; ++j) {
    w[j] = A[order[j] * p + order[j]];
    for (int64_t r = 0; r < p; ++r) sorted[r * p + j] = Q[r * p + order[j]];
  }
  Q.swap(sorted);
}

}  // namespace small
}  // namespace lipfast
