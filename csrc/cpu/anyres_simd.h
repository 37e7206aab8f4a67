// SIMD inner loops of the CPU AnyRes tiler (x86 AVX2 with portable fallbacks). Every path does
// Pillow's exact int32 fixed-point arithmetic (common/anyres_resample.h), so the SIMD and scalar
// results are bit-identical; the fallbacks are what non-x86 builds and the tests' scalar checks run.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <c10/util/Exception.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VLMK_X86 1
#endif

#include "common/anyres_resample.h"

namespace vlmk {
namespace anyres {

// Fixed-point taps of one axis (Pillow's bounds + normalised coefficients).
struct AxisTaps {
  int in, out, ksize, npairs;
  int maxpairs = 0;  // tap pairs of the widest output: a fixed trip count (no mispredicted loop exits)
  std::vector<int32_t> k;  // [out][ksize]
  std::vector<int> xmin, count;
  // For 16-bit multiply-adds (pmaddwd) on column pairs (2m, 2m + 1): output i's taps from pair
  // xpair[i] = xmin / 2 on (an odd xmin puts a zero weight first), k = hi * 2^15 + lo with lo in
  // [0, 2^15), hi in [-2^7, 2^7], two taps per int32 (the even column in the low half). Integer
  // sums wrap mod 2^32 like the exact int32 sum, so (sum hi) << 15 + (sum lo) is bit-identical to
  // Pillow's accumulator.
  std::vector<int> xpair;
  std::vector<int32_t> klo, khi;  // [out][npairs]
  // For 8-bit dot products (vpdpbusd: four u8 x s8 products summed per int32 lane): each weight as
  // three signed byte digits, k = d0 + d1 * 2^8 + d2 * 2^16, so that sum(x * k) = S0 + (S1 << 8) +
  // (S2 << 16) with S_d = sum(x * d_d), exact in int32 and wrapping like the exact sum. Horizontal:
  // output i's taps from column quad xquad[i] = xmin / 4 on (xmin % 4 zero weights first), every
  // output running maxquads quads; hq[d][i * maxquads + m] holds digit d of tap slots 4m .. 4m + 3
  // (slot order = byte order). Vertical: tap rows in groups of 4 from xmin, vq[d][i * vgroups + g].
  int maxquads = 0, vgroups = 0;
  std::vector<int> xquad;
  std::vector<int32_t> hq[3], vq[3];

  AxisTaps(int in_size, int out_size) : in(in_size), out(out_size) {
    const AxisScale s = axis_scale(in_size, out_size);
    ksize = s.ksize;
    npairs = (ksize + 2) / 2;  // room for the leading zero of an odd xmin
    k.resize(size_t(out_size) * ksize);
    xmin.resize(out_size);
    count.resize(out_size);
    xpair.resize(out_size);
    klo.assign(size_t(out_size) * npairs, 0);
    khi.assign(size_t(out_size) * npairs, 0);
    for (int i = 0; i < out_size; ++i) {
      count[i] = tap_weights(s, in_size, i, &k[size_t(i) * ksize], &xmin[i]);
      const int odd = xmin[i] & 1;
      xpair[i] = xmin[i] >> 1;
      maxpairs = std::max(maxpairs, (count[i] + odd + 1) / 2);
      for (int t = 0; t < count[i]; ++t) {
        const int32_t v = k[size_t(i) * ksize + t];
        const uint32_t lo = uint32_t(v) & 0x7fffu, hi = uint32_t(v >> 15) & 0xffffu;
        const int slot = t + odd, shift = (slot & 1) * 16;
        klo[size_t(i) * npairs + slot / 2] |= int32_t(lo << shift);
        khi[size_t(i) * npairs + slot / 2] |= int32_t(hi << shift);
      }
    }
    for (int i = 0; i < out_size; ++i) maxquads = std::max(maxquads, (count[i] + (xmin[i] & 3) + 3) / 4);
    vgroups = (ksize + 3) / 4;
    xquad.resize(out_size);
    for (int d = 0; d < 3; ++d) {
      hq[d].assign(size_t(out_size) * maxquads, 0);
      vq[d].assign(size_t(out_size) * vgroups, 0);
    }
    for (int i = 0; i < out_size; ++i) {
      xquad[i] = xmin[i] >> 2;
      for (int t = 0; t < count[i]; ++t) {
        int32_t r = k[size_t(i) * ksize + t];
        for (int d = 0; d < 3; ++d) {
          const int8_t digit = d < 2 ? int8_t(uint8_t(r & 0xff)) : int8_t(r);
          r = (r - digit) >> 8;  // exact: r - digit is a multiple of 256
          const uint32_t byte = uint32_t(uint8_t(digit));
          const int hs = t + (xmin[i] & 3);
          hq[d][size_t(i) * maxquads + hs / 4] |= int32_t(byte << (8 * (hs % 4)));
          vq[d][size_t(i) * vgroups + t / 4] |= int32_t(byte << (8 * (t % 4)));
        }
        TORCH_INTERNAL_ASSERT(r == 0, "anyres: a tap weight does not fit three signed byte digits");
      }
    }
  }
};

constexpr int kBlock = 8;   // rows the horizontal pass resamples together (one SIMD lane each)
constexpr int kBlocks = 4;  // 8-row blocks per horizontal step: each weight load feeds all of them

// ---- horizontal pass: a staged block (stage[j * kBlock + r] = row r, column j) -> nrows rows --

inline void hconv_scalar(const uint8_t* sc, const AxisTaps& ax, uint8_t* dst, int64_t dst_stride, int nrows) {
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

#if VLMK_X86
// Tap pairs are kept as bytes: pairs[m] = the 8 rows' (column 2m, column 2m + 1), 16 bytes, widened
// to the int16 operand of a tap pair as the multiply-add loads it (a free expansion there, and half
// the bytes to write and to keep in cache of int16 pairs). (w + 1) / 2 pairs per row block; a
// last odd column pairs with whatever follows it, which only a zero weight reads.

// One staged channel (sc[j * kBlock + r], w columns plus kBlock zero bytes) -> pairs.
__attribute__((target("avx2"))) inline void widen_pairs(const uint8_t* sc, int64_t w, __m128i* pairs) {
  const __m128i interleave = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  for (int64_t m = 0; 2 * m < w; ++m)
    _mm_store_si128(pairs + m, _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * m * kBlock)),
                                                interleave));
}

