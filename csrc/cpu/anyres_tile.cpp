// C++ CPU anyres_tile: uint8 images -> normalized (or raw uint8) LLaVA-NeXT tiles, no PIL.
//
// Per image: (1) describe the source as three channel planes with a pixel stride: planar CHW and
// interleaved HWC RGB views are read in place, also when the image comes as several row runs (the
// plan's parts: e.g. a large PIL image's separate memory blocks, read through a row pointer table;
// other layouts, grayscale with odd strides and RGBA are converted once, as HF converts them); (2) Pillow-exact separable bicubic resizes to the
// planned size and to the S x S global view. The usual case (horizontal pass, then vertical) is
// streamed: each thread sweeps its source rows once through both horizontal passes into small
// per-target rings and, as soon as an output row's taps are there, runs its vertical pass,
// normalizes it and writes it into its tiles (padding is written as normalize(0)); so neither
// the horizontal-pass output nor the resized image ever exists in full. The rarer orders (Pillow
// >= 13's vertical-first rule, one axis, a copy) produce a planar image that is then written.
// Multi-MB buffers live in per-thread scratch that outlives the call (fresh ones cost page faults).
// The per-element math is in common/anyres_resample.h (shared with the CUDA kernel) and the SIMD
// loops in cpu/anyres_simd.h (AVX2) and cpu/anyres_simd512.h (AVX-512 VNNI).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/anyres_plan.h"
#include "common/anyres_resample.h"
#include "common/anyres_tile_args.h"
#include "common/check.h"
#include "cpu/anyres_simd.h"
#include "cpu/anyres_simd512.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {
using namespace vlmk::anyres;

#if VLMK_X86
// VLMKERNELS_CPU_SIMD (read at load): "0" runs the portable loops that non-x86 builds run and
// "avx2" stops at the AVX2 loops, so that the tests check every path on an AVX-512 machine too.
const char* const kSimdEnv = std::getenv("VLMKERNELS_CPU_SIMD");
const bool kSimd = !(kSimdEnv && std::strcmp(kSimdEnv, "0") == 0);
const bool kHasAvx2 = kSimd && __builtin_cpu_supports("avx2");
const bool kHasSsse3 = kSimd && __builtin_cpu_supports("ssse3");
const bool kHasFma = kSimd && __builtin_cpu_supports("fma");
const bool kHasAvx512 = kHasAvx2 && !(kSimdEnv && std::strcmp(kSimdEnv, "avx2") == 0) &&
                        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
constexpr bool kHasAvx2 = false;
#endif

// ---- per-thread scratch -------------------------------------------------------------------------

// Slots: one buffer per (thread, slot), grown on demand and kept between calls up to kKeepBytes.
enum Slot : int { kSrcCopy, kVFirst, kResized0, kResized1, kStage, kRow, kRing0, kRing1, kSlots };
constexpr int64_t kKeepBytes = int64_t(16) << 20;  // a 4032x3024 image needs ~6 MB; huge ones are freed

struct ScratchPool {
  std::array<std::unique_ptr<uint8_t[]>, kSlots> buf;
  std::array<int64_t, kSlots> cap{};
};
ScratchPool& scratch_pool() {
  thread_local ScratchPool p;
  return p;
}

