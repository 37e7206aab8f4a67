// Host-side argument checks of anyres_tile, shared by the CPU and CUDA entry points: a bad table or
// image raises a ValueError/TypeError naming the argument before any kernel runs.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common/check.h"

namespace vlmk {
namespace anyres {

// plan columns (vlmkernels/anyres/tile.py builds this table)
enum PlanCol : int { kResH = 0, kResW, kPadT, kPadL, kRows, kCols, kFirst, kPlanCols };

struct TileArgs {
  int64_t n, tile, num_tiles;
  float mean[3], stdv[3];
};

inline TileArgs check_tile_args(const std::vector<at::Tensor>& images, const at::Tensor& plan,
                                const at::Tensor& out, int64_t tile, const std::vector<double>& mean,
                                const std::vector<double>& stdv, bool global_view) {
  TileArgs a;
  a.n = static_cast<int64_t>(images.size());
  a.tile = tile;
  VLMK_CHECK_ARG(tile > 0 && tile <= 65536, "tile_size must be in [1, 65536], got ", tile);
  VLMK_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kHalf ||
                      out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kByte,
                  "out_dtype must be float32, float16, bfloat16 or uint8, got ", out.scalar_type());
  VLMK_CHECK_ARG(out.dim() == 4 && out.size(1) == 3 && out.size(2) == tile && out.size(3) == tile,
                 "out must be [num_tiles, 3, ", tile, ", ", tile, "], got ", out.sizes());
  check_contiguous(out, "out");
  a.num_tiles = out.size(0);
  VLMK_CHECK_TYPE(plan.scalar_type() == at::kLong, "plan must be int64, got ", plan.scalar_type());
  VLMK_CHECK_ARG(plan.device().is_cpu(), "plan must be a CPU tensor (a host-side table)");
  VLMK_CHECK_ARG(plan.dim() == 2 && plan.size(0) == a.n && plan.size(1) == kPlanCols,
                 "plan must be [num_images=", a.n, ", ", int(kPlanCols), "], got ", plan.sizes());
  check_contiguous(plan, "plan");
  VLMK_CHECK_ARG(mean.size() == 3 && stdv.size() == 3, "mean and std must have 3 values, got ",
                 mean.size(), " and ", stdv.size());
  for (int c = 0; c < 3; ++c) {
    VLMK_CHECK_ARG(stdv[c] != 0.0, "std must be non-zero, got std[", c, "] = 0");
    a.mean[c] = static_cast<float>(mean[c]);
    a.stdv[c] = static_cast<float>(stdv[c]);
  }
  const int64_t* p = plan.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (int64_t i = 0; i < a.n; ++i) {
    const at::Tensor& im = images[i];
    VLMK_CHECK_TYPE(im.scalar_type() == at::kByte, "images[", i, "] must be uint8, got ", im.scalar_type());
    VLMK_CHECK_ARG(im.dim() == 3, "images[", i, "] must be an [H, W, C] view, got ", im.sizes());
    VLMK_CHECK_ARG(im.device() == out.device(), "images[", i, "] is on ", im.device(), " but out is on ",
                   out.device());
    const int64_t h = im.size(0), w = im.size(1), c = im.size(2);
    VLMK_CHECK_ARG(c == 1 || c == 3 || c == 4, "images[", i, "] must have 1, 3 or 4 channels, got ", c);
    VLMK_CHECK_ARG(h > 0 && w > 0, "images[", i, "] is empty: ", im.sizes());
    VLMK_CHECK_ARG(h < (1 << 24) && w < (1 << 24), "images[", i, "] is too large: ", im.sizes());
    VLMK_CHECK_ARG(im.stride(0) >= 0 && im.stride(1) >= 0 && im.stride(2) >= 0,
                   "images[", i, "] must not have negative strides");
    const int64_t* r = p + i * kPlanCols;
    const int64_t rh = r[kResH], rw = r[kResW], pt = r[kPadT], pl = r[kPadL], rows = r[kRows],
                  cols = r[kCols], first = r[kFirst];
    VLMK_CHECK_ARG(rows >= 1 && cols >= 1 && rows * cols <= (1 << 20), "plan[", i, "]: bad grid ", rows, "x", cols);
    VLMK_CHECK_ARG(rh >= 1 && rw >= 1 && rh < (1 << 24) && rw < (1 << 24), "plan[", i,
                   "]: bad resized size ", rh, "x", rw);
    VLMK_CHECK_ARG(pt >= 0 && pl >= 0 && pt + rh <= rows * tile && pl + rw <= cols * tile, "plan[", i,
                   "]: the resized image ", rh, "x", rw, " at (", pt, ", ", pl, ") does not fit the ",
                   rows * tile, "x", cols * tile, " canvas");
    const int64_t count = rows * cols + (global_view ? 1 : 0);
    VLMK_CHECK_ARG(first >= 0 && first + count <= a.num_tiles, "plan[", i, "]: tiles [", first, ", ",
                   first + count, ") exceed num_tiles=", a.num_tiles);
    spans.emplace_back(first, first + count);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    VLMK_CHECK_ARG(spans[i].first >= spans[i - 1].second, "plan: the output tiles of two images overlap");
  return a;
}

}  // namespace anyres
}  // namespace vlmk
