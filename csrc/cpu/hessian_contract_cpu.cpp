// CPU kernel of lipfast::hessian_contract: H[E_i, E_i] from projections (MATH.md §1), one row per thread chunk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "math.h"
#include "op_interfaces.h"

namespace lipfast {

void check_hessian_contract_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& xnorm2,
                                   const at::Tensor& ynorm2, const at::Tensor& S) {
  constexpr const char* op = "lipfast::hessian_contract";
  LIPFAST_CHECK_DIM("lipfast::hessian_contract", a, "a", 2, "[N, k]");
  LIPFAST_CHECK_DIM("lipfast::hessian_contract", b, "b", 2, "[N, k]");
  LIPFAST_CHECK_DIM("lipfast::hessian_contract", xnorm2, "xnorm2", 1, "[N]");
  LIPFAST_CHECK_DIM("lipfast::hessian_contract", ynorm2, "ynorm2", 1, "[N]");
  LIPFAST_CHECK_DIM("lipfast::hessian_contract", S, "S", 1, "[k]");
  for (const auto& [t, name] : {std::pair{&a, "a"}, std::pair{&b, "b"}, std::pair{&xnorm2, "xnorm2"},
                                 std::pair{&ynorm2, "ynorm2"}, std::pair{&S, "S"}}) {
    LIPFAST_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", name,
                  " must be float32 or float64, got ", t->scalar_type());
    LIPFAST_CHECK(t->device() == a.device(), op, ": ", name, " must be on ", a.device(), " (a's device), got ",
                  t->device());
  }
  const int64_t N = a.size(0), k = a.size(1);
  LIPFAST_CHECK(k >= 1, op, ": a must have at least one column (k >= 1), got shape ", a.sizes());
  LIPFAST_CHECK(b.sizes() == a.sizes(), op, ": b must have a's shape ", a.sizes(), ", got ", b.sizes());
  LIPFAST_CHECK_SIZE("lipfast::hessian_contract", xnorm2, "xnorm2", 0, N, "a.size(0)");
  LIPFAST_CHECK_SIZE("lipfast::hessian_contract", ynorm2, "ynorm2", 0, N, "a.size(0)");
  LIPFAST_CHECK_SIZE("lipfast::hessian_contract", S, "S", 0, k, "a.size(1)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hessian_contract_cpu(
    const at::Tensor& a,       // [N, k]
    const at::Tensor& b,       // [N, k]
    const at::Tensor& xnorm2,  // [N]
    const at::Tensor& ynorm2,  // [N]
    const at::Tensor& S,       // [k]
    double sigma_next) {
  check_hessian_contract_inputs(a, b, xnorm2, ynorm2, S);
  const int64_t N = a.size(0), k = a.size(1);
  auto ad = a.to(at::kDouble).contiguous();
  auto bd = b.to(at::kDouble).contiguous();
  auto xd = xnorm2.to(at::kDouble).contiguous();
  auto yd = ynorm2.to(at::kDouble).contiguous();
  auto Sd = S.to(at::kDouble).contiguous();
  auto opts = ad.options();
  // outputs
  auto value = at::empty({N}, opts), lo = at::empty({N}, opts), hi = at::empty({N}, opts);
  if (N == 0) return {value, lo, hi};
  const double *pa = ad.data_ptr<double>(), *pb = bd.data_ptr<double>();
  const double *px = xd.data_ptr<double>(), *py = yd.data_ptr<double>(), *ps = Sd.data_ptr<double>();
  double *pv = value.data_ptr<double>(), *pl = lo.data_ptr<double>(), *ph = hi.data_ptr<double>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto h = hessian_terms(pa + i * k, pb + i * k, 1, ps, k, sigma_next, px[i], py[i]);
      pv[i] = h.value;
      pl[i] = h.lo;
      ph[i] = h.hi;
    }
  });
  return {value, lo, hi};
}

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("hessian_contract", &hessian_contract_cpu); }

}  // namespace lipfast