// A buffer of n bytes from this thread's slot (a slot is used by one Scratch at a time).
class Scratch {
 public:
  Scratch(Slot slot, int64_t n) : slot_(slot), n_(n) {
    ScratchPool& p = scratch_pool();
    if (p.cap[slot] < n) p.buf[slot].reset(new uint8_t[n]), p.cap[slot] = n;
    ptr_ = p.buf[slot].get();
  }
  ~Scratch() {
    ScratchPool& p = scratch_pool();
    if (n_ > kKeepBytes) p.buf[slot_].reset(), p.cap[slot_] = 0;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  uint8_t* get() const { return ptr_; }

 private:
  Slot slot_;
  int64_t n_;
  uint8_t* ptr_;
};

// A uint8 RGB image: channel c of pixel (y, x) is row(c, y)[x * px_stride]; px_stride is 1 (planar
// / grayscale planes), 3 (interleaved RGB, ch[c] = base + c) or 4 (Pillow's RGBX pixels,
// vlmkernels/anyres/pil.py: the 4th byte is read, never used). Rows are row_stride apart, or, for
// an image held in several row runs (e.g. a large PIL image: Pillow's separate memory blocks), at
// the pointers of `rows` (row y's channel 0; channel c at the same offset ch[c] - ch[0] as row 0).
struct RgbSrc {
  const uint8_t* ch[3];
  int64_t h, w, row_stride, px_stride;
  const uint8_t* const* rows = nullptr;
  const uint8_t* row(int c, int64_t y) const { return rows ? rows[y] + (ch[c] - ch[0]) : ch[c] + y * row_stride; }
  // rows [y, h) of this image
  RgbSrc from_row(int64_t y) const {
    RgbSrc s = *this;
    s.h -= y;
    if (rows)
      s.rows += y;
    else
      for (auto& p : s.ch) p += y * row_stride;
    return s;
  }
  bool packed() const { return ch[1] == ch[0] + 1 && ch[2] == ch[0] + 2; }
  bool interleaved() const { return px_stride == 3 && packed(); }
  bool rgbx() const { return px_stride == 4 && packed(); }
};

RgbSrc planar_src(const uint8_t* p, int64_t h, int64_t w) {
  return RgbSrc{{p, p + h * w, p + 2 * h * w}, h, w, w, 1};
}

// One horizontal-pass output: its taps and where its planar rows go.
struct HTarget {
  const AxisTaps* ax;
  uint8_t* dst;  // channel 0, row 0 = source row 0 of the pass
  int64_t stride, plane;
};

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

// The same for RGBX rows (32 bytes per 8 pixels): one shuffle per 4 pixels groups R, G, B, X.
__attribute__((target("ssse3"))) void stage_rgbx8x8(const uint8_t* const* rows, int64_t j, uint8_t* out,
                                                    int64_t cstride) {
  const __m128i split = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m128i r8[kBlock], g8[kBlock], b8[kBlock];
  for (int r = 0; r < kBlock; ++r) {
    const uint8_t* px = rows[r] + 4 * j;
    const __m128i lo = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(px)), split);
    const __m128i hi = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(px + 16)), split);
    const __m128i rg = _mm_unpacklo_epi32(lo, hi);  // R0-3 R4-7 G0-3 G4-7
    r8[r] = rg;
    g8[r] = _mm_srli_si128(rg, 8);
    b8[r] = _mm_unpackhi_epi32(lo, hi);  // B0-3 B4-7 X0-3 X4-7
  }
  transpose8x8(r8, out);
  transpose8x8(g8, out + cstride);
  transpose8x8(b8, out + 2 * cstride);
}
#endif

