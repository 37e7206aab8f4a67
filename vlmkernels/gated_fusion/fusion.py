"""Gated fusion of encoder features: the sigmoid gate and the per-sample expert mix.

* ``gated_fusion(a, b, weight, bias)`` = ``g*a + (1-g)*b`` with ``g = sigmoid(cat(a, b) Wᵀ + bias)``:
  one GEMM whose K loop reads ``a`` then ``b`` (the concat is never materialized), sigmoid and mix in
  the fp32 epilogue. ``mix_a``/``mix_b`` (optional) are mixed instead of ``a``/``b``: the published
  gated multimodal unit (``python_ref.fusion.SigmoidGate(variant="gmu")``) gates ``tanh`` projections
  of the inputs to any ``out_dim``, with ``weight [out_dim, D_a + D_b]``.
* ``expert_mix(features, gate, weights, biases)`` = ``sum_i gate[b, i] (X_i W_iᵀ + b_i)``: one
  K-concatenated GEMM with a per-(sample, expert) scale on each expert's partial product; a sample
  whose gate for an expert is 0 (after top-k) skips that expert's K segment.

Math: :mod:`python_ref.ops.fusion_gates`. Backends ``triton`` (CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``reference``; ``auto`` = triton on CUDA, reference on CPU.
Backward: ``gated_fusion_backward`` on triton recomputes the gate GEMM and stores ``dz`` and ``d va``
from its epilogue; ``expert_mix_backward`` computes ``grad W_i`` once per expert (its epilogue stores
the features' gradient and per-tile partial sums of the gate's), then ``d W_i`` with a torch matmul.
"""

from __future__ import annotations

import torch

from .. import library
from ._linear_ops import check_devices, check_groups, check_tensor, check_vector, grads_for, lazy, register_op

__all__ = ["gated_fusion", "expert_mix"]

GATE = "gated_fusion"
MIX = "expert_mix"


# ---- gated_fusion --------------------------------------------------------------------------------

def _check_gate(a, b, weight, bias, mix_a, mix_b) -> None:
    op = GATE
    check_tensor(op, "a", a, min_dim=1)
    check_tensor(op, "b", b, min_dim=1, dtype=a.dtype)
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"{op}: a and b must have equal leading dims, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_tensor(op, "weight", weight, dim=2, dtype=a.dtype)
    k = a.shape[-1] + b.shape[-1]
    if weight.shape[1] != k:
        raise ValueError(f"{op}: weight must be [D_out, D_a + D_b = {k}], got shape {tuple(weight.shape)}")
    d_out = weight.shape[0]
    check_vector(op, "bias", bias, d_out, a.dtype)
    if (mix_a is None) != (mix_b is None):
        raise ValueError(f"{op}: give both mix_a and mix_b or neither")
    if mix_a is None:
        if not a.shape[-1] == b.shape[-1] == d_out:
            raise ValueError(f"{op}: a and b are mixed element-wise, so D_a, D_b and weight's D_out must be "
                             f"equal, got {a.shape[-1]}, {b.shape[-1]}, {d_out} (pass mix_a/mix_b to gate other "
                             f"values)")
    else:
        out_shape = (*a.shape[:-1], d_out)
        for name, t in (("mix_a", mix_a), ("mix_b", mix_b)):
            check_tensor(op, name, t, dtype=a.dtype)
            if tuple(t.shape) != out_shape:
                raise ValueError(f"{op}: {name} must have the output's shape {out_shape}, got {tuple(t.shape)}")
    check_devices(op, dict(a=a, b=b, weight=weight, bias=bias, mix_a=mix_a, mix_b=mix_b))


def gated_fusion(a, b, weight, bias, *, mix_a=None, mix_b=None, backend: str = "auto"):
    """``g*a + (1-g)*b``, ``g = sigmoid(cat(a, b) Wᵀ + bias)``; ``a, b [..., D]``, ``weight [D, 2D]``,
    ``bias [D]`` or None. With ``mix_a, mix_b [..., D_out]`` the gate (``weight [D_out, D_a+D_b]``)
    mixes those instead. Output in ``a``'s dtype."""
    _check_gate(a, b, weight, bias, mix_a, mix_b)
    return library.op(GATE)(a, b, weight, bias, mix_a, mix_b, backend)


def _gate_backward_fake(grad, a, b, weight, bias, mix_a, mix_b):
    out_shape = (*a.shape[:-1], weight.shape[0])
    return (torch.empty_like(a), torch.empty_like(b), torch.empty_like(weight), weight.new_empty(weight.shape[0]),
            a.new_empty(out_shape), a.new_empty(out_shape))


def _gate_setup(ctx, inputs, output):
    a, b, weight, bias, mix_a, mix_b, _backend = inputs
    ctx.save_for_backward(a, b, weight, bias, mix_a, mix_b)


def _gate_backward(ctx, grad):
    a, b, weight, bias, mix_a, mix_b = ctx.saved_tensors
    grads = library.op(f"{GATE}_backward")(grad, a, b, weight, bias, mix_a, mix_b, "auto")
    return grads_for(ctx, grads, 7)


