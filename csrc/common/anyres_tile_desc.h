// Flat descriptors of one anyres_tile batch for the CUDA kernel: built on the host by
// cuda/anyres_bind.cpp, uploaded in one copy, read by cuda/anyres_tile.cu. No torch headers.
#pragma once
#include <cstdint>

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

}  // namespace anyres
}  // namespace vlmk