// Rows [y, y + nrows) of src staged column-major per channel: stage[c][j][r] (rows past nrows
// repeat the last one), so the tap loop runs over 8 independent rows with a broadcast weight.
void stage_block(const RgbSrc& s, int64_t y, int nrows, uint8_t* stage) {
  const int64_t cstride = s.w * kBlock;
  int64_t j0 = 0;  // columns [0, j0) of every channel staged by a SIMD path
#if defined(__x86_64__) && defined(__GNUC__)
  if ((s.interleaved() || s.rgbx()) && kHasSsse3) {
    const uint8_t* rows[kBlock];
    for (int r = 0; r < kBlock; ++r) rows[r] = s.row(0, y + std::min(r, nrows - 1));
    const auto stage8 = s.rgbx() ? stage_rgbx8x8 : stage_rgb8x8;
    for (; j0 + 8 <= s.w; j0 += 8) stage8(rows, j0, stage + j0 * kBlock, cstride);
  }
#endif
  for (int c = 0; c < 3; ++c) {
    const uint8_t* rows[kBlock];
    for (int r = 0; r < kBlock; ++r) rows[r] = s.row(c, y + std::min(r, nrows - 1));
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

// Rows one horizontal step resamples: kBlocks staged 8-row blocks.
constexpr int64_t kStep = kBlocks * kBlock;

// A thread's staging area for horizontal passes over rows of width w: kBlocks staged 8-row blocks,
// then one channel of each as tap pairs (AVX2) or of each two as 16-row column quads (AVX-512),
// each followed by the pairs or quads that zero weights may read (see hconv_column).
class HStage {
 public:
  HStage(int64_t w, const HTarget* targets, size_t n) : w_(w), stage_bytes_(3 * w * kBlock) {
    int spare = 1;  // pairs or quads that zero weights may read past the widened ones
    for (size_t i = 0; i < n; ++i) spare = std::max({spare, targets[i].ax->maxpairs + 1, targets[i].ax->maxquads + 1});
    pstride_ = (w + 1) / 2 + spare;
    qstride_ = (w + 3) / 4 + spare;
    const int64_t area = std::max(16 * kBlocks * pstride_, 64 * 2 * qstride_);
    buf_.emplace(kStage, kBlocks * stage_bytes_ + kTail + 64 + area);
    std::memset(buf_->get() + kBlocks * stage_bytes_, 0, kTail);
    const uintptr_t end = reinterpret_cast<uintptr_t>(buf_->get() + kBlocks * stage_bytes_ + kTail);
    pairs_ = reinterpret_cast<uint8_t*>((end + 63) & ~uintptr_t(63));
#if VLMK_X86
    if (kHasAvx512)  // the quads zero weights read past the filled ones (0 * x = 0, but defined)
      for (int b = 0; b < 2; ++b)
        std::memset(pairs_ + 64 * (b * qstride_ + (w + 3) / 4), 0, 64 * (qstride_ - (w + 3) / 4));
#endif
  }

  // Source rows [y, y + kStep) (fewer at the end) through every target's horizontal pass; target
  // t's row y + r goes to t.dst + c * t.plane + r * t.stride.
  void run(const RgbSrc& src, int64_t y, const HTarget* targets, size_t n) {
    uint8_t* staged[kBlocks];
    int nrows[kBlocks];
    int nb = 0;  // blocks with rows
#if VLMK_X86
    const bool direct = kHasAvx2 && !kHasAvx512 && src.px_stride == 1;  // planar rows widen straight to pairs
#else
    const bool direct = false;
#endif
    for (int i = 0; i < kBlocks; ++i) {
      staged[i] = buf_->get() + i * stage_bytes_;
      nrows[i] = int(std::clamp<int64_t>(src.h - y - i * kBlock, 0, kBlock));
      if (nrows[i] > 0) {
        if (!direct) stage_block(src, y + i * kBlock, nrows[i], staged[i]);
        ++nb;
      }
    }
#if VLMK_X86
    if (kHasAvx512) return run512(staged, nrows, targets, n);
#endif
    for (int c = 0; c < 3; ++c) {
#if VLMK_X86
      if (kHasAvx2) {
        __m128i* pairs = reinterpret_cast<__m128i*>(pairs_);
        const __m128i* p[kBlocks];
        // a last odd column's pair reads the next staged byte (the next channel's or block's
        // first column, or the zeroed tail), only ever met by a weight of 0. Blocks past the
        // image reuse block 0's pairs (computed, not stored).
        for (int i = 0; i < kBlocks; ++i) {
          p[i] = i < nb ? pairs + i * pstride_ : pairs;
          if (i >= nb) continue;
          if (direct) {
            const uint8_t* rows[kBlock];
            for (int r = 0; r < kBlock; ++r)
              rows[r] = src.row(c, y + i * kBlock + std::min(r, nrows[i] - 1));
            widen_rows(rows, w_, pairs + i * pstride_);
          } else {
            widen_pairs(staged[i] + c * w_ * kBlock, w_, pairs + i * pstride_);
          }
        }
        for (size_t t = 0; t < n; ++t)
          hconv_avx2(p, *targets[t].ax, targets[t].dst + c * targets[t].plane, targets[t].stride, nrows);
        continue;
      }
#endif
      for (int i = 0; i < nb; ++i)
        for (size_t t = 0; t < n; ++t)
          hconv_scalar(staged[i] + c * w_ * kBlock, *targets[t].ax,
                       targets[t].dst + c * targets[t].plane + i * kBlock * targets[t].stride, targets[t].stride,
                       nrows[i]);
    }
  }

 private:
  static constexpr int64_t kTail = 4 * kBlock;  // zeroed bytes after the staged blocks (read past w)

#if VLMK_X86
  // The horizontal passes of the staged blocks as two 16-row blocks of column quads.
  void run512(uint8_t* const* staged, const int* nrows, const HTarget* targets, size_t n) {
    static_assert(kBlocks == 2 * kBlock16 / kBlock, "two 16-row blocks per step");
    __m512i* quads = reinterpret_cast<__m512i*>(pairs_);
    int rows16[2];
    for (int b = 0; b < 2; ++b) rows16[b] = nrows[2 * b] + nrows[2 * b + 1];
    for (int c = 0; c < 3; ++c) {
      const __m512i* q[2];
      for (int b = 0; b < 2; ++b) {
        q[b] = quads + (rows16[b] > 0 ? b * qstride_ : 0);  // an empty block reuses block 0's quads
        if (rows16[b] == 0) continue;
        const uint8_t* lo = staged[2 * b] + c * w_ * kBlock;
        const uint8_t* hi = nrows[2 * b + 1] > 0 ? staged[2 * b + 1] + c * w_ * kBlock : lo;
        quads_from_staged(lo, hi, w_, quads + b * qstride_);
      }
      for (size_t t = 0; t < n; ++t)
        hconv512(q, *targets[t].ax, targets[t].dst + c * targets[t].plane, targets[t].stride, rows16);
    }
  }
#endif

  int64_t w_, stage_bytes_, pstride_ = 0, qstride_ = 0;
  std::optional<Scratch> buf_;
  uint8_t* pairs_ = nullptr;  // tap pairs of 16 bytes or quads of 64, 64-byte aligned in buf_
};

// Rows [0, src.h) of src through the horizontal pass of every target (planar outputs).
void hpass(const RgbSrc& src, const std::vector<HTarget>& targets) {
  const int64_t blocks = (src.h + kStep - 1) / kStep;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    HStage stage(src.w, targets.data(), targets.size());
    std::vector<HTarget> at_y(targets);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t y = b * kStep;
      for (size_t t = 0; t < targets.size(); ++t) at_y[t].dst = targets[t].dst + y * targets[t].stride;
      stage.run(src, y, at_y.data(), at_y.size());
    }
  });
}

