// AVX-512 VNNI loops of the CPU AnyRes tiler: the passes of cpu/anyres_simd.h as 8-bit dot products
// (vpdpbusd: four u8 pixels times four s8 weight digits per int32 lane, AxisTaps::hq / vq), the
// pixels read as bytes, never widened. Three digit sums per output instead of Pillow's one int32
// sum, combined into the same int32 (see AxisTaps), so the results stay bit-identical to Pillow.
#pragma once
#include "cpu/anyres_simd.h"

#if VLMK_X86
// GCC 12 flags _mm512_undefined_* inside its own intrinsics as (maybe-)uninitialized
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define VLMK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace vlmk {
namespace anyres {

constexpr int kBlock16 = 16;  // rows of one 512-bit horizontal block (one int32 lane each)

// ---- horizontal pass: rows in lanes, 4 source columns per lane -----------------------------

// 32 staged bytes (columns 4m .. 4m + 3 of 8 rows) -> row r's 4 columns in dword r.
VLMK_AVX512 inline __m256i quad8(const uint8_t* s) {
  // per 128-bit lane, each row's (column, column + 1) byte pair
  const __m256i pair = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                        0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m256i p = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)), pair);
  const __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);
  return _mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi));
}

// Two staged 8-row blocks a, b (stage[j * kBlock + r]; columns past w are read, only ever met by a
// zero weight) -> quads[m]: the 16 rows' columns 4m .. 4m + 3, row r in int32 lane r.
VLMK_AVX512 inline void quads_from_staged(const uint8_t* a, const uint8_t* b, int64_t w, __m512i* quads) {
  for (int64_t m = 0; 4 * m < w; ++m)
    _mm512_store_si512(quads + m, _mm512_inserti64x4(_mm512_castsi256_si512(quad8(a + 32 * m)), quad8(b + 32 * m), 1));
}

// (acc >> 22) of one output column (taps from quad j on) for two 16-row blocks q[0], q[1]: each
// weight broadcast feeds both. P > 0 is the quad count known at compile time (unrolled), P == 0
// runs nq. Quads past an output's taps have zero weights.
template <int P>
VLMK_AVX512 inline void hconv_column512(const __m512i* const* q, const int32_t* d0, const int32_t* d1,
                                        const int32_t* d2, int64_t j, int nq, __m512i* r) {
  __m512i a0[2], a1[2], a2[2];
  for (int b = 0; b < 2; ++b)
    a0[b] = _mm512_set1_epi32(kRoundBias), a1[b] = _mm512_setzero_si512(), a2[b] = _mm512_setzero_si512();
  const int n = P > 0 ? P : nq;
#pragma GCC unroll 16
  for (int t = 0; t < n; ++t) {
    const __m512i w0 = _mm512_set1_epi32(d0[t]), w1 = _mm512_set1_epi32(d1[t]), w2 = _mm512_set1_epi32(d2[t]);
    for (int b = 0; b < 2; ++b) {
      const __m512i v = _mm512_load_si512(q[b] + j + t);
      a0[b] = _mm512_dpbusd_epi32(a0[b], v, w0);
      a1[b] = _mm512_dpbusd_epi32(a1[b], v, w1);
      a2[b] = _mm512_dpbusd_epi32(a2[b], v, w2);
    }
  }
  for (int b = 0; b < 2; ++b)
    r[b] = _mm512_srai_epi32(
        _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(a2[b], 16), _mm512_slli_epi32(a1[b], 8)), a0[b]),
        kPrecisionBits);
}

// Four output columns (c[k]: 16 rows of acc >> 22) -> bytes clipped like clip8, dword (lane l, i)
// = row 4l + i's four columns.
VLMK_AVX512 inline __m512i pack4(const __m512i* c) {
  const __m512i tr = _mm512_set4_epi32(0x0f0b0703, 0x0e0a0602, 0x0d090501, 0x0c080400);  // 4x4 byte transpose
  return _mm512_shuffle_epi8(
      _mm512_packus_epi16(_mm512_packs_epi32(c[0], c[1]), _mm512_packs_epi32(c[2], c[3])), tr);
}

