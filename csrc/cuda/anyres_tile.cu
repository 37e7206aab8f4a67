// CUDA anyres_tile: the whole batch in one launch. out is float32/float16/bfloat16 (normalized) or
// uint8 (the rounded tile bytes, for patch_embed_uint8).
//
// Pillow's resize is two separable passes with a uint8 rounding between them; the GPU runs them
// as two passes too, inside one block, through shared memory (no global scratch):
//   * a block owns 32 x 64 output pixels of one tile. Along the first pass's axis A (x, or y for
//     Pillow >= 13's vertical-first order) they read a source span of ~(64 + 4) * scale pixels
//     (x) or ~(32 + 4) * scale (y); along the second axis B, ~(32 + 4) * scale source lines (or
//     ~(64 + 4) * scale);
//   * the B span is walked in chunks of source lines. Per chunk: stage the chunk's source pixels
//     in shared memory (coalesced, converted once: gray stays one plane, RGBA is composited onto
//     white once per pixel); first pass: each staged line -> the block's A outputs, int32 from
//     the 2^21 bias, >> 22, clip8 -> uint8 lines in shared memory (dp4a on 4 source bytes at a
//     time against byte planes of the weights, recombined exactly); second pass: each thread adds
//     the chunk's lines to the int32 accumulators of its 8 output pixels (integer sums: chunking
//     does not change them). At the end: clip8, normalize, write the tile (padding: normalize(0)).
// The tap tables come from the host (cuda/anyres_tile_host.cpp, built with common/
// anyres_resample.h as the CPU kernel's are), and the per-element math (kRoundBias, clip8,
// composite_white, normalize_u8) is the shared one, so the bytes are the CPU kernel's.
// Blocks whose spans do not fit the shared memory (downscales beyond ~25x) read the source and
// the weights from global memory, one tap at a time (same arithmetic, slower).
//
// Bytes moved per image: the source once per target (h * w * C; twice with the global view, the
// second read partly from L2) plus the overlap of neighbouring blocks' spans (~4 * scale lines
// per 32 output rows, mostly L2 hits), plus the tiles (num_tiles * 3 * S^2 * sizeof(out)); no
// intermediate touches HBM. 4032 x 3024 RGB -> 672 x 504 in 2 x 2 tiles of 336 + the global view,
// fp32: 36.6 MB + 6.8 MB = 43 MB at least, 13 us at an H100 SXM's 3.35 TB/s; the >= 50% target
// is 26 us. Arithmetic for that image: ~0.38 G multiply-adds (halo lines included), ~90% in the
// first pass at ~1.3 instructions per 4 (dp4a), the rest one byte load + IMAD each: about as
// long again on an H100, so time it before deciding which side bounds it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common/anyres_resample.h"
#include "common/anyres_tile_desc.h"

