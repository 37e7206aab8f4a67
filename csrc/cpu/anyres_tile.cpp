// C++ CPU anyres_tile: uint8 images -> normalized (or raw uint8) LLaVA-NeXT tiles, no PIL.
//
// Per image: (1) describe the source as three channel planes with a pixel stride: planar CHW and
// interleaved HWC RGB views are read in place (other layouts, grayscale with odd strides and RGBA
// are converted once, as HF converts them); (2) Pillow-exact separable bicubic resize to the planned
// size and to the S x S global view; both resizes share one staging of the source rows, every pass
// is multithreaded over rows with at::parallel_for and all intermediates are planar; (3) write every
// canvas pixel (resized image or zero padding) straight into its tile, normalized through a
// 256-entry table (or as raw bytes for uint8 output). The per-element math lives in
// common/anyres_resample.h and is shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <algorithm>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <memory>
#include <utility>
#include <vector>

#include "bindings.h"
#include "common/anyres_plan.h"
#include "common/anyres_resample.h"
#include "common/anyres_tile_args.h"
#include "common/check.h"

namespace vlmk {
namespace {
using namespace vlmk::anyres;

using Bytes = std::unique_ptr<uint8_t[]>;
Bytes bytes(int64_t n) { return Bytes(new uint8_t[n]); }  // uninitialised: every byte gets written

// Fixed-point taps of one axis (Pillow's bounds + normalised coefficients).
struct AxisTaps {
  int in, out, ksize;
  std::vector<int32_t> k;
  std::vector<int> xmin, count;
  AxisTaps(int in_size, int out_size) : in(in_size), out(out_size) {
    const AxisScale s = axis_scale(in_size, out_size);
    ksize = s.ksize;
    k.resize(static_cast<size_t>(out_size) * ksize);
    xmin.resize(out_size);
    count.resize(out_size);
    for (int i = 0; i < out_size; ++i) count[i] = tap_weights(s, in_size, i, &k[size_t(i) * ksize], &xmin[i]);
    // For 16-bit multiply-adds (pmaddwd): k = hi * 2^15 + lo with lo in [0, 2^15), hi in [-2^7, 2^7],
    // two taps per int32 (tap t in the low half). Integer sums wrap mod 2^32 like the exact int32
    // sum, so (sum hi) << 15 + (sum lo) is bit-identical to Pillow's accumulator.
    npairs = (ksize + 1) / 2;
    klo.assign(size_t(out_size) * npairs, 0);
    khi.assign(size_t(out_size) * npairs, 0);
    for (int i = 0; i < out_size; ++i)
      for (int t = 0; t < count[i]; ++t) {
        const int32_t v = k[size_t(i) * ksize + t];
        const uint32_t lo = uint32_t(v) & 0x7fffu, hi = uint32_t(v >> 15) & 0xffffu;
        const int shift = (t & 1) * 16;
        klo[size_t(i) * npairs + t / 2] |= int32_t(lo << shift);
        khi[size_t(i) * npairs + t / 2] |= int32_t(hi << shift);
      }
  }
  int npairs = 0;
  std::vector<int32_t> klo, khi;  // tap pairs (see above)
};

// A uint8 RGB image: channel c of pixel (y, x) is ch[c][y * row_stride + x * px_stride]; px_stride
// is 1 (planar / grayscale planes) or 3 (interleaved RGB, ch[c] = base + c).
struct RgbSrc {
  const uint8_t* ch[3];
  int64_t h, w, row_stride, px_stride;
  bool interleaved() const { return px_stride == 3 && ch[1] == ch[0] + 1 && ch[2] == ch[0] + 2; }
};

RgbSrc planar_src(const uint8_t* p, int64_t h, int64_t w) {
  return RgbSrc{{p, p + h * w, p + 2 * h * w}, h, w, w, 1};
}

constexpr int kBlock = 8;  // rows resampled together by the horizontal pass (one SIMD lane each)

// One horizontal-pass output: its taps and where its planar rows go.
struct HTarget {
  const AxisTaps* ax;
  uint8_t* dst;  // channel 0, row 0 = source row 0 of the pass
  int64_t stride, plane;
};

// Tap loop of one channel of a staged block: dst[r * dst_stride + x] for the block's rows r.
void hconv_generic(const uint8_t* sc, const AxisTaps& ax, uint8_t* dst, int64_t dst_stride, int nrows) {
  for (int x = 0; x < ax.out; ++x) {
    const int32_t* k = &ax.k[size_t(x) * ax.ksize];
    const uint8_t* col = sc + int64_t(ax.xmin[x]) * kBlock;
    int32_t acc[kBlock];
    for (int r = 0; r < kBlock; ++r) acc[r] = kRoundBias;
    for (int t = 0; t < ax.count[x]; ++t)
      for (int r = 0; r < kBlock; ++r) acc[r] += int32_t(col[t * kBlock + r]) * k[t];
    for (int r = 0; r < nrows; ++r) dst[r * dst_stride + x] = clip8(acc[r]);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Same arithmetic with AVX2 pmaddwd: per tap pair, 8 rows x 2 taps as 16 int16 (staged columns j
// and j + 1 interleaved per row) times the broadcast (k[t], k[t+1]) halves. A pair may read one
// staged column past the taps; its weight is 0.
__attribute__((target("avx2"))) void hconv_avx2(const uint8_t* sc, const AxisTaps& ax, uint8_t* dst,
                                                int64_t dst_stride, int nrows) {
  const __m256i bias = _mm256_set1_epi32(kRoundBias);
  const __m128i interleave = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  alignas(32) int32_t acc[kBlock];
  for (int x = 0; x < ax.out; ++x) {
    const int32_t* lo = &ax.klo[size_t(x) * ax.npairs];
    const int32_t* hi = &ax.khi[size_t(x) * ax.npairs];
    const uint8_t* col = sc + int64_t(ax.xmin[x]) * kBlock;
    __m256i alo = _mm256_setzero_si256(), ahi = _mm256_setzero_si256();
    const int n = (ax.count[x] + 1) / 2;
    for (int t = 0; t < n; ++t) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(col + t * 2 * kBlock));
      const __m256i w = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(v, interleave));
      alo = _mm256_add_epi32(alo, _mm256_madd_epi16(w, _mm256_set1_epi32(lo[t])));
      ahi = _mm256_add_epi32(ahi, _mm256_madd_epi16(w, _mm256_set1_epi32(hi[t])));
    }
    const __m256i a = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(ahi, 15), alo), bias);
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc), a);
    for (int r = 0; r < nrows; ++r) dst[r * dst_stride + x] = clip8(acc[r]);
  }
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#else
const bool kHasAvx2 = false;
#endif

