// CUDA moe_topk_route: one warp per token row, the row held in registers (VPT experts per lane,
// lane-strided so loads coalesce), warp-shuffle reductions for softmax, group scores and the
// k argmax rounds. Per-element math comes from common/moe_topk.h (shared with the CPU kernel).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "common/moe_topk.h"

namespace vlmk {
namespace {

using namespace vlmk::moe;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;

// Butterfly argmax: every lane ends with the best (value, id); ties to the lowest id.
__device__ __forceinline__ void warp_best(float& v, int& id) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float ov = __shfl_xor_sync(kFull, v, off);
    int oid = __shfl_xor_sync(kFull, id, off);
    if (ranks_before(ov, oid, v, id)) { v = ov; id = oid; }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// Best (value, id) among this lane's elements whose bit is set in mask.
template <int VPT>
__device__ __forceinline__ void lane_best(const float (&vals)[VPT], uint32_t mask, int lane, float& v, int& id) {
  v = -INFINITY;
  id = INT_MAX;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    if ((mask >> i) & 1u) {
      int e = lane + 32 * i;
      if (ranks_before(vals[i], e, v, id)) { v = vals[i]; id = e; }
    }
}

template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    moe_route_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ w_out,
                     int32_t* __restrict__ id_out, int64_t T, int E, int K, int G, int TG, int scoring,
                     int group_mode, bool renorm, float scale) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* gscore = smem + warp * (G + 2 * K);  // per warp: G group scores | K weights | K ids
  float* out_w = gscore + G;
  int* out_id = reinterpret_cast<int*>(out_w + K);
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
  if (row >= T) return;  // warp-uniform: no block-level sync below

  const scalar_t* x = logits + row * E;
  float score[VPT], key[VPT];
  uint32_t valid = 0;
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    int e = lane + 32 * i;
    score[i] = e < E ? static_cast<float>(x[e]) : -INFINITY;
    if (e < E) valid |= 1u << i;
    mx = score[i] > mx ? score[i] : mx;
  }
  float inv_sum = 1.f;
  if (scoring == kSoftmax) {
    mx = warp_max(mx);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) s += ((valid >> i) & 1u) ? exp_(score[i] - mx) : 0.f;
    inv_sum = 1.f / warp_sum(s);
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    int e = lane + 32 * i;
    score[i] = ((valid >> i) & 1u) ? expert_score(score[i], scoring, mx, inv_sum) : 0.f;
    key[i] = (bias != nullptr && e < E) ? selection_key(score[i], bias[e]) : score[i];
  }

  uint32_t avail = valid;
  if (G > 1) {
    const int S = E / G;
    for (int g = 0; g < G; ++g) {
      Top2<float> t;
      t.init();
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        int e = lane + 32 * i;
        if (((valid >> i) & 1u) && e / S == g) t.push(key[i]);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        Top2<float> o;
        o.first = __shfl_xor_sync(kFull, t.first, off);
        o.second = __shfl_xor_sync(kFull, t.second, off);
        o.count = __shfl_xor_sync(kFull, t.count, off);
        t.merge(o);
      }
      if (lane == 0) gscore[g] = t.score(group_mode);
    }
    __syncwarp();
    // pick TG groups (argmax rounds over the smem scores), then flag them in place
    uint32_t gtaken = 0;  // bit j: group lane + 32*j already chosen
    for (int r = 0; r < TG; ++r) {
      float v = -INFINITY;
      int id = INT_MAX;
      for (int j = 0, g = lane; g < G; ++j, g += 32)
        if (!((gtaken >> j) & 1u) && ranks_before(gscore[g], g, v, id)) { v = gscore[g]; id = g; }
      warp_best(v, id);
      if (id % 32 == lane) gtaken |= 1u << (id / 32);
    }
    __syncwarp();
    for (int j = 0, g = lane; g < G; ++j, g += 32) gscore[g] = ((gtaken >> j) & 1u) ? 1.f : 0.f;
    __syncwarp();
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      int e = lane + 32 * i;
      if (((valid >> i) & 1u) && gscore[e / S] == 0.f) avail &= ~(1u << i);
    }
  }

  // pass 1: k winners by key; without bias key == score, so this is already the output order
  uint32_t sel = 0;
  const bool has_bias = bias != nullptr;
  for (int r = 0; r < K; ++r) {
    float v;
    int id;
    lane_best<VPT>(key, avail, lane, v, id);
    warp_best(v, id);
    if (id % 32 == lane) {
      avail &= ~(1u << (id / 32));
      sel |= 1u << (id / 32);
      if (!has_bias) { out_w[r] = v; out_id[r] = id; }
    }
  }
  // pass 2 (bias only): order the winners by unbiased score
  if (has_bias) {
    for (int r = 0; r < K; ++r) {
      float v;
      int id;
      lane_best<VPT>(score, sel, lane, v, id);
      warp_best(v, id);
      if (id % 32 == lane) { sel &= ~(1u << (id / 32)); out_w[r] = v; out_id[r] = id; }
    }
  }
  __syncwarp();
  float part = 0.f;
  for (int j = lane; j < K; j += 32) part += out_w[j];
  const float mul = scale / (renorm ? renorm_divisor(warp_sum(part)) : 1.f);
  for (int j = lane; j < K; j += 32) {
    w_out[row * K + j] = out_w[j] * mul;
    id_out[row * K + j] = out_id[j];
  }
}

