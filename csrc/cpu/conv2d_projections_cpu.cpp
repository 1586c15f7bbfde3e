// CPU kernels of lipfast::conv2d_projections and lipfast::persample_conv2d: G_i v1 and G_iᵀ u1 of a Conv2d,
// one sample at a time, while its input and output-gradient sit in the core's cache (the composite kernel's
// five ATen convolutions and batched products each stream the whole batch: 3.3–3.5× slower on the runs'
// small CNN, bench/RESULTS.md). Sums in float64 on the general path; the stride-1 path (below) sums in the
// input's precision, as the training step's own convolutions do. Per sample i, with T output positions:
//   du[t] = Σ_c u1[c] d_i[c, t]                       (D_iᵀ u1)
//   xv[t] = Σ_{c,a,b} v1[c,a,b] x_i[c, r(t,a), s(t,b)] (X_iᵀ v1, a convolution with v1 as the filter)
//   (G_iᵀ u1)[c,a,b] = Σ_t x_i[c, r(t,a), s(t,b)] du[t]   — the same positions, read in the same loop
//   (G_i v1)[c]     = Σ_t d_i[c, t] xv[t]
// with r = ho·sh − ph + a·dh, s = wo·sw − pw + b·dw, and zero where (r, s) falls into the padding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "direction.h"
#include "target_clones.h"
#include "op_interfaces.h"

namespace lipfast {

namespace {

// The output indices o in [0, out) whose input index o·step − pad + offset lies in [0, size).
std::pair<int64_t, int64_t> valid_range(int64_t out, int64_t step, int64_t pad, int64_t offset, int64_t size) {
  const int64_t first = pad - offset;  // o·step >= first
  const int64_t last = size - 1 + pad - offset;  // o·step <= last
  if (last < 0) return {0, 0};
  const int64_t lo = first <= 0 ? 0 : (first + step - 1) / step;
  const int64_t hi = std::min(out, last / step + 1);
  return {lo, std::max(lo, hi)};
}

struct Geometry {
  int64_t C, H, Wd, m, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  std::vector<std::pair<int64_t, int64_t>> rows, cols;  // valid output rows per kernel row a, columns per b
};

// One sample: gv [m] = G_i v1 and gtu [C·kh·kw] = G_iᵀ u1, with du, xv [Ho·Wo] as scratch. The reductions
// are declared `omp simd` (a plain float64 sum would wait on each add's latency).
template <typename T>
inline __attribute__((always_inline)) void sample_impl(const T* xi, const T* gi, const double* u1, const double* v1,
                                                       const Geometry& g, double* du, double* xv, double* gv,
                                                       double* gtu) {
  const int64_t Tn = g.Ho * g.Wo;
  std::fill(du, du + Tn, 0.0);
  for (int64_t c = 0; c < g.m; ++c) {
    const double w = u1[c];
    const T* row = gi + c * Tn;
#pragma omp simd
    for (int64_t t = 0; t < Tn; ++t) du[t] += w * static_cast<double>(row[t]);
  }
  std::fill(xv, xv + Tn, 0.0);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t a = 0; a < g.kh; ++a) {
      const auto [ho0, ho1] = g.rows[a];
      for (int64_t b = 0; b < g.kw; ++b) {
        const auto [wo0, wo1] = g.cols[b];
        const double w = v1[(c * g.kh + a) * g.kw + b];
        const int64_t shift = b * g.dw - g.pw;  // x column of output column wo: wo·sw + shift
        double dot = 0.0;
        for (int64_t ho = ho0; ho < ho1; ++ho) {
          const T* xr = xi + (c * g.H + ho * g.sh - g.ph + a * g.dh) * g.Wd;
          double* xo = xv + ho * g.Wo;
          const double* dr = du + ho * g.Wo;
#pragma omp simd reduction(+ : dot)
          for (int64_t wo = wo0; wo < wo1; ++wo) {
            const double xval = static_cast<double>(xr[wo * g.sw + shift]);
            xo[wo] += w * xval;
            dot += xval * dr[wo];
          }
        }
        gtu[(c * g.kh + a) * g.kw + b] = dot;
      }
    }
  }
  for (int64_t c = 0; c < g.m; ++c) {
    const T* row = gi + c * Tn;
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (int64_t t = 0; t < Tn; ++t) dot += static_cast<double>(row[t]) * xv[t];
    gv[c] = dot;
  }
}

