"""Reference GEMM + fused-epilogue ops (Q-Former output blocks, concat/split projectors, MLP projector).

Numerics, shared by every backend: the products and the whole epilogue run in the accumulation
dtype (fp32; float64 for float64 inputs) and the result is rounded once to the input dtype. The only
intermediate that is stored between two GEMMs (``mlp_projector``'s hidden activation) is rounded to
the input dtype, as every kernel writes it. ``"gelu"`` is the exact erf GELU (HF ``nn.GELU()``),
``"gelu_tanh"`` the tanh approximation. Eager modules that round each intermediate to bf16 differ from
these by about one bf16 ulp.

Plain torch ops, so autograd works through the forwards; each ``*_backward`` is the same vjp written
out (usable where autograd cannot record, e.g. inside a custom op's kernel), checked against autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "linear_residual_layernorm", "linear_residual_layernorm_backward",
    "linear_activation", "linear_activation_backward", "linear_gelu",
    "concat_linear", "concat_linear_backward", "split_linear", "split_linear_backward",
    "mlp_projector", "mlp_projector_backward",
]

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu")
SPLIT_LAYOUTS = ("channel_concat", "token_interleave")
_SQRT_2_OVER_PI = (2 / torch.pi) ** 0.5


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return z
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "relu":
        return F.relu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z) / dz."""
    if activation == "none":
        return torch.ones_like(z)
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5
    if activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def dropout_scale(p: float) -> float:
    """Scale of kept elements: ``1/(1-p)``; ``p == 1`` drops everything (scale 0, never inf)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _linear(x, weight, bias, acc):
    """``x Wᵀ + b`` in the accumulation dtype (one fused addmm where torch has it)."""
    return F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _weight_grads(dz, x, weight, bias):
    """``(dx, dW, db)`` of ``z = x Wᵀ + b`` from ``dz`` (acc dtype); db in bias's (else weight's) dtype."""
    dx = (dz @ weight.to(dz.dtype)).to(x.dtype)
    dW = (_flat(dz).T @ _flat(x).to(dz.dtype)).to(weight.dtype)
    db = _flat(dz).sum(0).to(weight.dtype if bias is None else bias.dtype)
    return dx, dW, db


# ---- Q-Former post-LN output block --------------------------------------------------------------

def _pre_layernorm(x, weight, bias, residual, keep_mask, dropout_p, acc):
    z = _linear(x, weight, bias, acc)
    if keep_mask is not None:
        z = z * keep_mask.to(acc) * dropout_scale(dropout_p)
    return z + residual.to(acc)


def linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps, keep_mask=None,
                              dropout_p=0.0):
    """``LayerNorm(dropout(x Wᵀ + b) + residual)`` over the last dim (BERT ``*Output``/``*SelfOutput``).

    ``keep_mask`` (bool, the output's shape) is the dropout keep-mask; kept values are scaled by
    ``1/(1-dropout_p)``. ``bias``, ``ln_weight``, ``ln_bias`` may be None."""
    acc = acc_dtype(x.dtype)
    h = _pre_layernorm(x, weight, bias, residual, keep_mask, dropout_p, acc)
    y = F.layer_norm(h, (h.shape[-1],), None if ln_weight is None else ln_weight.to(acc),
                     None if ln_bias is None else ln_bias.to(acc), eps)
    return y.to(x.dtype)


def linear_residual_layernorm_backward(grad, x, weight, bias, residual, ln_weight, ln_bias, eps, keep_mask=None,
                                       dropout_p=0.0):
    """vjp: ``(dx, dW, db, d residual, d ln_weight, d ln_bias)``; the gradients of None parameters are
    returned too (as if they were zeros / ones)."""
    acc = acc_dtype(x.dtype)
    h = _pre_layernorm(x, weight, bias, residual, keep_mask, dropout_p, acc)
    mean = h.mean(-1, keepdim=True)
    rstd = torch.rsqrt((h - mean).square().mean(-1, keepdim=True) + eps)
    xhat = (h - mean) * rstd
    g = grad.to(acc)
    pdt = weight.dtype
    d_lnw = _flat(g * xhat).sum(0).to(pdt if ln_weight is None else ln_weight.dtype)
    d_lnb = _flat(g).sum(0).to(pdt if ln_bias is None else ln_bias.dtype)
    dxhat = g if ln_weight is None else g * ln_weight.to(acc)
    dh = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dz = dh if keep_mask is None else dh * keep_mask.to(acc) * dropout_scale(dropout_p)
    dx, dW, db = _weight_grads(dz, x, weight, bias)
    return dx, dW, db, dh.to(residual.dtype), d_lnw, d_lnb


# ---- Linear + activation -----------------------------------------------------------------------

def linear_activation(x, weight, bias, activation="none"):
    """``act(x Wᵀ + b)``."""
    return apply_activation(_linear(x, weight, bias, acc_dtype(x.dtype)), activation).to(x.dtype)


def linear_activation_backward(grad, x, weight, bias, activation="none"):
    """vjp: ``(dx, dW, db)``."""
    acc = acc_dtype(x.dtype)
    dz = grad.to(acc)
    if activation != "none":
        dz = dz * activation_grad(_linear(x, weight, bias, acc), activation)
    return _weight_grads(dz, x, weight, bias)


def linear_gelu(x, weight, bias):
    """``GELU(x Wᵀ + b)``, exact erf form (HF ``*Intermediate``)."""
    return linear_activation(x, weight, bias, "gelu")


# ---- channel-concat projector ------------------------------------------------------------------

def concat_linear(features, weight, bias, activation="none"):
    """``act(cat(features, -1) Wᵀ + b)`` (Eagle, Florence-VL's DBFusion first layer)."""
    acc = acc_dtype(features[0].dtype)
    x = torch.cat([f.to(acc) for f in features], dim=-1)
    return apply_activation(_linear(x, weight, bias, acc), activation).to(features[0].dtype)


def concat_linear_backward(grad, features, weight, bias, activation="none"):
    """vjp: ``([d features_i], dW, db)``."""
    dtype = features[0].dtype
    acc = acc_dtype(dtype)
    x = torch.cat([f.to(acc) for f in features], dim=-1)
    dx, dW, db = linear_activation_backward(grad, x, weight, bias, activation)
    splits = torch.split(dx, [f.shape[-1] for f in features], dim=-1)
    return [s.to(dtype, copy=True) for s in splits], dW, db  # copies: the gradients never alias each other


# ---- grouped projector -------------------------------------------------------------------------

def _check_layout(layout):
    if layout not in SPLIT_LAYOUTS:
        raise ValueError(f"layout must be one of {SPLIT_LAYOUTS}, got {layout!r}")


def split_linear(features, weights, biases, activation="none", layout="channel_concat"):
    """Group ``i`` is ``act(features[i] W_iᵀ + b_i)``. ``"channel_concat"``: the groups side by side
    on the last dim (DeepSeek-VL's hybrid projector), ``[..., sum D_out_i]``. ``"token_interleave"``
    (published LEO): ``features[i]`` are ``[..., T, D_i]``, every ``D_out_i`` equal, and
    ``out[..., j*N + i, :]`` is token ``j`` of group ``i``, ``[..., N*T, D_out]``."""
    _check_layout(layout)
    biases = biases if biases is not None else [None] * len(features)
    outs = [linear_activation(f, w, b, activation) for f, w, b in zip(features, weights, biases)]
    if layout == "channel_concat":
        return torch.cat(outs, dim=-1)
    stacked = torch.stack(outs, dim=-2)  # [..., T, N, D]
    return stacked.reshape(*stacked.shape[:-3], -1, stacked.shape[-1])


def split_linear_backward(grad, features, weights, biases, activation="none", layout="channel_concat"):
    """vjp: ``([d features_i], [d W_i], [d b_i])``."""
    _check_layout(layout)
    biases = biases if biases is not None else [None] * len(features)
    if layout == "channel_concat":
        grads = torch.split(grad, [w.shape[0] for w in weights], dim=-1)
    else:
        n = len(features)
        g = grad.reshape(*grad.shape[:-2], grad.shape[-2] // n, n, grad.shape[-1])
        grads = g.unbind(-2)
    out = [linear_activation_backward(g, f, w, b, activation) for g, f, w, b in zip(grads, features, weights, biases)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


# ---- LLaVA MLP projector -----------------------------------------------------------------------

def mlp_projector(x, w1, b1, w2, b2, activation="gelu"):
    """``Linear(act(Linear(x)))`` (LLaVA-1.5 ``mlp2x_gelu``); the hidden activation is rounded to ``x``'s
    dtype (it is stored between the two GEMMs)."""
    h = linear_activation(x, w1, b1, activation)
    return linear_activation(h, w2, b2, "none")


def mlp_projector_backward(grad, x, w1, b1, w2, b2, activation="gelu"):
    """vjp: ``(dx, dW1, db1, dW2, db2)``."""
    h = linear_activation(x, w1, b1, activation)
    dh, dW2, db2 = linear_activation_backward(grad, h, w2, b2, "none")
    dx, dW1, db1 = linear_activation_backward(dh, x, w1, b1, activation)
    return dx, dW1, db1, dW2, db2
