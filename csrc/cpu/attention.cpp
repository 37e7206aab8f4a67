// Q-Former attention on the CPU (semantics: vlmkernels/qformer/attention.py, math:
// python_ref/ops/qformer.py). The common case (no dropout, dense keys, every size non-zero) runs
// ATen's CPU flash attention on [B,H,L,d] views of the [B,L,H,d] inputs with an additive mask built
// from the bool masks; rows without a kept key are then set to out = 0, lse = +inf (the reference's
// convention, which the flash kernel's backward reads back as P = 0). Dropout masks, packed keys and
// empty sizes run the reference's composite (matmul / logsumexp / exp) in fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <limits>
#include <vector>

#include "ops/kernels.h"

namespace vlmk {
namespace {

using OptT = std::optional<at::Tensor>;
constexpr double kInf = std::numeric_limits<double>::infinity();

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool use_flash(const at::Tensor& q, const at::Tensor& k, const OptT& cu, const OptT& dropout_mask) {
  return !cu.has_value() && !dropout_mask.has_value() && q.numel() > 0 && k.size(1) > 0;
}

// keep [B, Lq or 1, Lk] (True = attend) of the dense layout, or undefined when nothing is masked.
at::Tensor dense_keep(const OptT& key_padding_mask, const OptT& attn_mask) {
  at::Tensor keep;
  if (key_padding_mask) keep = key_padding_mask->unsqueeze(1);
  if (attn_mask) keep = keep.defined() ? keep.logical_and(*attn_mask) : *attn_mask;
  return keep;
}

// The additive float mask [B, 1, Lq or 1, Lk] the flash kernel takes (0 keep, -inf drop).
std::optional<at::Tensor> additive_mask(const at::Tensor& keep, at::ScalarType dtype) {
  if (!keep.defined()) return std::nullopt;
  const auto mdt = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return at::zeros(keep.sizes(), keep.options().dtype(mdt)).masked_fill_(keep.logical_not(), -kInf).unsqueeze(1);
}

// [b, L, H, d] -> [b, H, L, d] in the accumulation dtype, contiguous (python_ref's _heads).
at::Tensor heads(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).transpose(1, 2).contiguous(); }

at::Tensor scores(const at::Tensor& qh, const at::Tensor& kh, const at::Tensor& keep, double scale) {
  at::Tensor s = at::matmul(qh, kh.transpose(-1, -2)).mul_(scale);
  if (keep.defined()) s.masked_fill_(keep.unsqueeze(1).logical_not(), -kInf);
  return s;
}

at::Tensor dropped(const at::Tensor& p, const at::Tensor& drop, double dropout_p) {
  if (!drop.defined()) return p;
  return p * drop.to(p.scalar_type()) / (1.0 - dropout_p);
}

struct Segment {
  int64_t lo, hi;  // batch rows of q
  at::Tensor k, v, keep, drop;  // k/v [1 or B, n, H, d]; keep [.., Lq, n]; drop [.., H, Lq, n]
};

// python_ref's _segments: one dense segment, or one per image of the packed keys.
std::vector<Segment> segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& kpm,
                              const OptT& attn_mask, const OptT& dropout_mask, const OptT& cu) {
  std::vector<Segment> out;
  const int64_t B = q.size(0);
  if (!cu) {
    out.push_back({0, B, k, v, dense_keep(kpm, attn_mask), dropout_mask.value_or(at::Tensor())});
    return out;
  }
  const at::Tensor bounds = cu->to(at::kLong).contiguous();
  const int64_t* c = bounds.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = c[b], hi = c[b + 1];
    at::Tensor keep;
    if (kpm) keep = kpm->slice(0, lo, hi).view({1, 1, hi - lo});
    if (attn_mask) {
      at::Tensor am = attn_mask->slice(1, lo, hi).unsqueeze(0);
      keep = keep.defined() ? keep.logical_and(am) : am;
    }
    at::Tensor drop = dropout_mask ? dropout_mask->slice(2, lo, hi).unsqueeze(0) : at::Tensor();
    out.push_back({b, b + 1, k.slice(0, lo, hi).unsqueeze(0), v.slice(0, lo, hi).unsqueeze(0), keep, drop});
  }
  return out;
}

at::Tensor cat_or(const std::vector<at::Tensor>& parts, at::IntArrayRef empty_shape, const at::Tensor& like,
                  at::ScalarType dtype) {
  if (parts.size() == 1) return parts[0];
  return parts.empty() ? at::zeros(empty_shape, like.options().dtype(dtype)) : at::cat(parts);
}