// 16 columns (g[k]: pack4 of columns 4k .. 4k + 3) -> rows: nx bytes to each of nrows rows.
VLMK_AVX512 inline void store_16x16(const __m512i* g, int nx, uint8_t* dst, int64_t dst_stride, int nrows) {
  const __m512i t0 = _mm512_unpacklo_epi32(g[0], g[1]), t1 = _mm512_unpackhi_epi32(g[0], g[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(g[2], g[3]), t3 = _mm512_unpackhi_epi32(g[2], g[3]);
  alignas(64) uint8_t rows[4][64];  // rows[i] lane l = row 4l + i
  _mm512_store_si512(rows[0], _mm512_unpacklo_epi64(t0, t2));
  _mm512_store_si512(rows[1], _mm512_unpackhi_epi64(t0, t2));
  _mm512_store_si512(rows[2], _mm512_unpacklo_epi64(t1, t3));
  _mm512_store_si512(rows[3], _mm512_unpackhi_epi64(t1, t3));
  if (nx == 16) {  // a fixed-size copy compiles to one store
    for (int r = 0; r < nrows; ++r) std::memcpy(dst + r * dst_stride, &rows[r & 3][16 * (r >> 2)], 16);
  } else {
    for (int r = 0; r < nrows; ++r) std::memcpy(dst + r * dst_stride, &rows[r & 3][16 * (r >> 2)], size_t(nx));
  }
}

// Sixteen output columns at a time for two 16-row blocks (block b's rows start 16 b rows below
// block 0's in dst; nrows[b] of them are stored, none for an empty block).
template <int P>
VLMK_AVX512 void hconv_blocks512(const __m512i* const* q, const AxisTaps& ax, uint8_t* dst, int64_t dst_stride,
                                 const int* nrows) {
  const int mq = ax.maxquads;
  for (int x = 0; x < ax.out; x += 16) {
    const int nx = std::min(16, ax.out - x);
    __m512i g[2][4];
    for (int k = 0; k < 4; ++k) {
      __m512i c[2][4];
      for (int i = 0; i < 4; ++i) {
        const size_t xi = size_t(x + std::min(4 * k + i, nx - 1));
        __m512i r[2];
        hconv_column512<P>(q, &ax.hq[0][xi * mq], &ax.hq[1][xi * mq], &ax.hq[2][xi * mq], ax.xquad[xi], mq, r);
        c[0][i] = r[0], c[1][i] = r[1];
      }
      g[0][k] = pack4(c[0]), g[1][k] = pack4(c[1]);
    }
    for (int b = 0; b < 2; ++b)
      if (nrows[b] > 0) store_16x16(g[b], nx, dst + b * kBlock16 * dst_stride + x, dst_stride, nrows[b]);
  }
}

// Unrolled kernels for up to 16 quads (up to ~12x downscales), a loop beyond.
VLMK_AVX512 inline void hconv512(const __m512i* const* q, const AxisTaps& ax, uint8_t* dst, int64_t dst_stride,
                                 const int* nrows) {
  with_unrolled(ax.maxquads, [&](auto n) { hconv_blocks512<decltype(n)::value>(q, ax, dst, dst_stride, nrows); });
}

// ---- vertical pass: columns in lanes, 4 tap rows per lane ---------------------------------

// Output row y of n bytes from its tap rows rows[0, count) (rows past count repeat the last one
// under a zero weight); 64 columns per step, the last one masked.
VLMK_AVX512 inline void vconv_rows512(const uint8_t* const* rows, int64_t n, const AxisTaps& ax, int64_t y,
                                      uint8_t* dst) {
  const int count = ax.count[y], groups = (count + 3) / 4;
  const int32_t* d[3];
  for (int k = 0; k < 3; ++k) d[k] = &ax.vq[k][size_t(y) * ax.vgroups];
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 m = n - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (n - i)) - 1;
    __m512i a[4][3];  // [columns 4k .. 4k + 3 of each 16-column lane][digit]
    for (int k = 0; k < 4; ++k)
      a[k][0] = _mm512_set1_epi32(kRoundBias), a[k][1] = _mm512_setzero_si512(), a[k][2] = _mm512_setzero_si512();
    for (int g = 0; g < groups; ++g) {
      __m512i r[4];
      for (int t = 0; t < 4; ++t) r[t] = _mm512_maskz_loadu_epi8(m, rows[std::min(4 * g + t, count - 1)] + i);
      // per 128-bit lane: each column's 4 tap bytes in one dword, columns 4k .. 4k + 3 in v[k]
      const __m512i ab_lo = _mm512_unpacklo_epi8(r[0], r[1]), ab_hi = _mm512_unpackhi_epi8(r[0], r[1]);
      const __m512i cd_lo = _mm512_unpacklo_epi8(r[2], r[3]), cd_hi = _mm512_unpackhi_epi8(r[2], r[3]);
      const __m512i v[4] = {_mm512_unpacklo_epi16(ab_lo, cd_lo), _mm512_unpackhi_epi16(ab_lo, cd_lo),
                            _mm512_unpacklo_epi16(ab_hi, cd_hi), _mm512_unpackhi_epi16(ab_hi, cd_hi)};
      for (int j = 0; j < 3; ++j) {
        const __m512i w = _mm512_set1_epi32(d[j][g]);
        for (int k = 0; k < 4; ++k) a[k][j] = _mm512_dpbusd_epi32(a[k][j], v[k], w);
      }
    }
    __m512i s[4];
    for (int k = 0; k < 4; ++k)
      s[k] = _mm512_srai_epi32(
          _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(a[k][2], 16), _mm512_slli_epi32(a[k][1], 8)), a[k][0]),
          kPrecisionBits);
    // per lane: packs keeps (v0, v1) and (v2, v3) in order, packus joins them: 16 columns in order
    const __m512i out = _mm512_packus_epi16(_mm512_packs_epi32(s[0], s[1]), _mm512_packs_epi32(s[2], s[3]));
    _mm512_mask_storeu_epi8(dst + i, m, out);
  }
}

// ---- normalization ------------------------------------------------------------------------

// normalize8_fma (cpu/anyres_simd.h) for 16 bytes: the same operations per lane, so the same bits;
// kStream: a non-temporal store of one whole cache line (out 64-byte aligned).
template <bool kStream = false>
VLMK_AVX512 inline void normalize16_fma(const uint8_t* in, const FastNorm& k, float* out) {
  const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in))));
  const __m512 c255 = _mm512_set1_ps(255.0f), r255 = _mm512_set1_ps(1.0f / 255.0f);
  __m512 q = _mm512_mul_ps(x, r255);
  q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, c255, x), r255, q);  // x / 255
  const __m512 d = _mm512_sub_ps(q, _mm512_set1_ps(k.mean)), sd = _mm512_set1_ps(k.stdv), rs = _mm512_set1_ps(k.rstd);
  __m512 y = _mm512_mul_ps(d, rs);
  y = _mm512_fmadd_ps(_mm512_fnmadd_ps(y, sd, d), rs, y);  // d / std
  if constexpr (kStream)
    _mm512_stream_ps(out, y);
  else
    _mm512_storeu_ps(out, y);
}

}  // namespace anyres
}  // namespace vlmk
#pragma GCC diagnostic pop
#endif