// Stride 1 (the common case): on a zero-padded copy xp [C, Hp, Wp] of the sample, output position
// (ho, wo) reads xp[c, ho + a·dh, wo + b·dw]. On an output grid as wide as xp (q = ho·Wp + wo, where the
// columns wo >= Wo are junk) every kernel offset is then one contiguous loop over q, of length Ho·Wp,
// instead of Ho loops of length Wo: du is zero on the junk columns, so they add nothing to G_iᵀ u1, and
// their xv is never read; three kernel columns share each pass over xv. Sums in the input's precision
// (16 float32 lanes at a time, as the training step's own convolutions); results are returned in float64.
template <typename T>
inline __attribute__((always_inline)) void sample_stride1_impl(const T* xi, const T* gi, const double* u1,
                                                               const double* v1, const Geometry& g, T* xp, T* du,
                                                               T* xv, double* gv, double* gtu) {
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.Wd + 2 * g.pw, Tn = g.Ho * g.Wo, Q = g.Ho * Wp;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t r = 0; r < g.H; ++r)
      std::copy(xi + (c * g.H + r) * g.Wd, xi + (c * g.H + r + 1) * g.Wd, xp + (c * Hp + r + g.ph) * Wp + g.pw);
  // du on the compact grid (m loops of length Ho·Wo, not m·Ho loops of length Wo), then onto the padded one;
  // xv serves as scratch until it is zeroed.
  T* duc = xv;
  std::fill(duc, duc + Tn, T(0));
  for (int64_t c = 0; c < g.m; ++c) {
    const T w = static_cast<T>(u1[c]);
    const T* row = gi + c * Tn;
#pragma omp simd
    for (int64_t t = 0; t < Tn; ++t) duc[t] += w * row[t];
  }
  std::fill(du, du + Q, T(0));
  for (int64_t ho = 0; ho < g.Ho; ++ho) std::copy(duc + ho * g.Wo, duc + (ho + 1) * g.Wo, du + ho * Wp);
  std::fill(xv, xv + Q, T(0));
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t a = 0; a < g.kh; ++a) {
      const T* xrow = xp + (c * Hp + a * g.dh) * Wp;
      const double* wrow = v1 + (c * g.kh + a) * g.kw;
      double* yrow = gtu + (c * g.kh + a) * g.kw;
      int64_t b = 0;
      for (; b + 3 <= g.kw; b += 3) {  // three kernel columns per pass over xv
        const T* x0 = xrow + b * g.dw;
        const T* x1 = x0 + g.dw;
        const T* x2 = x1 + g.dw;
        const T w0 = static_cast<T>(wrow[b]), w1 = static_cast<T>(wrow[b + 1]), w2 = static_cast<T>(wrow[b + 2]);
        T d0 = 0, d1 = 0, d2 = 0;
#pragma omp simd reduction(+ : d0, d1, d2)
        for (int64_t q = 0; q < Q; ++q) {
          const T dq = du[q];
          xv[q] += w0 * x0[q] + w1 * x1[q] + w2 * x2[q];
          d0 += x0[q] * dq;
          d1 += x1[q] * dq;
          d2 += x2[q] * dq;
        }
        yrow[b] = d0;
        yrow[b + 1] = d1;
        yrow[b + 2] = d2;
      }
      for (; b < g.kw; ++b) {
        const T* xs = xrow + b * g.dw;
        const T w = static_cast<T>(wrow[b]);
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t q = 0; q < Q; ++q) {
          xv[q] += w * xs[q];
          dot += xs[q] * du[q];
        }
        yrow[b] = dot;
      }
    }
  }
  T* xc = du;  // xv back on the compact grid, in du's buffer (du is no longer needed)
  for (int64_t ho = 0; ho < g.Ho; ++ho) std::copy(xv + ho * Wp, xv + ho * Wp + g.Wo, xc + ho * g.Wo);
  for (int64_t c = 0; c < g.m; ++c) {
    T dot = 0;
    const T* row = gi + c * Tn;
#pragma omp simd reduction(+ : dot)
    for (int64_t t = 0; t < Tn; ++t) dot += row[t] * xc[t];
    gv[c] = dot;
  }
}

LIPFAST_CPU_CLONES void sample(const float* xi, const float* gi, const double* u1, const double* v1,
                               const Geometry& g, double* du, double* xv, double* gv, double* gtu) {
  sample_impl(xi, gi, u1, v1, g, du, xv, gv, gtu);
}

LIPFAST_CPU_CLONES void sample(const double* xi, const double* gi, const double* u1, const double* v1,
                               const Geometry& g, double* du, double* xv, double* gv, double* gtu) {
  sample_impl(xi, gi, u1, v1, g, du, xv, gv, gtu);
}

LIPFAST_CPU_CLONES void sample_stride1(const float* xi, const float* gi, const double* u1, const double* v1,
                                       const Geometry& g, float* xp, float* du, float* xv, double* gv, double* gtu) {
  sample_stride1_impl(xi, gi, u1, v1, g, xp, du, xv, gv, gtu);
}

