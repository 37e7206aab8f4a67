"""Multi-encoder projectors as GEMMs with fused epilogues.

* ``concat_linear(features, weight, bias, activation)`` = ``act(cat(features, -1) Wᵀ + b)`` (Eagle's and
  Florence-VL's first projector layer): the K loop walks the feature tensors one after the other, the
  concat is never materialized. ``"gelu"`` is the erf form (``nn.GELU()``), ``"gelu_tanh"`` the tanh one.
* ``split_linear(features, weights, biases, activation, layout)``: group ``i`` = ``act(X_i W_iᵀ + b_i)``,
  one grouped launch (a program column per group),
  written straight into its column block of one output (``"channel_concat"``, DeepSeek-VL's hybrid
  projector: ``[..., sum D_out_i]``) or into interleaved token slots (``"token_interleave"``, published
  LEO: ``out[..., i::N, :]`` = group ``i``, ``[..., N*T, D_out]``). The interleaved output viewed as
  ``[..., T, N*D_out]`` is the column-block layout, so both layouts are the same strided stores.
* ``mlp_projector(x, w1, b1, w2, b2, activation)``: LLaVA-1.5/OneVision ``Linear -> GELU -> Linear``,
  bias + activation in the first GEMM's epilogue (the hidden activation is stored once, in x's dtype).

Math: :mod:`python_ref.ops.linear_epilogue`. Backends ``triton`` and ``reference`` (auto: triton on
CUDA, reference on CPU), for the backward ops too (triton: a recompute GEMM storing ``grad * act'(z)``,
then the weight gradients as torch matmuls).
"""

from __future__ import annotations

import torch

from .. import library
from ._linear_ops import (check_activation, check_devices, check_groups, check_linear, check_list, check_tensor,
                          check_vector, grads_for, lazy, register_op)

__all__ = ["concat_linear", "split_linear", "mlp_projector"]

CONCAT = "concat_linear"
SPLIT = "split_linear"
MLP = "mlp_projector"
LAYOUTS = ("channel_concat", "token_interleave")
CONCAT_ACTIVATIONS = ("none", "gelu", "gelu_tanh")


# ---- concat_linear -------------------------------------------------------------------------------

def _check_concat(features, weight, bias, activation) -> None:
    op = CONCAT
    check_list(op, "features", features)
    x0 = features[0]
    check_tensor(op, "features[0]", x0, min_dim=1)
    for i, x in enumerate(features):
        check_tensor(op, f"features[{i}]", x, min_dim=1, dtype=x0.dtype)
        if x.shape[:-1] != x0.shape[:-1]:
            raise ValueError(f"{op}: features[{i}] must have the leading dims of features[0] "
                             f"{tuple(x0.shape[:-1])}, got {tuple(x.shape)}")
    check_tensor(op, "weight", weight, dim=2, dtype=x0.dtype)
    k = sum(x.shape[-1] for x in features)
    if weight.shape[1] != k:
        raise ValueError(f"{op}: weight must be [D_out, sum D_i = {k}], got shape {tuple(weight.shape)}")
    check_vector(op, "bias", bias, weight.shape[0], x0.dtype)
    check_activation(op, activation, CONCAT_ACTIVATIONS)
    check_devices(op, dict(features=features, weight=weight, bias=bias))


def concat_linear(features, weight, bias, activation: str = "none", *, backend: str = "auto"):
    """``act(cat(features, -1) Wᵀ + b)`` -> ``[..., D_out]`` in the features' dtype; up to 5 features."""
    _check_concat(features, weight, bias, activation)
    return library.op(CONCAT)(list(features), weight, bias, activation, backend)


def _concat_backward_fake(grad, features, weight, bias, activation):
    return [torch.empty_like(x) for x in features], torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _concat_setup(ctx, inputs, output):
    features, weight, bias, activation, _backend = inputs
    ctx.n, ctx.activation = len(features), activation
    ctx.save_for_backward(*features, weight, bias)


def _concat_backward(ctx, grad):
    *features, weight, bias = ctx.saved_tensors
    grads = library.op(f"{CONCAT}_backward")(grad, features, weight, bias, ctx.activation, "auto")
    return grads_for(ctx, grads, 5)


register_op(CONCAT, check=_check_concat, reference="python_ref.ops.linear_epilogue:concat_linear",
            triton="vlmkernels.triton.linear_epilogue:concat_linear",
            out_shape=lambda features, weight, *_: (*features[0].shape[:-1], weight.shape[0]),
            backward_reference="python_ref.ops.linear_epilogue:concat_linear_backward",
            backward_triton="vlmkernels.triton.linear_epilogue:concat_linear_backward",
            backward_fake=_concat_backward_fake, setup_context=_concat_setup, backward=_concat_backward)


# ---- split_linear --------------------------------------------------------------------------------

def _check_split(features, weights, biases, activation, layout) -> None:
    op = SPLIT
    check_groups(op, features, weights, biases)
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {LAYOUTS}, got {layout!r}")
    check_activation(op, activation, CONCAT_ACTIVATIONS)
    x0 = features[0]
    check_tensor(op, "features[0]", x0, min_dim=2 if layout == "token_interleave" else 1)
    for i, x in enumerate(features):
        check_tensor(op, f"features[{i}]", x, dtype=x0.dtype)
        if x.shape[:-1] != x0.shape[:-1]:
            raise ValueError(f"{op}: features[{i}] must have the leading dims of features[0] "
                             f"{tuple(x0.shape[:-1])}, got {tuple(x.shape)}")
        check_linear(op, f"features[{i}]", x, f"weights[{i}]", weights[i], f"biases[{i}]",
                     None if biases is None else biases[i])
        if biases is not None and biases[i] is None:
            raise TypeError(f"{op}: biases[{i}] is None (pass biases=None for no biases)")
    if layout == "token_interleave" and any(w.shape[0] != weights[0].shape[0] for w in weights):
        raise ValueError(f"{op}: layout='token_interleave' needs equal output widths, got "
                         f"{[w.shape[0] for w in weights]}")
    check_devices(op, dict(features=features, weights=weights, biases=biases))


