"""Reference gated expert fusion ops: sigmoid gate, per-sample expert mix, vision router.

Numerics as in :mod:`python_ref.ops.linear_epilogue`: products and epilogues in fp32 (float64 for
float64 inputs), one rounding to the features' dtype. The router's hidden activation and logits are
rounded to the input dtype (an ``nn.Linear`` in that dtype stores them), then the softmax runs in
fp32 (MoVA), and the top-k selection is python_ref's :func:`python_ref.ops.moe.moe_topk_route`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_epilogue import _flat, _linear, _weight_grads, acc_dtype, linear_activation
from .moe import moe_topk_route

__all__ = ["gated_fusion", "gated_fusion_backward", "expert_mix", "expert_mix_backward", "vision_router",
           "router_logits"]


def gated_fusion(a, b, weight, bias, mix_a=None, mix_b=None):
    """``g*va + (1-g)*vb`` with ``g = sigmoid(cat(a, b) Wᵀ + bias)``.

    ``va, vb`` are ``a, b`` themselves (the design document's gate: ``a, b, out`` all ``[..., D]``,
    ``weight [D, 2D]``), or ``mix_a, mix_b`` when given (the published gated multimodal unit mixes
    ``tanh`` projections of the inputs, ``[..., out_dim]``, with ``weight [out_dim, D_a + D_b]``)."""
    acc = acc_dtype(a.dtype)
    g = torch.sigmoid(_linear(torch.cat([a.to(acc), b.to(acc)], -1), weight, bias, acc))
    va = (a if mix_a is None else mix_a).to(acc)
    vb = (b if mix_b is None else mix_b).to(acc)
    return (vb + g * (va - vb)).to(a.dtype)


def gated_fusion_backward(grad, a, b, weight, bias, mix_a=None, mix_b=None):
    """vjp: ``(da, db, dW, d bias, d mix_a, d mix_b)`` (the mix gradients are those of ``a, b`` as mixed
    values; when ``mix_*`` is None they are already included in ``da, db``)."""
    acc = acc_dtype(a.dtype)
    x = torch.cat([a.to(acc), b.to(acc)], -1)
    g = torch.sigmoid(_linear(x, weight, bias, acc))
    va = (a if mix_a is None else mix_a).to(acc)
    vb = (b if mix_b is None else mix_b).to(acc)
    gy = grad.to(acc)
    dz = gy * (va - vb) * g * (1 - g)
    dx, dW, dbias = _weight_grads(dz, x, weight, bias)
    da, db = dx[..., :a.shape[-1]], dx[..., a.shape[-1]:]
    dva, dvb = gy * g, gy * (1 - g)
    if mix_a is None:
        da, db = da + dva, db + dvb
    vdt = a.dtype if mix_a is None else mix_a.dtype
    return da.to(a.dtype), db.to(b.dtype), dW, dbias, dva.to(vdt), dvb.to(vdt)


def expert_mix(features, gate, weights, biases=None):
    """``out[b] = sum_i gate[b, i] * (features[i][b] W_iᵀ + b_i)``: features ``[B, T, D_i]``, gate
    ``[B, N]``, weights ``[D_out, D_i]`` -> ``[B, T, D_out]`` in the features' dtype."""
    acc = acc_dtype(features[0].dtype)
    biases = biases if biases is not None else [None] * len(features)
    out = 0
    for i, (x, w, bi) in enumerate(zip(features, weights, biases)):
        out = out + gate[:, i].to(acc)[:, None, None] * _linear(x, w, bi, acc)
    return out.to(features[0].dtype)


def expert_mix_backward(grad, features, gate, weights, biases=None):
    """vjp: ``([d features_i], d gate, [d W_i], [d b_i])``. ``d gate[b, i] = <grad[b], Y_i[b]>`` with
    ``Y_i = X_i W_iᵀ + b_i`` is computed as ``<grad[b] W_i, X_i[b]> + <sum_t grad[b, t], b_i>``: the
    ``grad W_i`` product also gives ``d features_i``, so the gate's gradient costs no extra GEMM."""
    acc = acc_dtype(features[0].dtype)
    biases = biases if biases is not None else [None] * len(features)
    gy = grad.to(acc)
    gy_rows = gy.sum(1)  # [B, D_out]
    d_feats, d_weights, d_biases, d_gate = [], [], [], []
    for i, (x, w, bi) in enumerate(zip(features, weights, biases)):
        s = gate[:, i].to(acc)
        gw = gy @ w.to(acc)  # [B, T, D_i]
        dg = (gw * x.to(acc)).sum((1, 2))
        if bi is not None:
            dg = dg + gy_rows @ bi.to(acc)
        d_gate.append(dg)
        d_feats.append((gw * s[:, None, None]).to(x.dtype))
        scaled = gy * s[:, None, None]
        d_weights.append((_flat(scaled).T @ _flat(x).to(acc)).to(w.dtype))
        d_biases.append((gy_rows * s[:, None]).sum(0).to(w.dtype if bi is None else bi.dtype))
    return d_feats, torch.stack(d_gate, 1).to(gate.dtype), d_weights, d_biases


def router_logits(pooled, w1, b1, w2, b2, activation="gelu"):
    """``Linear(act(Linear(pooled)))`` with the hidden activation and the logits rounded to pooled's dtype."""
    h = linear_activation(pooled, w1, b1, activation)
    return linear_activation(h, w2, b2, "none")


def vision_router(pooled, w1, b1, w2, b2, top_k=None, activation="gelu", image_type=None):
    """Per-sample expert weights ``[B, N]`` in pooled's dtype: softmax of :func:`router_logits` in fp32
    (float64 for float64); with ``top_k``, the top-k probabilities renormalised to sum to 1 and zeros
    elsewhere (MoVA). ``image_type`` (int [B], optional): row ``b`` becomes one-hot on expert
    ``image_type[b]`` where that is ``>= 0`` (the document's explicit override), ``-1`` keeps the routing."""
    logits = router_logits(pooled, w1, b1, w2, b2, activation)
    acc = acc_dtype(logits.dtype)
    if top_k is None:
        weights = torch.softmax(logits.to(acc), dim=-1)
    else:
        vals, ids = moe_topk_route(logits, top_k, scoring="softmax", renormalize=True, weights_dtype=acc)
        weights = torch.zeros_like(logits, dtype=acc).scatter(1, ids.long(), vals)
    if image_type is not None:
        image_type = image_type.long()
        forced = F.one_hot(image_type.clamp_min(0), logits.shape[1]).to(weights.dtype)
        weights = torch.where((image_type >= 0).unsqueeze(1), forced, weights)
    return weights.to(pooled.dtype)
