// C++ CPU moe_topk_route: one row per task, rows split across threads with at::parallel_for.
// The per-element math (scores, NaN rules, group scoring, ordered top-k) lives in
// common/moe_topk.h and is shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/kernels.h"
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

// 8 floats as one value (GCC/Clang vector extension): the loops below are written on it directly
// because GCC does not vectorise them on its own (-fwrapv, float reductions without -ffast-math).
// On a CPU without AVX2 the compiler splits each operation into SSE halves, with the same results.
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only pass between inline helpers of this file
using f32x8 = float __attribute__((vector_size(32)));
using i32x8 = int32_t __attribute__((vector_size(32)));

template <typename To, typename From>
inline To bit_cast_(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

// exp(x) for x <= 0 (x - row max), on a float (F = float, I = int32_t) or 8 at once (f32x8, i32x8):
// Cody-Waite reduction x = n*ln2 + r with |r| <= ln2/2, Cephes' degree-6 polynomial for e^r (at most
// 1 ulp from expf over [-110, 0], checked exhaustively), and 2^n applied in two halves so results in
// the denormal range round as expf's do. x < -104 gives +0; NaN stays NaN.
template <typename F, typename I>
inline F exp_nonpositive(F x) {
  const F lo = F{} - 104.f;
  x = x < lo ? lo : x;
  const F round_magic = F{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const F t = x * 1.44269504088896341f + round_magic;
  const F n = t - round_magic;
  const I ni = bit_cast_<I>(t) - 0x4B400000;  // n as an integer, in [-150, 0]
  F r = x - n * 0.693359375f;                 // ln2 split in two: n*ln2 is exact
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const I n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 0]: 2^n1 and 2^n2 are normal floats
  return p * bit_cast_<F>((n1 + 127) << 23) * bit_cast_<F>((n2 + 127) << 23);
}

inline f32x8 load8(const float* p) { return bit_cast_<f32x8>(*reinterpret_cast<const float(*)[8]>(p)); }
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// score[e] = softmax(x)[e] for one row. Returns false when the row holds a NaN or +-Inf that makes
// the max or the sum non-finite: the caller then takes the generic path, which implements the NaN
// rules. The AVX2 clone runs where the CPU has it; both clones round identically (no FMA).
__attribute__((target_clones("avx2", "default"))) bool softmax_row_fast(const float* x, int64_t E, float* score) {
  const int64_t body = E / 8 * 8;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  f32x8 vmax = f32x8{} + neg_inf;
  for (int64_t e = 0; e < body; e += 8) {
    const f32x8 v = load8(x + e);
    vmax = v > vmax ? v : vmax;
  }
  float row_max = neg_inf;
  for (int j = 0; j < 8; ++j) row_max = vmax[j] > row_max ? vmax[j] : row_max;
  for (int64_t e = body; e < E; ++e) row_max = x[e] > row_max ? x[e] : row_max;
  if (!std::isfinite(row_max)) return false;
  f32x8 vsum = {};
  for (int64_t e = 0; e < body; e += 8) {
    const f32x8 v = exp_nonpositive<f32x8, i32x8>(load8(x + e) - row_max);
    store8(score + e, v);
    vsum += v;
  }
  float sum = 0.f;
  for (int j = 0; j < 8; ++j) sum += vsum[j];
  for (int64_t e = body; e < E; ++e) {
    score[e] = exp_nonpositive<float, int32_t>(x[e] - row_max);
    sum += score[e];
  }
  if (!std::isfinite(sum)) return false;  // a NaN logit (max skips NaN; the exp keeps it)
  const float inv_sum = 1.f / sum;
  for (int64_t e = 0; e < body; e += 8) store8(score + e, load8(score + e) * inv_sum);  // finite: no NaN rule needed
  for (int64_t e = body; e < E; ++e) score[e] = vlmk::moe::softmax_score(score[e], inv_sum);
  return true;
}

// Ordered top-k (k <= 8) of one row held in two 8-lane registers, best first by moe::ranks_before.
// Candidates arrive in id order, so an equal value already held ranks before the newcomer; the
// insertion is branch-free (a lane keeps its entry, takes the newcomer, or its left neighbour's).
struct Top8 {
  f32x8 vals;
  i32x8 ids;
  void init() {
    vals = f32x8{} - std::numeric_limits<float>::infinity();
    ids = i32x8{} + std::numeric_limits<int32_t>::max();
  }
  void insert(float v, int32_t id) {
    const i32x8 keep = vals >= v;                                                   // lanes before the slot
    const i32x8 first = {-1, 0, 0, 0, 0, 0, 0, 0};
    const i32x8 at_or_before = __builtin_shuffle(keep, i32x8{0, 0, 1, 2, 3, 4, 5, 6}) | first;
    const f32x8 vals_right = __builtin_shuffle(vals, i32x8{0, 0, 1, 2, 3, 4, 5, 6});
    const i32x8 ids_right = __builtin_shuffle(ids, i32x8{0, 0, 1, 2, 3, 4, 5, 6});
    vals = keep ? vals : (at_or_before ? f32x8{} + v : vals_right);
    ids = keep ? ids : (at_or_before ? i32x8{} + id : ids_right);
  }
};

// Top-k (k <= 8) of score[0, E) into `top`. The lane-wise maxima over the 8-wide blocks are 8
// distinct entries, so anything below their minimum ranks after >= 8 >= k entries and cannot be
// chosen: only entries >= that bound (typically a handful) go through the insertion, all of them,
// branch-free (one that does not make the top k lands past lane k-1).
__attribute__((target_clones("avx2", "default"))) void top8_scan(const float* score, int64_t E, Top8& top,
                                                                 int32_t* cand) {
  const int64_t body = E / 8 * 8;
  float bound = -std::numeric_limits<float>::infinity();
  if (body > 0) {
    f32x8 m = load8(score);
    for (int64_t e = 8; e < body; e += 8) {
      const f32x8 v = load8(score + e);
      m = v > m ? v : m;
    }
    bound = m[0];
    for (int j = 1; j < 8; ++j) bound = m[j] < bound ? m[j] : bound;
  }
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    cand[n] = (int32_t)e;
    n += score[e] >= bound;
  }
  for (int64_t c = 0; c < n; ++c) top.insert(score[cand[c]], cand[c]);
}

