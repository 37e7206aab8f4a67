// torch.ops.vlmkernels.attention and attention_backward on CPU tensors: the argument checks (the
// Python copy's, vlmkernels/qformer/attention.py _check / _check_backward / _check_cu_seqlens_values,
// word for word), the kernel call (csrc/cpu/attention.cpp) or a forced Python backend, and the
// autograd of attention (for every device) whose backward is the attention_backward op.
#include <torch/autograd.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/check.h"
#include "ops/dispatch.h"
#include "ops/kernels.h"

namespace vlmk {
namespace {

using OptT = std::optional<at::Tensor>;
using Fwd = std::tuple<at::Tensor, at::Tensor>;
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using FwdSig = Fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&,
                   std::optional<double>, const OptT&, double, c10::string_view);
using BwdSig = Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const OptT&, const OptT&, const OptT&, std::optional<double>, const OptT&,
                   double, c10::string_view);

// Python's repr of a float ("0.5", "1.0", "-0.1", "1e-05", "inf", "nan").
std::string py_float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);  // shortest round trip
  std::string sci(buf, res.ptr);
  const size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  const int exp10 = std::atoi(sci.c_str() + e + 1);
  std::string sign;
  if (!mant.empty() && mant[0] == '-') {
    sign = "-";
    mant = mant.substr(1);
  }
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  const int decpt = exp10 + 1;  // position of the decimal point after the first digit
  if (decpt > -4 && decpt <= 16) {
    std::string s;
    if (decpt <= 0) {
      s = "0." + std::string(-decpt, '0') + digits;
    } else if (decpt >= static_cast<int>(digits.size())) {
      s = digits + std::string(decpt - digits.size(), '0') + ".0";
    } else {
      s = digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
    return sign + s;
  }
  std::string m = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
  char ebuf[16];
  std::snprintf(ebuf, sizeof(ebuf), "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
  return sign + m + ebuf;
}

// Python's repr of a torch.device.
std::string py_device_repr(const c10::Device& dev) {
  std::string s = std::string("device(type='") + c10::DeviceTypeName(dev.type(), /*lower_case=*/true) + "'";
  if (dev.has_index()) s += ", index=" + std::to_string(dev.index());
  return s + ")";
}

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// _check: metadata only.
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& key_padding_mask,
                     const OptT& attn_mask, const OptT& cu_seqlens_k, const OptT& dropout_mask, double dropout_p) {
  VLMK_CHECK_ARG(q.dim() == 4, "attention: q must be 4-D [B, Lq, H, d], got shape ", shape_str(q.sizes()));
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), d = q.size(3);
  const bool varlen = cu_seqlens_k.has_value();
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens_k;
    VLMK_CHECK_TYPE(cu.scalar_type() == at::kInt, "attention: cu_seqlens_k must be an int32 tensor, got ",
                    dtype_name(cu.scalar_type()));
    VLMK_CHECK_ARG(cu.dim() == 1 && cu.size(0) == B + 1, "attention: cu_seqlens_k must be [B+1] = [", B + 1,
                   "], got shape ", shape_str(cu.sizes()));
    VLMK_CHECK_ARG(k.dim() == 3, "attention: with cu_seqlens_k, k must be 3-D [total_k, H, d], got shape ",
                   shape_str(k.sizes()));
  } else {
    VLMK_CHECK_ARG(k.dim() == 4, "attention: k must be 4-D [B, Lk, H, d], got shape ", shape_str(k.sizes()));
    VLMK_CHECK_ARG(k.size(0) == B, "attention: k's batch ", k.size(0), " differs from q's ", B);
  }
  VLMK_CHECK_ARG(k.size(-2) == H, "attention: k has ", k.size(-2), " heads, q has ", H);
  VLMK_CHECK_ARG(k.size(-1) == d, "attention: k's head dim ", k.size(-1), " differs from q's ", d);
  VLMK_CHECK_ARG(v.sizes() == k.sizes(), "attention: v must have k's shape ", shape_str(k.sizes()), ", got ",
                 shape_str(v.sizes()));
  VLMK_CHECK_TYPE(is_float_dtype(q.scalar_type()), "attention: q must be float32, float16, bfloat16 or float64, got ",
                  dtype_name(q.scalar_type()));
  VLMK_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "attention: k must have q's dtype ", dtype_name(q.scalar_type()),
                  ", got ", dtype_name(k.scalar_type()));
  VLMK_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "attention: v must have q's dtype ", dtype_name(q.scalar_type()),
                  ", got ", dtype_name(v.scalar_type()));
  const int64_t nk = varlen ? k.size(0) : k.size(1);
  const std::vector<int64_t> kpm_shape = varlen ? std::vector<int64_t>{nk} : std::vector<int64_t>{B, nk};
  const std::vector<int64_t> am_shape = varlen ? std::vector<int64_t>{Lq, nk} : std::vector<int64_t>{B, Lq, nk};
  const std::vector<int64_t> dm_shape =
      varlen ? std::vector<int64_t>{H, Lq, nk} : std::vector<int64_t>{B, H, Lq, nk};
  const struct {
    const char* name;
    const OptT& mask;
    const std::vector<int64_t>& want;
  } masks[] = {{"key_padding_mask", key_padding_mask, kpm_shape},
               {"attn_mask", attn_mask, am_shape},
               {"dropout_mask", dropout_mask, dm_shape}};
  for (const auto& m : masks) {
    if (!m.mask) continue;
    VLMK_CHECK_TYPE(m.mask->scalar_type() == at::kBool, "attention: ", m.name,
                    " must be a bool tensor (True = keep), got ", dtype_name(m.mask->scalar_type()));
    VLMK_CHECK_ARG(m.mask->sizes() == at::IntArrayRef(m.want), "attention: ", m.name, " must have shape ",
                   shape_str(m.want), varlen ? " (packed keys: no batch axis)" : "", ", got ",
                   shape_str(m.mask->sizes()));
  }
  VLMK_CHECK_ARG(0.0 <= dropout_p && dropout_p < 1.0, "attention: dropout_p must be in [0, 1), got ",
                 py_float_repr(dropout_p));
  VLMK_CHECK_ARG(dropout_mask || !(dropout_p > 0.0),
                 "attention: dropout_p > 0 needs a dropout_mask (the functional API draws it)");
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"q", &q},
      {"k", &k},
      {"v", &v},
      {"key_padding_mask", key_padding_mask ? &*key_padding_mask : nullptr},
      {"attn_mask", attn_mask ? &*attn_mask : nullptr},
      {"cu_seqlens_k", cu_seqlens_k ? &*cu_seqlens_k : nullptr},
      {"dropout_mask", dropout_mask ? &*dropout_mask : nullptr}};
  bool one_device = true;
  for (const auto& [name, t] : named)
    if (t && t->device() != q.device()) one_device = false;
  if (!one_device) {
    std::string devices = "{";
    for (const auto& [name, t] : named) {
      if (!t) continue;
      devices += (devices.size() > 1 ? ", '" : "'") + std::string(name) + "': " + py_device_repr(t->device());
    }
    VLMK_CHECK_ARG(false, "attention: all tensors must be on one device, got ", devices, "}");
  }
}

