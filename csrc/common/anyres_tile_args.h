// Host-side argument checks of anyres_tile: a bad table or image raises a ValueError/TypeError naming
// the argument before anything is allocated or any kernel runs. The op (ops/anyres.cpp) runs them
// first, for every backend; the messages match vlmkernels.anyres.tile.check_tile_args (the Python
// backends' copy) word for word, which tests/test_anyres_inputs.py checks.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common/check.h"

namespace vlmk {
namespace anyres {

// plan columns (vlmkernels/anyres/tile.py builds this table). kParts: how many consecutive `images`
// entries hold the image, stacked along its rows (1 for an ordinary view; several for an image kept
// in separate memory blocks, e.g. a large PIL image read in place: vlmkernels/anyres/pil.py).
enum PlanCol : int { kResH = 0, kResW, kPadT, kPadL, kRows, kCols, kFirst, kParts, kPlanCols };
constexpr int64_t kMaxTile = 65536, kMaxSide = int64_t(1) << 24, kMaxGrid = int64_t(1) << 20;

struct TileArgs {
  int64_t n, tile, num_tiles;  // n: images (plan rows); their parts are images[part0[i] .. part0[i + 1])
  float mean[3], stdv[3];
  std::vector<int64_t> part0;
};

// Checks one plan row against its image's size; written so that no product or sum can overflow.
inline void check_plan_row(int64_t i, const int64_t* r, int64_t tile, int64_t num_tiles, bool global_view) {
  const int64_t rh = r[kResH], rw = r[kResW], pt = r[kPadT], pl = r[kPadL], rows = r[kRows], cols = r[kCols],
                first = r[kFirst];
  VLMK_CHECK_ARG(rows >= 1 && cols >= 1 && rows <= kMaxGrid && cols <= kMaxGrid / rows, "anyres_tile: plan[", i,
                 "]: bad grid ", rows, "x", cols, " (at most ", kMaxGrid, " tiles)");
  VLMK_CHECK_ARG(rh >= 1 && rw >= 1 && rh < kMaxSide && rw < kMaxSide, "anyres_tile: plan[", i,
                 "]: bad resized size ", rh, "x", rw);
  VLMK_CHECK_ARG(pt >= 0 && pl >= 0 && pt <= rows * tile - rh && pl <= cols * tile - rw, "anyres_tile: plan[", i,
                 "]: the resized image ", rh, "x", rw, " at (", pt, ", ", pl, ") does not fit the ", rows * tile, "x",
                 cols * tile, " canvas");
  const int64_t count = rows * cols + (global_view ? 1 : 0);
  VLMK_CHECK_ARG(first >= 0 && first <= num_tiles - count, "anyres_tile: plan[", i, "]: its ", count,
                 " tiles from tile ", first, " exceed num_tiles=", num_tiles);
}

// `device`: where the output goes (the first image's device).
inline TileArgs check_tile_args(const std::vector<at::Tensor>& images, const at::Tensor& plan, int64_t num_tiles,
                                int64_t tile, const std::vector<double>& mean, const std::vector<double>& stdv,
                                bool global_view, at::ScalarType out_dtype, c10::Device device) {
  TileArgs a;
  const int64_t n_parts = static_cast<int64_t>(images.size());
  a.tile = tile;
  a.num_tiles = num_tiles;
  VLMK_CHECK_ARG(tile >= 1 && tile <= kMaxTile, "anyres_tile: tile_size must be in [1, ", kMaxTile, "], got ", tile);
  VLMK_CHECK_ARG(num_tiles >= 0, "anyres_tile: num_tiles must be >= 0, got ", num_tiles);
  VLMK_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16 ||
                      out_dtype == at::kByte,
                  "anyres_tile: out_dtype must be float32, float16, bfloat16 or uint8, got ", dtype_name(out_dtype));
  VLMK_CHECK_TYPE(plan.scalar_type() == at::kLong, "anyres_tile: plan must be int64, got ",
                  dtype_name(plan.scalar_type()));
  VLMK_CHECK_ARG(plan.device().is_cpu(), "anyres_tile: plan must be a CPU tensor (a host-side table)");
  VLMK_CHECK_ARG(plan.dim() == 2 && plan.size(1) == kPlanCols, "anyres_tile: plan must be [num_images, ",
                 int(kPlanCols), "], got ", shape_str(plan.sizes()));
  VLMK_CHECK_ARG(plan.is_contiguous(), "anyres_tile: plan must be contiguous");
  VLMK_CHECK_ARG(mean.size() == 3 && stdv.size() == 3, "anyres_tile: mean and std must have 3 values, got ",
                 mean.size(), " and ", stdv.size());
  for (int c = 0; c < 3; ++c) {
    VLMK_CHECK_ARG(stdv[c] != 0.0, "anyres_tile: std must be non-zero, got std[", c, "] = 0");
    a.mean[c] = static_cast<float>(mean[c]);
    a.stdv[c] = static_cast<float>(stdv[c]);
  }
  for (int64_t j = 0; j < n_parts; ++j) {
    const at::Tensor& im = images[j];
    VLMK_CHECK_TYPE(im.scalar_type() == at::kByte, "anyres_tile: images[", j, "] must be uint8, got ",
                    dtype_name(im.scalar_type()));
    VLMK_CHECK_ARG(im.dim() == 3, "anyres_tile: images[", j, "] must be an [H, W, C] view, got shape ",
                   shape_str(im.sizes()));
    VLMK_CHECK_ARG(im.device() == device, "anyres_tile: images[", j, "] is on ", im.device(), " but images[0] is on ",
                   device);
    const int64_t h = im.size(0), w = im.size(1), c = im.size(2);
    VLMK_CHECK_ARG(c == 1 || c == 3 || c == 4, "anyres_tile: images[", j, "] must have 1, 3 or 4 channels, got ", c);
    VLMK_CHECK_ARG(h > 0 && w > 0, "anyres_tile: images[", j, "] is empty: shape ", shape_str(im.sizes()));
    VLMK_CHECK_ARG(h < kMaxSide && w < kMaxSide, "anyres_tile: images[", j, "] is too large: shape ",
                   shape_str(im.sizes()));
    VLMK_CHECK_ARG(im.stride(0) >= 0 && im.stride(1) >= 0 && im.stride(2) >= 0, "anyres_tile: images[", j,
                   "] must not have negative strides");
  }
  a.n = plan.size(0);
  a.part0.assign(1, 0);
  const int64_t* p = plan.const_data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t* r = p + i * kPlanCols;
    const int64_t j0 = a.part0.back(), parts = r[kParts];
    VLMK_CHECK_ARG(parts >= 1 && parts <= n_parts - j0, "anyres_tile: plan[", i, "]: its ", parts,
                   " parts from images[", j0, "] are not among the ", n_parts, " images");
    int64_t h = 0;
    for (int64_t j = j0; j < j0 + parts; ++j) {
      VLMK_CHECK_ARG(images[j].size(1) == images[j0].size(1) && images[j].size(2) == images[j0].size(2),
                     "anyres_tile: plan[", i, "]: images[", j, "] has shape ", shape_str(images[j].sizes()),
                     " but images[", j0, "] ", shape_str(images[j0].sizes()),
                     ": the parts of an image must agree in width and channels");
      h += images[j].size(0);
    }
    VLMK_CHECK_ARG(h < kMaxSide, "anyres_tile: plan[", i, "]: the image is too large: ", h, " rows");
    a.part0.push_back(j0 + parts);
    check_plan_row(i, r, tile, num_tiles, global_view);
    spans.emplace_back(r[kFirst], r[kFirst] + r[kRows] * r[kCols] + (global_view ? 1 : 0));
  }
  VLMK_CHECK_ARG(a.part0.back() == n_parts, "anyres_tile: plan: its ", a.n, " images hold ", a.part0.back(),
                 " parts, but images has ", n_parts);
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    VLMK_CHECK_ARG(spans[i].first >= spans[i - 1].second, "anyres_tile: plan: the output tiles of two images overlap");
  return a;
}

// The kernels' entry (csrc/cpu, csrc/cuda): the same checks against the output they write.
inline TileArgs check_tile_args(const std::vector<at::Tensor>& images, const at::Tensor& plan, const at::Tensor& out,
                                int64_t tile, const std::vector<double>& mean, const std::vector<double>& stdv,
                                bool global_view) {
  VLMK_CHECK_ARG(out.dim() == 4 && out.size(1) == 3 && out.size(2) == tile && out.size(3) == tile,
                 "anyres_tile: out must be [num_tiles, 3, ", tile, ", ", tile, "], got ", shape_str(out.sizes()));
  check_contiguous(out, "out");
  return check_tile_args(images, plan, out.size(0), tile, mean, stdv, global_view, out.scalar_type(), out.device());
}

}  // namespace anyres
}  // namespace vlmk
