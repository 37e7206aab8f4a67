// Pillow bicubic tap tables of one resize axis, for the Triton one-kernel tile-and-encode
// (vlmkernels/triton/anyres_encode.py): computed with the very helpers the C++ and CUDA tilers use
// (common/anyres_resample.h), so the fused kernel's resized bytes are bit-identical to theirs.
#include <ATen/ATen.h>

#include <tuple>

#include "bindings.h"
#include "common/anyres_resample.h"
#include "common/check.h"

namespace vlmk {
namespace {

// in_size -> out_size along one axis: (xmin int32 [out], weights int32 [out, ksize]) where output
// pixel i reads source pixels xmin[i] + t with the 22-bit fixed-point weight weights[i, t]; taps
// past Pillow's count have weight 0 (their index may lie past the image). These are Pillow's
// coefficients even when in_size == out_size (Pillow would skip that pass; they are an identity).
std::tuple<at::Tensor, at::Tensor> anyres_taps_cpu(int64_t in_size, int64_t out_size) {
  VLMK_CHECK_ARG(in_size > 0 && in_size < (int64_t(1) << 24), "in_size must be in [1, 2^24), got ", in_size);
  VLMK_CHECK_ARG(out_size > 0 && out_size < (int64_t(1) << 24), "out_size must be in [1, 2^24), got ", out_size);
  const anyres::AxisScale s = anyres::axis_scale(int(in_size), int(out_size));
  const auto opts = at::TensorOptions().dtype(at::kInt);
  at::Tensor xmin = at::empty({out_size}, opts);
  at::Tensor weights = at::empty({out_size, s.ksize}, opts);
  int32_t* x = xmin.data_ptr<int32_t>();
  int32_t* w = weights.data_ptr<int32_t>();
  for (int64_t i = 0; i < out_size; ++i) {
    int lo;
    anyres::tap_weights(s, int(in_size), int(i), w + i * s.ksize, &lo);
    x[i] = lo;
  }
  return {xmin, weights};
}

}  // namespace
}  // namespace vlmk

VLMK_BINDINGS(anyres_taps_cpu) {
  m.def("anyres_taps_cpu", &vlmk::anyres_taps_cpu,
        "Pillow bicubic taps of one axis: (xmin int32 [out], weights int32 [out, ksize])",
        pybind11::arg("in_size"), pybind11::arg("out_size"));
}