#if defined(__SSE2__)
// 8 rows of 8 bytes (the low halves of a[0..7]) -> 8 staged columns of 8 bytes (a byte transpose).
inline void transpose8x8(const __m128i* a, uint8_t* out) {
  const __m128i t0 = _mm_unpacklo_epi8(a[0], a[1]), t1 = _mm_unpacklo_epi8(a[2], a[3]);
  const __m128i t2 = _mm_unpacklo_epi8(a[4], a[5]), t3 = _mm_unpacklo_epi8(a[6], a[7]);
  const __m128i u0 = _mm_unpacklo_epi16(t0, t1), u1 = _mm_unpackhi_epi16(t0, t1);
  const __m128i u2 = _mm_unpacklo_epi16(t2, t3), u3 = _mm_unpackhi_epi16(t2, t3);
  __m128i* o = reinterpret_cast<__m128i*>(out);
  _mm_storeu_si128(o + 0, _mm_unpacklo_epi32(u0, u2));
  _mm_storeu_si128(o + 1, _mm_unpackhi_epi32(u0, u2));
  _mm_storeu_si128(o + 2, _mm_unpacklo_epi32(u1, u3));
  _mm_storeu_si128(o + 3, _mm_unpackhi_epi32(u1, u3));
}

// Planar rows: columns [j, j + 8) of 8 rows -> 8 staged columns.
inline void stage_plane8x8(const uint8_t* const* rows, int64_t j, uint8_t* out) {
  __m128i a[kBlock];
  for (int r = 0; r < kBlock; ++r) a[r] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r] + j));
  transpose8x8(a, out);
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// Interleaved RGB rows: pixels [j, j + 8) of 8 rows (24 bytes each) split into R, G, B with two
// byte shuffles per row, then one transpose per channel into stage[c] = out + c * cstride.
__attribute__((target("ssse3"))) void stage_rgb8x8(const uint8_t* const* rows, int64_t j, uint8_t* out,
                                                   int64_t cstride) {
  const __m128i rg_lo = _mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1);
  const __m128i rg_hi = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, -1, -1, -1, -1, -1, 0, 3, 6);
  const __m128i b_lo = _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i b_hi = _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, -1, -1, -1, -1, -1, -1, -1, -1);
  __m128i r8[kBlock], g8[kBlock], b8[kBlock];
  for (int r = 0; r < kBlock; ++r) {
    const uint8_t* px = rows[r] + 3 * j;
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(px));
    const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(px + 16));
    const __m128i rg = _mm_or_si128(_mm_shuffle_epi8(lo, rg_lo), _mm_shuffle_epi8(hi, rg_hi));
    r8[r] = rg;
    g8[r] = _mm_srli_si128(rg, 8);
    b8[r] = _mm_or_si128(_mm_shuffle_epi8(lo, b_lo), _mm_shuffle_epi8(hi, b_hi));
  }
  transpose8x8(r8, out);
  transpose8x8(g8, out + cstride);
  transpose8x8(b8, out + 2 * cstride);
}
const bool kHasSsse3 = __builtin_cpu_supports("ssse3");
#endif

