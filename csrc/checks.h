// Input checks shared by the kernels: every message names the op, the argument, what was expected and
// what arrived, so a user never has to read C++ to learn what went wrong.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <type_traits>

// Messages are assembled here, not by TORCH_CHECK's std::ostream: built with a GCC whose libstdc++ is not
// the one the process runs with (a GPU image with its own GCC 13), every check whose message formatted a
// number through std::ostream inside the extension crashed the interpreter instead of raising. Numbers and
// shapes become text with std::to_string/snprintf; TORCH_CHECK then only copies a string.
namespace lipfast {
namespace msg {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void put(std::string& s, T v) { s += std::to_string(v); }
inline void put(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  s += buf;
}
inline void put(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void put(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }

template <typename... Args>
std::string text(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

}  // namespace msg
}  // namespace lipfast

// TORCH_CHECK with the message built by lipfast::msg::text (evaluated only when the check fails).
#define LIPFAST_CHECK(cond, ...) TORCH_CHECK(cond, ::lipfast::msg::text(__VA_ARGS__))

#define LIPFAST_CHECK_DIM(op, t, name, d, shape)                                                     \
  LIPFAST_CHECK((t).dim() == (d), op ": " name " must have shape " shape " (", d, " dims), got ",      \
                (t).sizes())

#define LIPFAST_CHECK_FLOAT(op, t, name)                                                             \
  LIPFAST_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,                   \
                op ": " name " must be float32 or float64, got ", (t).scalar_type())

#define LIPFAST_CHECK_SAME_DEVICE(op, t, name, ref)                                                  \
  LIPFAST_CHECK((t).device() == (ref).device(), op ": " name " must be on ", (ref).device(), ", got ", \
                (t).device())

#define LIPFAST_CHECK_SIZE(op, t, name, dim, expected, what)                                         \
  LIPFAST_CHECK((t).size(dim) == (expected), op ": " name ".size(", dim, ") must equal ", what, " (",  \
                expected, "), got ", (t).size(dim), " (", name " has shape ", (t).sizes(), ")")
