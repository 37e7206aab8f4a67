// CUDA moe_align_block_size (vLLM layout, stable and deterministic):
//   1. align_count:   per-chunk expert histograms (shared-memory counters; counts are order-free).
//   2. align_prefix:  one block: per-expert totals, padded sizes, a block-wide exclusive scan into
//                     segment starts, per-(chunk, expert) write cursors, expert_ids, sentinel padding.
//   3. align_scatter: one warp per chunk walks it 32 entries at a time; __match_any_sync ranks
//                     equal experts inside the step, so entries keep their flattened order.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/moe_align.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {

constexpr int kPrefixThreads = 1024;


__global__ void align_count(const int32_t* __restrict__ ids, const int32_t* __restrict__ map,
                            int32_t* __restrict__ counts, int64_t n, int E, int64_t chunk) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = (int64_t)blockIdx.x * chunk, end = min(n, begin + chunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    int e = moe::local_expert(ids[i], E, map);
    if (e >= 0) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[(int64_t)blockIdx.x * E + e] = hist[e];
}

__global__ void __launch_bounds__(kPrefixThreads)
    align_prefix(const int32_t* __restrict__ counts, int32_t* __restrict__ cursors, int32_t* __restrict__ sorted_ids,
                 int32_t* __restrict__ expert_ids, int32_t* __restrict__ total_out, int num_chunks, int E, int B,
                 int64_t max_padded, int64_t num_blocks, int32_t sentinel) {
  __shared__ int32_t scan[kPrefixThreads];
  __shared__ int32_t total_sh;
  const int tid = threadIdx.x;
  const int per = (E + kPrefixThreads - 1) / kPrefixThreads;  // contiguous experts per thread
  const int e0 = min(E, tid * per), e1 = min(E, e0 + per);
  int32_t local = 0;
  for (int e = e0; e < e1; ++e) {
    int32_t cnt = 0;
    for (int c = 0; c < num_chunks; ++c) cnt += counts[(int64_t)c * E + e];
    local += (cnt + B - 1) / B * B;
  }
  // inclusive Hillis-Steele scan of the per-thread padded sums
  scan[tid] = local;
  __syncthreads();
  for (int off = 1; off < kPrefixThreads; off <<= 1) {
    int32_t v = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += v;
    __syncthreads();
  }
  if (tid == kPrefixThreads - 1) total_sh = scan[tid];
  int32_t pos = scan[tid] - local;  // exclusive: start of this thread's first expert
  for (int e = e0; e < e1; ++e) {
    int32_t cnt = 0;
    for (int c = 0; c < num_chunks; ++c) {
      const int64_t at = (int64_t)c * E + e;
      const int32_t v = counts[at];
      cursors[at] = pos + cnt;
      cnt += v;
    }
    const int32_t padded = (cnt + B - 1) / B * B;
    for (int32_t p = pos + cnt; p < pos + padded; ++p) sorted_ids[p] = sentinel;
    for (int32_t b = pos / B; b < (pos + padded) / B; ++b) expert_ids[b] = e;
    pos += padded;
  }
  __syncthreads();
  const int32_t total = total_sh;
  if (tid == 0) total_out[0] = total;
  for (int64_t p = total + tid; p < max_padded; p += kPrefixThreads) sorted_ids[p] = sentinel;
  for (int64_t b = total / B + tid; b < num_blocks; b += kPrefixThreads) expert_ids[b] = -1;
}

__global__ void align_scatter(const int32_t* __restrict__ ids, const int32_t* __restrict__ map,
                              const int32_t* __restrict__ cursors, int32_t* __restrict__ sorted_ids, int64_t n, int E,
                              int64_t chunk) {
  extern __shared__ int32_t cursor[];
  for (int e = threadIdx.x; e < E; e += 32) cursor[e] = cursors[(int64_t)blockIdx.x * E + e];
  __syncwarp();
  const int lane = threadIdx.x;
  const unsigned lt_mask = (1u << lane) - 1u;
  const int64_t begin = (int64_t)blockIdx.x * chunk, end = min(n, begin + chunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const int e = i < end ? moe::local_expert(ids[i], E, map) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int32_t slot = e >= 0 ? cursor[e] : 0;
    __syncwarp();
    if (e >= 0) {
      sorted_ids[slot + __popc(peers & lt_mask)] = static_cast<int32_t>(i);
      if ((peers & lt_mask) == 0) cursor[e] = slot + __popc(peers);  // the lowest lane advances it
    }
    __syncwarp();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& ids, int64_t num_experts,
                                                                        int64_t block_size,
                                                                        const std::optional<at::Tensor>& expert_map) {
  // arguments are checked by the op (csrc/ops/moe_align.cpp), the expert limit included
  TORCH_INTERNAL_ASSERT(ids.is_cuda() && ids.is_contiguous() && num_experts <= kMaxAlignExpertsCuda);
  const int64_t n = ids.numel(), E = num_experts, B = block_size;
  const int64_t max_padded = moe::align_max_padded(n, E, B);
  const int32_t* map = expert_map ? expert_map->const_data_ptr<int32_t>() : nullptr;
  const c10::cuda::CUDAGuard guard(ids.device());
  auto opts = ids.options().dtype(at::kInt);
  const int64_t num_blocks = (max_padded + B - 1) / B;
  auto sorted_ids = at::empty({max_padded}, opts);
  auto expert_ids = at::empty({num_blocks}, opts);
  if (n == 0) return {sorted_ids, expert_ids.fill_(-1), at::zeros({1}, opts)};
  auto total = at::empty({1}, opts);
  // chunks of >= 256 entries (a multiple of the warp), at most ~256 of them
  int64_t chunk = std::max<int64_t>(256, (n + 255) / 256);
  chunk = (chunk + 31) / 32 * 32;
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  auto cursors = at::empty({num_chunks, E}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* in = ids.const_data_ptr<int32_t>();
  const size_t hist_bytes = E * sizeof(int32_t);
  // counts first land in `cursors`' twin buffer; prefix reads counts and writes cursors
  auto counts = at::empty({num_chunks, E}, opts);
  align_count<<<num_chunks, 256, hist_bytes, stream>>>(in, map, counts.mutable_data_ptr<int32_t>(), n, (int)E, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  align_prefix<<<1, kPrefixThreads, 0, stream>>>(counts.const_data_ptr<int32_t>(), cursors.mutable_data_ptr<int32_t>(),
                                                  sorted_ids.mutable_data_ptr<int32_t>(),
                                                  expert_ids.mutable_data_ptr<int32_t>(), total.mutable_data_ptr<int32_t>(),
                                                  (int)num_chunks, (int)E, (int)B, max_padded, num_blocks,
                                                  static_cast<int32_t>(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  align_scatter<<<num_chunks, 32, hist_bytes, stream>>>(in, map, cursors.const_data_ptr<int32_t>(),
                                                        sorted_ids.mutable_data_ptr<int32_t>(), n, (int)E, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted_ids, expert_ids, total};
}

}  // namespace vlmk
