// torch.ops.vlmkernels.anyres_tile (CPU and CUDA tensors) and anyres_plan_llava (CPU), registered
// from C++ (ops/dispatch.h). The plan table and images are checked first, for every backend, by
// common/anyres_tile_args.h (shared with both devices' kernels). Uint8 in, no gradients: autograd
// falls through.
#include "bindings.h"
#include "common/anyres_tile_args.h"
#include "common/check.h"
#include "ops/dispatch.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {

template <c10::DeviceType kDevice>
at::Tensor tile(at::TensorList images, const at::Tensor& plan, int64_t num_tiles, int64_t tile_size,
                c10::ArrayRef<double> mean, c10::ArrayRef<double> stdv, bool global_view, at::ScalarType out_dtype,
                c10::string_view backend) {
  constexpr bool kCuda = kDevice == c10::DeviceType::CUDA;
  const std::vector<at::Tensor> ims = images.vec();
  const c10::Device device = ims.empty() ? c10::Device(c10::kCPU) : ims[0].device();
  const std::vector<double> m = mean.vec(), s = stdv.vec();
  // every backend validates here, before anything is allocated (a bad plan may ask for terabytes)
  const anyres::TileArgs a = anyres::check_tile_args(ims, plan, num_tiles, tile_size, m, s, global_view, out_dtype,
                                                     device);
  if (!runs_native(backend, kCuda ? "cuda" : "cpu"))
    return call_python_backend<at::Tensor>("anyres_tile", images, plan, num_tiles, tile_size, mean, stdv, global_view,
                                           out_dtype, backend);
  at::Tensor out = at::empty({num_tiles, 3, tile_size, tile_size}, at::TensorOptions().dtype(out_dtype).device(device));
  int64_t covered = global_view ? a.n : 0;
  const int64_t* p = plan.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < a.n; ++i) covered += p[i * anyres::kPlanCols + anyres::kRows] * p[i * anyres::kPlanCols + anyres::kCols];
  if (covered != num_tiles) out.zero_();  // slots no image writes stay zero
#ifdef VLMK_WITH_CUDA
  if constexpr (kCuda) {
    anyres_tile_cuda(ims, plan, out, tile_size, m, s, global_view);
    return out;
  }
#endif
  anyres_tile_cpu(ims, plan, out, tile_size, m, s, global_view);
  return out;
}

at::Tensor plan_llava(const at::Tensor& sizes, const at::Tensor& pins, int64_t tile_size, c10::string_view backend) {
  if (!runs_native(backend, "cpu"))
    return call_python_backend<at::Tensor>("anyres_plan_llava", sizes, pins, tile_size, backend);
  return anyres_plan_llava_cpu(sizes, pins, tile_size);
}

}  // namespace
}  // namespace vlmk

TORCH_LIBRARY_IMPL(vlmkernels, CPU, m) {
  m.impl("anyres_tile", TORCH_FN(vlmk::tile<c10::DeviceType::CPU>));
  m.impl("anyres_plan_llava", TORCH_FN(vlmk::plan_llava));
}
#ifdef VLMK_WITH_CUDA
TORCH_LIBRARY_IMPL(vlmkernels, CUDA, m) { m.impl("anyres_tile", TORCH_FN(vlmk::tile<c10::DeviceType::CUDA>)); }
#endif
TORCH_LIBRARY_IMPL(vlmkernels, Autograd, m) {
  m.impl("anyres_tile", torch::CppFunction::makeFallthrough());
  m.impl("anyres_plan_llava", torch::CppFunction::makeFallthrough());
}