std::tuple<at::Tensor, at::Tensor> composite_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const OptT& kpm, const OptT& attn_mask, const OptT& cu,
                                                     double scale, const OptT& dropout_mask, double dropout_p) {
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t H = q.size(2), Lq = q.size(1), d = q.size(3);
  std::vector<at::Tensor> outs, lses;
  for (const Segment& s : segments(q, k, v, kpm, attn_mask, dropout_mask, cu)) {
    at::Tensor sc = scores(heads(q.slice(0, s.lo, s.hi), acc), heads(s.k, acc), s.keep, scale);
    at::Tensor p, lse;
    if (sc.size(-1) == 0) {
      p = sc;
      lse = at::full(sc.sizes().slice(0, 3), kInf, sc.options());
    } else {
      lse = at::logsumexp(sc, -1);
      const at::Tensor empty = at::isneginf(lse);
      p = at::exp(sc - lse.masked_fill(empty, 0.0).unsqueeze(-1));
      lse.masked_fill_(empty, kInf);
    }
    outs.push_back(at::matmul(dropped(p, s.drop, dropout_p), heads(s.v, acc)));
    lses.push_back(lse);
  }
  at::Tensor out = cat_or(outs, {0, H, Lq, d}, q, acc).transpose(1, 2).to(q.scalar_type()).contiguous();
  return {out, cat_or(lses, {0, H, Lq}, q, acc).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptT& kpm, const OptT& attn_mask, const OptT& cu, double scale,
    const OptT& dropout_mask, double dropout_p) {
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t H = q.size(2), Lq = q.size(1), d = q.size(3);
  const at::Tensor delta = (grad.to(acc) * out.to(acc)).sum(-1).transpose(1, 2);  // [B, H, Lq]
  std::vector<at::Tensor> dqs, dks, dvs;
  for (const Segment& s : segments(q, k, v, kpm, attn_mask, dropout_mask, cu)) {
    const at::Tensor qh = heads(q.slice(0, s.lo, s.hi), acc), kh = heads(s.k, acc), vh = heads(s.v, acc);
    const at::Tensor gh = heads(grad.slice(0, s.lo, s.hi), acc);
    // lse = +inf on rows without a kept key: P = 0 there
    const at::Tensor p = at::exp(scores(qh, kh, s.keep, scale) - lse.slice(0, s.lo, s.hi).to(acc).unsqueeze(-1));
    dvs.push_back(at::matmul(dropped(p, s.drop, dropout_p).transpose(-1, -2), gh));
    const at::Tensor dp = dropped(at::matmul(gh, vh.transpose(-1, -2)), s.drop, dropout_p);
    const at::Tensor ds = p * (dp - delta.slice(0, s.lo, s.hi).unsqueeze(-1)) * scale;
    dqs.push_back(at::matmul(ds, kh));
    dks.push_back(at::matmul(ds.transpose(-1, -2), qh));
  }
  at::Tensor dq = cat_or(dqs, {0, H, Lq, d}, q, acc).transpose(1, 2);
  at::Tensor dk, dv;
  if (!cu) {
    dk = dks[0].transpose(1, 2);
    dv = dvs[0].transpose(1, 2);
  } else {  // [1, H, n, d] per image -> packed [total_k, H, d]
    for (auto* parts : {&dks, &dvs})
      for (auto& t : *parts) t = t[0].transpose(0, 1);
    dk = cat_or(dks, {0, H, d}, k, acc);
    dv = cat_or(dvs, {0, H, d}, v, acc);
  }
  return {dq.to(q.scalar_type()).contiguous(), dk.to(k.scalar_type()).contiguous(),
          dv.to(v.scalar_type()).contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qformer_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const OptT& key_padding_mask, const OptT& attn_mask,
                                                         const OptT& cu_seqlens_k, double scale,
                                                         const OptT& dropout_mask, double dropout_p) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // compute in the inputs' dtype
  if (!use_flash(q, k, cu_seqlens_k, dropout_mask))
    return composite_forward(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p);
  const at::Tensor keep = dense_keep(key_padding_mask, attn_mask);
  auto [oh, lse_h] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.contiguous().transpose(1, 2), k.contiguous().transpose(1, 2), v.contiguous().transpose(1, 2), 0.0, false,
      additive_mask(keep, q.scalar_type()), scale);
  at::Tensor out = oh.transpose(1, 2).contiguous();  // the kernel writes [B, Lq, H, d]: no copy
  at::Tensor lse = lse_h.contiguous();
  if (keep.defined()) {  // rows without a kept key: out = 0, lse = +inf
    const at::Tensor empty = keep.any(-1).logical_not();  // [B, Lq or 1]
    if (empty.any().item<bool>()) {
      lse.masked_fill_(empty.unsqueeze(1), kInf);
      out.masked_fill_(empty.unsqueeze(-1).unsqueeze(-1), 0);
    }
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qformer_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptT& key_padding_mask, const OptT& attn_mask, const OptT& cu_seqlens_k,
    double scale, const OptT& dropout_mask, double dropout_p) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (!use_flash(q, k, cu_seqlens_k, dropout_mask))
    return composite_backward(grad, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k, scale,
                              dropout_mask, dropout_p);
  const at::Tensor keep = dense_keep(key_padding_mask, attn_mask);
  // P = exp(S + mask - lse): lse = +inf (a row without a kept key, from any backend) gives P = 0
  auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      grad.contiguous().transpose(1, 2), q.contiguous().transpose(1, 2), k.contiguous().transpose(1, 2),
      v.contiguous().transpose(1, 2), out.contiguous().transpose(1, 2), lse.contiguous(), 0.0, false,
      additive_mask(keep, q.scalar_type()), scale);
  return {dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()};
}

}  // namespace vlmk