// _check_cu_seqlens_values (one host read; the tensors are on the CPU here).
void check_cu_seqlens_values(const at::Tensor& cu_seqlens_k, int64_t total_k) {
  const at::Tensor cu = cu_seqlens_k.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  VLMK_CHECK_ARG(c[0] == 0 && c[n - 1] == total_k, "attention: cu_seqlens_k must run from 0 to total_k = ", total_k,
                 " (k.shape[0]), got ", c[0], " .. ", c[n - 1]);
  for (int64_t i = 1; i < n; ++i) {
    if (c[i] < c[i - 1]) {
      std::string list = "[";
      for (int64_t j = 0; j < n; ++j) list += (j ? ", " : "") + std::to_string(c[j]);
      VLMK_CHECK_ARG(false, "attention: cu_seqlens_k must be non-decreasing, got ", list, "]");
    }
  }
}

// _check_backward
void check_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2);
  const std::vector<int64_t> lse_shape{B, H, Lq};
  const std::pair<const char*, const at::Tensor*> shaped[] = {{"grad", &grad}, {"out", &out}, {"lse", &lse}};
  for (const auto& [name, t] : shaped) {
    const at::IntArrayRef want = t == &lse ? at::IntArrayRef(lse_shape) : q.sizes();
    VLMK_CHECK_ARG(t->sizes() == want, "attention_backward: ", name, " must have shape ", shape_str(want), ", got ",
                   shape_str(t->sizes()));
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad", &grad}, {"out", &out}})
    VLMK_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "attention_backward: ", name, " must have q's dtype ",
                    dtype_name(q.scalar_type()), ", got ", dtype_name(t->scalar_type()));
  VLMK_CHECK_TYPE(lse.scalar_type() == lse_dtype(q), "attention_backward: lse must be ", dtype_name(lse_dtype(q)),
                  ", got ", dtype_name(lse.scalar_type()));
}