register_op(GATE, check=_check_gate, reference="python_ref.ops.fusion_gates:gated_fusion",
            triton="vlmkernels.triton.linear_epilogue:gated_fusion",
            out_shape=lambda a, b, weight, *_: (*a.shape[:-1], weight.shape[0]),
            backward_reference="python_ref.ops.fusion_gates:gated_fusion_backward",
            backward_triton="vlmkernels.triton.linear_epilogue:gated_fusion_backward",
            backward_fake=_gate_backward_fake, setup_context=_gate_setup, backward=_gate_backward)


# ---- expert_mix ----------------------------------------------------------------------------------

def _check_mix(features, gate, weights, biases) -> None:
    op = MIX
    n = check_groups(op, features, weights, biases)
    x0 = features[0]
    check_tensor(op, "features[0]", x0, dim=3)
    B, T = x0.shape[:2]
    check_tensor(op, "weights[0]", weights[0], dim=2, dtype=x0.dtype)
    d_out = weights[0].shape[0]
    for i, (x, w) in enumerate(zip(features, weights)):
        check_tensor(op, f"features[{i}]", x, dim=3, dtype=x0.dtype)
        if x.shape[:2] != (B, T):
            raise ValueError(f"{op}: features[{i}] must be [B={B}, T={T}, D_{i}], got {tuple(x.shape)}")
        check_tensor(op, f"weights[{i}]", w, dim=2, dtype=x0.dtype)
        if tuple(w.shape) != (d_out, x.shape[2]):
            raise ValueError(f"{op}: weights[{i}] must be [D_out={d_out}, D_{i}={x.shape[2]}], got {tuple(w.shape)}")
        if biases is not None:
            check_vector(op, f"biases[{i}]", biases[i], d_out, x0.dtype)
            if biases[i] is None:
                raise TypeError(f"{op}: biases[{i}] is None (pass biases=None for no biases)")
    check_tensor(op, "gate", gate, dim=2)
    if tuple(gate.shape) != (B, n):
        raise ValueError(f"{op}: gate must be [B={B}, N={n}] (one weight per sample and expert), "
                         f"got {tuple(gate.shape)}")
    check_devices(op, dict(features=features, gate=gate, weights=weights, biases=biases))


def expert_mix(features, gate, weights, biases=None, *, backend: str = "auto"):
    """``sum_i gate[b, i] (features[i][b] W_iᵀ + b_i)`` -> ``[B, T, D_out]`` in the features' dtype.

    ``features``: N (<= 5) tensors ``[B, T, D_i]``; ``gate [B, N]`` (any float dtype, used in fp32);
    ``weights``: N ``[D_out, D_i]``; ``biases``: N ``[D_out]`` or None. An expert whose gate is 0 for a
    sample costs no GEMM work for that sample on the triton backend; gradients still flow to the gate."""
    _check_mix(features, gate, weights, biases)
    return library.op(MIX)(list(features), gate, list(weights), None if biases is None else list(biases), backend)


_mix_backward_ref = lazy("python_ref.ops.fusion_gates:expert_mix_backward")


def _mix_backward_reference(grad, features, gate, weights, biases):
    d_feats, d_gate, d_weights, d_biases = _mix_backward_ref(grad, features, gate, weights, biases)
    return d_feats, d_gate, d_weights, d_biases if biases is not None else []


def _mix_backward_fake(grad, features, gate, weights, biases):
    d_biases = [] if biases is None else [torch.empty_like(b) for b in biases]
    return [torch.empty_like(x) for x in features], torch.empty_like(gate), [torch.empty_like(w) for w in weights], \
        d_biases


def _mix_setup(ctx, inputs, output):
    features, gate, weights, biases, _backend = inputs
    ctx.n = len(features)
    ctx.has_bias = biases is not None
    ctx.save_for_backward(*features, gate, *weights, *(biases or ()))


def _mix_backward(ctx, grad):
    saved, n = ctx.saved_tensors, ctx.n
    features, gate, weights = list(saved[:n]), saved[n], list(saved[n + 1:2 * n + 1])
    biases = list(saved[2 * n + 1:]) if ctx.has_bias else None
    d_feats, d_gate, d_weights, d_biases = library.op(f"{MIX}_backward")(grad, features, gate, weights, biases,
                                                                          "auto")
    need = ctx.needs_input_grad
    return (d_feats if need[0] else None, d_gate if need[1] else None, d_weights if need[2] else None,
            d_biases if ctx.has_bias and need[3] else None, None)


register_op(MIX, check=_check_mix, reference="python_ref.ops.fusion_gates:expert_mix",
            triton="vlmkernels.triton.linear_epilogue:expert_mix",
            out_shape=lambda features, gate, weights, biases: (*features[0].shape[:2], weights[0].shape[0]),
            backward_reference=_mix_backward_reference,
            backward_triton="vlmkernels.triton.linear_epilogue:expert_mix_backward",
            backward_fake=_mix_backward_fake, setup_context=_mix_setup, backward=_mix_backward)
