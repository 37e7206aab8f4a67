// Flat descriptors of one anyres_tile batch for the CUDA kernel: built on the host by
// cuda/anyres_tile_host.cpp (with make_resize below), uploaded in one copy, read by
// cuda/anyres_tile.cu. No torch headers: the host-emulation test compiles it too.
#pragma once
#include <cstdint>
#include <vector>

#include "common/anyres_resample.h"

namespace vlmk {
namespace anyres {

// One resize (source -> out_h x out_w). Taps of output pixel i along an axis start at
// taps[off + i * (2 + ksize)]: {xmin, count, w0 .. w(ksize-1)}. An axis that keeps its size gets
// identity taps (one tap of weight 1 << 22), which is what skipping Pillow's pass computes.
struct ResizeDesc {
  int32_t out_h, out_w;
  int32_t ksize_h, ksize_v;
  int64_t taps_h, taps_v;  // offsets (int32 entries) into the taps table
  int32_t vertical_first;
  int32_t pad_;
};

struct ImageDesc {
  int64_t src;  // device address of element [0, 0, 0]
  int64_t stride_h, stride_w, stride_c;
  int32_t h, w, c;
  int32_t pad_t, pad_l;
  int32_t rows, cols;
  int32_t pad_;
  ResizeDesc grid;   // to the planned size inside the canvas
  ResizeDesc whole;  // the global view, S x S
};

// Which image and which tile each output tile slot holds; image < 0: slot left untouched (zeros).
struct TileDesc {
  int32_t image;
  int32_t kind;  // 0: global view, 1: canvas tile (row, col)
  int32_t row, col;
};

// ---- host side -----------------------------------------------------------------------------

// Appends one axis's taps ({xmin, count, weights...} per output pixel); returns its offset.
inline int64_t add_axis(std::vector<int32_t>& taps, int in_size, int out_size, int32_t* ksize) {
  const int64_t off = static_cast<int64_t>(taps.size());
  if (in_size == out_size) {  // Pillow skips this pass: identity taps compute the same values
    *ksize = 1;
    for (int i = 0; i < out_size; ++i) taps.insert(taps.end(), {i, 1, int32_t(1) << kPrecisionBits});
    return off;
  }
  const AxisScale s = axis_scale(in_size, out_size);
  *ksize = s.ksize;
  std::vector<int32_t> k(s.ksize);
  for (int i = 0; i < out_size; ++i) {
    int xmin;
    const int count = tap_weights(s, in_size, i, k.data(), &xmin);
    taps.push_back(xmin);
    taps.push_back(count);
    taps.insert(taps.end(), k.begin(), k.end());
  }
  return off;
}

inline ResizeDesc make_resize(std::vector<int32_t>& taps, int in_h, int in_w, int out_h, int out_w) {
  ResizeDesc r{};
  r.out_h = out_h;
  r.out_w = out_w;
  r.taps_h = add_axis(taps, in_w, out_w, &r.ksize_h);
  r.taps_v = add_axis(taps, in_h, out_h, &r.ksize_v);
  // with one axis unchanged the order does not matter (identity taps); Pillow's rule otherwise
  r.vertical_first = (in_w != out_w && in_h != out_h && vertical_first(in_h, in_w, out_h, out_w)) ? 1 : 0;
  return r;
}

}  // namespace anyres
}  // namespace vlmk
