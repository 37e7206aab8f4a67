// Pillow-compatible antialiased bicubic resampling of 8-bit images (Pillow's Resample.c), shared by
// the C++ CPU kernel and the CUDA kernel so that CPU tests cover the CUDA arithmetic.
//
// Per axis and output pixel i: center = (i + 0.5) * scale; support = 2 * max(scale, 1); the taps
// are source pixels [xmin, xmin + count) with weights cubic((j - center + 0.5) / max(scale, 1))
// (a = -0.5), normalised to sum 1 and quantised to 22-bit fixed point. Each pass accumulates in
// int32 from a rounding bias of 2^21 and clips (acc >> 22) to [0, 255]. The double arithmetic uses
// explicit round-to-nearest operations on the device so nvcc cannot contract it into FMAs, which
// would change the coefficients' last bits.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace vlmk {
namespace anyres {

constexpr int kPrecisionBits = 22;  // Pillow: 32 - 8 - 2
constexpr int32_t kRoundBias = 1 << (kPrecisionBits - 1);

#if defined(__CUDA_ARCH__)
VLMK_HD double dmul(double a, double b) { return __dmul_rn(a, b); }
VLMK_HD double dadd(double a, double b) { return __dadd_rn(a, b); }
VLMK_HD double dsub(double a, double b) { return __dsub_rn(a, b); }
VLMK_HD double ddiv(double a, double b) { return __ddiv_rn(a, b); }
VLMK_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
VLMK_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
#else
VLMK_HD double dmul(double a, double b) { return a * b; }
VLMK_HD double dadd(double a, double b) { return a + b; }
VLMK_HD double dsub(double a, double b) { return a - b; }
VLMK_HD double ddiv(double a, double b) { return a / b; }
VLMK_HD float fsub(float a, float b) { return a - b; }
VLMK_HD float fdiv(float a, float b) { return a / b; }
#endif

// Pillow's bicubic_filter with a = -0.5, evaluated in Pillow's operation order.
VLMK_HD double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return dadd(dmul(dmul(dsub(dmul(a + 2.0, x), a + 3.0), x), x), 1.0);
  if (x < 2.0) return dmul(dsub(dmul(dadd(dmul(dsub(x, 5.0), x), 8.0), x), 4.0), a);
  return 0.0;
}

struct AxisScale {
  double scale, filterscale, support;
  int ksize;  // taps reserved per output pixel
};

VLMK_HD AxisScale axis_scale(int in_size, int out_size) {
  AxisScale s;
  // Pillow computes (in1 - in0) in float: exact for any image size below 2^24
  s.scale = ddiv(static_cast<double>(in_size), static_cast<double>(out_size));
  s.filterscale = s.scale < 1.0 ? 1.0 : s.scale;
  s.support = dmul(2.0, s.filterscale);
  s.ksize = static_cast<int>(ceil(s.support)) * 2 + 1;
  return s;
}

// Taps of output pixel i: first source index and count (Pillow's bounds).
VLMK_HD void tap_range(const AxisScale& s, int in_size, int i, double* center, int* xmin, int* count) {
  const double c = dmul(dadd(static_cast<double>(i), 0.5), s.scale);
  int lo = static_cast<int>(dadd(dsub(c, s.support), 0.5));  // C cast truncates toward zero
  if (lo < 0) lo = 0;
  int hi = static_cast<int>(dadd(dadd(c, s.support), 0.5));
  if (hi > in_size) hi = in_size;
  *center = c;
  *xmin = lo;
  *count = hi - lo;
}

VLMK_HD double tap_weight(const AxisScale& s, double center, int j) {
  // Pillow: (x + xmin - center + 0.5) * (1.0 / filterscale) with j = x + xmin
  return bicubic(dmul(dadd(dsub(static_cast<double>(j), center), 0.5), ddiv(1.0, s.filterscale)));
}

VLMK_HD int32_t quantize_weight(double w) {
  const double f = dmul(w, static_cast<double>(1 << kPrecisionBits));
  return w < 0 ? static_cast<int32_t>(dadd(-0.5, f)) : static_cast<int32_t>(dadd(0.5, f));
}

// Fixed-point weights of output pixel i into k[0 .. count) (k must hold s.ksize entries; the rest
// are zeroed). Two passes over the taps recompute the same doubles instead of buffering them.
VLMK_HD int tap_weights(const AxisScale& s, int in_size, int i, int32_t* k, int* xmin) {
  double center;
  int count;
  tap_range(s, in_size, i, &center, xmin, &count);
  double total = 0.0;
  for (int t = 0; t < count; ++t) total = dadd(total, tap_weight(s, center, *xmin + t));
  for (int t = 0; t < count; ++t) {
    double w = tap_weight(s, center, *xmin + t);
    if (total != 0.0) w = ddiv(w, total);
    k[t] = quantize_weight(w);
  }
  for (int t = count; t < s.ksize; ++t) k[t] = 0;
  return count;
}

// Pillow's clip8: (acc >> 22) clamped to [0, 255]; acc already includes the rounding bias.
VLMK_HD uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Pillow >= 13 (python-pillow/Pillow#9549): vertical pass first when the height shrinks by more
// than twice as many pixels as the width. The order changes the rounding between the passes.
VLMK_HD bool vertical_first(int in_h, int in_w, int out_h, int out_w) {
  return out_h < in_h && (in_h - out_h) > 2 * (in_w - out_w);
}

// HF's numpy RGBA -> RGB: composite onto white in float64, round half to even.
VLMK_HD uint8_t composite_white(uint8_t c, uint8_t a) {
  const double alpha = ddiv(static_cast<double>(a), 255.0);
  const double v = dadd(dmul(alpha, static_cast<double>(c)), dmul(dsub(1.0, alpha), 255.0));
  return static_cast<uint8_t>(nearbyint(v));  // default rounding mode: half to even, like np.round
}

// HF PIL backend: rescale in float64 (x * (1/255)), cast to float32, then (x - mean) / std in fp32.
VLMK_HD float normalize_u8(uint8_t v, float mean, float std) {
  const float x = static_cast<float>(dmul(static_cast<double>(v), 1.0 / 255.0));
  return fdiv(fsub(x, mean), std);
}

}  // namespace anyres
}  // namespace vlmk
