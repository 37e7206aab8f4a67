// C++ CPU moe_topk_route: one row per task, rows split across threads with at::parallel_for.
// The per-element math (scores, NaN rules, group scoring, ordered top-k) lives in
// common/moe_topk.h and is shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
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

// ---- fast path: softmax scoring, no bias, no groups (Mixtral / Qwen-MoE routers) ----------------
// exp dominates the row cost and libm's expf is a scalar call, so the row's exps use a polynomial
// GCC vectorises instead. The selection and weight math below are the shared helpers' exactly.

// exp(x) for x <= 0 (x - row max) in plain arithmetic: Cody-Waite reduction x = n*ln2 + r with
// |r| <= ln2/2, Cephes' degree-6 polynomial for e^r (within ~1 ulp of expf), and 2^n applied in two
// halves so that results in the denormal range round as expf's do. x < -104 gives +0; NaN stays NaN.
inline float exp_nonpositive(float x) {
  x = x < -104.f ? -104.f : x;
  const float round_magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + round_magic;
  const float n = t - round_magic;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const int32_t ni = t_bits - 0x4B400000;  // n as an integer, in [-150, 0]
  float r = x - n * 0.693359375f;          // ln2 split in two for an exact n*ln2
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 0]: both 2^n1, 2^n2 are normal floats
  const int32_t s1_bits = (n1 + 127) << 23, s2_bits = (n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &s1_bits, sizeof s1);
  std::memcpy(&s2, &s2_bits, sizeof s2);
  return p * s1 * s2;
}

constexpr int kLanes = 16;  // independent partial max/sum lanes, so the loops vectorise without -ffast-math

// score[e] = softmax(x)[e] for one row. Returns false (score untouched beyond scratch use) when the
// row holds a NaN or +-Inf that makes the max or the sum non-finite: the caller then takes the
// generic path, which implements the NaN rules. AVX2 clone where the CPU has it.
__attribute__((target_clones("avx2", "default"))) bool softmax_row_fast(const float* x, int E, float* score) {
  float lane_max[kLanes];
  for (int j = 0; j < kLanes; ++j) lane_max[j] = -std::numeric_limits<float>::infinity();
  int e = 0;
  for (; e + kLanes <= E; e += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_max[j] = x[e + j] > lane_max[j] ? x[e + j] : lane_max[j];
  float row_max = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < kLanes; ++j) row_max = lane_max[j] > row_max ? lane_max[j] : row_max;
  for (; e < E; ++e) row_max = x[e] > row_max ? x[e] : row_max;
  if (!std::isfinite(row_max)) return false;
  float lane_sum[kLanes] = {};
  e = 0;
  for (; e + kLanes <= E; e += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      score[e + j] = exp_nonpositive(x[e + j] - row_max);
      lane_sum[j] += score[e + j];
    }
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += lane_sum[j];
  for (; e < E; ++e) {
    score[e] = exp_nonpositive(x[e] - row_max);
    sum += score[e];
  }
  if (!std::isfinite(sum)) return false;  // a NaN logit (max skips NaN; the exp keeps it)
  const float inv_sum = 1.f / sum;
  for (e = 0; e < E; ++e) score[e] = vlmk::moe::softmax_score(score[e], inv_sum);
  return true;
}

// Softmax top-k of one row without bias or groups: the selection order (score desc, id asc) is
// already the output order, so one ordered insertion pass gives ids, weights and their sum.
inline void select_topk_row(const float* score, int E, int k, double scale, bool renormalize, float* vals,
                            int* idx, float* out_w, int32_t* out_id) {
  using namespace vlmk::moe;
  int n = 0;
  for (int e = 0; e < k; ++e) topk_insert(vals, idx, n, k, score[e], e);
  for (int e = k; e < E; ++e)
    if (score[e] > vals[k - 1]) topk_insert(vals, idx, n, k, score[e], e);  // equal loses to the lower id
  float sum = 0.f;
  for (int i = 0; i < k; ++i) sum += vals[i];
  const float mul = static_cast<float>(scale) / (renormalize ? renorm_divisor(sum) : 1.f);
  for (int i = 0; i < k; ++i) {
    out_w[i] = vals[i] * mul;
    out_id[i] = idx[i];
  }
}

// Rows [begin, end): the fast softmax path where it applies (fp32 math, row finite), else route_row.
template <typename scalar_t, typename acc_t>
void route_rows(const scalar_t* x, const acc_t* bias, const RouteParams& p, bool fast, int64_t begin, int64_t end,
                acc_t* out_w, int32_t* out_id) {
  const int64_t E = p.E, k = p.k;
  RowScratch<acc_t> scratch(p);
  if constexpr (std::is_same_v<acc_t, float>) {
    std::vector<float> row(fast && !std::is_same_v<scalar_t, float> ? E : 0);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* xt = x + t * E;
      const float* xf = reinterpret_cast<const float*>(xt);
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (fast) {
          for (int64_t e = 0; e < E; ++e) row[e] = static_cast<float>(xt[e]);
          xf = row.data();
        }
      }
      if (fast && softmax_row_fast(xf, (int)E, scratch.score.data()))
        select_topk_row(scratch.score.data(), (int)E, (int)k, p.scale, p.renormalize, scratch.sel_v.data(),
                        scratch.sel_id.data(), out_w + t * k, out_id + t * k);
      else
        route_row<scalar_t, acc_t>(xt, bias, p, scratch, out_w + t * k, out_id + t * k);
    }
  } else {
    for (int64_t t = begin; t < end; ++t) route_row<scalar_t, acc_t>(x + t * E, bias, p, scratch, out_w + t * k, out_id + t * k);
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
    const bool fast = p.scoring == moe::kSoftmax && !b && p.groups == 1;
    at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      route_rows<scalar_t, acc_t>(x, b, p, fast, begin, end, w, id);
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
