// moe_align_block_size helpers shared by the C++ CPU kernel (csrc/cpu/moe_align.cpp) and the CUDA
// kernel (csrc/cuda/moe_align.cu). No torch headers: nvcc compiles this for the device too.
#pragma once
#include <stdint.h>

#include "hd.h"

namespace vlmk {
namespace moe {

// Local expert of an entry's id, or -1 when the entry is dropped: the id is outside [0, E), or the
// expert map sends it to -1 (not on this rank) or outside [0, E). Never clamped into a real expert.
VLMK_HD int32_t local_expert(int32_t id, int64_t E, const int32_t* map) {
  if (id < 0 || id >= E) return -1;
  if (map != nullptr) {
    id = map[id];
    if (id < 0 || id >= E) return -1;
  }
  return id;
}

// Length of sorted_token_ids for n = T*k entries (vLLM's max_num_tokens_padded): every expert's
// segment padded to a multiple of B, and with n < E at most n experts are hit. The kernels size
// their outputs with it, so no caller-supplied length can be too small.
VLMK_HD int64_t align_max_padded(int64_t n, int64_t E, int64_t B) {
  const int64_t m = n + E * (B - 1);
  return n < E && n * B < m ? n * B : m;
}

}  // namespace moe
}  // namespace vlmk
