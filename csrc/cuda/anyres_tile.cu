// CUDA anyres_tile: the whole batch in one launch, one thread per output tile pixel (3 channels).
// out is float32/float16/bfloat16 (normalized) or uint8 (the rounded tile bytes, for patch_embed_uint8).
//
// A thread finds its image and tile from the uploaded descriptors, maps the pixel into the resized
// image (or the zero padding), and evaluates Pillow's two separable passes directly: for each tap of
// the second pass it recomputes the first pass's uint8 value, so the rounding between the passes is
// exactly Pillow's. The tap weights are precomputed on the host with the same helpers the CPU
// kernel uses (common/anyres_resample.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/anyres_resample.h"
#include "common/anyres_tile_desc.h"

namespace vlmk {
namespace anyres {
namespace {

struct Norm {
  float mean[3], stdv[3];
};

__device__ __forceinline__ void load_rgb(const ImageDesc& d, int y, int x, int32_t* rgb) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(d.src) + y * d.stride_h + x * d.stride_w;
  if (d.c == 1) {
    rgb[0] = rgb[1] = rgb[2] = p[0];
  } else if (d.c == 3) {
    rgb[0] = p[0];
    rgb[1] = p[d.stride_c];
    rgb[2] = p[2 * d.stride_c];
  } else {
    const uint8_t a = p[3 * d.stride_c];
    for (int k = 0; k < 3; ++k) rgb[k] = composite_white(p[k * d.stride_c], a);
  }
}

// Pillow value of resized pixel (ry, rx), all three channels.
__device__ void resample_pixel(const ImageDesc& d, const ResizeDesc& rz, const int32_t* taps, int ry, int rx,
                               int32_t* out) {
  const int32_t* th = taps + rz.taps_h + int64_t(rx) * (2 + rz.ksize_h);
  const int32_t* tv = taps + rz.taps_v + int64_t(ry) * (2 + rz.ksize_v);
  // first pass along `a`, second along `b`
  const int32_t* ta = rz.vertical_first ? tv : th;
  const int32_t* tb = rz.vertical_first ? th : tv;
  int32_t acc_b[3] = {kRoundBias, kRoundBias, kRoundBias};
  for (int t = 0; t < tb[1]; ++t) {
    const int jb = tb[0] + t;
    int32_t acc_a[3] = {kRoundBias, kRoundBias, kRoundBias};
    for (int s = 0; s < ta[1]; ++s) {
      const int ja = ta[0] + s;
      int32_t rgb[3];
      if (rz.vertical_first)
        load_rgb(d, ja, jb, rgb);
      else
        load_rgb(d, jb, ja, rgb);
      const int32_t w = ta[2 + s];
      for (int c = 0; c < 3; ++c) acc_a[c] += rgb[c] * w;
    }
    const int32_t w = tb[2 + t];
    for (int c = 0; c < 3; ++c) acc_b[c] += int32_t(clip8(acc_a[c])) * w;
  }
  for (int c = 0; c < 3; ++c) out[c] = clip8(acc_b[c]);
}

// Normalized float tiles, or (out_dtype=uint8) the raw rounded bytes with mean/std ignored.
template <typename out_t>
__device__ __forceinline__ out_t tile_value(uint8_t v, float mean, float stdv) {
  return static_cast<out_t>(normalize_u8(v, mean, stdv));
}
template <>
__device__ __forceinline__ uint8_t tile_value<uint8_t>(uint8_t v, float, float) {
  return v;
}

template <typename out_t>
__global__ void anyres_tile_kernel(const ImageDesc* __restrict__ images, const TileDesc* __restrict__ tiles,
                                   const int32_t* __restrict__ taps, int64_t num_tiles, int S, Norm norm,
                                   out_t* __restrict__ out) {
  const int64_t plane = int64_t(S) * S;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_tiles * plane) return;
  const int64_t tile = idx / plane, pix = idx % plane;
  const int y = int(pix / S), x = int(pix % S);
  const TileDesc t = tiles[tile];
  if (t.image < 0) return;
  const ImageDesc& d = images[t.image];
  int32_t v[3] = {0, 0, 0};
  if (t.kind == 0) {
    resample_pixel(d, d.whole, taps, y, x, v);
  } else {
    const int ry = t.row * S + y - d.pad_t, rx = t.col * S + x - d.pad_l;
    if (ry >= 0 && ry < d.grid.out_h && rx >= 0 && rx < d.grid.out_w) resample_pixel(d, d.grid, taps, ry, rx, v);
  }
  for (int c = 0; c < 3; ++c)
    out[(tile * 3 + c) * plane + pix] = tile_value<out_t>(uint8_t(v[c]), norm.mean[c], norm.stdv[c]);
}

}  // namespace

// meta: device bytes = [ImageDesc x n_images][TileDesc x num_tiles][int32 taps]; out [num_tiles, 3, S, S].
void launch_anyres_tile(const at::Tensor& meta, int64_t n_images, at::Tensor& out, int64_t tile, const float* mean,
                        const float* stdv) {
  const int64_t num_tiles = out.size(0);
  const int64_t total = num_tiles * tile * tile;
  if (total == 0 || n_images == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const uint8_t* base = meta.data_ptr<uint8_t>();
  const auto* images = reinterpret_cast<const ImageDesc*>(base);
  const auto* tiles = reinterpret_cast<const TileDesc*>(base + n_images * sizeof(ImageDesc));
  const auto* taps = reinterpret_cast<const int32_t*>(base + n_images * sizeof(ImageDesc) + num_tiles * sizeof(TileDesc));
  Norm norm;
  for (int c = 0; c < 3; ++c) norm.mean[c] = mean[c], norm.stdv[c] = stdv[c];
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "anyres_tile: too many output pixels for one launch");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, out.scalar_type(), "anyres_tile_cuda", [&] {
    anyres_tile_kernel<scalar_t><<<unsigned(blocks), threads, 0, stream>>>(images, tiles, taps, num_tiles, int(tile),
                                                                           norm, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace anyres
}  // namespace vlmk