LIPFAST_CPU_CLONES void sample_stride1(const double* xi, const double* gi, const double* u1, const double* v1,
                                       const Geometry& g, double* xp, double* du, double* xv, double* gv,
                                       double* gtu) {
  sample_stride1_impl(xi, gi, u1, v1, g, xp, du, xv, gv, gtu);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv2d_projections_cpu(const at::Tensor& x_, const at::Tensor& g_,
                                                          const at::Tensor& u1_, const at::Tensor& v1_,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv2d_projections_inputs(x_, g_, u1_, v1_, kernel_size, stride, padding, dilation);
  const auto x = x_.contiguous(), gr = g_.contiguous();
  const auto u1 = u1_.to(at::kDouble).contiguous(), v1 = v1_.to(at::kDouble).contiguous();
  Geometry g{x.size(1), x.size(2), x.size(3), gr.size(1), gr.size(2), gr.size(3), kernel_size[0], kernel_size[1],
             stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], {}, {}};
  for (int64_t a = 0; a < g.kh; ++a) g.rows.push_back(valid_range(g.Ho, g.sh, g.ph, a * g.dh, g.H));
  for (int64_t b = 0; b < g.kw; ++b) g.cols.push_back(valid_range(g.Wo, g.sw, g.pw, b * g.dw, g.Wd));
  const int64_t B = x.size(0), n = g.C * g.kh * g.kw, T = g.Ho * g.Wo;
  const auto f64 = x.options().dtype(at::kDouble);
  auto Gv1 = at::empty({B, g.m}, f64), Gtu1 = at::empty({B, n}, f64);
  if (B == 0) return {Gv1, Gtu1};
  const double* pu = u1.data_ptr<double>();
  const double* pv = v1.data_ptr<double>();
  double* pgv = Gv1.data_ptr<double>();
  double* pgtu = Gtu1.data_ptr<double>();
  const int64_t work = (2 * g.m + 2 * n) * T;  // multiply-adds per sample
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_projections", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pg = gr.data_ptr<scalar_t>();
    const bool stride1 = g.sh == 1 && g.sw == 1;
    const int64_t Hp = g.H + 2 * g.ph, Wp = g.Wd + 2 * g.pw;
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      if (stride1) {
        // xp holds (kw − 1)·dw zeros past its end: the last offsets' loops read that far.
        std::vector<scalar_t> xp(g.C * Hp * Wp + (g.kw - 1) * g.dw, 0), du(g.Ho * Wp), xv(g.Ho * Wp);
        for (int64_t i = begin; i < end; ++i) {
          sample_stride1(px + i * g.C * g.H * g.Wd, pg + i * g.m * T, pu, pv, g, xp.data(), du.data(), xv.data(),
                         pgv + i * g.m, pgtu + i * n);
        }
        return;
      }
      std::vector<double> du(T), xv(T);
      for (int64_t i = begin; i < end; ++i) {
        sample(px + i * g.C * g.H * g.Wd, pg + i * g.m * T, pu, pv, g, du.data(), xv.data(), pgv + i * g.m,
               pgtu + i * n);
      }
    });
  });
  return {Gv1, Gtu1};
}

// persample_conv2d: the projections above, then per sample its direction's contraction with the spectrum
// (direction.h: a = Uᵀ(G_i v1), b = Vᵀ(G_iᵀ u1), the squared norms, H[G_i, G_i]), and the batch sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> persample_conv2d_cpu(
    const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& U, const at::Tensor& S_, const at::Tensor& V,
    double sigma_next, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  check_persample_conv2d_inputs(x, grad_out, U, S_, V, kernel_size, stride, padding, dilation);
  const auto [xv, yv] =
      conv2d_projections_cpu(x, grad_out, U.select(1, 0), V.select(1, 0), kernel_size, stride, padding, dilation);
  const int64_t B = xv.size(0), m = xv.size(1), n = yv.size(1), k = U.size(1);
  const auto S = S_.to(at::kDouble).contiguous();
  const auto f64 = xv.options();
  auto proj = at::empty({B}, f64), hess = at::empty({B}, f64), lo = at::empty({B}, f64), hi = at::empty({B}, f64);
  const double *pxv = xv.data_ptr<double>(), *pyv = yv.data_ptr<double>(), *ps = S.data_ptr<double>();
  double *pp = proj.data_ptr<double>(), *ph = hess.data_ptr<double>(), *pl = lo.data_ptr<double>(),
         *pq = hi.data_ptr<double>();
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (m + n) * k)), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const Direction d = project_direction(pxv + i * m, m, pyv + i * n, n, U, V, ps, k, sigma_next);
      pp[i] = d.first;
      ph[i] = d.h.value;
      pl[i] = d.h.lo;
      pq[i] = d.h.hi;
    }
  });
  return {proj, hess, lo, hi, xv.sum(0), yv.sum(0)};
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("conv2d_projections", &conv2d_projections_cpu);
  m.impl("persample_conv2d", &persample_conv2d_cpu);
}

}  // namespace lipfast
