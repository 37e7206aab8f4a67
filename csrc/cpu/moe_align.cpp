// C++ CPU moe_align_block_size (vLLM layout, stable): per-chunk expert histograms in parallel, a
// serial prefix over (expert, chunk), then a parallel in-order scatter. Chunks are contiguous
// ranges of the flattened entries, so order inside an expert is the flattened order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/moe_align.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {

// The two passes over one chunk [lo, hi) of the flattened entries. Plain functions with local
// pointers: inside the parallel_for lambdas GCC reloaded the captured pointers on every entry.
template <bool kHasMap>
void count_chunk(const int32_t* in, int64_t lo, int64_t hi, int64_t E, const int32_t* map, int64_t* count) {
  for (int64_t i = lo; i < hi; ++i) {
    const int32_t e = moe::local_expert(in[i], E, kHasMap ? map : nullptr);
    if (e >= 0) ++count[e];
  }
}

template <bool kHasMap>
void scatter_chunk(const int32_t* in, int64_t lo, int64_t hi, int64_t E, const int32_t* map, int64_t* next,
                   int32_t* out) {
  for (int64_t i = lo; i < hi; ++i) {
    const int32_t e = moe::local_expert(in[i], E, kHasMap ? map : nullptr);
    if (e >= 0) out[next[e]++] = static_cast<int32_t>(i);
  }
}

}  // namespace

// Arguments are checked by the op (csrc/ops/moe_align.cpp): ids and expert_map contiguous int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(const at::Tensor& ids, int64_t num_experts,
                                                                       int64_t block_size,
                                                                       const std::optional<at::Tensor>& expert_map) {
  TORCH_INTERNAL_ASSERT(ids.is_contiguous() && ids.scalar_type() == at::kInt);
  const int64_t n = ids.numel(), E = num_experts, B = block_size;
  const int64_t max_padded = moe::align_max_padded(n, E, B);
  const int32_t* map = expert_map ? expert_map->const_data_ptr<int32_t>() : nullptr;
  auto opts = ids.options().dtype(at::kInt);
  auto sorted_ids = at::empty({max_padded}, opts);
  auto expert_ids = at::empty({(max_padded + B - 1) / B}, opts);
  auto total_out = at::empty({1}, opts);
  const int32_t* in = ids.const_data_ptr<int32_t>();
  int32_t* out = sorted_ids.mutable_data_ptr<int32_t>();

  const int64_t chunk = 8192;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>((n + chunk - 1) / chunk, at::get_num_threads() * 4));
  const int64_t per = (n + P - 1) / std::max<int64_t>(P, 1);
  std::vector<int64_t> offs(P * E, 0);  // counts, then start position per (chunk, expert)
  at::parallel_for(0, P, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * per, hi = std::min(n, (c + 1) * per);
      if (map)
        count_chunk<true>(in, lo, hi, E, map, offs.data() + c * E);
      else
        count_chunk<false>(in, lo, hi, E, map, offs.data() + c * E);
    }
  });
  int64_t pos = 0;
  std::vector<int64_t> seg_start(E), seg_padded(E);
  for (int64_t e = 0; e < E; ++e) {
    seg_start[e] = pos;
    int64_t cnt = 0;
    for (int64_t c = 0; c < P; ++c) {
      int64_t v = offs[c * E + e];
      offs[c * E + e] = pos + cnt;
      cnt += v;
    }
    seg_padded[e] = (cnt + B - 1) / B * B;
    pos += seg_padded[e];
  }
  TORCH_CHECK(pos <= max_padded, "internal: padded total ", pos, " exceeds buffer ", max_padded);
  std::fill(out, out + max_padded, static_cast<int32_t>(n));  // the sentinel
  at::parallel_for(0, P, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * per, hi = std::min(n, (c + 1) * per);
      if (map)
        scatter_chunk<true>(in, lo, hi, E, map, offs.data() + c * E, out);
      else
        scatter_chunk<false>(in, lo, hi, E, map, offs.data() + c * E, out);
    }
  });
  int32_t* eid = expert_ids.mutable_data_ptr<int32_t>();
  std::fill(eid, eid + expert_ids.numel(), -1);
  for (int64_t e = 0; e < E; ++e)
    std::fill(eid + seg_start[e] / B, eid + (seg_start[e] + seg_padded[e]) / B, static_cast<int32_t>(e));
  total_out.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(pos);
  return {sorted_ids, expert_ids, total_out};
}

}  // namespace vlmk
