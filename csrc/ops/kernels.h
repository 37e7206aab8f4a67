// The kernel entry points the ops in csrc/ops/ wrap (csrc/cpu/*.cpp, csrc/cuda/*). They take
// validated, contiguous arguments: every argument check lives in the op (csrc/ops/), once for all
// devices.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace vlmk {

// scoring: 0 softmax, 1 sigmoid; group_score: 0 top2_sum, 1 max. Weights come back fp32 (fp64 for
// fp64 logits on the CPU), ids int32. bias, when given, is in the weights' dtype.
std::tuple<at::Tensor, at::Tensor> moe_topk_route_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                      int64_t top_k, int64_t scoring, bool renormalize,
                                                      int64_t num_groups, int64_t topk_groups, int64_t group_score,
                                                      double scaling_factor);
// ids and expert_map int32; the outputs' sizes follow moe_align_max_padded (common/moe_align.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(const at::Tensor& ids, int64_t num_experts,
                                                                       int64_t block_size,
                                                                       const std::optional<at::Tensor>& expert_map);
std::tuple<at::Tensor, at::Tensor> topk_select_tokens_cpu(const at::Tensor& scores, const at::Tensor& tokens, int64_t k);
// writes `out` [num_tiles, 3, S, S]; checks the plan against the images (common/anyres_tile_args.h)
void anyres_tile_cpu(const std::vector<at::Tensor>& images, const at::Tensor& plan, at::Tensor out, int64_t tile,
                     const std::vector<double>& mean, const std::vector<double>& stdv, bool global_view);
at::Tensor anyres_plan_llava_cpu(const at::Tensor& sizes, const at::Tensor& pins, int64_t tile);
// Q-Former attention (python_ref/ops/qformer.py): q [B,Lq,H,d], k/v [B,Lk,H,d] ([total_k,H,d] with
// cu_seqlens_k), bool masks True = keep, the scale resolved. (out [B,Lq,H,d] in q's dtype, contiguous;
// lse [B,H,Lq] fp32, fp64 for fp64 q, +inf on rows without a kept key) and (dq, dk, dv) contiguous.
std::tuple<at::Tensor, at::Tensor> qformer_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& key_padding_mask,
                                                         const std::optional<at::Tensor>& attn_mask,
                                                         const std::optional<at::Tensor>& cu_seqlens_k, double scale,
                                                         const std::optional<at::Tensor>& dropout_mask,
                                                         double dropout_p);
std::tuple<at::Tensor, at::Tensor, at::Tensor> qformer_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_k, double scale,
    const std::optional<at::Tensor>& dropout_mask, double dropout_p);

#ifdef VLMK_WITH_CUDA
constexpr int64_t kMaxAlignExpertsCuda = 4096;  // the CUDA align keeps per-expert cursors in shared memory
std::tuple<at::Tensor, at::Tensor> moe_topk_route_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                       int64_t top_k, int64_t scoring, bool renormalize,
                                                       int64_t num_groups, int64_t topk_groups, int64_t group_score,
                                                       double scaling_factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& ids, int64_t num_experts,
                                                                        int64_t block_size,
                                                                        const std::optional<at::Tensor>& expert_map);
void anyres_tile_cuda(const std::vector<at::Tensor>& images, const at::Tensor& plan, at::Tensor out, int64_t tile,
                      const std::vector<double>& mean, const std::vector<double>& stdv, bool global_view);
#endif

}  // namespace vlmk
