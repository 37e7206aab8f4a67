// torch.ops.vlmkernels.moe_topk_route on CPU and CUDA tensors: argument checks, the kernel call and
// its autograd (weights w.r.t. logits), all registered from C++ so that a call never enters Python
// unless it forces a Python backend (ops/dispatch.h). Semantics: vlmkernels/moe/route.py.
#include <torch/autograd.h>

#include "bindings.h"
#include "common/check.h"
#include "ops/dispatch.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {

using Route = std::tuple<at::Tensor, at::Tensor>;
using RouteSig = Route(const at::Tensor&, int64_t, c10::string_view, bool, const std::optional<at::Tensor>&, int64_t,
                       int64_t, c10::string_view, double, at::ScalarType, c10::string_view);
constexpr int64_t kMaxExpertsCuda = 1024;  // the CUDA kernel keeps a row in a warp's registers

struct RouteCodes {
  int64_t scoring, group_score;
};

// The messages match vlmkernels.moe.route.check_route_args (the Python backends' copy), word for word.
RouteCodes check_route_args(const at::Tensor& logits, int64_t top_k, c10::string_view scoring,
                            const std::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups,
                            c10::string_view group_score, at::ScalarType weights_dtype) {
  VLMK_CHECK_ARG(logits.dim() == 2, "moe_topk_route: logits must be 2-D [T, E], got shape ", shape_str(logits.sizes()));
  VLMK_CHECK_TYPE(is_float_dtype(logits.scalar_type()),
                  "moe_topk_route: logits must be float32/float16/bfloat16/float64, got ", dtype_name(logits.scalar_type()));
  RouteCodes c{scoring == "sigmoid" ? 1 : 0, group_score == "max" ? 1 : 0};
  VLMK_CHECK_ARG(scoring == "softmax" || scoring == "sigmoid",
                 "moe_topk_route: scoring must be one of ('softmax', 'sigmoid'), got '", scoring, "'");
  VLMK_CHECK_ARG(group_score == "top2_sum" || group_score == "max",
                 "moe_topk_route: group_score must be one of ('top2_sum', 'max'), got '", group_score, "'");
  const int64_t E = logits.size(1);
  VLMK_CHECK_ARG(top_k >= 1 && top_k <= E, "moe_topk_route: top_k must be in [1, E=", E, "], got top_k=", top_k);
  VLMK_CHECK_ARG(num_groups >= 1 && E % num_groups == 0, "moe_topk_route: E=", E,
                 " is not divisible by num_groups=", num_groups);
  VLMK_CHECK_ARG(topk_groups >= 1 && topk_groups <= num_groups, "moe_topk_route: topk_groups must be in [1, num_groups=",
                 num_groups, "], got ", topk_groups);
  const int64_t eligible = topk_groups * (E / num_groups);
  VLMK_CHECK_ARG(eligible >= top_k, "moe_topk_route: too few eligible experts: topk_groups*E/num_groups = ", eligible,
                 " < top_k=", top_k);
  if (bias) {
    VLMK_CHECK_ARG(bias->dim() == 1 && bias->size(0) == E, "moe_topk_route: bias must have shape [E=", E, "], got ",
                   shape_str(bias->sizes()));
    VLMK_CHECK_TYPE(is_float_dtype(bias->scalar_type()), "moe_topk_route: bias must be a float tensor, got ",
                    dtype_name(bias->scalar_type()));
    VLMK_CHECK_ARG(bias->device() == logits.device(), "moe_topk_route: bias is on ", bias->device(), " but logits on ",
                   logits.device());
  }
  VLMK_CHECK_TYPE(is_float_dtype(weights_dtype), "moe_topk_route: weights_dtype must be a float dtype, got ",
                  dtype_name(weights_dtype));
  return c;
}

template <c10::DeviceType kDevice>
Route route(const at::Tensor& logits, int64_t top_k, c10::string_view scoring, bool renormalize,
            const std::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups, c10::string_view group_score,
            double scaling_factor, at::ScalarType weights_dtype, c10::string_view backend) {
  constexpr bool kCuda = kDevice == c10::DeviceType::CUDA;
  const RouteCodes c = check_route_args(logits, top_k, scoring, bias, num_groups, topk_groups, group_score, weights_dtype);
  if (!runs_native(backend, kCuda ? "cuda" : "cpu"))
    return call_python_backend<Route>("moe_topk_route", logits, top_k, scoring, renormalize, bias, num_groups,
                                      topk_groups, group_score, scaling_factor, weights_dtype, backend);
  const int64_t T = logits.size(0), E = logits.size(1);
  if (T == 0)
    return {at::empty({0, top_k}, logits.options().dtype(weights_dtype)), at::empty({0, top_k}, logits.options().dtype(at::kInt))};
  // fp64 logits: fp64 math on the CPU, fp32 on the GPU (as the triton backend)
  const at::Tensor x = (kCuda && logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits).contiguous();
  std::optional<at::Tensor> b;
  if (bias) b = bias->to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
#ifdef VLMK_WITH_CUDA
  if constexpr (kCuda) {
    VLMK_CHECK_ARG(E <= kMaxExpertsCuda, "moe_topk_route: the cuda backend takes E <= ", kMaxExpertsCuda, ", got E=", E);
    auto [w, ids] = moe_topk_route_cuda(x, b, top_k, c.scoring, renormalize, num_groups, topk_groups, c.group_score,
                                        scaling_factor);
    return {w.scalar_type() == weights_dtype ? w : w.to(weights_dtype), ids};
  }
#endif
  auto [w, ids] = moe_topk_route_cpu(x, b, top_k, c.scoring, renormalize, num_groups, topk_groups, c.group_score,
                                     scaling_factor);
  return {w.scalar_type() == weights_dtype ? w : w.to(weights_dtype), ids};
}