// Softmax top-k of one row without bias or groups: the selection order (score desc, id asc) is
// already the output order, so one ordered pass gives ids, weights and their sum.
inline void select_topk_row(const float* score, int E, int k, double scale, bool renormalize, float* vals,
                            int* idx, int32_t* idx_scratch, float* out_w, int32_t* out_id) {
  using namespace vlmk::moe;
  if (k <= 8) {
    Top8 top;
    top.init();
    top8_scan(score, E, top, idx_scratch);
    for (int i = 0; i < k; ++i) {
      vals[i] = top.vals[i];
      idx[i] = top.ids[i];
    }
  } else {
    int n = 0;
    for (int e = 0; e < k; ++e) topk_insert(vals, idx, n, k, score[e], e);
    for (int e = k; e < E; ++e)
      if (score[e] > vals[k - 1]) topk_insert(vals, idx, n, k, score[e], e);  // equal loses to the lower id
  }
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
    std::vector<int32_t> candidates(fast ? E : 0);
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
                        scratch.sel_id.data(), candidates.data(), out_w + t * k, out_id + t * k);
      else
        route_row<scalar_t, acc_t>(xt, bias, p, scratch, out_w + t * k, out_id + t * k);
    }
  } else {
    for (int64_t t = begin; t < end; ++t) route_row<scalar_t, acc_t>(x + t * E, bias, p, scratch, out_w + t * k, out_id + t * k);
  }
}

}  // namespace

// Arguments are checked by the op (csrc/ops/moe_route.cpp): logits contiguous [T, E], bias [E] in the
// accumulation dtype.
std::tuple<at::Tensor, at::Tensor> moe_topk_route_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                      int64_t top_k, int64_t scoring, bool renormalize,
                                                      int64_t num_groups, int64_t topk_groups, int64_t group_score,
                                                      double scaling_factor) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_INTERNAL_ASSERT(logits.is_contiguous() && (!bias || bias->scalar_type() == acc_type));
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

}  // namespace vlmk