double resolve_scale(const at::Tensor& q, std::optional<double> scale) {
  if (scale) return *scale;
  const int64_t d = q.size(3);
  return d ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0;
}

Fwd attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& key_padding_mask,
                  const OptT& attn_mask, const OptT& cu_seqlens_k, std::optional<double> scale,
                  const OptT& dropout_mask, double dropout_p, c10::string_view backend) {
  check_attention(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, dropout_mask, dropout_p);
  if (!runs_native(backend, "cpu"))
    return call_python_backend<Fwd>("attention", q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale,
                                    dropout_mask, dropout_p, backend);
  if (cu_seqlens_k) check_cu_seqlens_values(*cu_seqlens_k, k.size(0));
  return qformer_attention_cpu(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, resolve_scale(q, scale),
                               dropout_mask, dropout_p);
}

Bwd attention_backward_cpu(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& out, const at::Tensor& lse, const OptT& key_padding_mask,
                           const OptT& attn_mask, const OptT& cu_seqlens_k, std::optional<double> scale,
                           const OptT& dropout_mask, double dropout_p, c10::string_view backend) {
  check_attention(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, dropout_mask, dropout_p);
  check_backward(grad, q, out, lse);
  if (!runs_native(backend, "cpu"))
    return call_python_backend<Bwd>("attention_backward", grad, q, k, v, out, lse, key_padding_mask, attn_mask,
                                    cu_seqlens_k, scale, dropout_mask, dropout_p, backend);
  if (cu_seqlens_k) check_cu_seqlens_values(*cu_seqlens_k, k.size(0));  // the packed bounds are read
  return qformer_attention_backward_cpu(grad, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k,
                                        resolve_scale(q, scale), dropout_mask, dropout_p);
}

// ---- autograd (every device): the backward is the attention_backward op with the forward's backend --

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::attention", "").typed<FwdSig>();
  return op;
}
const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("vlmkernels::attention_backward", "").typed<BwdSig>();
  return op;
}

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, const OptT& key_padding_mask,
                                                const OptT& attn_mask, const OptT& cu_seqlens_k,
                                                std::optional<double> scale, const OptT& dropout_mask,
                                                double dropout_p, const std::string& backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse] =
        fwd_op().call(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p, backend);
    ctx->save_for_backward({q, k, v, out, lse, key_padding_mask.value_or(at::Tensor()),
                            attn_mask.value_or(at::Tensor()), cu_seqlens_k.value_or(at::Tensor()),
                            dropout_mask.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["backend"] = backend;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const c10::IValue& sc = ctx->saved_data["scale"];
    const std::optional<double> scale = sc.isNone() ? std::nullopt : std::optional<double>(sc.toDouble());
    auto [dq, dk, dv] = bwd_op().call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]),
                                      opt(s[7]), scale, opt(s[8]), ctx->saved_data["dropout_p"].toDouble(),
                                      ctx->saved_data["backend"].toStringRef());
    torch::autograd::variable_list out(10);
    if (ctx->needs_input_grad(0)) out[0] = dq;
    if (ctx->needs_input_grad(1)) out[1] = dk;
    if (ctx->needs_input_grad(2)) out[2] = dv;
    return out;
  }
};

Fwd attention_autograd(c10::DispatchKeySet ks, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const OptT& key_padding_mask, const OptT& attn_mask, const OptT& cu_seqlens_k,
                       std::optional<double> scale, const OptT& dropout_mask, double dropout_p,
                       c10::string_view backend) {
  if (!(at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())))
    return fwd_op().redispatch(ks & c10::after_autograd_keyset, q, k, v, key_padding_mask, attn_mask, cu_seqlens_k,
                               scale, dropout_mask, dropout_p, backend);
  auto out = AttentionFunction::apply(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask,
                                      dropout_p, std::string(backend));
  return {out[0], out[1]};
}

}  // namespace
}  // namespace vlmk

TORCH_LIBRARY_IMPL(vlmkernels, CPU, m) {
  m.impl("attention", TORCH_FN(vlmk::attention_cpu));
  m.impl("attention_backward", TORCH_FN(vlmk::attention_backward_cpu));
}
TORCH_LIBRARY_IMPL(vlmkernels, Autograd, m) { m.impl("attention", TORCH_FN(vlmk::attention_autograd)); }
