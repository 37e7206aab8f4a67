"""``moe_topk_route``: fused router top-k (softmax|sigmoid, bias, groups, renormalize, scale).

Semantics are those of :func:`python_ref.ops.moe.moe_topk_route` (the reference backend):
selection on ``score + bias``, weights are the unbiased scores, groups scored by top-2 sum or max,
ties to the lowest index, NaN scores count as 0, rows ordered by weight descending then id.
Backends: ``cpu`` (C++, multithreaded over rows), ``cuda`` (one warp per row), ``triton`` (one
program per row), ``reference``. Every backend computes in fp32 (float64 logits: fp64 on the
reference and cpu backends, fp32 on cuda/triton). ``cuda`` and ``triton`` take E <= 1024.

Autograd: the weights are differentiable w.r.t. ``logits`` (analytic backward on the saved ids,
recomputing the scores); ``bias`` gets no gradient (it only steers the discrete selection).
"""

from __future__ import annotations

import operator

import torch

from .. import library, registry
from python_ref.ops import moe as _ref

__all__ = ["moe_topk_route"]

OP = "moe_topk_route"
SCORINGS = {"softmax": 0, "sigmoid": 1}
GROUP_SCORES = {"top2_sum": 0, "max": 1}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_EXPERTS_GPU = 1024  # cuda/triton keep a whole row in registers


def _check_logits_and_top_k(logits, top_k) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"moe_topk_route: logits must be a Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"moe_topk_route: logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"moe_topk_route: logits must be float32/float16/bfloat16/float64, got {logits.dtype}")
    if isinstance(top_k, bool) or not hasattr(type(top_k), "__index__"):
        raise TypeError(f"moe_topk_route: top_k must be an int, got {type(top_k).__name__} {top_k!r}")
    E = logits.shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"moe_topk_route: top_k must be in [1, E={E}], got top_k={top_k}")


