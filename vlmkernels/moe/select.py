"""``topk_select_tokens``: keep the k best-scoring tokens per batch row (DynamicQFormer top-k).

Order is score descending, ties to the lowest index, NaN ranked below every number (so NaN
tokens are picked last). Backends: ``cpu`` (C++, parallel over batch rows) and ``reference``
(torch sort + gather; also the CUDA path). Autograd: the gradient flows to ``tokens`` (scattered
into the selected rows); ``scores`` get none: the selection is piecewise constant, use
``scores.gather(1, index)`` when a differentiable score of the selection is needed.
"""

from __future__ import annotations

import torch

from .. import library, registry
from python_ref.ops import moe as _ref

__all__ = ["topk_select_tokens"]

OP = "topk_select_tokens"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_select_args(scores, tokens, k) -> None:
    for name, t in (("scores", scores), ("tokens", tokens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"topk_select_tokens: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"topk_select_tokens: {name} must be a float tensor, got {t.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"topk_select_tokens: scores must be 2-D [B, N], got shape {tuple(scores.shape)}")
    if tokens.dim() != 3 or tuple(tokens.shape[:2]) != tuple(scores.shape):
        raise ValueError(
            f"topk_select_tokens: tokens must be [B, N, D] matching scores [B, N]={tuple(scores.shape)}, "
            f"got {tuple(tokens.shape)}"
        )
    if tokens.device != scores.device:
        raise ValueError(f"topk_select_tokens: tokens are on {tokens.device} but scores on {scores.device}")
    N = scores.shape[1]
    if not 0 <= k <= N:
        raise ValueError(f"topk_select_tokens: k must be in [0, N={N}], got k={k}")


def _reference(scores, tokens, k):
    check_select_args(scores, tokens, k)
    return _ref.topk_select_tokens(scores, tokens, k)


registry.register(OP, "reference", _reference, devices=("cpu", "cuda"))
registry.register(OP, "cpu", library.native_backend(OP, "cpu"), devices=("cpu",))


@library.register_fake(OP)
def _fake(scores, tokens, k, backend="auto"):
    check_select_args(scores, tokens, k)
    B, _, D = tokens.shape
    return (tokens.new_empty(B, k, D), torch.empty(B, k, dtype=torch.int64, device=scores.device))


def _setup_context(ctx, inputs, output):
    _scores, tokens, _k, _backend = inputs
    ctx.tokens_shape = tokens.shape
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_selected, _grad_index):
    (index,) = ctx.saved_tensors
    grad_tokens = None
    if ctx.needs_input_grad[1] and grad_selected is not None:
        B, N, D = ctx.tokens_shape
        grad_tokens = grad_selected.new_zeros(B, N, D)
        # indices within a row are distinct, so a plain scatter is exact
        grad_tokens.scatter_(1, index.unsqueeze(-1).expand(-1, -1, D), grad_selected)
    return None, grad_tokens, None, None


library.register_autograd(OP, _backward, _setup_context)
_OP = library.op(OP).default


def topk_select_tokens(
    scores: torch.Tensor, tokens: torch.Tensor, k: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the ``k`` highest-scoring tokens of each batch row.

    Args:
        scores: ``[B, N]`` float scores.
        tokens: ``[B, N, D]`` float tokens (same device).
        k: tokens to keep, ``0 <= k <= N``.

    Returns ``(selected [B, k, D] tokens.dtype, index int64 [B, k])`` ordered by score descending,
    ties to the lowest index, NaN last. Gradient flows to ``tokens`` only.
    """
    return _OP(scores, tokens, k, backend)