// In-register transpose of 8 rows of 8 words: r[m] becomes word m of every row (row b in word b).
__attribute__((target("avx2"))) inline void transpose8_epi16(__m128i* r) {
  __m128i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);      // words 0..3 of rows 2i, 2i+1
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);  // words 4..7
  }
  for (int h = 0; h < 2; ++h) {  // words 4h .. 4h + 3
    u[4 * h + 0] = _mm_unpacklo_epi32(t[h], t[h + 2]);      // words 4h, 4h+1 of rows 0..3
    u[4 * h + 1] = _mm_unpackhi_epi32(t[h], t[h + 2]);      // words 4h+2, 4h+3 of rows 0..3
    u[4 * h + 2] = _mm_unpacklo_epi32(t[h + 4], t[h + 6]);  // the same for rows 4..7
    u[4 * h + 3] = _mm_unpackhi_epi32(t[h + 4], t[h + 6]);
  }
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 2; ++q) {
      r[4 * h + 2 * q] = _mm_unpacklo_epi64(u[4 * h + q], u[4 * h + q + 2]);
      r[4 * h + 2 * q + 1] = _mm_unpackhi_epi64(u[4 * h + q], u[4 * h + q + 2]);
    }
}

// 8 planar source rows of w bytes straight to tap pairs (what widen_pairs makes of a staged
// block), 16 columns per step: each row read as 8 (column 2m, column 2m + 1) words and transposed
// so that a pair holds the 8 rows. No staged copy.
__attribute__((target("avx2"))) inline void widen_rows(const uint8_t* const* rows, int64_t w, __m128i* pairs) {
  int64_t j = 0;
  for (; j + 16 <= w; j += 16) {
    __m128i e[8];
    for (int r = 0; r < kBlock; ++r) e[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + j));
    transpose8_epi16(e);
    for (int m = 0; m < 8; ++m) _mm_store_si128(pairs + j / 2 + m, e[m]);
  }
  for (; j < w; j += 2) {  // the tail; a last odd column pairs with a 0
    alignas(16) uint8_t v[16];
    for (int r = 0; r < kBlock; ++r) v[2 * r] = rows[r][j], v[2 * r + 1] = j + 1 < w ? rows[r][j + 1] : 0;
    _mm_store_si128(pairs + j / 2, _mm_load_si128(reinterpret_cast<const __m128i*>(v)));
  }
}

// Keeps v in a register: without it GCC re-associates the unrolled sums into a tree (spilling
// partial sums) and folds each operand load into both of its multiply-adds (twice the loads).
#define VLMK_PIN(v) __asm__("" : "+x"(v))

