// Input checks shared by the kernels: every message names the op, the argument, what was expected and
// what arrived, so a user never has to read C++ to learn what went wrong.
#pragma once

#include <ATen/ATen.h>

#define LIPFAST_CHECK_DIM(op, t, name, d, shape)                                                     \
  TORCH_CHECK((t).dim() == (d), op ": " name " must have shape " shape " (", d, " dims), got ",      \
              (t).sizes())

#define LIPFAST_CHECK_FLOAT(op, t, name)                                                             \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,                   \
              op ": " name " must be float32 or float64, got ", (t).scalar_type())

#define LIPFAST_CHECK_SAME_DEVICE(op, t, name, ref)                                                  \
  TORCH_CHECK((t).device() == (ref).device(), op ": " name " must be on ", (ref).device(), ", got ", \
              (t).device())

#define LIPFAST_CHECK_SIZE(op, t, name, dim, expected, what)                                         \
  TORCH_CHECK((t).size(dim) == (expected), op ": " name ".size(", dim, ") must equal ", what, " (",  \
              expected, "), got ", (t).size(dim), " (", name " has shape ", (t).sizes(), ")")
