// Per-element MoE routing math shared by the C++ CPU kernel (csrc/cpu/moe_route.cpp) and the CUDA
// kernel (csrc/cuda/moe_route.cu), so that CPU tests exercise the arithmetic the GPU runs.
// Header-only and free of torch includes: nvcc compiles it with plain ATen in the .cu file.
#pragma once
#include <math.h>
#include <stdint.h>

#include "hd.h"

namespace vlmk {
namespace moe {

enum Scoring : int { kSoftmax = 0, kSigmoid = 1 };
enum GroupScore : int { kTop2Sum = 0, kMax = 1 };

VLMK_HD float exp_(float x) { return expf(x); }
VLMK_HD double exp_(double x) { return exp(x); }

// NaN (and, for scores, +-Inf) count as 0: a poisoned row then routes deterministically.
template <typename T>
VLMK_HD T nan_to_zero(T x) { return x != x ? T(0) : x; }
template <typename T>
VLMK_HD T finite_or_zero(T x) { return (x - x == T(0)) ? x : T(0); }

template <typename T>
VLMK_HD T sigmoid(T x) { return T(1) / (T(1) + exp_(-x)); }

// Score of one expert. Softmax needs the row max and 1/sum(exp(x - max)) computed by the caller;
// a NaN/Inf anywhere in a softmax row makes those non-finite and every score of the row 0.
template <typename T>
VLMK_HD T softmax_score(T exp_shifted, T inv_sum) { return finite_or_zero(exp_shifted * inv_sum); }

template <typename T>
VLMK_HD T expert_score(T logit, int scoring, T row_max, T inv_sum) {
  return scoring == kSoftmax ? softmax_score(exp_(logit - row_max), inv_sum) : finite_or_zero(sigmoid(logit));
}

// Selection key: biased score, NaN (e.g. a NaN bias, or inf - inf) counts as 0.
template <typename T>
VLMK_HD T selection_key(T score, T bias) { return nan_to_zero(score + bias); }

// Strict order used everywhere: larger value first, then lower index ("lower indices win").
template <typename T>
VLMK_HD bool ranks_before(T a, int ia, T b, int ib) { return a > b || (a == b && ia < ib); }

// Running top-2 of a group (for top2_sum) or max; start with count = 0.
template <typename T>
struct Top2 {
  T first, second;
  int count;
  VLMK_HD void init() { count = 0; first = second = T(0); }
  VLMK_HD void push(T v) {
    if (count == 0) { first = v; }
    else if (count == 1 || v > second) {
      if (v > first) { second = first; first = v; } else { second = v; }
    }
    count = count < 2 ? count + 1 : 2;
  }
  // merges another partial (used by the CUDA warp reduction)
  VLMK_HD void merge(const Top2& o) {
    if (o.count > 0) push(o.first);
    if (o.count > 1) push(o.second);
  }
  VLMK_HD T score(int mode) const {
    T s = (mode == kMax || count < 2) ? first : first + second;
    return nan_to_zero(s);
  }
};

// Ordered top-k buffer of (value, id), best first by ranks_before. Insertion keeps it sorted, so a
// scan over candidates in any order yields the same k winners (ties to the lowest id).
template <typename T>
VLMK_HD void topk_insert(T* vals, int* ids, int& count, int k, T v, int id) {
  if (count == k && !ranks_before(v, id, vals[k - 1], ids[k - 1])) return;
  int pos = count < k ? count++ : k - 1;
  while (pos > 0 && ranks_before(v, id, vals[pos - 1], ids[pos - 1])) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = v;
  ids[pos] = id;
}

// Renormalisation divisor: the sum of the selected weights, 1 when it is not positive.
template <typename T>
VLMK_HD T renorm_divisor(T sum) { return sum > T(0) ? sum : T(1); }

}  // namespace moe
}  // namespace vlmk