// Rows [y, y + nrows) of src staged column-major per channel: stage[c][j][r] (rows past nrows
// repeat the last one), so the tap loop runs over 8 independent rows with a broadcast weight.
void stage_block(const RgbSrc& s, int64_t y, int nrows, uint8_t* stage) {
  const int64_t cstride = s.w * kBlock;
  int64_t j0 = 0;  // columns [0, j0) of every channel staged by a SIMD path
#if defined(__x86_64__) && defined(__GNUC__)
  if (s.interleaved() && kHasSsse3) {
    const uint8_t* rows[kBlock];
    for (int r = 0; r < kBlock; ++r) rows[r] = s.ch[0] + (y + std::min(r, nrows - 1)) * s.row_stride;
    for (; j0 + 8 <= s.w; j0 += 8) stage_rgb8x8(rows, j0, stage + j0 * kBlock, cstride);
  }
#endif
  for (int c = 0; c < 3; ++c) {
    const uint8_t* rows[kBlock];
    for (int r = 0; r < kBlock; ++r) rows[r] = s.ch[c] + (y + std::min(r, nrows - 1)) * s.row_stride;
    uint8_t* sc = stage + int64_t(c) * cstride;
    int64_t j = j0;
#if defined(__SSE2__)
    if (s.px_stride == 1)
      for (; j + 8 <= s.w; j += 8) stage_plane8x8(rows, j, sc + j * kBlock);
#endif
    const int64_t ps = s.px_stride;
    for (int r = 0; r < kBlock; ++r)
      for (int64_t jj = j; jj < s.w; ++jj) sc[jj * kBlock + r] = rows[r][jj * ps];
  }
}