// Output row y of a vertical pass from its tap rows (row t of the taps at rows[t]).
inline void vconv_rows(const uint8_t* const* rows, int64_t n, const AxisTaps& ax, int64_t y, uint8_t* dst) {
  const int32_t* k = &ax.k[size_t(y) * ax.ksize];
#if VLMK_X86
  if (kHasAvx512) return vconv_rows512(rows, n, ax, y, dst);
  if (kHasAvx2) return vconv_rows_avx2(rows, n, k, ax.count[y], dst);
#endif
  vconv_rows_scalar(rows, 0, n, k, ax.count[y], dst);
}

// The same with the tap rows of channel c of src (or, with an interleaved src, of whole pixels).
inline void vconv_row(const RgbSrc& src, int c, int64_t n, const AxisTaps& ax, int64_t y, uint8_t* dst) {
  thread_local std::vector<const uint8_t*> rows;
  rows.resize(size_t(ax.count[y]));
  for (int t = 0; t < ax.count[y]; ++t) rows[t] = src.row(c, ax.xmin[y] + t);
  vconv_rows(rows.data(), n, ax, y, dst);
}

// Vertical resample of rows of n bytes: of channels [0, nplanes) of src (nplanes = 1 with an
// interleaved src: whole pixel rows).
void vpass(const RgbSrc& src, int nplanes, int64_t n, const AxisTaps& ax, uint8_t* dst, int64_t dst_stride,
           int64_t dst_plane) {
  at::parallel_for(0, ax.out, 4, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y)
      for (int p = 0; p < nplanes; ++p) vconv_row(src, p, n, ax, y, dst + p * dst_plane + y * dst_stride);
  });
}

// Any RgbSrc -> planar [3][h][w].
void to_planar(const RgbSrc& s, uint8_t* out) {
  at::parallel_for(0, s.h, 16, [&](int64_t y0, int64_t y1) {
    for (int c = 0; c < 3; ++c)
      for (int64_t y = y0; y < y1; ++y) {
        const uint8_t* row = s.row(c, y);
        uint8_t* d = out + (c * s.h + y) * s.w;
        for (int64_t x = 0; x < s.w; ++x) d[x] = row[x * s.px_stride];
      }
  });
}

// Tap tables by (in, out) size: images of a dataset repeat a few sizes, and building a table costs
// two bicubic evaluations per tap. Bounded: cleared when full.
std::shared_ptr<const AxisTaps> axis_taps(int in, int out) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, std::shared_ptr<const AxisTaps>> cache;
  constexpr size_t kMaxEntries = 64;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find({in, out});
    if (it != cache.end()) return it->second;
  }
  auto taps = std::make_shared<const AxisTaps>(in, out);
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() >= kMaxEntries) cache.clear();
  cache.emplace(std::make_pair(in, out), taps);
  return taps;
}

// ---- resize plans ---------------------------------------------------------------------------------

// One resized image (oh x ow) as planar bytes, for the cases the streamed path does not cover.
struct ResizedRows {
  int64_t oh = 0, ow = 0;
  const uint8_t* planar = nullptr;
  const uint8_t* row(int c, int64_t y) const { return planar + (c * oh + y) * ow; }
};

// Does Pillow resize (in_h, in_w) -> (oh, ow) horizontally first and then vertically? That case
// (nearly every AnyRes resize) is streamed (stream_targets); the rest goes through Resizer.
bool streamed(int64_t in_h, int64_t in_w, int64_t oh, int64_t ow) {
  return ow != in_w && oh != in_h && !vertical_first(int(in_h), int(in_w), int(oh), int(ow));
}