// (acc >> 22) of one output column (taps from pair j) for the kBlocks 8-row blocks of tap pairs
// p[b]: per tap pair, 8 rows x 2 taps as 16 int16 times the broadcast (k[t], k[t+1]) halves, each
// weight load shared by all blocks. P > 0 is the pair count known at compile time (fully
// unrolled), P == 0 runs npairs. Every output runs ax.maxpairs pairs: pairs past its taps have
// weight 0 and may read up to maxpairs pairs past the widened ones (0 * x = 0 exactly).
template <int P>
__attribute__((target("avx2"))) inline void hconv_column(const __m128i* const* p, const int32_t* lo, const int32_t* hi,
                                                         int64_t j, int npairs, __m256i* r) {
  __m256i alo[kBlocks], ahi[kBlocks];
  for (int b = 0; b < kBlocks; ++b) alo[b] = _mm256_set1_epi32(kRoundBias), ahi[b] = _mm256_setzero_si256();
  const int n = P > 0 ? P : npairs;
#pragma GCC unroll 16
  for (int t = 0; t < n; ++t) {
    const __m256i wl = _mm256_set1_epi32(lo[t]), wh = _mm256_set1_epi32(hi[t]);
    for (int b = 0; b < kBlocks; ++b) {
      __m256i v = _mm256_cvtepu8_epi16(_mm_load_si128(p[b] + j + t));
      VLMK_PIN(v);
      alo[b] = _mm256_add_epi32(alo[b], _mm256_madd_epi16(v, wl));
      ahi[b] = _mm256_add_epi32(ahi[b], _mm256_madd_epi16(v, wh));
    }
    for (int b = 0; b < kBlocks; ++b) {
      VLMK_PIN(alo[b]);
      VLMK_PIN(ahi[b]);
    }
  }
  for (int b = 0; b < kBlocks; ++b)
    r[b] = _mm256_srai_epi32(_mm256_add_epi32(_mm256_slli_epi32(ahi[b], 15), alo[b]), kPrecisionBits);
}

// 8 columns x 8 rows of (acc >> 22) -> bytes (packs/packus clip exactly like clip8), transposed in
// registers so that each row gets one store.
__attribute__((target("avx2"))) inline void store_8x8(const __m256i* a, int nx, uint8_t* dst, int64_t dst_stride,
                                                      int nrows) {
  // in-lane 4x4 byte transpose: [x0 r0..3, x1 r0..3, ...] -> [r0 x0..3, r1 x0..3, ...]
  const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  // lane l of q0 holds columns x0..x3 for rows 4l..4l+3; q1 the same for x4..x7
  const __m256i q0 = _mm256_shuffle_epi8(
      _mm256_packus_epi16(_mm256_packs_epi32(a[0], a[1]), _mm256_packs_epi32(a[2], a[3])), tr);
  const __m256i q1 = _mm256_shuffle_epi8(
      _mm256_packus_epi16(_mm256_packs_epi32(a[4], a[5]), _mm256_packs_epi32(a[6], a[7])), tr);
  // rows (0, 1 | 4, 5) and (2, 3 | 6, 7), 8 bytes each
  alignas(32) uint64_t rows[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(rows), _mm256_unpacklo_epi32(q0, q1));
  _mm256_store_si256(reinterpret_cast<__m256i*>(rows + 4), _mm256_unpackhi_epi32(q0, q1));
  static constexpr int kSlot[8] = {0, 1, 4, 5, 2, 3, 6, 7};  // row r lives in rows[kSlot[r]]
  if (nx == 8) {  // a fixed-size copy compiles to one store
    for (int r = 0; r < nrows; ++r) std::memcpy(dst + r * dst_stride, &rows[kSlot[r]], 8);
  } else {
    for (int r = 0; r < nrows; ++r) std::memcpy(dst + r * dst_stride, &rows[kSlot[r]], size_t(nx));
  }
}

// Eight output columns at a time for the kBlocks staged blocks (block b's rows start b * kBlock
// rows below block 0's in dst; nrows[b] of them are stored, none for a padding block).
template <int P>
__attribute__((target("avx2"))) void hconv_blocks(const __m128i* const* p, const AxisTaps& ax, uint8_t* dst,
                                                  int64_t dst_stride, const int* nrows) {
  for (int x = 0; x < ax.out; x += 8) {
    const int nx = std::min(8, ax.out - x);
    __m256i a[kBlocks][8];
    for (int i = 0; i < 8; ++i) {
      const int xi = x + std::min(i, nx - 1);
      __m256i r[kBlocks];
      hconv_column<P>(p, &ax.klo[size_t(xi) * ax.npairs], &ax.khi[size_t(xi) * ax.npairs], ax.xpair[xi], ax.maxpairs, r);
      for (int b = 0; b < kBlocks; ++b) a[b][i] = r[b];
    }
    for (int b = 0; b < kBlocks; ++b)
      if (nrows[b] > 0) store_8x8(a[b], nx, dst + b * kBlock * dst_stride + x, dst_stride, nrows[b]);
  }
}

// f(std::integral_constant<int, n>{}) for n in [1, kMaxUnroll] (a kernel unrolled for n steps),
// else f(std::integral_constant<int, 0>{}) (its loop).
constexpr int kMaxUnroll = 16;
template <int N = 1, typename F>
inline void with_unrolled(int n, F&& f) {
  if constexpr (N > kMaxUnroll) {
    f(std::integral_constant<int, 0>{});
  } else {
    if (n == N) return f(std::integral_constant<int, N>{});
    with_unrolled<N + 1>(n, f);
  }
}

