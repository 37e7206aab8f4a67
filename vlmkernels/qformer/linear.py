"""The Q-Former's GEMM + epilogue ops (BERT post-LN output blocks and the erf-GELU intermediate).

* ``linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p=0.0)`` =
  ``LayerNorm(dropout(x Wᵀ + b) + residual)`` over the last dim (HF ``Blip2QFormerSelfOutput`` /
  ``Blip2QFormerOutput``). The dropout keep-mask is drawn here with torch's RNG (``bernoulli(1-p)``,
  like ``F.dropout``) and handed to the op as a tensor, so every backend applies the same mask and the
  backward reuses it; kept values are scaled by ``1/(1-p)``.
* ``linear_gelu(x, weight, bias)`` = exact erf ``GELU(x Wᵀ + b)`` (HF ``*Intermediate``; not tanh).

Math: :mod:`python_ref.ops.linear_epilogue` (fp32 accumulation and epilogue, one rounding). Backends:
``triton`` (:mod:`vlmkernels.triton.linear_epilogue`; CUDA, or CPU under ``TRITON_INTERPRET=1``) and
``reference``; ``auto`` picks triton on CUDA and the reference on CPU. The backward ops
(``*_backward``) have both backends too: python_ref's vjp, and on triton a recompute GEMM whose
epilogue applies the vjp's elementwise part (GELU') or writes the fp32 pre-norm sum for one
LayerNorm + dropout vjp row kernel; the weight gradients are torch matmuls.
"""

from __future__ import annotations

import torch

from .. import library
from ..gated_fusion._linear_ops import (check_devices, check_linear, check_tensor, check_vector, grads_for, lazy,
                                       register_op)

__all__ = ["linear_residual_layernorm", "linear_gelu"]

LRLN = "linear_residual_layernorm"
GELU = "linear_gelu"


# ---- linear_residual_layernorm -----------------------------------------------------------------

def _check_lrln(x, weight, bias, residual, ln_weight, ln_bias, eps, keep_mask, dropout_p) -> None:
    op = LRLN
    check_tensor(op, "x", x, min_dim=1)
    check_linear(op, "x", x, "weight", weight, "bias", bias)
    out_shape = (*x.shape[:-1], weight.shape[0])
    check_tensor(op, "residual", residual, dtype=x.dtype)
    if tuple(residual.shape) != out_shape:
        raise ValueError(f"{op}: residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
    check_vector(op, "ln_weight", ln_weight, weight.shape[0], x.dtype)
    check_vector(op, "ln_bias", ln_bias, weight.shape[0], x.dtype)
    if not isinstance(eps, (float, int)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a float >= 0, got {eps!r}")
    if not isinstance(dropout_p, (float, int)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p!r}")
    if keep_mask is not None:
        check_tensor(op, "keep_mask", keep_mask, floating=False)
        if keep_mask.dtype != torch.bool or tuple(keep_mask.shape) != out_shape:
            raise ValueError(f"{op}: keep_mask must be bool of the output's shape {out_shape}, "
                             f"got {keep_mask.dtype} {tuple(keep_mask.shape)}")
    check_devices(op, dict(x=x, weight=weight, bias=bias, residual=residual, ln_weight=ln_weight,
                           ln_bias=ln_bias, keep_mask=keep_mask))


def dropout_keep_mask(shape, p: float, device, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Bool keep-mask drawn like ``F.dropout`` (each element kept with probability ``1-p``); None for p=0."""
    if p == 0.0:
        return None
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p=0.0, *,
                              backend: str = "auto", generator: torch.Generator | None = None):
    """``LayerNorm(dropout(x Wᵀ + b) + residual)`` in ``x``'s dtype; ``x [..., K]``, ``weight [N, K]``,
    ``residual [..., N]``. ``bias``, ``ln_weight`` and ``ln_bias`` may be None. ``dropout_p > 0`` draws
    the keep-mask from torch's RNG (or ``generator``); pass 0 at inference."""
    _check_lrln(x, weight, bias, residual, ln_weight, ln_bias, eps, None, dropout_p)
    keep = dropout_keep_mask(residual.shape, float(dropout_p), x.device, generator)
    return library.op(LRLN)(x, weight, bias, residual, ln_weight, ln_bias, float(eps), keep, float(dropout_p),
                            backend)


def _lrln_backward_fake(grad, x, weight, bias, residual, ln_weight, ln_bias, eps, keep_mask, dropout_p):
    n = weight.shape[0]
    return (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(n), torch.empty_like(residual),
            weight.new_empty(n), weight.new_empty(n))


def _lrln_setup(ctx, inputs, output):
    x, weight, bias, residual, ln_weight, ln_bias, eps, keep_mask, dropout_p, _backend = inputs
    ctx.save_for_backward(x, weight, bias, residual, ln_weight, ln_bias, keep_mask)
    ctx.eps, ctx.dropout_p = eps, dropout_p


def _lrln_backward(ctx, grad):
    x, weight, bias, residual, ln_weight, ln_bias, keep_mask = ctx.saved_tensors
    grads = library.op(f"{LRLN}_backward")(grad, x, weight, bias, residual, ln_weight, ln_bias, ctx.eps, keep_mask,
                                           ctx.dropout_p, "auto")
    dx, dw, db, dres, dlnw, dlnb = grads
    return grads_for(ctx, (dx, dw, db, dres, dlnw, dlnb), 10)


register_op(LRLN, check=_check_lrln, reference="python_ref.ops.linear_epilogue:linear_residual_layernorm",
            triton="vlmkernels.triton.linear_epilogue:linear_residual_layernorm",
            out_shape=lambda x, weight, bias, residual, *_: residual.shape,
            backward_reference="python_ref.ops.linear_epilogue:linear_residual_layernorm_backward",
            backward_triton="vlmkernels.triton.linear_epilogue:linear_residual_layernorm_backward",
            backward_fake=_lrln_backward_fake, setup_context=_lrln_setup, backward=_lrln_backward)


# ---- linear_gelu -------------------------------------------------------------------------------

def _check_gelu(x, weight, bias) -> None:
    check_tensor(GELU, "x", x, min_dim=1)
    check_linear(GELU, "x", x, "weight", weight, "bias", bias)
    check_devices(GELU, dict(x=x, weight=weight, bias=bias))


def linear_gelu(x, weight, bias, *, backend: str = "auto"):
    """Exact erf ``GELU(x Wᵀ + b)`` in ``x``'s dtype; ``bias`` may be None."""
    _check_gelu(x, weight, bias)
    return library.op(GELU)(x, weight, bias, backend)


def _gelu_backward_fake(grad, x, weight, bias):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _gelu_setup(ctx, inputs, output):
    x, weight, bias, _backend = inputs
    ctx.save_for_backward(x, weight, bias)


def _gelu_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    grads = library.op(f"{GELU}_backward")(grad, x, weight, bias, "auto")
    return grads_for(ctx, grads, 4)


register_op(GELU, check=_check_gelu, reference="python_ref.ops.linear_epilogue:linear_gelu",
            triton=lazy("vlmkernels.triton.linear_epilogue:linear_activation", "gelu"),
            out_shape=lambda x, weight, bias: (*x.shape[:-1], weight.shape[0]),
            backward_reference=lazy("python_ref.ops.linear_epilogue:linear_activation_backward", "gelu"),
            backward_triton=lazy("vlmkernels.triton.linear_epilogue:linear_activation_backward", "gelu"),
            backward_fake=_gelu_backward_fake, setup_context=_gelu_setup, backward=_gelu_backward)