// Pillow-exact bicubic resizes of one RGB image to planar images, for the sizes that are not
// streamed (entries without `planar` for those): vertical first, one axis only, or a plain copy.
class Resizer {
 public:
  Resizer(const RgbSrc& src, const std::vector<std::pair<int64_t, int64_t>>& sizes) {
    const size_t n = sizes.size();
    TORCH_INTERNAL_ASSERT(n <= 2);
    out_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t oh = sizes[i].first, ow = sizes[i].second;
      out_[i].oh = oh;
      out_[i].ow = ow;
      if (streamed(src.h, src.w, oh, ow)) continue;
      if (ow != src.w) htaps_[i] = axis_taps(int(src.w), int(ow));
      if (oh != src.h) vtaps_[i] = axis_taps(int(src.h), int(oh));
      unfused(src, i);
    }
  }
  const ResizedRows& operator[](size_t i) const { return out_[i]; }

 private:
  // Vertical-first, vertical-only and copy cases: a planar resized image.
  void unfused(const RgbSrc& src, size_t i) {
    ResizedRows& r = out_[i];
    const int64_t oh = r.oh, ow = r.ow;
    rbuf_[i].emplace(i ? kResized1 : kResized0, oh * ow * 3);
    uint8_t* out = rbuf_[i]->get();
    r.planar = out;
    if (htaps_[i] && !vtaps_[i]) {
      hpass(src, {HTarget{&*htaps_[i], out, ow, oh * ow}});
    } else if (htaps_[i]) {  // vertical first (Pillow >= 13 rule), then horizontal
      Scratch tmp(kVFirst, oh * src.w * std::max<int64_t>(3, src.px_stride));
      const RgbSrc v = vpass_src(src, *vtaps_[i], tmp.get());
      hpass(v, {HTarget{&*htaps_[i], out, ow, oh * ow}});
    } else if (vtaps_[i]) {
      if (src.px_stride == 1) {
        vpass(src, 3, ow, *vtaps_[i], out, ow, oh * ow);
      } else {
        Scratch tmp(kVFirst, oh * src.w * std::max<int64_t>(3, src.px_stride));
        to_planar(vpass_src(src, *vtaps_[i], tmp.get()), out);
      }
    } else {
      to_planar(src, out);
    }
  }

  // Source rows resampled vertically (vt.out rows, full width) into tmp (oh * w * max(3, px_stride)
  // bytes), same layout as src.
  static RgbSrc vpass_src(const RgbSrc& src, const AxisTaps& vt, uint8_t* tmp) {
    const int64_t oh = vt.out, w = src.w;
    if (src.interleaved() || src.rgbx()) {  // the vertical pass ignores channels: one plane of rows
      const int64_t ps = src.px_stride;
      vpass(src, 1, w * ps, vt, tmp, w * ps, 0);
      return RgbSrc{{tmp, tmp + 1, tmp + 2}, oh, w, w * ps, ps};
    }
    vpass(src, 3, w, vt, tmp, w, oh * w);
    return planar_src(tmp, oh, w);
  }

  std::vector<ResizedRows> out_;
  std::shared_ptr<const AxisTaps> htaps_[2], vtaps_[2];
  std::optional<Scratch> rbuf_[2];
};

// ---- tile writer ----------------------------------------------------------------------------------

// Byte -> output value of one channel: the exact normalization (or the byte itself for uint8 output).
template <typename out_t>
struct Normalizer {
  out_t lut[3][256];
  float mean[3], stdv[3];
#if VLMK_X86
  FastNorm fast[3];
  bool fast_ok[3] = {false, false, false};  // normalize8_fma checked bit-identical to lut[c]
#endif
  Normalizer(const float* m, const float* s) {
    for (int c = 0; c < 3; ++c) {
      mean[c] = m[c], stdv[c] = s[c];
      for (int v = 0; v < 256; ++v) {
        if constexpr (std::is_same_v<out_t, uint8_t>)
          lut[c][v] = uint8_t(v);
        else
          lut[c][v] = static_cast<out_t>(normalize_u8(uint8_t(v), m[c], s[c]));
      }
#if VLMK_X86
      if constexpr (std::is_same_v<out_t, float>)
        if (kHasAvx2 && kHasFma) {
          fast[c] = FastNorm{m[c], s[c], 1.0f / s[c]};
          uint8_t bytes[256];
          float got[256];
          for (int v = 0; v < 256; ++v) bytes[v] = uint8_t(v);
          for (int v = 0; v < 256; v += 8) normalize8_fma(bytes + v, fast[c], got + v);
          fast_ok[c] = std::memcmp(got, lut[c], sizeof(got)) == 0;
          if (kHasAvx512) {
            for (int v = 0; v < 256; v += 16) normalize16_fma(bytes + v, fast[c], got + v);
            fast_ok[c] = fast_ok[c] && std::memcmp(got, lut[c], sizeof(got)) == 0;
          }
        }
#endif
    }
  }
  void convert(int c, const uint8_t* in, out_t* out, int64_t n) const {
    int64_t i = 0;
    if constexpr (std::is_same_v<out_t, uint8_t>) {
      std::memcpy(out, in, n);
      return;
    }
#if VLMK_X86
    if constexpr (std::is_same_v<out_t, float>) {
      if (fast_ok[c] && kHasAvx512 && reinterpret_cast<uintptr_t>(out) % 64 == 0)
        for (; i + 16 <= n; i += 16) normalize16_fma<true>(in + i, fast[c], out + i);
      if (fast_ok[c] && reinterpret_cast<uintptr_t>(out + i) % 32 == 0)
        for (; i + 8 <= n; i += 8) normalize8_fma<true>(in + i, fast[c], out + i);
      else if (fast_ok[c])
        for (; i + 8 <= n; i += 8) normalize8_fma(in + i, fast[c], out + i);
      else if (kHasAvx2)
        for (; i + 8 <= n; i += 8) normalize8_avx2(in + i, mean[c], stdv[c], out + i);
    }
#endif
    for (; i < n; ++i) out[i] = lut[c][in[i]];
  }
};

// Orders this thread's non-temporal tile stores before the parallel region's join.
inline void store_fence() {
#if VLMK_X86
  _mm_sfence();
#endif
}

