// torch.ops.vlmkernels.topk_select_tokens on CPU tensors: argument checks, the kernel call and its
// autograd (the gradient scattered back into the selected token rows), registered from C++
// (ops/dispatch.h). CUDA tensors take the Python backends. Semantics: vlmkernels/moe/select.py.
#include <torch/autograd.h>

#include "bindings.h"
#include "common/check.h"
#include "ops/dispatch.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {

using Select = std::tuple<at::Tensor, at::Tensor>;
using SelectSig = Select(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view);

// The messages match vlmkernels.moe.select.check_select_args (the Python backends' copy).
void check_select_args(const at::Tensor& scores, const at::Tensor& tokens, int64_t k) {
  VLMK_CHECK_TYPE(is_float_dtype(scores.scalar_type()), "topk_select_tokens: scores must be a float tensor, got ",
                  dtype_name(scores.scalar_type()));
  VLMK_CHECK_TYPE(is_float_dtype(tokens.scalar_type()), "topk_select_tokens: tokens must be a float tensor, got ",
                  dtype_name(tokens.scalar_type()));
  VLMK_CHECK_ARG(scores.dim() == 2, "topk_select_tokens: scores must be 2-D [B, N], got shape ", shape_str(scores.sizes()));
  VLMK_CHECK_ARG(tokens.dim() == 3 && tokens.size(0) == scores.size(0) && tokens.size(1) == scores.size(1),
                 "topk_select_tokens: tokens must be [B, N, D] matching scores [B, N]=", shape_str(scores.sizes()),
                 ", got ", shape_str(tokens.sizes()));
  VLMK_CHECK_ARG(tokens.device() == scores.device(), "topk_select_tokens: tokens are on ", tokens.device(),
                 " but scores on ", scores.device());
  const int64_t N = scores.size(1);
  VLMK_CHECK_ARG(k >= 0 && k <= N, "topk_select_tokens: k must be in [0, N=", N, "], got k=", k);
}

Select select_cpu(const at::Tensor& scores, const at::Tensor& tokens, int64_t k, c10::string_view backend) {
  check_select_args(scores, tokens, k);
  if (!runs_native(backend, "cpu")) return call_python_backend<Select>("topk_select_tokens", scores, tokens, k, backend);
  return topk_select_tokens_cpu(scores.contiguous(), tokens.contiguous(), k);
}

const c10::TypedOperatorHandle<SelectSig>& select_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::topk_select_tokens", "").typed<SelectSig>();
  return op;
}

class SelectFunction : public torch::autograd::Function<SelectFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& scores,
                                                const at::Tensor& tokens, int64_t k, const std::string& backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [selected, index] = select_op().call(scores, tokens, k, backend);
    ctx->save_for_backward({index});
    ctx->saved_data["tokens_shape"] = tokens.sym_sizes();  // symbolic under torch.compile
    ctx->mark_non_differentiable({index});
    return {selected, index};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(4);  // scores get none: the selection is piecewise constant
    if (grads[0].defined() && ctx->needs_input_grad(1)) {
      const at::Tensor index = ctx->get_saved_variables()[0];
      const auto shape = ctx->saved_data["tokens_shape"].toSymIntVector();
      // indices within a row are distinct, so a plain scatter is exact
      const at::Tensor rows = index.unsqueeze(-1).expand_symint({-1, -1, shape[2]});
      out[1] = grads[0].new_zeros_symint(shape).scatter_(1, rows, grads[0]);
    }
    return out;
  }
};

// At the Autograd key: a call that needs no gradient goes straight to the kernel below.
Select select_autograd(c10::DispatchKeySet ks, const at::Tensor& scores, const at::Tensor& tokens, int64_t k,
                       c10::string_view backend) {
  if (!(at::GradMode::is_enabled() && tokens.requires_grad()))  // scores get no gradient
    return select_op().redispatch(ks & c10::after_autograd_keyset, scores, tokens, k, backend);
  auto out = SelectFunction::apply(scores, tokens, k, std::string(backend));
  return {out[0], out[1]};
}

}  // namespace
}  // namespace vlmk

TORCH_LIBRARY_IMPL(vlmkernels, CPU, m) { m.impl("topk_select_tokens", TORCH_FN(vlmk::select_cpu)); }
TORCH_LIBRARY_IMPL(vlmkernels, Autograd, m) { m.impl("topk_select_tokens", TORCH_FN(vlmk::select_autograd)); }