// Rows [0, src.h) of src through the horizontal pass of every target (planar outputs).
void hpass(const RgbSrc& src, const std::vector<HTarget>& targets) {
  const int64_t blocks = (src.h + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    Bytes stage = bytes(int64_t(3) * src.w * kBlock + 2 * kBlock);  // + the pair over-read
    std::memset(stage.get() + int64_t(3) * src.w * kBlock, 0, 2 * kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t y = b * kBlock;
      const int nrows = int(std::min<int64_t>(kBlock, src.h - y));
      stage_block(src, y, nrows, stage.get());
      for (const HTarget& t : targets)
        for (int c = 0; c < 3; ++c) {
          const uint8_t* sc = stage.get() + int64_t(c) * src.w * kBlock;
          uint8_t* dst = t.dst + c * t.plane + y * t.stride;
          if (kHasAvx2)
            hconv_avx2(sc, *t.ax, dst, t.stride, nrows);
          else
            hconv_generic(sc, *t.ax, dst, t.stride, nrows);
        }
    }
  });
}

__attribute__((target_clones("avx2", "default")))
void vpass_row(const uint8_t* src, int64_t src_stride, int64_t n, const int32_t* k, int count, int32_t* acc,
               uint8_t* dst) {
  for (int64_t i = 0; i < n; ++i) acc[i] = kRoundBias;
  for (int t = 0; t < count; ++t) {
    const uint8_t* row = src + t * src_stride;
    const int32_t w = k[t];
    for (int64_t i = 0; i < n; ++i) acc[i] += int32_t(row[i]) * w;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = clip8(acc[i]);
}

// Vertical resample of `nplanes` planes of rows of n bytes; tap indices are relative to src row
// `row0` (the first row the planes hold).
void vpass(const uint8_t* const* planes, int nplanes, int64_t src_stride, int64_t n, int64_t row0,
           const AxisTaps& ax, uint8_t* dst, int64_t dst_stride, int64_t dst_plane) {
  at::parallel_for(0, ax.out, 4, [&](int64_t y0, int64_t y1) {
    std::vector<int32_t> acc(n);
    for (int64_t y = y0; y < y1; ++y)
      for (int p = 0; p < nplanes; ++p)
        vpass_row(planes[p] + (ax.xmin[y] - row0) * src_stride, src_stride, n, &ax.k[size_t(y) * ax.ksize],
                  ax.count[y], acc.data(), dst + p * dst_plane + y * dst_stride);
  });
}

// Any RgbSrc -> planar [3][h][w].
void to_planar(const RgbSrc& s, uint8_t* out) {
  at::parallel_for(0, s.h, 16, [&](int64_t y0, int64_t y1) {
    for (int c = 0; c < 3; ++c)
      for (int64_t y = y0; y < y1; ++y) {
        const uint8_t* row = s.ch[c] + y * s.row_stride;
        uint8_t* d = out + (c * s.h + y) * s.w;
        for (int64_t x = 0; x < s.w; ++x) d[x] = row[x * s.px_stride];
      }
  });
}

// Source rows resampled vertically (oh rows, full width) into a new source of the same layout.
RgbSrc vpass_src(const RgbSrc& src, const AxisTaps& vt, Bytes& tmp) {
  const int64_t oh = vt.out, w = src.w;
  tmp = bytes(oh * w * 3);
  if (src.interleaved()) {  // the vertical pass ignores channels: one plane of 3w-byte rows
    vpass(src.ch, 1, src.row_stride, w * 3, 0, vt, tmp.get(), w * 3, 0);
    return RgbSrc{{tmp.get(), tmp.get() + 1, tmp.get() + 2}, oh, w, w * 3, 3};
  }
  vpass(src.ch, 3, src.row_stride, w, 0, vt, tmp.get(), w, oh * w);
  return planar_src(tmp.get(), oh, w);
}

// Pillow-exact bicubic resizes of one RGB image to several sizes, each planar [3][oh][ow].
// Resizes whose first pass is horizontal share one staged horizontal pass over the source.
std::vector<Bytes> resize_rgb(const RgbSrc& src, const std::vector<std::pair<int64_t, int64_t>>& sizes) {
  const size_t n = sizes.size();
  std::vector<Bytes> outs(n);
  std::vector<std::unique_ptr<AxisTaps>> htaps(n), vtaps(n);
  std::vector<Bytes> tmps(n);
  std::vector<HTarget> shared;
  int64_t lo = src.h, hi = 0;  // source rows the shared horizontal pass must cover
  std::vector<char> h_first(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t oh = sizes[i].first, ow = sizes[i].second;
    outs[i] = bytes(oh * ow * 3);
    const bool need_h = ow != src.w, need_v = oh != src.h;
    if (need_h) htaps[i] = std::make_unique<AxisTaps>(int(src.w), int(ow));
    if (need_v) vtaps[i] = std::make_unique<AxisTaps>(int(src.h), int(oh));
    if (need_h && !(need_v && vertical_first(int(src.h), int(src.w), int(oh), int(ow)))) {
      h_first[i] = 1;
      // like Pillow, only the source rows the vertical pass reads
      const int64_t first = need_v ? vtaps[i]->xmin[0] : 0;
      const int64_t last = need_v ? vtaps[i]->xmin[oh - 1] + vtaps[i]->count[oh - 1] : src.h;
      lo = std::min(lo, first);
      hi = std::max(hi, last);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (!h_first[i]) continue;
    const int64_t oh = sizes[i].first, ow = sizes[i].second;
    if (vtaps[i]) {
      tmps[i] = bytes((hi - lo) * ow * 3);
      shared.push_back(HTarget{htaps[i].get(), tmps[i].get(), ow, (hi - lo) * ow});
    } else {  // lo == 0 here: this target needs every source row
      shared.push_back(HTarget{htaps[i].get(), outs[i].get() + lo * ow, ow, oh * ow});
    }
  }
  if (!shared.empty()) {
    RgbSrc rows = src;
    for (auto& p : rows.ch) p += lo * src.row_stride;
    rows.h = hi - lo;
    hpass(rows, shared);
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t oh = sizes[i].first, ow = sizes[i].second;
    uint8_t* out = outs[i].get();
    if (h_first[i]) {
      if (vtaps[i]) {
        const RgbSrc t = planar_src(tmps[i].get(), hi - lo, ow);
        vpass(t.ch, 3, ow, ow, lo, *vtaps[i], out, ow, oh * ow);
      }
    } else if (htaps[i]) {  // vertical first (Pillow >= 13 rule), then horizontal
      Bytes tmp;
      const RgbSrc v = vpass_src(src, *vtaps[i], tmp);
      hpass(v, {HTarget{htaps[i].get(), out, ow, oh * ow}});
    } else if (vtaps[i]) {
      if (src.px_stride == 1) {
        vpass(src.ch, 3, src.row_stride, ow, 0, *vtaps[i], out, ow, oh * ow);
      } else {
        Bytes tmp;
        to_planar(vpass_src(src, *vtaps[i], tmp), out);
      }
    } else {
      to_planar(src, out);
    }
  }
  return outs;
}

// Any uint8 [H, W, C] view -> an RgbSrc, converted as HF converts (gray -> RGB, RGBA composited
// onto white). Planar 3-channel and grayscale views with unit pixel stride and interleaved RGB
// rows are read in place; anything else is converted once into interleaved `storage`.
RgbSrc make_src(const at::Tensor& im, Bytes& storage) {
  const int64_t h = im.size(0), w = im.size(1), c = im.size(2);
  const int64_t sh = im.stride(0), sw = im.stride(1), sc = im.stride(2);
  const uint8_t* p = im.data_ptr<uint8_t>();
  if (c == 3 && sc == 1 && sw == 3) return RgbSrc{{p, p + 1, p + 2}, h, w, sh, 3};
  if (c == 3 && sw == 1) return RgbSrc{{p, p + sc, p + 2 * sc}, h, w, sh, 1};
  if (c == 1 && sw == 1) return RgbSrc{{p, p, p}, h, w, sh, 1};
  storage = bytes(h * w * 3);
  uint8_t* q = storage.get();
  at::parallel_for(0, h, 16, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      const uint8_t* s = p + y * sh;
      uint8_t* d = q + y * w * 3;
      // one loop per case so that each inner loop is branch-free
      if (c == 1) {
        for (int64_t x = 0; x < w; ++x) d[3 * x] = d[3 * x + 1] = d[3 * x + 2] = s[x * sw];
      } else if (c == 3) {
        const uint8_t *r = s, *g = s + sc, *b = s + 2 * sc;
        for (int64_t x = 0; x < w; ++x) {
          d[3 * x] = r[x * sw];
          d[3 * x + 1] = g[x * sw];
          d[3 * x + 2] = b[x * sw];
        }
      } else {
        for (int64_t x = 0; x < w; ++x) {
          const uint8_t* px = s + x * sw;
          const uint8_t a = px[3 * sc];
          for (int k = 0; k < 3; ++k) d[3 * x + k] = composite_white(px[k * sc], a);
        }
      }
    }
  });
  return RgbSrc{{q, q + 1, q + 2}, h, w, w * 3, 3};
}