// Where a resized image lands: a canvas of rows x cols tiles of S x S with the image at (pad_t,
// pad_l) and zero bytes around it; tile (r, tc) is out tile r * cols + tc, row-major.
struct Canvas {
  int64_t ih, iw, pad_t, pad_l, rows, cols, S;
};

// Canvas row Y of channel c (`row`: the image's bytes for that row, or nullptr in the padding).
template <typename out_t>
void emit_row(const Canvas& cv, int64_t Y, int c, const uint8_t* row, const Normalizer<out_t>& norm, out_t* out) {
  const int64_t S = cv.S, r = Y / S, yy = Y % S;
  const out_t pad = norm.lut[c][0];
  for (int64_t tc = 0; tc < cv.cols; ++tc) {
    out_t* o = out + (((r * cv.cols + tc) * 3 + c) * S + yy) * S;
    // tile columns [x0, x1) come from the image (image column xx + shift), the rest is padding
    const int64_t x0 = row ? std::clamp<int64_t>(cv.pad_l - tc * S, 0, S) : S;
    const int64_t x1 = row ? std::clamp<int64_t>(cv.pad_l + cv.iw - tc * S, x0, S) : S;
    const int64_t shift = tc * S - cv.pad_l;
    std::fill(o, o + x0, pad);
    if (x1 > x0) norm.convert(c, row + shift + x0, o + x0, x1 - x0);
    std::fill(o + x1, o + S, pad);
  }
}

// One resized image and where it lands.
template <typename out_t>
struct CanvasJob {
  const ResizedRows* img;
  Canvas cv;
  out_t* out;
};

// Every row of every canvas of planar images (one parallel region for all of them): image rows
// are converted, padding rows are filled.
template <typename out_t>
void emit_canvases(const std::vector<CanvasJob<out_t>>& jobs, const Normalizer<out_t>& norm) {
  int64_t total = 0;
  for (const auto& j : jobs) total += j.cv.rows * j.cv.S;
  at::parallel_for(0, total, 8, [&](int64_t g0, int64_t g1) {
    int64_t base = 0;
    for (const auto& j : jobs) {
      const int64_t rows = j.cv.rows * j.cv.S;
      for (int64_t Y = std::max(g0, base) - base; Y < std::min(g1, base + rows) - base; ++Y) {
        const int64_t y = Y - j.cv.pad_t;
        const bool in = y >= 0 && y < j.cv.ih;
        for (int c = 0; c < 3; ++c) emit_row(j.cv, Y, c, in ? j.img->row(c, y) : nullptr, norm, j.out);
      }
      base += rows;
    }
    store_fence();
  });
}

// ---- the streamed common case ------------------------------------------------------------------

// A resize done horizontally first, then vertically, straight into its canvas.
template <typename out_t>
struct StreamTarget {
  std::shared_ptr<const AxisTaps> ht, vt;
  Canvas cv;
  out_t* out;
};

// One past the last source row output row y of a vertical pass reads (non-decreasing in y).
inline int64_t taps_end(const AxisTaps& vt, int64_t y) { return int64_t(vt.xmin[y]) + vt.count[y]; }

