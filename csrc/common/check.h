// Argument checks shared by the C++ entry points: they raise ValueError/TypeError-style messages
// naming the argument, so bad input never reaches a kernel.
#pragma once
#include <torch/extension.h>

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
}  // namespace vlmk
