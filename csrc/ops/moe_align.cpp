// torch.ops.vlmkernels.moe_align_block_size on CPU and CUDA tensors: argument checks, int64 ids
// narrowed to int32 (ids outside [0, E) become -1, dropped, instead of wrapping), the kernel call.
// Registered from C++ (ops/dispatch.h); the outputs are integers, so autograd falls through.
#include "bindings.h"
#include "common/check.h"
#include "ops/dispatch.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {

using Align = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
constexpr int64_t kInt32Max = 2147483647;

// The messages match vlmkernels.moe.align.check_align_args (the Python backends' copy).
void check_align_args(const at::Tensor& ids, int64_t num_experts, int64_t block_size,
                      const std::optional<at::Tensor>& expert_map) {
  VLMK_CHECK_ARG(ids.dim() == 2, "moe_align_block_size: ids must be 2-D [T, k], got shape ", shape_str(ids.sizes()));
  VLMK_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                  "moe_align_block_size: ids must be int32 or int64, got ", dtype_name(ids.scalar_type()));
  VLMK_CHECK_ARG(num_experts >= 1, "moe_align_block_size: num_experts must be >= 1, got ", num_experts);
  VLMK_CHECK_ARG(block_size >= 1, "moe_align_block_size: block_size must be >= 1, got ", block_size);
  const int64_t n = ids.numel();
  // the sum is computed in doubles first: huge arguments must not overflow int64 before the check
  VLMK_CHECK_ARG(double(n) + double(num_experts) * double(block_size) <= double(kInt32Max),
                 "moe_align_block_size: T*k + E*block_size = ", n + num_experts * block_size, " overflows int32");
  if (expert_map) {
    VLMK_CHECK_ARG(expert_map->dim() == 1 && expert_map->size(0) == num_experts,
                   "moe_align_block_size: expert_map must have shape [num_experts=", num_experts, "], got ",
                   shape_str(expert_map->sizes()));
    VLMK_CHECK_TYPE(expert_map->scalar_type() == at::kInt || expert_map->scalar_type() == at::kLong,
                    "moe_align_block_size: expert_map must be int32 or int64, got ",
                    dtype_name(expert_map->scalar_type()));
    VLMK_CHECK_ARG(expert_map->device() == ids.device(), "moe_align_block_size: expert_map is on ",
                   expert_map->device(), " but ids on ", ids.device());
  }
}

// int32 contiguous; int64 values outside [0, E) become -1 (dropped) instead of wrapping.
at::Tensor narrow_ids(const at::Tensor& t, int64_t num_experts) {
  if (t.scalar_type() == at::kInt) return t.contiguous();
  return at::where((t >= 0) & (t < num_experts), t, -1).to(at::kInt).contiguous();
}

template <c10::DeviceType kDevice>
Align align(const at::Tensor& ids, int64_t num_experts, int64_t block_size, const std::optional<at::Tensor>& expert_map,
            c10::string_view backend) {
  constexpr bool kCuda = kDevice == c10::DeviceType::CUDA;
  check_align_args(ids, num_experts, block_size, expert_map);
  if (!runs_native(backend, kCuda ? "cuda" : "cpu"))
    return call_python_backend<Align>("moe_align_block_size", ids, num_experts, block_size, expert_map, backend);
  const at::Tensor in = narrow_ids(ids, num_experts);
  std::optional<at::Tensor> map;
  if (expert_map) map = narrow_ids(*expert_map, num_experts);
#ifdef VLMK_WITH_CUDA
  if constexpr (kCuda) {
    VLMK_CHECK_ARG(num_experts <= kMaxAlignExpertsCuda, "moe_align_block_size: the cuda backend takes num_experts <= ",
                   kMaxAlignExpertsCuda, ", got ", num_experts);
    return moe_align_block_size_cuda(in, num_experts, block_size, map);
  }
#endif
  return moe_align_block_size_cpu(in, num_experts, block_size, map);
}

}  // namespace
}  // namespace vlmk

TORCH_LIBRARY_IMPL(vlmkernels, CPU, m) { m.impl("moe_align_block_size", TORCH_FN(vlmk::align<c10::DeviceType::CPU>)); }
#ifdef VLMK_WITH_CUDA
TORCH_LIBRARY_IMPL(vlmkernels, CUDA, m) { m.impl("moe_align_block_size", TORCH_FN(vlmk::align<c10::DeviceType::CUDA>)); }
#endif
TORCH_LIBRARY_IMPL(vlmkernels, Autograd, m) { m.impl("moe_align_block_size", torch::CppFunction::makeFallthrough()); }

// The same C++ entry without the dispatcher, for the bench's host-overhead rows.
VLMK_BINDINGS(moe_align_op) {
  namespace py = pybind11;
  m.def("moe_align_block_size_cpu", &vlmk::align<c10::DeviceType::CPU>, "no dispatcher", py::arg("ids"),
        py::arg("num_experts"), py::arg("block_size"), py::arg("expert_map") = py::none(), py::arg("backend") = "auto");
#ifdef VLMK_WITH_CUDA
  m.def("moe_align_block_size_cuda", &vlmk::align<c10::DeviceType::CUDA>, "no dispatcher", py::arg("ids"),
        py::arg("num_experts"), py::arg("block_size"), py::arg("expert_map") = py::none(), py::arg("backend") = "auto");
#endif
}