// First output row whose taps end past source row `row`.
int64_t first_row_ending_after(const AxisTaps& vt, int64_t row) {
  int64_t lo = 0, hi = vt.out;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (taps_end(vt, mid) > row) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Both resizes of an image in one sweep per thread: each thread owns the output rows whose taps
// end in its range of source rows, runs those rows (plus the few before them its first outputs
// read) through the horizontal passes in kStep-row steps into a small ring of rows per target, and
// emits every output row as soon as its taps are in the ring: vertical pass, normalization and
// tile write in one go. So the horizontal-pass output never leaves the cache, and the source
// rows are staged once for both targets.
template <typename out_t>
void stream_targets(const RgbSrc& src, const std::vector<StreamTarget<out_t>>& ts, const Normalizer<out_t>& norm) {
  const size_t n = ts.size();
  TORCH_INTERNAL_ASSERT(n <= 2);
  int64_t lo = src.h, hi = 0, ow_max = 0;
  for (const auto& t : ts) {
    lo = std::min<int64_t>(lo, t.vt->xmin[0]);
    hi = std::max(hi, taps_end(*t.vt, t.vt->out - 1));
    ow_max = std::max<int64_t>(ow_max, t.ht->out);
  }
  RgbSrc rows = src.from_row(lo);  // the source rows any vertical tap reads
  rows.h = hi - lo;
  const int64_t steps = (rows.h + kStep - 1) / kStep;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), steps));
  // Every chunk after the first also re-reads the `halo` source rows before its own (its first
  // outputs' taps), so earlier chunks get that many more rows: chunk k's output rows close in
  // source rows (bounds[k], bounds[k + 1]], bounds[k] ~ lo + k * work / chunks - (k - 1) * halo
  // in whole steps.
  int64_t halo = 0;
  for (const auto& t : ts) halo = std::max<int64_t>(halo, 2 * t.vt->maxpairs);
  const int64_t work = rows.h + (chunks - 1) * halo;
  std::vector<int64_t> bounds(chunks + 1, hi);
  bounds[0] = lo;
  for (int64_t k = 1; k < chunks; ++k) {
    const int64_t r = (k * work / chunks - (k - 1) * halo + kStep / 2) / kStep * kStep;
    bounds[k] = std::clamp<int64_t>(lo + r, bounds[k - 1], hi);
  }
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t a = bounds[k], b = bounds[k + 1];
      int64_t y0[2], y1[2], next[2], ring_rows[2];
      uint8_t* ring[2];
      std::optional<Scratch> ring_buf[2];
      HTarget at[2];
      int64_t start = b;
      for (size_t i = 0; i < n; ++i) {
        const AxisTaps& vt = *ts[i].vt;
        y0[i] = k == 0 ? 0 : first_row_ending_after(vt, a);
        y1[i] = k + 1 == chunks ? vt.out : first_row_ending_after(vt, b);
        next[i] = y0[i];
        if (y0[i] < y1[i]) start = std::min<int64_t>(start, vt.xmin[y0[i]]);
        // holds the widest tap window plus one step, in whole steps (so a step never wraps)
        ring_rows[i] = (2 * vt.maxpairs + kStep + kStep - 1) / kStep * kStep;
        ring_buf[i].emplace(i ? kRing1 : kRing0, 3 * ring_rows[i] * ts[i].ht->out);
        ring[i] = ring_buf[i]->get();
        at[i] = HTarget{ts[i].ht.get(), nullptr, ts[i].ht->out, ring_rows[i] * ts[i].ht->out};
      }
      Scratch buf(kRow, ow_max + 32);
      std::vector<const uint8_t*> taps;
      // canvas rows above (first chunk) and below (last chunk) the image are padding
      for (size_t i = 0; i < n; ++i) {
        const Canvas& cv = ts[i].cv;
        if (k == 0)
          for (int64_t Y = 0; Y < cv.pad_t; ++Y)
            for (int c = 0; c < 3; ++c) emit_row(cv, Y, c, nullptr, norm, ts[i].out);
        if (k + 1 == chunks)
          for (int64_t Y = cv.pad_t + cv.ih; Y < cv.rows * cv.S; ++Y)
            for (int c = 0; c < 3; ++c) emit_row(cv, Y, c, nullptr, norm, ts[i].out);
      }
      if (start >= b) continue;  // no output rows end here
      HStage stage(src.w, at, n);
      // steps start at this chunk's first row: ring slot of source row r is (r - start) % ring_rows
      for (int64_t s = start; s < b; s += kStep) {
        for (size_t i = 0; i < n; ++i) at[i].dst = ring[i] + ((s - start) % ring_rows[i]) * at[i].stride;
        stage.run(rows, s - lo, at, n);
        const int64_t ready = std::min(s + kStep, hi);
        for (size_t i = 0; i < n; ++i) {
          const AxisTaps& vt = *ts[i].vt;
          const int64_t ow = at[i].stride;
          for (; next[i] < y1[i] && taps_end(vt, next[i]) <= ready; ++next[i]) {
            const int64_t y = next[i];
            taps.resize(size_t(vt.count[y]));
            for (int c = 0; c < 3; ++c) {
              for (int t = 0; t < vt.count[y]; ++t)
                taps[t] = ring[i] + c * at[i].plane + ((vt.xmin[y] + t - start) % ring_rows[i]) * ow;
              vconv_rows(taps.data(), ow, vt, y, buf.get());
              emit_row(ts[i].cv, y + ts[i].cv.pad_t, c, buf.get(), norm, ts[i].out);
            }
          }
        }
      }
      for (size_t i = 0; i < n; ++i) TORCH_INTERNAL_ASSERT(next[i] == y1[i], "anyres_tile: streamed rows left behind");
    }
    store_fence();
  });
}

// Whether the unused 4th byte of an RGBX view's last pixel lies in its storage (the RGBX loops read
// whole pixels).
bool x_byte_readable(const at::Tensor& im) {
  const int64_t last = im.storage_offset() + (im.size(0) - 1) * im.stride(0) + 4 * im.size(1);
  return last <= int64_t(im.storage().nbytes());
}

// A uint8 [H, W, C] view read in place: planar 3-channel and grayscale views with unit pixel
// stride, interleaved RGB rows and Pillow's RGBX rows; nullopt for anything else.
std::optional<RgbSrc> in_place_src(const at::Tensor& im) {
  const int64_t h = im.size(0), w = im.size(1), c = im.size(2);
  const int64_t sh = im.stride(0), sw = im.stride(1), sc = im.stride(2);
  const uint8_t* p = im.data_ptr<uint8_t>();
  if (c == 3 && sc == 1 && (sw == 3 || (sw == 4 && x_byte_readable(im))))
    return RgbSrc{{p, p + 1, p + 2}, h, w, sh, sw};
  if (c == 3 && sw == 1) return RgbSrc{{p, p + sc, p + 2 * sc}, h, w, sh, 1};
  if (c == 1 && sw == 1) return RgbSrc{{p, p, p}, h, w, sh, 1};
  return std::nullopt;
}

