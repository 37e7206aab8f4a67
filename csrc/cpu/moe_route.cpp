// C++ CPU moe_topk_route: one row per task, rows split across threads with at::parallel_for.
// The per-element math (scores, NaN rules, group scoring, ordered top-k) lives in
// common/moe_topk.h and is shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "bindings.h"
#include "common/check.h"
#include "common/moe_topk.h"

namespace vlmk {
namespace {

struct RouteParams {
  int64_t E, k, groups, topk_groups;
  int scoring, group_mode;
  bool renormalize;
  double scale;
};

// Scratch reused across the rows of one thread's chunk.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> score, key, gscore_v, sel_v, ord_v;
  std::vector<int> gscore_id, sel_id, ord_id;
  std::vector<char> eligible;
  RowScratch(const RouteParams& p)
      : score(p.E), key(p.E), gscore_v(p.topk_groups), sel_v(p.k), ord_v(p.k),
        gscore_id(p.topk_groups), sel_id(p.k), ord_id(p.k), eligible(p.E) {}
};

template <typename scalar_t, typename acc_t>
void route_row(const scalar_t* x, const acc_t* bias, const RouteParams& p, RowScratch<acc_t>& s,
               acc_t* out_w, int32_t* out_id) {
  using namespace vlmk::moe;
  const int E = (int)p.E, k = (int)p.k;
  acc_t row_max = -std::numeric_limits<acc_t>::infinity(), inv_sum = acc_t(1);
  if (p.scoring == kSoftmax) {
    for (int e = 0; e < E; ++e) {
      acc_t v = static_cast<acc_t>(x[e]);
      row_max = v > row_max ? v : row_max;
    }
    acc_t sum = 0;
    for (int e = 0; e < E; ++e) {
      s.score[e] = exp_(static_cast<acc_t>(x[e]) - row_max);  // cached: exp dominates the row cost
      sum += s.score[e];
    }
    inv_sum = acc_t(1) / sum;
    for (int e = 0; e < E; ++e) s.score[e] = softmax_score(s.score[e], inv_sum);
  } else {
    for (int e = 0; e < E; ++e) s.score[e] = expert_score(static_cast<acc_t>(x[e]), p.scoring, row_max, inv_sum);
  }
  for (int e = 0; e < E; ++e) s.key[e] = bias ? selection_key(s.score[e], bias[e]) : s.score[e];
  // group-limited selection: only experts of the topk_groups best groups stay eligible
  const int G = (int)p.groups, S = E / G;
  if (G > 1) {
    int ng = 0;
    for (int g = 0; g < G; ++g) {
      Top2<acc_t> t;
      t.init();
      for (int e = g * S; e < (g + 1) * S; ++e) t.push(s.key[e]);
      topk_insert(s.gscore_v.data(), s.gscore_id.data(), ng, (int)p.topk_groups, t.score(p.group_mode), g);
    }
    std::fill(s.eligible.begin(), s.eligible.end(), 0);
    for (int i = 0; i < ng; ++i)
      std::fill(s.eligible.begin() + s.gscore_id[i] * S, s.eligible.begin() + (s.gscore_id[i] + 1) * S, 1);
  }
  int ns = 0;
  for (int e = 0; e < E; ++e)
    if (G == 1 || s.eligible[e]) topk_insert(s.sel_v.data(), s.sel_id.data(), ns, k, s.key[e], e);
  // output order: unbiased weight descending, then id
  int no = 0;
  acc_t sum = 0;
  for (int i = 0; i < ns; ++i) {
    acc_t w = s.score[s.sel_id[i]];
    sum += w;
    topk_insert(s.ord_v.data(), s.ord_id.data(), no, k, w, s.sel_id[i]);
  }
  const acc_t mul = static_cast<acc_t>(p.scale) / (p.renormalize ? renorm_divisor(sum) : acc_t(1));
  for (int i = 0; i < k; ++i) {
    out_w[i] = s.ord_v[i] * mul;
    out_id[i] = s.ord_id[i];
  }
}

std::tuple<at::Tensor, at::Tensor> moe_topk_route_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                      int64_t top_k, int64_t scoring, bool renormalize,
                                                      int64_t num_groups, int64_t topk_groups, int64_t group_score,
                                                      double scaling_factor) {
  VLMK_CHECK_ARG(logits.dim() == 2, "logits must be 2-D [T, E], got ", logits.dim(), "-D");
  check_device(logits, c10::kCPU, "logits");
  check_contiguous(logits, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  VLMK_CHECK_ARG(top_k >= 1 && top_k <= E, "top_k must be in [1, E=", E, "], got ", top_k);
  VLMK_CHECK_ARG(num_groups >= 1 && E % num_groups == 0, "E=", E, " is not divisible by num_groups=", num_groups);
  VLMK_CHECK_ARG(topk_groups >= 1 && topk_groups <= num_groups, "topk_groups must be in [1, num_groups]");
  VLMK_CHECK_ARG(topk_groups * (E / num_groups) >= top_k, "too few eligible experts for top_k=", top_k);
  VLMK_CHECK_ARG(scoring == 0 || scoring == 1, "scoring code must be 0 (softmax) or 1 (sigmoid)");
  VLMK_CHECK_ARG(group_score == 0 || group_score == 1, "group_score code must be 0 (top2_sum) or 1 (max)");
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (bias) {
    VLMK_CHECK_ARG(bias->dim() == 1 && bias->size(0) == E, "bias must have shape [E=", E, "]");
    VLMK_CHECK_TYPE(bias->scalar_type() == acc_type, "bias must be ", acc_type, " for ", logits.scalar_type(), " logits");
    check_device(*bias, c10::kCPU, "bias");
    check_contiguous(*bias, "bias");
  }
  auto weights = at::empty({T, top_k}, logits.options().dtype(acc_type));
  auto ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};
  const RouteParams p{E, top_k, num_groups, topk_groups, (int)scoring, (int)group_score, renormalize, scaling_factor};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_topk_route_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* b = bias ? bias->const_data_ptr<acc_t>() : nullptr;
    acc_t* w = weights.mutable_data_ptr<acc_t>();
    int32_t* id = ids.mutable_data_ptr<int32_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1));
    at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> scratch(p);
      for (int64_t t = begin; t < end; ++t)
        route_row<scalar_t, acc_t>(x + t * E, b, p, scratch, w + t * top_k, id + t * top_k);
    });
  });
  return {weights, ids};
}

}  // namespace
}  // namespace vlmk

VLMK_BINDINGS(moe_route_cpu) {
  m.def("moe_topk_route_cpu", &vlmk::moe_topk_route_cpu, "fused MoE top-k routing (CPU)", pybind11::arg("logits"),
        pybind11::arg("bias"), pybind11::arg("top_k"), pybind11::arg("scoring"), pybind11::arg("renormalize"),
        pybind11::arg("num_groups"), pybind11::arg("topk_groups"), pybind11::arg("group_score"),
        pybind11::arg("scaling_factor"));
}
