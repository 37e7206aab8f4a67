// LLaVA-NeXT / OneVision AnyRes geometry, bit-exact with HF transformers:
// select_best_resolution, get_patch_output_size and _get_padding_size (image_processing_utils.py,
// image_processing_*llava_next.py). Shared by the C++ plan binding and the kernels.
#pragma once
#include <cmath>
#include <cstdint>

// No torch headers here: this file is also compiled by nvcc for the CUDA kernels.
#include "hd.h"

namespace vlmk {
namespace anyres {

struct LlavaPlan {
  int64_t best_h, best_w;        // chosen pinpoint (canvas)
  int64_t resized_h, resized_w;  // aspect-preserving resize inside the canvas
  int64_t pad_l, pad_t, pad_r, pad_b;
  int64_t rows, cols;            // canvas / tile
};

// Python's int(float) truncates toward zero; the values here are non-negative.
VLMK_HD int64_t trunc_to_i64(double v) { return static_cast<int64_t>(v); }

// pins: m (height, width) pairs. Keeps the most effective pixels, then the least waste; the first
// candidate wins ties (HF iterates in list order with strict comparisons).
VLMK_HD void select_best_resolution(int64_t h, int64_t w, const int64_t* pins, int64_t m,
                                    int64_t* best_h, int64_t* best_w) {
  int64_t best_eff = 0, best_waste = INT64_MAX;
  *best_h = pins[0];
  *best_w = pins[1];
  for (int64_t i = 0; i < m; ++i) {
    const int64_t ph = pins[2 * i], pw = pins[2 * i + 1];
    const double sw = static_cast<double>(pw) / static_cast<double>(w);
    const double sh = static_cast<double>(ph) / static_cast<double>(h);
    const double scale = sw < sh ? sw : sh;  // Python min(): first argument on ties (same value)
    const int64_t dw = trunc_to_i64(static_cast<double>(w) * scale);
    const int64_t dh = trunc_to_i64(static_cast<double>(h) * scale);
    int64_t eff = dw * dh;
    if (eff > w * h) eff = w * h;
    const int64_t waste = pw * ph - eff;
    if (eff > best_eff || (eff == best_eff && waste < best_waste)) {
      best_eff = eff;
      best_waste = waste;
      *best_h = ph;
      *best_w = pw;
    }
  }
}

// HF get_patch_output_size: fit (h, w) into (th, tw) keeping the aspect ratio, math.ceil rounding.
VLMK_HD void patch_output_size(int64_t h, int64_t w, int64_t th, int64_t tw, int64_t* out_h,
                               int64_t* out_w) {
  const double sw = static_cast<double>(tw) / static_cast<double>(w);
  const double sh = static_cast<double>(th) / static_cast<double>(h);
  if (sw < sh) {
    const int64_t nh = static_cast<int64_t>(ceil(static_cast<double>(h) * sw));
    *out_w = tw;
    *out_h = nh < th ? nh : th;
  } else {
    const int64_t nw = static_cast<int64_t>(ceil(static_cast<double>(w) * sh));
    *out_h = th;
    *out_w = nw < tw ? nw : tw;
  }
}

VLMK_HD LlavaPlan llava_plan(int64_t h, int64_t w, const int64_t* pins, int64_t m, int64_t tile) {
  LlavaPlan p;
  select_best_resolution(h, w, pins, m, &p.best_h, &p.best_w);
  patch_output_size(h, w, p.best_h, p.best_w, &p.resized_h, &p.resized_w);
  // the odd pixel of padding goes right / bottom (divmod(target - new, 2))
  const int64_t dx = p.best_w - p.resized_w, dy = p.best_h - p.resized_h;
  p.pad_l = dx / 2;
  p.pad_r = dx - dx / 2;
  p.pad_t = dy / 2;
  p.pad_b = dy - dy / 2;
  p.rows = p.best_h / tile;
  p.cols = p.best_w / tile;
  return p;
}

}  // namespace anyres
}  // namespace vlmk