template <typename scalar_t, int VPT>
void launch(const at::Tensor& logits, const float* bias, at::Tensor& w, at::Tensor& ids, int K, int G, int TG,
            int scoring, int gmode, bool renorm, float scale) {
  const int64_t T = logits.size(0);
  const int E = (int)logits.size(1);
  const size_t smem = (size_t)kWarpsPerBlock * (G + 2 * K) * sizeof(float);
  const int64_t blocks = (T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  auto stream = at::cuda::getCurrentCUDAStream();
  moe_route_kernel<scalar_t, VPT><<<blocks, kWarpsPerBlock * 32, smem, stream>>>(
      logits.const_data_ptr<scalar_t>(), bias, w.mutable_data_ptr<float>(), ids.mutable_data_ptr<int32_t>(), T, E, K,
      G, TG, scoring, gmode, renorm, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_topk_route_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                       int64_t top_k, int64_t scoring, bool renormalize,
                                                       int64_t num_groups, int64_t topk_groups, int64_t group_score,
                                                       double scaling_factor) {
  // arguments are checked by the op (csrc/ops/moe_route.cpp)
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_INTERNAL_ASSERT(logits.is_cuda() && logits.is_contiguous() && E >= 1 && E <= 1024);
  const float* b = bias ? bias->const_data_ptr<float>() : nullptr;
  const c10::cuda::CUDAGuard guard(logits.device());
  auto w = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  if (T == 0) return {w, ids};
  const int K = (int)top_k, G = (int)num_groups, TG = (int)topk_groups, sc = (int)scoring, gm = (int)group_score;
  const float scale = (float)scaling_factor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_topk_route_cuda", [&] {
    if (E <= 32) launch<scalar_t, 1>(logits, b, w, ids, K, G, TG, sc, gm, renormalize, scale);
    else if (E <= 64) launch<scalar_t, 2>(logits, b, w, ids, K, G, TG, sc, gm, renormalize, scale);
    else if (E <= 128) launch<scalar_t, 4>(logits, b, w, ids, K, G, TG, sc, gm, renormalize, scale);
    else if (E <= 256) launch<scalar_t, 8>(logits, b, w, ids, K, G, TG, sc, gm, renormalize, scale);
    else if (E <= 512) launch<scalar_t, 16>(logits, b, w, ids, K, G, TG, sc, gm, renormalize, scale);
    else launch<scalar_t, 32>(logits, b, w, ids, K, G, TG, sc, gm, renormalize, scale);
  });
  return {w, ids};
}

}  // namespace vlmk
