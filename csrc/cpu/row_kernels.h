// Loops over row blocks ([p, n] row-major, p ~ 13) that accumulate in float64: Gram matrices, linear
// combinations of rows, residual norms. Done through ATen they cost a float64 copy of the block plus a
// dispatched GEMM (~15 µs each at these sizes); here one pass, vectorised for AVX-512/AVX2 where the CPU
// has them (row_kernels.cpp).
#pragma once

#include <cstdint>

namespace lipfast {
namespace rows {

// M [p, p] = Z Zᵀ for Z [p, n].
void gram(const float* Z, int64_t p, int64_t n, double* M);
void gram(const double* Z, int64_t p, int64_t n, double* M);

// out [q, n] = C Z for C [q, p] (float64) and Z [p, n], summed in float64.
void combine(const double* C, int64_t q, const float* Z, int64_t p, int64_t n, float* out);
void combine(const double* C, int64_t q, const double* Z, int64_t p, int64_t n, double* out);

// out[j] = ‖Z_j − s_j·V_j‖ for rows j < p of Z, V [p, n].
void residual_norms(const float* Z, const float* V, const double* s, int64_t p, int64_t n, double* out);
void residual_norms(const double* Z, const double* V, const double* s, int64_t p, int64_t n, double* out);

// Σ_c x[c]² in float64.
double sum_squares(const float* x, int64_t n);
double sum_squares(const double* x, int64_t n);

// out[c] += w·x[c], out in float64.
void add_scaled(double* out, double w, const float* x, int64_t n);
void add_scaled(double* out, double w, const double* x, int64_t n);

// out[r * k + j] = x_r·P_j for the four rows x_0..x_3 and the k rows of P [k, n], summed in T. Four rows at
// once, so that each row of P, which may sit in L2, is read once for all four; rows may repeat.
void dots4(const float* const x[4], const float* P, int64_t k, int64_t n, float* out);
void dots4(const double* const x[4], const double* P, int64_t k, int64_t n, double* out);

// out [q, r] = the first q columns of Y [r, ld] (row-major, leading dimension ld), transposed.
void transpose(const float* Y, int64_t r, int64_t ld, int64_t q, float* out);
void transpose(const double* Y, int64_t r, int64_t ld, int64_t q, double* out);

}  // namespace rows
}  // namespace lipfast
