// C++ CPU topk_select_tokens: per batch row a partial sort of token indices by (score desc, index
// asc, NaN last), then a row copy of the selected tokens; rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "ops/kernels.h"

namespace vlmk {
namespace {

template <typename T>
inline bool score_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na != nb) return nb;  // NaN ranks below every number
  if (!na && a != b) return a > b;
  return ia < ib;
}

}  // namespace

// Arguments are checked by the op (csrc/ops/topk_select.cpp): contiguous scores [B, N], tokens [B, N, D].
std::tuple<at::Tensor, at::Tensor> topk_select_tokens_cpu(const at::Tensor& scores, const at::Tensor& tokens,
                                                          int64_t k) {
  TORCH_INTERNAL_ASSERT(scores.is_contiguous() && tokens.is_contiguous());
  const int64_t Bn = scores.size(0), N = scores.size(1), D = tokens.size(2);
  auto index = at::empty({Bn, k}, scores.options().dtype(at::kLong));
  auto selected = at::empty({Bn, k, D}, tokens.options());
  if (Bn == 0 || k == 0) return {selected, index};
  const int64_t row_bytes = D * tokens.element_size();
  const char* src = static_cast<const char*>(tokens.const_data_ptr());
  char* dst = static_cast<char*>(selected.mutable_data_ptr());
  int64_t* idx_out = index.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_select_tokens_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    at::parallel_for(0, Bn, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> order(N);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* row = s + b * N;
        std::iota(order.begin(), order.end(), int64_t(0));
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t i, int64_t j) {
          return score_before<acc_t>(static_cast<acc_t>(row[i]), i, static_cast<acc_t>(row[j]), j);
        });
        for (int64_t r = 0; r < k; ++r) {
          idx_out[b * k + r] = order[r];
          std::memcpy(dst + (b * k + r) * row_bytes, src + (b * N + order[r]) * row_bytes, row_bytes);
        }
      }
    });
  });
  return {selected, index};
}

}  // namespace vlmk
