// Host side of the CUDA anyres_tile (called by csrc/ops/anyres.cpp): validates, builds the batch
// descriptors and tap tables (with the helpers the CPU kernel uses), uploads them in one copy and
// launches the kernels.
#ifdef VLMK_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <vector>

#include "common/anyres_resample.h"
#include "common/anyres_tile_args.h"
#include "common/anyres_tile_desc.h"
#include "common/check.h"
#include "ops/kernels.h"

namespace vlmk {
namespace anyres {

void launch_anyres_tile(const at::Tensor& meta, int64_t n_images, at::Tensor& out, int64_t tile, const float* mean,
                        const float* stdv);

}  // namespace anyres

void anyres_tile_cuda(const std::vector<at::Tensor>& images, const at::Tensor& plan, at::Tensor out, int64_t tile,
                      const std::vector<double>& mean, const std::vector<double>& stdv, bool global_view) {
  using namespace anyres;
  const c10::cuda::CUDAGuard guard(out.device());  // the images' card, whatever the current device
  const TileArgs a = check_tile_args(images, plan, out, tile, mean, stdv, global_view);
  VLMK_CHECK_ARG(out.is_cuda(), "out must be a CUDA tensor for the cuda backend");
  const int64_t* p = plan.data_ptr<int64_t>();
  std::vector<ImageDesc> descs(a.n);
  std::vector<TileDesc> tiles(a.num_tiles, TileDesc{-1, 0, 0, 0});
  std::vector<int32_t> taps;
  // an image given as several row runs (plan column kParts) is joined on the device first (freed
  // after the launch: the caching allocator reuses them only in this stream's order)
  std::vector<at::Tensor> joined(a.n);
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t j0 = a.part0[i], j1 = a.part0[i + 1];
    if (j1 - j0 > 1)
      joined[i] = at::cat(std::vector<at::Tensor>(images.begin() + j0, images.begin() + j1), 0);
    const at::Tensor& im = j1 - j0 > 1 ? joined[i] : images[j0];
    const int64_t* r = p + i * kPlanCols;
    ImageDesc& d = descs[i];
    d = ImageDesc{};
    d.src = reinterpret_cast<int64_t>(im.data_ptr<uint8_t>());
    d.stride_h = im.stride(0), d.stride_w = im.stride(1), d.stride_c = im.stride(2);
    d.h = int32_t(im.size(0)), d.w = int32_t(im.size(1)), d.c = int32_t(im.size(2));
    d.pad_t = int32_t(r[kPadT]), d.pad_l = int32_t(r[kPadL]);
    d.rows = int32_t(r[kRows]), d.cols = int32_t(r[kCols]);
    d.grid = make_resize(taps, d.h, d.w, int(r[kResH]), int(r[kResW]));
    int64_t slot = r[kFirst];
    if (global_view) {
      d.whole = make_resize(taps, d.h, d.w, int(tile), int(tile));
      tiles[slot++] = TileDesc{int32_t(i), 0, 0, 0};
    }
    for (int32_t row = 0; row < d.rows; ++row)
      for (int32_t col = 0; col < d.cols; ++col) tiles[slot++] = TileDesc{int32_t(i), 1, row, col};
  }
  const size_t n_img = descs.size() * sizeof(ImageDesc), n_tile = tiles.size() * sizeof(TileDesc),
               n_taps = taps.size() * sizeof(int32_t);
  at::Tensor host = at::empty({int64_t(n_img + n_tile + n_taps)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  if (n_img) std::memcpy(h, descs.data(), n_img);
  if (n_tile) std::memcpy(h + n_img, tiles.data(), n_tile);
  if (n_taps) std::memcpy(h + n_img + n_tile, taps.data(), n_taps);
  const at::Tensor meta = host.to(out.device(), /*non_blocking=*/true);
  launch_anyres_tile(meta, a.n, out, tile, a.mean, a.stdv);
}

}  // namespace vlmk
#endif  // VLMK_WITH_CUDA