def check_route_args(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
                     scaling_factor, weights_dtype) -> None:
    """Validate metadata only (shapes, dtypes, options), so it also runs under torch.compile."""
    _check_logits_and_top_k(logits, top_k)
    if scoring not in SCORINGS:
        raise ValueError(f"moe_topk_route: scoring must be one of {tuple(SCORINGS)}, got {scoring!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"moe_topk_route: group_score must be one of {tuple(GROUP_SCORES)}, got {group_score!r}")
    E = logits.shape[1]
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"moe_topk_route: E={E} is not divisible by num_groups={num_groups}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"moe_topk_route: topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
    eligible = topk_groups * (E // num_groups)
    if eligible < top_k:
        raise ValueError(
            f"moe_topk_route: too few eligible experts: topk_groups*E/num_groups = {eligible} < top_k={top_k}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"moe_topk_route: bias must be a Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (E,):
            raise ValueError(f"moe_topk_route: bias must have shape [E={E}], got {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"moe_topk_route: bias must be a float tensor, got {bias.dtype}")
        if bias.device != logits.device:
            raise ValueError(f"moe_topk_route: bias is on {bias.device} but logits on {logits.device}")
    if weights_dtype not in FLOAT_DTYPES:
        raise TypeError(f"moe_topk_route: weights_dtype must be a float dtype, got {weights_dtype}")


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_inputs(logits, bias):
    """Contiguous logits (fp64 computed in fp32, as on the cuda backend) and an fp32 bias."""
    logits = logits.contiguous()
    if logits.dtype == torch.float64:
        logits = logits.float()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    return logits, bias


def _empty_result(logits, top_k, weights_dtype):
    T = logits.shape[0]
    return (torch.empty(T, top_k, dtype=weights_dtype, device=logits.device),
            torch.empty(T, top_k, dtype=torch.int32, device=logits.device))


def _reference(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
               scaling_factor, weights_dtype):
    check_route_args(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
                     scaling_factor, weights_dtype)
    return _ref.moe_topk_route(
        logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias, num_groups=num_groups,
        topk_groups=topk_groups, group_score=group_score, scaling_factor=scaling_factor,
        weights_dtype=weights_dtype,
    )


def _triton(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
            scaling_factor, weights_dtype):
    check_route_args(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
                     scaling_factor, weights_dtype)
    if logits.shape[1] > MAX_EXPERTS_GPU:
        raise ValueError(f"moe_topk_route: the triton backend takes E <= {MAX_EXPERTS_GPU}, got E={logits.shape[1]}")
    if logits.shape[0] == 0:
        return _empty_result(logits, top_k, weights_dtype)
    from ..triton.moe_route import moe_topk_route_triton

    logits, bias = _triton_inputs(logits, bias)
    w, ids = moe_topk_route_triton(logits, bias, int(top_k), SCORINGS[scoring], bool(renormalize),
                                   int(num_groups), int(topk_groups), GROUP_SCORES[group_score],
                                   float(scaling_factor))
    return w.to(weights_dtype), ids


registry.register(OP, "reference", _reference, devices=("cpu", "cuda"))
registry.register(OP, "cpu", library.native_backend(OP, "cpu"), devices=("cpu",))
registry.register(OP, "cuda", library.native_backend(OP, "cuda"), devices=("cuda",))
registry.register(OP, "triton", _triton, devices=("cpu", "cuda"))


@library.register_fake(OP)
def _fake(logits, top_k, scoring="softmax", renormalize=True, bias=None, num_groups=1, topk_groups=1,
          group_score="top2_sum", scaling_factor=1.0, weights_dtype=torch.float32, backend="auto"):
    check_route_args(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
                     scaling_factor, weights_dtype)
    return _empty_result(logits, top_k, weights_dtype)


# ---- autograd (Python copy for builds without vlmkernels._C; csrc/ops/moe_route.cpp otherwise) ---

def _setup_context(ctx, inputs, output):
    logits, _top_k, scoring, renormalize, _bias, _g, _tg, _gs, scaling_factor, _wd, _backend = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.scoring, ctx.renormalize, ctx.scaling_factor = scoring, renormalize, scaling_factor


def route_backward_math(logits, ids, grad_weights, scoring, renormalize, scaling_factor):
    """d(weights)/d(logits) contracted with ``grad_weights``; recomputes the scores from the logits.
    The C++ autograd (``route_backward`` in csrc/ops/moe_route.cpp) is tested against it."""
    cdt = _compute_dtype(logits.dtype)
    x = logits.to(cdt)
    raw = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    finite = torch.isfinite(raw)
    s = torch.where(finite, raw, torch.zeros_like(raw))
    idx = ids.long()
    w = s.gather(1, idx)
    g = grad_weights.to(cdt) * scaling_factor
    if renormalize:
        denom = w.sum(-1, keepdim=True)
        pos = denom > 0
        denom = torch.where(pos, denom, torch.ones_like(denom))
        r = w / denom
        # d(w_j / S)/d(w_i) = (delta_ij - r_j) / S ; S is constant 1 when the sum is 0
        g = torch.where(pos, (g - (g * r).sum(-1, keepdim=True)) / denom, g)
    G = torch.zeros_like(s).scatter_add_(1, idx, g)  # gradient w.r.t. the score vector
    G = torch.where(finite, G, torch.zeros_like(G))  # scores forced to 0 are constants
    if scoring == "softmax":
        dx = s * (G - (s * G).sum(-1, keepdim=True))
    else:
        dx = G * s * (1 - s)
    return dx.to(logits.dtype)


def _backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] and grad_weights is not None:
        dx = route_backward_math(logits, ids, grad_weights, ctx.scoring, ctx.renormalize, ctx.scaling_factor)
    return (dx,) + (None,) * 10


library.register_autograd(OP, _backward, _setup_context)
_OP = library.op(OP).default


def moe_topk_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
    scaling_factor: float = 1.0,
    weights_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``top_k`` experts. Returns ``(weights [T,k] weights_dtype, ids int32 [T,k])``.

    Args:
        logits: router logits ``[T, E]`` (fp32/fp16/bf16; fp64 accepted); any strides.
        top_k: experts per token, ``1 <= top_k <= E``.
        scoring: ``"softmax"`` over the row or elementwise ``"sigmoid"``.
        renormalize: divide the k weights by their sum (a zero sum divides by 1).
        bias: optional ``[E]`` selection bias (DeepSeek-V3 ``e_score_correction_bias``); it changes
            which experts are chosen, never the returned weights. Used in fp32.
        num_groups, topk_groups, group_score: grouped selection (DeepSeek-V2 ``"max"`` / V3
            ``"top2_sum"``): only experts of the ``topk_groups`` best groups are eligible.
        scaling_factor: multiplies the final weights (DeepSeek ``routed_scaling_factor``).
        weights_dtype: dtype of the returned weights (math is fp32 regardless).

    Ties go to the lowest index; NaN/Inf scores count as 0, and so does a NaN selection key
    (``score + bias``), so a NaN row without bias picks experts ``0..k-1`` and never a duplicate;
    within a row entries are ordered by weight descending, then id (so with a bias the order can
    differ from the selection order; a negative ``scaling_factor`` keeps the unscaled order).
    ``T == 0`` returns empty ``[0, k]`` tensors. Weights are differentiable w.r.t. ``logits``.
    """
    if type(top_k) is not int or not 0 < top_k < 2**63:
        # the op's argument parser takes bools and rejects 2**64 or 2.5 without saying what is wrong
        _check_logits_and_top_k(logits, top_k)
        top_k = operator.index(top_k)
    # arguments cost host time to convert: the dtype goes as its code, a default backend not at all
    args = (logits, top_k, scoring, renormalize, bias, num_groups, topk_groups, group_score, scaling_factor,
            library.dtype_arg(weights_dtype))
    return _OP(*args) if backend == "auto" else _OP(*args, backend)