// Any uint8 [H, W, C] view -> an RgbSrc, converted as HF converts (gray -> RGB, RGBA composited
// onto white): in place where in_place_src reads it, else converted once into interleaved `storage`.
RgbSrc make_src(const at::Tensor& im, std::optional<Scratch>& storage) {
  if (const auto src = in_place_src(im)) return *src;
  const int64_t h = im.size(0), w = im.size(1), c = im.size(2);
  const int64_t sh = im.stride(0), sw = im.stride(1), sc = im.stride(2);
  const uint8_t* p = im.data_ptr<uint8_t>();
  storage.emplace(kSrcCopy, h * w * 3);
  uint8_t* q = storage->get();
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

// An image given as the row runs parts[0, k) (plan column kParts), stacked along its rows. Runs
// read in place with one layout (e.g. the RGBX blocks of a large PIL image) are read where they
// are, through a table of row pointers in `rows`; other runs are joined into `joined` once.
RgbSrc make_src(const at::Tensor* parts, int64_t k, std::optional<Scratch>& storage,
                std::vector<const uint8_t*>& rows, at::Tensor& joined) {
  if (k == 1) return make_src(parts[0], storage);
  std::vector<RgbSrc> runs;
  for (int64_t j = 0; j < k; ++j) {
    const auto src = in_place_src(parts[j]);
    const bool same = src && (runs.empty() || (src->px_stride == runs[0].px_stride &&
                                               src->ch[1] - src->ch[0] == runs[0].ch[1] - runs[0].ch[0] &&
                                               src->ch[2] - src->ch[0] == runs[0].ch[2] - runs[0].ch[0]));
    if (!same) {
      joined = at::cat(at::TensorList(parts, size_t(k)), 0);
      return make_src(joined, storage);
    }
    runs.push_back(*src);
  }
  rows.clear();
  for (const RgbSrc& r : runs)
    for (int64_t y = 0; y < r.h; ++y) rows.push_back(r.row(0, y));
  RgbSrc src = runs[0];
  src.h = int64_t(rows.size());
  src.rows = rows.data();
  return src;
}

}  // namespace

void anyres_tile_cpu(const std::vector<at::Tensor>& images, const at::Tensor& plan, at::Tensor out,
                     int64_t tile, const std::vector<double>& mean, const std::vector<double>& stdv,
                     bool global_view) {
  const TileArgs a = check_tile_args(images, plan, out, tile, mean, stdv, global_view);
  VLMK_CHECK_ARG(out.device().is_cpu(), "out must be a CPU tensor for the cpu backend");
  const int64_t* p = plan.data_ptr<int64_t>();
  const int64_t tile_elems = 3 * tile * tile;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, out.scalar_type(), "anyres_tile_cpu", [&] {
    // uint8 output: the raw tile bytes (mean/std ignored); else the exact normalized values
    const auto norm = std::make_unique<Normalizer<scalar_t>>(a.mean, a.stdv);
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<const uint8_t*> rows;
    for (int64_t i = 0; i < a.n; ++i) {
      const int64_t* r = p + i * kPlanCols;
      std::optional<Scratch> storage;
      at::Tensor joined;
      const RgbSrc src = make_src(images.data() + a.part0[i], a.part0[i + 1] - a.part0[i], storage, rows, joined);
      scalar_t* dst = o + r[kFirst] * tile_elems;
      std::vector<std::pair<int64_t, int64_t>> sizes{{r[kResH], r[kResW]}};
      std::vector<Canvas> canvases{Canvas{r[kResH], r[kResW], r[kPadT], r[kPadL], r[kRows], r[kCols], tile}};
      std::vector<scalar_t*> outs{dst + (global_view ? tile_elems : 0)};
      if (global_view) {
        sizes.emplace_back(tile, tile);
        canvases.push_back(Canvas{tile, tile, 0, 0, 1, 1, tile});
        outs.push_back(dst);  // the global view is the image's first tile
      }
      const Resizer res(src, sizes);
      std::vector<CanvasJob<scalar_t>> jobs;
      std::vector<StreamTarget<scalar_t>> streams;
      for (size_t j = 0; j < sizes.size(); ++j) {
        const auto [oh, ow] = sizes[j];
        if (res[j].planar)
          jobs.push_back({&res[j], canvases[j], outs[j]});
        else  // left to the streamed path
          streams.push_back({axis_taps(int(src.w), int(ow)), axis_taps(int(src.h), int(oh)), canvases[j], outs[j]});
      }
      if (!streams.empty()) stream_targets(src, streams, *norm);
      if (!jobs.empty()) emit_canvases(jobs, *norm);
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

}  // namespace vlmk
