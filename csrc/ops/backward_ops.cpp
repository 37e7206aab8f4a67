// C++ autograd for the ops implemented in Python (Triton and reference backends) whose backward is
// an op of its own: fused_moe (fused_moe_backward) and anyres_pack (anyres_pack_backward). At the
// Autograd key a call that needs no gradient goes straight to the Python impl below, without the
// Python autograd frame torch.library.register_autograd would put on every call; one that needs
// one records a node whose backward calls the backward op. The Python formulas in
// vlmkernels/moe/fused.py and vlmkernels/anyres/pack.py serve builds without this extension.
#include <torch/autograd.h>

#include "ops/dispatch.h"

namespace vlmk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- fused_moe ------------------------------------------------------------------------------

using MoeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, c10::string_view, c10::string_view);
using MoeBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view, c10::string_view);

const c10::TypedOperatorHandle<MoeSig>& moe_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::fused_moe", "").typed<MoeSig>();
  return op;
}
const c10::TypedOperatorHandle<MoeBwdSig>& moe_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::fused_moe_backward", "").typed<MoeBwdSig>();
  return op;
}

class MoeFunction : public torch::autograd::Function<MoeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                               const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& ids,
                               const std::string& activation, const std::string& backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({hidden, gate_up_proj, down_proj, weights, ids});
    ctx->saved_data["activation"] = activation;
    return {moe_op().call(hidden, gate_up_proj, down_proj, weights, ids, activation, backend)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dh, dgu, dd, dw] = moe_backward_op().call(grads[0], s[0], s[1], s[2], s[3], s[4],
                                                    ctx->saved_data["activation"].toStringRef(), "auto");
    variable_list out{dh, dgu, dd, dw, at::Tensor(), at::Tensor(), at::Tensor()};
    for (size_t i = 0; i < 4; ++i)
      if (!ctx->needs_input_grad(i)) out[i] = at::Tensor();
    return out;
  }
};

at::Tensor moe_autograd(c10::DispatchKeySet ks, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                        const at::Tensor& down_proj, const at::Tensor& weights, const at::Tensor& ids,
                        c10::string_view activation, c10::string_view backend) {
  const bool grad = at::GradMode::is_enabled() && (hidden.requires_grad() || gate_up_proj.requires_grad() ||
                                                   down_proj.requires_grad() || weights.requires_grad());
  if (!grad)
    return moe_op().redispatch(ks & c10::after_autograd_keyset, hidden, gate_up_proj, down_proj, weights, ids,
                               activation, backend);
  return MoeFunction::apply(hidden, gate_up_proj, down_proj, weights, ids, std::string(activation),
                            std::string(backend))[0];
}

// ---- anyres_pack ----------------------------------------------------------------------------

using PackSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                           c10::string_view);
using PackBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, c10::string_view);

const c10::TypedOperatorHandle<PackSig>& pack_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::anyres_pack", "").typed<PackSig>();
  return op;
}
const c10::TypedOperatorHandle<PackBwdSig>& pack_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::anyres_pack_backward", "").typed<PackBwdSig>();
  return op;
}

class PackFunction : public torch::autograd::Function<PackFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& plan,
                               const std::optional<at::Tensor>& newline, int64_t total_rows,
                               const std::string& backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({features, plan, newline.value_or(at::Tensor())});
    return {pack_op().call(features, plan, newline, total_rows, backend)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::optional<at::Tensor> newline = s[2].defined() ? std::optional<at::Tensor>(s[2]) : std::nullopt;
    auto [g_features, g_newline] = pack_backward_op().call(grads[0].contiguous(), s[0], s[1], newline, "auto");
    return {ctx->needs_input_grad(0) ? g_features : at::Tensor(), at::Tensor(),
            newline && ctx->needs_input_grad(2) ? g_newline : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor pack_autograd(c10::DispatchKeySet ks, const at::Tensor& features, const at::Tensor& plan,
                         const std::optional<at::Tensor>& newline, int64_t total_rows, c10::string_view backend) {
  const bool grad =
      at::GradMode::is_enabled() && (features.requires_grad() || (newline && newline->requires_grad()));
  if (!grad) return pack_op().redispatch(ks & c10::after_autograd_keyset, features, plan, newline, total_rows, backend);
  return PackFunction::apply(features, plan, newline, total_rows, std::string(backend))[0];
}

}  // namespace
}  // namespace vlmk

TORCH_LIBRARY_IMPL(vlmkernels, Autograd, m) {
  m.impl("fused_moe", TORCH_FN(vlmk::moe_autograd));
  m.impl("anyres_pack", TORCH_FN(vlmk::pack_autograd));
}
