"""``vision_router``: per-sample weights over vision experts (MoVA's dynamic gate, the document's
LEO / DynamicVisionSelector router; ``python_ref.fusion.ExpertRouter``).

``vision_router(pooled [B, C], w1, b1, w2, b2, *, top_k=None, activation="gelu", image_type=None)``:
``Linear -> act -> Linear`` (hidden activation and logits rounded to pooled's dtype, as ``nn.Linear``
layers in that dtype store them), softmax in fp32; with ``top_k`` the MoE family's router
(``moe_topk_route``: its top-k and tie rules, renormalised) picks the experts and the others get 0.
``image_type`` (int [B]) forces row ``b`` one-hot on expert ``image_type[b]`` where ``>= 0``
(``ExpertRouter``'s explicit override; a forced row has no gradient). MoVA's coarse routing (the LLM
masks experts per sample with -1e6 on their logits) is not an input: a caller that needs it runs the
MLP with :func:`mlp_projector`, adds its ``[B, N]`` mask and routes with ``moe_topk_route``.

Backends: ``reference`` is python_ref's function (its own top-k); ``triton`` runs the two GEMMs on the
linear epilogue core and routes through the ``moe_topk_route`` op (C++ or Triton), the same rules.

Backward: the op ``vision_router_backward`` recomputes the logits, reads the selected experts off the
forward's output and applies :func:`vlmkernels.moe.route.route_backward_math` (the renormalised top-k
softmax vjp) and the MLP's vjp.
"""

from __future__ import annotations

import torch

from .. import library
from ..moe.route import route_backward_math
from ._linear_ops import check_activation, check_devices, check_linear, check_tensor, grads_for, register_op

__all__ = ["vision_router"]

OP = "vision_router"


def _check(pooled, w1, b1, w2, b2, top_k, activation, image_type) -> None:
    check_tensor(OP, "pooled", pooled, dim=2)
    check_linear(OP, "pooled", pooled, "w1", w1, "b1", b1)
    check_tensor(OP, "w2", w2, dim=2, dtype=pooled.dtype)
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{OP}: w2 must be [N, hidden={w1.shape[0]}], got shape {tuple(w2.shape)}")
    if b2 is not None:
        check_tensor(OP, "b2", b2, dim=1, dtype=pooled.dtype)
        if b2.shape[0] != w2.shape[0]:
            raise ValueError(f"{OP}: b2 must have shape [{w2.shape[0]}], got {tuple(b2.shape)}")
    check_activation(OP, activation)
    n = w2.shape[0]
    if n < 1:
        raise ValueError(f"{OP}: w2 must have at least one row (expert), got shape {tuple(w2.shape)}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n):
        raise ValueError(f"{OP}: top_k must be None or an int in [1, N={n}], got {top_k!r}")
    if image_type is not None:
        check_tensor(OP, "image_type", image_type, dim=1, floating=False)
        if image_type.dtype not in (torch.int32, torch.int64) or image_type.shape[0] != pooled.shape[0]:
            raise ValueError(f"{OP}: image_type must be int32/int64 [B={pooled.shape[0]}], got "
                             f"{image_type.dtype} {tuple(image_type.shape)}")
    check_devices(OP, dict(pooled=pooled, w1=w1, b1=b1, w2=w2, b2=b2, image_type=image_type))


def vision_router(pooled, w1, b1, w2, b2, *, top_k: int | None = None, activation: str = "gelu",
                  image_type=None, backend: str = "auto"):
    """Routing weights ``[B, N]`` in pooled's dtype (rows sum to 1, or are one-hot where forced).

    ``image_type`` values must lie in ``[-1, N)``; checked here for CPU tensors outside
    ``torch.compile`` (a CUDA check would cost a host sync)."""
    _check(pooled, w1, b1, w2, b2, top_k, activation, image_type)
    if image_type is not None and not image_type.is_cuda and not torch.compiler.is_compiling() \
            and image_type.device.type != "meta" and image_type.numel():
        from torch._subclasses.fake_tensor import is_fake

        if not is_fake(image_type):
            lo, hi = int(image_type.min()), int(image_type.max())
            if lo < -1 or hi >= w2.shape[0]:
                raise ValueError(f"{OP}: image_type values must be in [-1, {w2.shape[0] - 1}], got [{lo}, {hi}]")
    return library.op(OP)(pooled, w1, b1, w2, b2, top_k, activation, image_type, backend)


def _route(logits, top_k, image_type, out_dtype):
    """python_ref's routing on the triton backend's logits, through the MoE family's router op."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if top_k is None:
        weights = torch.softmax(logits.to(acc), dim=-1)
    else:
        vals, ids = library.op("moe_topk_route")(logits, top_k, "softmax", True, None, 1, 1, "top2_sum", 1.0,
                                                 library.dtype_arg(acc), "auto")
        weights = torch.zeros_like(logits, dtype=acc).scatter(1, ids.long(), vals.to(acc))
    if image_type is not None:
        forced = torch.nn.functional.one_hot(image_type.long().clamp_min(0), logits.shape[1]).to(acc)
        weights = torch.where((image_type >= 0).unsqueeze(1), forced, weights)
    return weights.to(out_dtype)


def _triton(pooled, w1, b1, w2, b2, top_k, activation, image_type):
    from ..triton import linear_epilogue as kernel

    logits = kernel.mlp_projector(pooled, w1, b1, w2, b2, activation)
    return _route(logits, top_k, image_type, pooled.dtype)


def _backward_reference(grad, gate, pooled, w1, b1, w2, b2, top_k, activation, image_type):
    """The selected experts are read off the forward's output (its top-k entries; the others are exactly 0),
    so the backward never re-decides a near-tie differently from the forward."""
    from python_ref.ops.fusion_gates import router_logits
    from python_ref.ops.linear_epilogue import mlp_projector_backward

    logits = router_logits(pooled, w1, b1, w2, b2, activation)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    if image_type is not None:  # forced rows are constants
        g = torch.where((image_type >= 0).unsqueeze(1), torch.zeros_like(g), g)
    if top_k is None:
        ids = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape)
        d_logits = route_backward_math(logits, ids, g, "softmax", False, 1.0)
    else:
        ids = torch.topk(gate.to(acc), top_k, dim=-1).indices
        d_logits = route_backward_math(logits, ids, g.gather(1, ids), "softmax", True, 1.0)
    return mlp_projector_backward(d_logits, pooled, w1, b1, w2, b2, activation)


def _backward_fake(grad, gate, pooled, w1, b1, w2, b2, top_k, activation, image_type):
    return (torch.empty_like(pooled), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _setup(ctx, inputs, output):
    pooled, w1, b1, w2, b2, top_k, activation, image_type, _backend = inputs
    ctx.save_for_backward(output, pooled, w1, b1, w2, b2, image_type)
    ctx.top_k, ctx.activation = top_k, activation


def _backward(ctx, grad):
    gate, pooled, w1, b1, w2, b2, image_type = ctx.saved_tensors
    grads = library.op(f"{OP}_backward")(grad, gate, pooled, w1, b1, w2, b2, ctx.top_k, ctx.activation, image_type,
                                         "auto")
    return grads_for(ctx, grads, 9)


register_op(OP, check=_check, reference="python_ref.ops.fusion_gates:vision_router", triton=_triton,
            out_shape=lambda pooled, w1, b1, w2, *_: (pooled.shape[0], w2.shape[0]),
            backward_reference=_backward_reference, backward_fake=_backward_fake, setup_context=_setup,
            backward=_backward)