// Unrolled kernels for up to 16 tap pairs (up to ~8x downscales), a loop beyond.
__attribute__((target("avx2"))) inline void hconv_avx2(const __m128i* const* p, const AxisTaps& ax, uint8_t* dst,
                                                       int64_t dst_stride, const int* nrows) {
  with_unrolled(ax.maxpairs, [&](auto n) { hconv_blocks<decltype(n)::value>(p, ax, dst, dst_stride, nrows); });
}
#endif

// ---- vertical pass: one output row of n bytes from `count` source rows ----------------------

// rows[t] (t < count) are the tap rows of the output row; columns [i0, n) are resampled.
inline void vconv_rows_scalar(const uint8_t* const* rows, int64_t i0, int64_t n, const int32_t* k, int count,
                              uint8_t* dst) {
  for (int64_t i = i0; i < n; ++i) {
    int32_t acc = kRoundBias;
    for (int t = 0; t < count; ++t) acc += int32_t(rows[t][i]) * k[t];
    dst[i] = clip8(acc);
  }
}

#if VLMK_X86
__attribute__((target("avx2"))) inline __m256i load8_epi32(const uint8_t* q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}

// 32 columns per step with the accumulators in registers across all taps.
__attribute__((target("avx2"))) inline void vconv_rows_avx2(const uint8_t* const* rows, int64_t n,
                                                            const int32_t* k, int count, uint8_t* dst) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo packs' lane interleave
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i a0 = _mm256_set1_epi32(kRoundBias), a1 = a0, a2 = a0, a3 = a0;
    for (int t = 0; t < count; ++t) {
      const uint8_t* p = rows[t] + i;
      const __m256i w = _mm256_set1_epi32(k[t]);
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(load8_epi32(p), w));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(load8_epi32(p + 8), w));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(load8_epi32(p + 16), w));
      a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(load8_epi32(p + 24), w));
    }
    a0 = _mm256_srai_epi32(a0, kPrecisionBits);
    a1 = _mm256_srai_epi32(a1, kPrecisionBits);
    a2 = _mm256_srai_epi32(a2, kPrecisionBits);
    a3 = _mm256_srai_epi32(a3, kPrecisionBits);
    const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permutevar8x32_epi32(b, order));
  }
  if (i < n) vconv_rows_scalar(rows, i, n, k, count, dst);
}
#endif

// ---- normalization: bytes -> (x / 255 - mean) / std, HF's PIL-backend arithmetic ------------

#if VLMK_X86
// normalize_u8 for 8 bytes: the same IEEE operations in the same order (double multiply, round to
// float, float subtract, float divide), so it equals the scalar table bit for bit.
__attribute__((target("avx2"))) inline void normalize8_avx2(const uint8_t* in, float mean, float stdv, float* out) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in)));
  const __m256d scale = _mm256_set1_pd(1.0 / 255.0);
  const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(v)), scale));
  const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(v, 1)), scale));
  const __m256 x = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  _mm256_storeu_ps(out, _mm256_div_ps(_mm256_sub_ps(x, _mm256_set1_ps(mean)), _mm256_set1_ps(stdv)));
}

// The same values without divides or doubles: x / 255 and (x - mean) / std each as the product with
// the float reciprocal plus one FMA residual correction. That is correctly rounded for nearly all
// inputs, not all: the Normalizer uses it for a channel only after checking all 256 bytes against
// the scalar table.
struct FastNorm {
  float mean, stdv, rstd;
};
// kStream: a non-temporal store (out 32-byte aligned): the tiles are written once and not read
// back here, so skipping the read-for-ownership of each line saves memory traffic.
template <bool kStream = false>
__attribute__((target("avx2,fma"))) inline void normalize8_fma(const uint8_t* in, const FastNorm& k, float* out) {
  const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in))));
  const __m256 c255 = _mm256_set1_ps(255.0f), r255 = _mm256_set1_ps(1.0f / 255.0f);
  __m256 q = _mm256_mul_ps(x, r255);
  q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, c255, x), r255, q);  // x / 255
  const __m256 d = _mm256_sub_ps(q, _mm256_set1_ps(k.mean)), sd = _mm256_set1_ps(k.stdv), rs = _mm256_set1_ps(k.rstd);
  __m256 y = _mm256_mul_ps(d, rs);
  y = _mm256_fmadd_ps(_mm256_fnmadd_ps(y, sd, d), rs, y);  // d / std
  if constexpr (kStream)
    _mm256_stream_ps(out, y);
  else
    _mm256_storeu_ps(out, y);
}
#endif

}  // namespace anyres
}  // namespace vlmk
