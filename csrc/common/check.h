// Argument checks shared by the C++ entry points: they raise ValueError/TypeError-style messages
// naming the argument, so bad input never reaches a kernel.
#pragma once
#include <torch/extension.h>

#include <string>

#include "hd.h"

#define VLMK_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define VLMK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

namespace vlmk {
inline void check_contiguous(const at::Tensor& t, const char* name) {
  VLMK_CHECK_ARG(t.is_contiguous(), name, " must be contiguous");
}
inline void check_device(const at::Tensor& t, c10::DeviceType dev, const char* name) {
  VLMK_CHECK_ARG(t.device().type() == dev, name, " must be on ", c10::DeviceTypeName(dev), ", got ",
                 t.device());
}

// Python's spelling of a dtype and a shape ("torch.float32", "(2, 3)"), so that the C++ checks raise
// the messages the Python backends raise for the same bad input.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}
inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}
}  // namespace vlmk