namespace vlmk {
namespace anyres {
namespace {

constexpr int kThreads = 256;
constexpr int kTileX = 64, kTileY = 32;                // output pixels per block
constexpr int kPix = kTileX * kTileY / kThreads;       // output pixels per thread (one column)
constexpr int kSmemMax = 96 * 1024;                    // dynamic shared memory per block (2 per SM)
constexpr int kMinChunk = 8;                           // staging fewer lines per chunk: read global memory

struct Norm {
  float mean[3], stdv[3];
};

// Channels the passes compute: grayscale resamples one plane (its three RGB copies are equal).
__device__ __forceinline__ int planes_of(const ImageDesc& d) { return d.c == 1 ? 1 : 3; }

// The source image view, held in registers.
struct Source {
  const uint8_t* p;
  int64_t sh, sw, sc;
  int c;
  // pixel (y, x) as RGB (gray: replicated; RGBA composited onto white, as HF converts it)
  __device__ void rgb(int y, int x, int32_t* px) const {
    const uint8_t* q = p + y * sh + x * sw;
    if (c == 1) {
      px[0] = px[1] = px[2] = q[0];
    } else if (c == 3) {
      px[0] = q[0];
      px[1] = q[sc];
      px[2] = q[2 * sc];
    } else {
      const uint8_t a = q[3 * sc];
      for (int k = 0; k < 3; ++k) px[k] = composite_white(q[k * sc], a);
    }
  }
};

// One axis of one resize: entry i = {xmin, count, w0 .. w(ksize - 1)}.
struct Axis {
  const int32_t* t;
  int ksize;
  __device__ const int32_t* at(int i) const { return t + int64_t(i) * (2 + ksize); }
  __device__ int xmin(int i) const { return at(i)[0]; }
  __device__ int end(int i) const { return at(i)[0] + at(i)[1]; }  // non-decreasing in i
};

// What a block computes. A is the first pass's axis (x, or y when vertical_first), B the second.
// Ranges are in resized-image coordinates (a0..a1, b0..b1) and source coordinates (sa0.., sb0..).
template <bool kVFirst>
struct Work {
  static constexpr int kA = kVFirst ? kTileY : kTileX;  // block outputs along A
  Source src;
  Axis A, B;
  int a0, a1, b0, b1;
  int sa0, sa1, sb0, sb1;
  int nch;
};

// Shared memory of one block: [hdr: xmin - sa0, count per A output][weights, staged only: one
// uint4 per group of 4 taps and A output (pack_weights4)][stage, staged only: nch x lines x pitch]
// [mid: nch x lines x kA first-pass bytes].
struct Smem {
  int32_t* hdr;
  uint4* w;
  uint8_t* stage;
  uint8_t* mid;
  int lines;  // source lines per chunk
  int pitch;  // stage bytes per line: the span rounded up to words, plus the word a shifted read may touch
  bool staged;
};

// Staged when the weights and at least kMinChunk lines (or the whole B span) of stage + mid fit
// `bytes`; the chunk is then as many lines as fit.
template <bool kVFirst>
__device__ __forceinline__ Smem plan_smem(const Work<kVFirst>& k, uint8_t* base, int64_t bytes) {
  constexpr int kA = Work<kVFirst>::kA;
  const int64_t hdr = 2 * kA * 4, w = int64_t(k.A.ksize + 3) / 4 * kA * 16;
  const int64_t pitch = int64_t(k.sa1 - k.sa0 + 3) / 4 * 4 + 4, lines = k.sb1 - k.sb0;
  Smem s;
  s.hdr = reinterpret_cast<int32_t*>(base);
  s.w = reinterpret_cast<uint4*>(base + hdr);
  s.pitch = 0;
  const int64_t staged_lines = hdr + w < bytes ? (bytes - hdr - w) / (k.nch * (pitch + kA)) : 0;
  s.staged = staged_lines >= kMinChunk || staged_lines >= lines;
  if (s.staged) {
    s.lines = int(staged_lines < lines ? staged_lines : lines);
    s.pitch = int(pitch);
    s.stage = base + hdr + w;
    s.mid = s.stage + int64_t(k.nch) * s.lines * pitch;
  } else {
    const int64_t n = (bytes - hdr) / (k.nch * kA);
    s.lines = int(n < lines ? n : lines);
    s.stage = nullptr;
    s.mid = base + hdr;
  }
  return s;
}

// Up to 4 taps' weights as byte planes, w = hi * 2^16 + md * 2^8 + lo with lo, md unsigned and hi
// signed (Pillow's normalized bicubic weights stay within 1.125 * 2^22 in magnitude, so hi is in
// [-8, 72]), one byte per tap and zeros past n: dp4a then multiplies 4 source bytes at once and
// the three int32 sums recombine exactly (mod 2^32, as Pillow's accumulator).
__device__ __forceinline__ uint4 pack_weights4(const int32_t* w, int n) {
  uint32_t lo = 0, md = 0, hi = 0;
  for (int q = 0; q < 4; ++q) {
    const uint32_t v = q < n ? uint32_t(w[q]) : 0u;
    lo |= (v & 0xffu) << (8 * q);
    md |= (v >> 8 & 0xffu) << (8 * q);
    hi |= (v >> 16 & 0xffu) << (8 * q);
  }
  return make_uint4(lo, md, hi, 0u);
}

// The device instructions; the host branches spell out what they compute.
__device__ __forceinline__ uint32_t dot4_uu(uint32_t px, uint32_t w, uint32_t acc) {  // u8 . u8
#if defined(__CUDA_ARCH__)
  asm("dp4a.u32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(px), "r"(w));
#else
  for (int q = 0; q < 4; ++q) acc += (px >> (8 * q) & 0xffu) * (w >> (8 * q) & 0xffu);
#endif
  return acc;
}
__device__ __forceinline__ int32_t dot4_us(uint32_t px, uint32_t w, int32_t acc) {  // u8 . s8
#if defined(__CUDA_ARCH__)
  asm("dp4a.u32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(px), "r"(w));
#else
  for (int q = 0; q < 4; ++q) acc += int32_t(px >> (8 * q) & 0xffu) * int8_t(w >> (8 * q) & 0xffu);
#endif
  return acc;
}
__device__ __forceinline__ uint32_t bytes4(uint32_t lo, uint32_t hi, int shift) {  // bytes shift/8 .. +3 of hi:lo
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, shift);
#else
  return uint32_t(((uint64_t(hi) << 32) | lo) >> shift);
#endif
}

// Source lines [c0, c0 + n) x the A span into the stage, read along memory rows (coalesced):
// consecutive threads take consecutive x, i.e. consecutive j (A = x) or consecutive lines r (B = x).
template <bool kVFirst>
__device__ __forceinline__ void stage_chunk(const Work<kVFirst>& k, const Smem& s, int c0, int n) {
  const int span = k.sa1 - k.sa0;
  const int inner = kVFirst ? n : span, outer = kVFirst ? span : n;
  const int dq = kThreads / inner, dr = kThreads % inner;
  int i = threadIdx.x % inner, o = threadIdx.x / inner;
  while (o < outer) {
    const int r = kVFirst ? i : o, j = kVFirst ? o : i;
    int32_t px[3];
    k.src.rgb(kVFirst ? k.sa0 + j : c0 + r, kVFirst ? c0 + r : k.sa0 + j, px);
    for (int c = 0; c < k.nch; ++c) s.stage[(c * s.lines + r) * s.pitch + j] = uint8_t(px[c]);
    i += dr, o += dq;  // kThreads elements on, without a division
    if (i >= inner) i -= inner, ++o;
  }
}

// First pass of n staged lines: mid[c][r][a] = clip8(bias + sum_t px * w), Pillow's rounding.
// A thread reads its taps' bytes a word at a time (shifted to its first tap) and multiplies them
// 4 at a time with dp4a; the bytes past its last tap meet zero weights.
template <bool kVFirst>
__device__ __forceinline__ void first_pass_staged(const Work<kVFirst>& k, const Smem& s, int n) {
  constexpr int kA = Work<kVFirst>::kA;
  const int na = k.a1 - k.a0;
  for (int e = threadIdx.x; e < n * na; e += kThreads) {  // dense: edge blocks keep every lane busy
    const int a = e % na, r = e / na;
    const int j0 = s.hdr[a], groups = (s.hdr[kA + a] + 3) / 4, shift = (j0 & 3) * 8;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(s.stage);  // pitch is whole words
    int row[3];  // word index of the first tap's word, per plane
    uint32_t prev[3], lo[3] = {0, 0, 0}, md[3] = {0, 0, 0};
    int32_t hi[3] = {0, 0, 0};
    for (int c = 0; c < 3; ++c) {
      row[c] = (min(c, k.nch - 1) * s.lines + r) * (s.pitch / 4) + (j0 >> 2);
      prev[c] = words[row[c]];
    }
    for (int g = 0; g < groups; ++g) {
      const uint4 w = s.w[g * kA + a];
      for (int c = 0; c < 3; ++c) {
        if (c >= k.nch) continue;
        const uint32_t next = words[row[c] + g + 1], px = bytes4(prev[c], next, shift);
        prev[c] = next;
        lo[c] = dot4_uu(px, w.x, lo[c]);
        md[c] = dot4_uu(px, w.y, md[c]);
        hi[c] = dot4_us(px, w.z, hi[c]);
      }
    }
    for (int c = 0; c < k.nch; ++c) {
      const uint32_t acc = uint32_t(kRoundBias) + (uint32_t(hi[c]) << 16) + (md[c] << 8) + lo[c];
      s.mid[(c * s.lines + r) * kA + a] = clip8(int32_t(acc));
    }
  }
}

// The same from global memory, one tap at a time (spans too wide for shared memory).
template <bool kVFirst>
__device__ __forceinline__ void first_pass_global(const Work<kVFirst>& k, const Smem& s, int c0, int n) {
  constexpr int kA = Work<kVFirst>::kA;
  const int na = k.a1 - k.a0;
  for (int e = threadIdx.x; e < n * na; e += kThreads) {
    const int a = e % na, r = e / na, b = c0 + r;
    const int32_t* tap = k.A.at(k.a0 + a);
    int32_t acc[3] = {kRoundBias, kRoundBias, kRoundBias};
    for (int t = 0; t < tap[1]; ++t) {
      int32_t px[3];
      const int j = tap[0] + t;
      k.src.rgb(kVFirst ? j : b, kVFirst ? b : j, px);
      for (int c = 0; c < 3; ++c) acc[c] += px[c] * tap[2 + t];
    }
    for (int c = 0; c < k.nch; ++c) s.mid[(c * s.lines + r) * kA + a] = clip8(acc[c]);
  }
}

// A thread's output pixels: column tx of the block, rows ty + i * (kThreads / kTileX).
struct Pixels {
  int tx, ty;
  __device__ Pixels() : tx(threadIdx.x % kTileX), ty(threadIdx.x / kTileX) {}
  __device__ int row(int i) const { return ty + i * (kThreads / kTileX); }
};

// The block's pixels in resized-image coordinates: pixel (0, 0) is (y, x), and the resized image
// covers [y0, y1) x [x0, x1) of them (empty: padding only).
struct Window {
  int y, x, y0, y1, x0, x1;
  __device__ bool empty() const { return y0 >= y1 || x0 >= x1; }
  __device__ bool covers(int py, int px) const { return py >= y0 && py < y1 && px >= x0 && px < x1; }
};

// Second pass, partial: adds source lines [c0, c0 + n) of every output's B taps to acc.
template <bool kVFirst>
__device__ __forceinline__ void second_pass(const Work<kVFirst>& k, const Smem& s, const Window& win, int c0, int n,
                                            int32_t (*acc)[3]) {
  constexpr int kA = Work<kVFirst>::kA;
  const Pixels p;
#pragma unroll
  for (int i = 0; i < kPix; ++i) {
    const int y = win.y + p.row(i), x = win.x + p.tx;
    const int a = kVFirst ? y : x, b = kVFirst ? x : y;
    if (a < k.a0 || a >= k.a1 || b < k.b0 || b >= k.b1) continue;
    const int32_t* e = k.B.at(b);
    const int lo = max(e[0], c0), hi = min(e[0] + e[1], c0 + n);
    for (int t = lo; t < hi; ++t) {
      const int32_t w = e[2 + t - e[0]];
      for (int c = 0; c < 3; ++c)
        if (c < k.nch) acc[i][c] += int32_t(s.mid[(c * s.lines + t - c0) * kA + a - k.a0]) * w;
    }
  }
}

// Both passes over the block's B span, chunk by chunk, into acc.
template <bool kVFirst, bool kStaged>
__device__ __forceinline__ void resample_block(const Work<kVFirst>& k, const Smem& s, const Window& win,
                                               int32_t (*acc)[3]) {
  for (int c0 = k.sb0; c0 < k.sb1; c0 += s.lines) {
    const int n = min(s.lines, k.sb1 - c0);
    if constexpr (kStaged) {
      stage_chunk(k, s, c0, n);
      __syncthreads();
      first_pass_staged(k, s, n);
    } else {
      first_pass_global(k, s, c0, n);
    }
    __syncthreads();
    second_pass(k, s, win, c0, n, acc);
    __syncthreads();  // before the next chunk overwrites the stage and mid
  }
}

// Sets up the block's ranges and shared tables, then resamples its pixels into acc.
template <bool kVFirst>
__device__ __forceinline__ void run_block(const ImageDesc& d, const ResizeDesc& rz, const int32_t* taps,
                                          const Window& win, uint8_t* smem, int smem_bytes, int32_t (*acc)[3]) {
  constexpr int kA = Work<kVFirst>::kA;
  Work<kVFirst> k;
  k.src = Source{reinterpret_cast<const uint8_t*>(d.src), d.stride_h, d.stride_w, d.stride_c, d.c};
  const Axis h{taps + rz.taps_h, rz.ksize_h}, v{taps + rz.taps_v, rz.ksize_v};
  k.A = kVFirst ? v : h;
  k.B = kVFirst ? h : v;
  k.a0 = kVFirst ? win.y0 : win.x0, k.a1 = kVFirst ? win.y1 : win.x1;
  k.b0 = kVFirst ? win.x0 : win.y0, k.b1 = kVFirst ? win.x1 : win.y1;
  k.sa0 = k.A.xmin(k.a0), k.sa1 = k.A.end(k.a1 - 1);
  k.sb0 = k.B.xmin(k.b0), k.sb1 = k.B.end(k.b1 - 1);
  k.nch = planes_of(d);
  const Smem s = plan_smem(k, smem, smem_bytes);
  const int na = k.a1 - k.a0;
  for (int a = threadIdx.x; a < na; a += kThreads) {
    const int32_t* e = k.A.at(k.a0 + a);
    s.hdr[a] = e[0] - k.sa0;
    s.hdr[kA + a] = e[1];
  }
  if (s.staged)  // [group][a]: a warp's weight loads are consecutive
    for (int e = threadIdx.x; e < (k.A.ksize + 3) / 4 * na; e += kThreads) {
      const int a = e % na, g = e / na;
      s.w[g * kA + a] = pack_weights4(k.A.at(k.a0 + a) + 2 + 4 * g, min(4, k.A.ksize - 4 * g));
    }
  __syncthreads();
  if (s.staged)
    resample_block<kVFirst, true>(k, s, win, acc);
  else
    resample_block<kVFirst, false>(k, s, win, acc);
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

// Pixels [ty0, ty0 + ny) x [tx0, tx0 + nx) of tile t. The canvas pads the grid resize: its
// offsets are int64 (a plan may describe a canvas larger than int), the window's are not.
__device__ __forceinline__ Window window_of(const TileDesc& t, const ImageDesc& d, const ResizeDesc& rz, int S,
                                            int ty0, int tx0, int ny, int nx) {
  const int64_t y = (t.kind == 0 ? 0 : int64_t(t.row) * S - d.pad_t) + ty0;
  const int64_t x = (t.kind == 0 ? 0 : int64_t(t.col) * S - d.pad_l) + tx0;
  const int64_t y0 = y > 0 ? y : 0, y1 = y + ny < rz.out_h ? y + ny : rz.out_h;
  const int64_t x0 = x > 0 ? x : 0, x1 = x + nx < rz.out_w ? x + nx : rz.out_w;
  if (y0 >= y1 || x0 >= x1) return Window{0, 0, 0, 0, 0, 0};
  return Window{int(y), int(x), int(y0), int(y1), int(x0), int(x1)};  // |y|, |x| < S + 2^24 here
}

// Block (tile, band of kTileY rows, stripe of kTileX columns) of the output.
template <typename out_t>
__global__ void __launch_bounds__(kThreads, 2) anyres_tile_kernel(const ImageDesc* __restrict__ images,
                                                               const TileDesc* __restrict__ tiles,
                                                               const int32_t* __restrict__ taps, int S, int stripes,
                                                               int bands, int smem_bytes, Norm norm,
                                                               out_t* __restrict__ out) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int64_t tile = blockIdx.x / (int64_t(stripes) * bands);
  const int band = int(blockIdx.x / stripes % bands), stripe = int(blockIdx.x % stripes);
  const TileDesc t = tiles[tile];
  if (t.image < 0) return;  // slot left untouched
  const ImageDesc& d = images[t.image];
  const ResizeDesc& rz = t.kind == 0 ? d.whole : d.grid;
  const int ty0 = band * kTileY, tx0 = stripe * kTileX;
  const int ny = min(kTileY, S - ty0), nx = min(kTileX, S - tx0);
  const Window win = window_of(t, d, rz, S, ty0, tx0, ny, nx);
  int32_t acc[kPix][3];
  for (int i = 0; i < kPix; ++i)
    for (int c = 0; c < 3; ++c) acc[i][c] = kRoundBias;
  if (!win.empty()) {
    if (rz.vertical_first)
      run_block<true>(d, rz, taps, win, smem, smem_bytes, acc);
    else
      run_block<false>(d, rz, taps, win, smem, smem_bytes, acc);
  }
  const bool gray = planes_of(d) == 1;
  const int64_t plane = int64_t(S) * S;
  const Pixels p;
#pragma unroll
  for (int i = 0; i < kPix; ++i) {
    const int y = p.row(i), x = p.tx;
    if (y >= ny || x >= nx) continue;
    const bool in = win.covers(win.y + y, win.x + x);
    const int64_t o = tile * 3 * plane + int64_t(ty0 + y) * S + tx0 + x;
    for (int c = 0; c < 3; ++c) {
      const uint8_t v = in ? clip8(gray ? acc[i][0] : acc[i][c]) : 0;
      out[o + c * plane] = tile_value<out_t>(v, norm.mean[c], norm.stdv[c]);
    }
  }
}

}  // namespace

// ---- host launcher (tests/test_anyres_tile_separable.py runs the device code above on the host) ----

// meta: device bytes = [ImageDesc x n_images][TileDesc x num_tiles][int32 taps]; out [num_tiles, 3, S, S].
void launch_anyres_tile(const at::Tensor& meta, int64_t n_images, at::Tensor& out, int64_t tile, const float* mean,
                        const float* stdv) {
  const int64_t num_tiles = out.size(0);
  if (num_tiles == 0 || tile == 0 || n_images == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const uint8_t* base = meta.data_ptr<uint8_t>();
  const auto* images = reinterpret_cast<const ImageDesc*>(base);
  const auto* tiles = reinterpret_cast<const TileDesc*>(base + n_images * sizeof(ImageDesc));
  const auto* taps = reinterpret_cast<const int32_t*>(base + n_images * sizeof(ImageDesc) + num_tiles * sizeof(TileDesc));
  Norm norm;
  for (int c = 0; c < 3; ++c) norm.mean[c] = mean[c], norm.stdv[c] = stdv[c];
  const int stripes = int((tile + kTileX - 1) / kTileX), bands = int((tile + kTileY - 1) / kTileY);
  const int64_t blocks = num_tiles * stripes * bands;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "anyres_tile: too many output tiles for one launch");
  // what the device allows (Turing: 64 KB); less only means smaller chunks
  const int smem = int(std::min<size_t>(kSmemMax, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, out.scalar_type(), "anyres_tile_cuda", [&] {
    const auto kernel = anyres_tile_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<unsigned(blocks), kThreads, smem, stream>>>(
        images, tiles, taps, int(tile), stripes, bands, smem, norm, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace anyres
}  // namespace vlmk