// Planar canvas (rows*S x cols*S) -> tiles [first, first + rows*cols), row-major; pixels outside
// the resized image at (pad_t, pad_l) are zero (black) before normalization. `lut` maps a byte of
// channel c to its output value (identity for uint8 output).
template <typename out_t>
void emit_tiles(const uint8_t* img, int64_t ih, int64_t iw, int64_t pad_t, int64_t pad_l, int64_t rows,
                int64_t cols, int64_t S, const out_t (*lut)[256], out_t* out) {
  const int64_t canvas_h = rows * S;
  at::parallel_for(0, canvas_h, 16, [&](int64_t y0, int64_t y1) {
    for (int64_t cy = y0; cy < y1; ++cy) {
      const int64_t r = cy / S, yy = cy % S, sy = cy - pad_t;
      const bool row_in = sy >= 0 && sy < ih;
      for (int64_t tc = 0; tc < cols; ++tc) {
        // columns [x0, x1) of this tile row come from the image, the rest is padding
        const int64_t x0 = row_in ? std::clamp<int64_t>(pad_l - tc * S, 0, S) : S;
        const int64_t x1 = row_in ? std::clamp<int64_t>(pad_l + iw - tc * S, x0, S) : S;
        const int64_t shift = tc * S - pad_l;  // image column of tile column xx is xx + shift
        for (int c = 0; c < 3; ++c) {
          out_t* o = out + (((r * cols + tc) * 3 + c) * S + yy) * S;
          const out_t* l = lut[c];
          const out_t pad = l[0];
          for (int64_t xx = 0; xx < x0; ++xx) o[xx] = pad;
          if (x1 > x0) {
            const uint8_t* s = img + (c * ih + sy) * iw + shift;
            if constexpr (std::is_same_v<out_t, uint8_t>)
              std::memcpy(o + x0, s + x0, x1 - x0);
            else
              for (int64_t xx = x0; xx < x1; ++xx) o[xx] = l[s[xx]];
          }
          for (int64_t xx = x1; xx < S; ++xx) o[xx] = pad;
        }
      }
    }
  });
}

