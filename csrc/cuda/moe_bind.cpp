// pybind11 bindings of the MoE CUDA launchers (csrc/cuda/moe_route.cu, moe_align.cu).
#ifdef VLMK_WITH_CUDA
#include <optional>
#include <tuple>

#include "bindings.h"

namespace vlmk {
std::tuple<at::Tensor, at::Tensor> moe_topk_route_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                       int64_t top_k, int64_t scoring, bool renormalize,
                                                       int64_t num_groups, int64_t topk_groups, int64_t group_score,
                                                       double scaling_factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& ids, int64_t num_experts,
                                                                        int64_t block_size,
                                                                        const std::optional<at::Tensor>& expert_map,
                                                                        int64_t max_padded);
}  // namespace vlmk

VLMK_BINDINGS(moe_cuda) {
  m.def("moe_topk_route_cuda", &vlmk::moe_topk_route_cuda, "fused MoE top-k routing (CUDA)", pybind11::arg("logits"),
        pybind11::arg("bias"), pybind11::arg("top_k"), pybind11::arg("scoring"), pybind11::arg("renormalize"),
        pybind11::arg("num_groups"), pybind11::arg("topk_groups"), pybind11::arg("group_score"),
        pybind11::arg("scaling_factor"));
  m.def("moe_align_block_size_cuda", &vlmk::moe_align_block_size_cuda, "vLLM-layout stable MoE align (CUDA)",
        pybind11::arg("ids"), pybind11::arg("num_experts"), pybind11::arg("block_size"), pybind11::arg("expert_map"),
        pybind11::arg("max_padded"));
}
#endif  // VLMK_WITH_CUDA