// d(weights)/d(logits) contracted with grad_w, recomputing the scores from the logits. The Python
// copy (vlmkernels.moe.route.route_backward_math, used when this extension is absent) is tested
// against it.
at::Tensor route_backward(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& grad_w, bool softmax,
                          bool renormalize, double scale) {
  const auto cdt = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.to(cdt);
  const at::Tensor raw = softmax ? at::softmax(x, -1) : at::sigmoid(x);
  const at::Tensor finite = at::isfinite(raw);
  const at::Tensor s = raw.masked_fill(finite.logical_not(), 0);
  const at::Tensor idx = ids.to(at::kLong);
  const at::Tensor w = s.gather(1, idx);
  at::Tensor g = grad_w.to(cdt) * scale;
  if (renormalize) {
    at::Tensor denom = w.sum(-1, true);
    const at::Tensor pos = denom > 0;
    denom = at::where(pos, denom, at::ones_like(denom));  // a zero sum divides by 1: constant
    const at::Tensor r = w / denom;
    // d(w_j / S)/d(w_i) = (delta_ij - r_j) / S
    g = at::where(pos, (g - (g * r).sum(-1, true)) / denom, g);
  }
  at::Tensor G = at::zeros_like(s).scatter_add_(1, idx, g);  // gradient w.r.t. the score vector
  G = G.masked_fill(finite.logical_not(), 0);                // scores forced to 0 are constants
  const at::Tensor dx = softmax ? s * (G - (s * G).sum(-1, true)) : G * s * (1 - s);
  return dx.to(logits.scalar_type());
}

const c10::TypedOperatorHandle<RouteSig>& route_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::moe_topk_route", "").typed<RouteSig>();
  return op;
}

class RouteFunction : public torch::autograd::Function<RouteFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                int64_t top_k, const std::string& scoring, bool renormalize,
                                                const std::optional<at::Tensor>& bias, int64_t num_groups,
                                                int64_t topk_groups, const std::string& group_score,
                                                double scaling_factor, at::ScalarType weights_dtype,
                                                const std::string& backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [w, ids] = route_op().call(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
                                    scaling_factor, weights_dtype, backend);
    ctx->save_for_backward({logits, ids});
    ctx->saved_data["softmax"] = scoring == "softmax";
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scale"] = scaling_factor;
    ctx->mark_non_differentiable({ids});
    return {w, ids};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::autograd::variable_list out(11);  // one per forward argument; only logits gets one
    if (grads[0].defined() && ctx->needs_input_grad(0))
      out[0] = route_backward(saved[0], saved[1], grads[0], ctx->saved_data["softmax"].toBool(),
                              ctx->saved_data["renormalize"].toBool(), ctx->saved_data["scale"].toDouble());
    return out;
  }
};

// At the Autograd key: a call that needs no gradient goes straight to the kernel below.
Route route_autograd(c10::DispatchKeySet ks, const at::Tensor& logits, int64_t top_k, c10::string_view scoring,
                     bool renormalize, const std::optional<at::Tensor>& bias, int64_t num_groups,
                     int64_t topk_groups, c10::string_view group_score, double scaling_factor,
                     at::ScalarType weights_dtype, c10::string_view backend) {
  if (!(at::GradMode::is_enabled() && logits.requires_grad()))
    return route_op().redispatch(ks & c10::after_autograd_keyset, logits, top_k, scoring, renormalize, bias,
                                 num_groups, topk_groups, group_score, scaling_factor, weights_dtype, backend);
  auto out = RouteFunction::apply(logits, top_k, std::string(scoring), renormalize, bias, num_groups, topk_groups,
                                  std::string(group_score), scaling_factor, weights_dtype, std::string(backend));
  return {out[0], out[1]};
}

}  // namespace
}  // namespace vlmk

TORCH_LIBRARY_IMPL(vlmkernels, CPU, m) { m.impl("moe_topk_route", TORCH_FN(vlmk::route<c10::DeviceType::CPU>)); }
#ifdef VLMK_WITH_CUDA
TORCH_LIBRARY_IMPL(vlmkernels, CUDA, m) { m.impl("moe_topk_route", TORCH_FN(vlmk::route<c10::DeviceType::CUDA>)); }
#endif
TORCH_LIBRARY_IMPL(vlmkernels, Autograd, m) { m.impl("moe_topk_route", TORCH_FN(vlmk::route_autograd)); }

// The same C++ entry without the dispatcher, for the bench's host-overhead rows.
VLMK_BINDINGS(moe_route_op) {
  namespace py = pybind11;
  // the schema's defaults, so that the bench calls both paths with the same arguments
  const auto args = [] {
    return std::make_tuple(py::arg("logits"), py::arg("top_k"), py::arg("scoring") = "softmax",
                           py::arg("renormalize") = true, py::arg("bias") = py::none(), py::arg("num_groups") = 1,
                           py::arg("topk_groups") = 1, py::arg("group_score") = "top2_sum",
                           py::arg("scaling_factor") = 1.0, py::arg("weights_dtype") = at::kFloat,
                           py::arg("backend") = "auto");
  };
  std::apply([&](auto... a) { m.def("moe_topk_route_cpu", &vlmk::route<c10::DeviceType::CPU>, "no dispatcher", a...); },
             args());
#ifdef VLMK_WITH_CUDA
  std::apply([&](auto... a) { m.def("moe_topk_route_cuda", &vlmk::route<c10::DeviceType::CUDA>, "no dispatcher", a...); },
             args());
#endif
}