void anyres_tile_cpu(const std::vector<at::Tensor>& images, const at::Tensor& plan, at::Tensor out,
                     int64_t tile, const std::vector<double>& mean, const std::vector<double>& stdv,
                     bool global_view) {
  const TileArgs a = check_tile_args(images, plan, out, tile, mean, stdv, global_view);
  VLMK_CHECK_ARG(out.device().is_cpu(), "out must be a CPU tensor for the cpu backend");
  const int64_t* p = plan.data_ptr<int64_t>();
  const int64_t tile_elems = 3 * tile * tile;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, out.scalar_type(), "anyres_tile_cpu", [&] {
    // uint8 output: the raw tile bytes (mean/std ignored); else the exact normalized values
    scalar_t lut[3][256];
    for (int c = 0; c < 3; ++c)
      for (int v = 0; v < 256; ++v) {
        if constexpr (std::is_same_v<scalar_t, uint8_t>)
          lut[c][v] = uint8_t(v);
        else
          lut[c][v] = static_cast<scalar_t>(normalize_u8(uint8_t(v), a.mean[c], a.stdv[c]));
      }
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < a.n; ++i) {
      const int64_t* r = p + i * kPlanCols;
      Bytes storage;
      const RgbSrc src = make_src(images[i], storage);
      scalar_t* dst = o + r[kFirst] * tile_elems;
      std::vector<std::pair<int64_t, int64_t>> sizes{{r[kResH], r[kResW]}};
      if (global_view) sizes.emplace_back(tile, tile);
      std::vector<Bytes> res = resize_rgb(src, sizes);
      if (global_view) {
        emit_tiles<scalar_t>(res[1].get(), tile, tile, 0, 0, 1, 1, tile, lut, dst);
        dst += tile_elems;
      }
      emit_tiles<scalar_t>(res[0].get(), r[kResH], r[kResW], r[kPadT], r[kPadL], r[kRows], r[kCols], tile, lut, dst);
    }
  });
}