def _split_out_shape(features, weights, biases, activation, layout):
    lead = tuple(features[0].shape[:-1])
    if layout == "channel_concat":
        return (*lead, sum(w.shape[0] for w in weights))
    return (*lead[:-1], lead[-1] * len(features), weights[0].shape[0])


def split_linear(features, weights, biases, activation: str = "none", layout: str = "channel_concat", *,
                 backend: str = "auto"):
    """Group ``i`` = ``act(features[i] W_iᵀ + b_i)`` written into column blocks (``"channel_concat"``,
    ``[..., sum D_out_i]``) or interleaved token slots (``"token_interleave"``: features ``[..., T, D_i]``,
    equal ``D_out``, ``out[..., j*N + i, :]`` = token ``j`` of group ``i``); up to 5 groups."""
    _check_split(features, weights, biases, activation, layout)
    return library.op(SPLIT)(list(features), list(weights), None if biases is None else list(biases), activation,
                             layout, backend)


_split_backward_ref = lazy("python_ref.ops.linear_epilogue:split_linear_backward")


def _split_backward_reference(grad, features, weights, biases, activation, layout):
    d_feats, d_weights, d_biases = _split_backward_ref(grad, features, weights, biases, activation, layout)
    return d_feats, d_weights, d_biases if biases is not None else []


def _split_backward_fake(grad, features, weights, biases, activation, layout):
    d_biases = [] if biases is None else [torch.empty_like(b) for b in biases]
    return [torch.empty_like(x) for x in features], [torch.empty_like(w) for w in weights], d_biases


def _split_setup(ctx, inputs, output):
    features, weights, biases, activation, layout, _backend = inputs
    ctx.n, ctx.has_bias, ctx.activation, ctx.layout = len(features), biases is not None, activation, layout
    ctx.save_for_backward(*features, *weights, *(biases or ()))


def _split_backward(ctx, grad):
    saved, n = ctx.saved_tensors, ctx.n
    features, weights = list(saved[:n]), list(saved[n:2 * n])
    biases = list(saved[2 * n:]) if ctx.has_bias else None
    d_feats, d_weights, d_biases = library.op(f"{SPLIT}_backward")(grad, features, weights, biases, ctx.activation,
                                                                    ctx.layout, "auto")
    need = ctx.needs_input_grad
    return (d_feats if need[0] else None, d_weights if need[1] else None,
            d_biases if ctx.has_bias and need[2] else None, None, None, None)


register_op(SPLIT, check=_check_split, reference="python_ref.ops.linear_epilogue:split_linear",
            triton="vlmkernels.triton.linear_epilogue:split_linear",
            out_shape=_split_out_shape,
            backward_reference=_split_backward_reference,
            backward_triton="vlmkernels.triton.linear_epilogue:split_linear_backward",
            backward_fake=_split_backward_fake, setup_context=_split_setup, backward=_split_backward)


# ---- mlp_projector -------------------------------------------------------------------------------

def _check_mlp(x, w1, b1, w2, b2, activation) -> None:
    check_tensor(MLP, "x", x, min_dim=1)
    check_linear(MLP, "x", x, "w1", w1, "b1", b1)
    check_tensor(MLP, "w2", w2, dim=2, dtype=x.dtype)
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{MLP}: w2 must be [D_out, hidden={w1.shape[0]}] (w1's rows), got {tuple(w2.shape)}")
    check_vector(MLP, "b2", b2, w2.shape[0], x.dtype)
    check_activation(MLP, activation, CONCAT_ACTIVATIONS)
    check_devices(MLP, dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2))


def mlp_projector(x, w1, b1, w2, b2, activation: str = "gelu", *, backend: str = "auto"):
    """``Linear(act(Linear(x)))`` -> ``[..., D_out]`` in ``x``'s dtype; ``activation`` is ``"gelu"`` (erf),
    ``"gelu_tanh"`` or ``"none"``; biases may be None."""
    _check_mlp(x, w1, b1, w2, b2, activation)
    return library.op(MLP)(x, w1, b1, w2, b2, activation, backend)


def _mlp_backward_fake(grad, x, w1, b1, w2, b2, activation):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, _backend = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, w1, b1, w2, b2)


def _mlp_backward(ctx, grad):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    grads = library.op(f"{MLP}_backward")(grad, x, w1, b1, w2, b2, ctx.activation, "auto")
    return grads_for(ctx, grads, 7)


register_op(MLP, check=_check_mlp, reference="python_ref.ops.linear_epilogue:mlp_projector",
            triton="vlmkernels.triton.linear_epilogue:mlp_projector",
            out_shape=lambda x, w1, b1, w2, *_: (*x.shape[:-1], w2.shape[0]),
            backward_reference="python_ref.ops.linear_epilogue:mlp_projector_backward",
            backward_triton="vlmkernels.triton.linear_epilogue:mlp_projector_backward",
            backward_fake=_mlp_backward_fake, setup_context=_mlp_setup, backward=_mlp_backward)