// sizes [n, 2] (H, W), pins [m, 2] (H, W) -> int64 [n, 10] (see schemas.py anyres_plan_llava).
at::Tensor anyres_plan_llava_cpu(const at::Tensor& sizes, const at::Tensor& pins, int64_t tile) {
  VLMK_CHECK_TYPE(sizes.scalar_type() == at::kLong && pins.scalar_type() == at::kLong,
                  "sizes and pinpoints must be int64");
  VLMK_CHECK_ARG(sizes.dim() == 2 && sizes.size(1) == 2, "sizes must be [n, 2], got ", sizes.sizes());
  VLMK_CHECK_ARG(pins.dim() == 2 && pins.size(1) == 2 && pins.size(0) > 0,
                 "pinpoints must be a non-empty [m, 2], got ", pins.sizes());
  VLMK_CHECK_ARG(tile > 0, "tile_size must be positive, got ", tile);
  const at::Tensor s = sizes.cpu().contiguous(), q = pins.cpu().contiguous();
  const int64_t n = s.size(0), m = q.size(0);
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* qp = q.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)
    VLMK_CHECK_ARG(qp[2 * i] > 0 && qp[2 * i + 1] > 0, "pinpoints must be positive, got ", qp[2 * i], "x", qp[2 * i + 1]);
  for (int64_t i = 0; i < n; ++i)
    VLMK_CHECK_ARG(sp[2 * i] > 0 && sp[2 * i + 1] > 0, "image sizes must be positive, got ", sp[2 * i], "x", sp[2 * i + 1]);
  at::Tensor out = at::empty({n, 10}, s.options());
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const LlavaPlan pl = llava_plan(sp[2 * i], sp[2 * i + 1], qp, m, tile);
      const int64_t row[10] = {pl.best_h, pl.best_w, pl.resized_h, pl.resized_w, pl.pad_l,
                               pl.pad_t,  pl.pad_r,  pl.pad_b,     pl.rows,     pl.cols};
      std::memcpy(op + i * 10, row, sizeof(row));
    }
  });
  return out;
}

}  // namespace
}  // namespace vlmk

VLMK_BINDINGS(anyres_tile_cpu) {
  m.def("anyres_tile_cpu", &vlmk::anyres_tile_cpu, "uint8 images -> normalized AnyRes tiles (writes out)",
        pybind11::arg("images"), pybind11::arg("plan"), pybind11::arg("out"), pybind11::arg("tile_size"),
        pybind11::arg("mean"), pybind11::arg("std"), pybind11::arg("global_view"));
  m.def("anyres_plan_llava_cpu", &vlmk::anyres_plan_llava_cpu, "LLaVA AnyRes plans for many image sizes",
        pybind11::arg("sizes"), pybind11::arg("pinpoints"), pybind11::arg("tile_size"));
}
