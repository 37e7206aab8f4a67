"""``attention``: Q-Former (cross-)attention, non-causal, short queries over a few hundred keys.

``attention(q [B,Lq,H,d], k [B,Lk,H,d], v [B,Lk,H,d], *, key_padding_mask, attn_mask, cu_seqlens_k,
scale, dropout_p)`` returns ``[B,Lq,H,d]`` in q's dtype (exact math in :mod:`python_ref.ops.qformer`):

* ``key_padding_mask`` bool ``[B,Lk]`` and ``attn_mask`` bool ``[B,Lq,Lk]``, True = attend; both may
  be given (they are ANDed). A query row without a kept key returns zeros (never NaN), and gets zero
  gradients.
* ``cu_seqlens_k`` int32 ``[B+1]`` (prefix sums, ``cu[0] = 0``, non-decreasing, ``cu[B] = total_k``)
  packs images with different key counts: ``k``/``v`` are then ``[total_k, H, d]``, q stays
  ``[B,Lq,H,d]``, and every key axis is the packed one without a batch axis:
  ``key_padding_mask [total_k]``, ``attn_mask [Lq, total_k]``.
* ``scale`` defaults to ``d**-0.5``.
* ``dropout_p`` in ``[0, 1)``: dropout on the attention probabilities (HF in training; pass 0 in eval).
  The keep-mask is drawn here with torch's RNG (``torch.rand(...) >= p``: ``torch.manual_seed``
  reproduces it and every backend sees the same mask) as bool ``[B,H,Lq,Lk]`` (``[H,Lq,total_k]``
  packed); kept probabilities are scaled by ``1/(1-p)``.

dtypes fp32, fp16, bf16 (float64 on the reference backend); softmax and accumulation in fp32.
Empty inputs (B, Lq, H or d = 0) give the empty output; no keys at all (Lk = 0, total_k = 0) give zeros.

The op ``torch.ops.vlmkernels.attention`` takes the drawn ``dropout_mask`` and returns
``(out, lse float32 [B,H,Lq])`` (``lse = +inf`` on rows without a kept key) so that the backward
op ``attention_backward`` recomputes P from lse. Backends: ``triton`` (CUDA, and CPU tensors under
``TRITON_INTERPRET=1``; kernels in :mod:`vlmkernels.triton.qformer_attention`), ``cpu`` (C++,
``csrc/ops/attention.cpp``: ATen's CPU flash attention, a composite for dropout and packed keys; float64
too; registered at the dispatcher's CPU key with the same checks, so a CPU call never enters Python)
and ``reference`` (python_ref's math, any device, float64 too). ``auto``: triton on CUDA, cpu on CPU
(the reference where vlmkernels._C is not built). The autograd is C++ where the extension is built
(``csrc/ops/attention.cpp``), the Python formula below otherwise.
"""

from __future__ import annotations

import torch

from .. import library, registry
from ..moe.fused import _may_sync

__all__ = ["attention"]

OP = "attention"
BWD = "attention_backward"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p) -> None:
    """Metadata checks (no device sync); shared by the functional API, every backend and the fakes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"attention: q must be 4-D [B, Lq, H, d], got shape {_shape(q)}")
    B, Lq, H, d = q.shape
    varlen = cu_seqlens_k is not None
    if varlen:
        if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dtype != torch.int32:
            got = cu_seqlens_k.dtype if isinstance(cu_seqlens_k, torch.Tensor) else type(cu_seqlens_k).__name__
            raise TypeError(f"attention: cu_seqlens_k must be an int32 tensor, got {got}")
        if _shape(cu_seqlens_k) != (B + 1,):
            raise ValueError(f"attention: cu_seqlens_k must be [B+1] = [{B + 1}], got shape {_shape(cu_seqlens_k)}")
        if k.dim() != 3:
            raise ValueError(f"attention: with cu_seqlens_k, k must be 3-D [total_k, H, d], got shape {_shape(k)}")
        key_shape = (k.shape[0],)
    else:
        if k.dim() != 4:
            raise ValueError(f"attention: k must be 4-D [B, Lk, H, d], got shape {_shape(k)}")
        if k.shape[0] != B:
            raise ValueError(f"attention: k's batch {k.shape[0]} differs from q's {B}")
        key_shape = (B, k.shape[1])
    if k.shape[-2] != H:
        raise ValueError(f"attention: k has {k.shape[-2]} heads, q has {H}")
    if k.shape[-1] != d:
        raise ValueError(f"attention: k's head dim {k.shape[-1]} differs from q's {d}")
    if _shape(v) != _shape(k):
        raise ValueError(f"attention: v must have k's shape {_shape(k)}, got {_shape(v)}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"attention: q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    masks = (("key_padding_mask", key_padding_mask, key_shape),
             ("attn_mask", attn_mask, (Lq, k.shape[0]) if varlen else (B, Lq, k.shape[1])),
             ("dropout_mask", dropout_mask, (H, Lq, k.shape[0]) if varlen else (B, H, Lq, k.shape[1])))
    for name, m, want in masks:
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise TypeError(f"attention: {name} must be a bool tensor (True = keep), got {got}")
        if _shape(m) != want:
            layout = " (packed keys: no batch axis)" if varlen else ""
            raise ValueError(f"attention: {name} must have shape {want}{layout}, got {_shape(m)}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_mask is None and dropout_p > 0.0:
        raise ValueError("attention: dropout_p > 0 needs a dropout_mask (the functional API draws it)")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    named = {"q": q, "k": k, "v": v, "key_padding_mask": key_padding_mask, "attn_mask": attn_mask,
             "cu_seqlens_k": cu_seqlens_k, "dropout_mask": dropout_mask}
    devices = {n: t.device for n, t in named.items() if t is not None}
    if len(set(devices.values())) != 1:
        raise ValueError(f"attention: all tensors must be on one device, got {devices}")


def _check_cu_seqlens_values(cu_seqlens_k: torch.Tensor, total_k: int) -> None:
    """Values of ``cu_seqlens_k`` (one host read): starts at 0, non-decreasing, ends at ``total_k``."""
    cu = cu_seqlens_k.tolist()
    if cu[0] != 0 or cu[-1] != total_k:
        raise ValueError(f"attention: cu_seqlens_k must run from 0 to total_k = {total_k} (k.shape[0]), "
                         f"got {cu[0]} .. {cu[-1]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"attention: cu_seqlens_k must be non-decreasing, got {cu}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    check_cu_seqlens: bool | None = None,
) -> torch.Tensor:
    """Q-Former attention output ``[B, Lq, H, d]`` in q's dtype (see the module docstring).

    ``check_cu_seqlens=None`` (default) verifies ``cu_seqlens_k``'s values where that costs no device
    sync (CPU tensors, outside ``torch.compile``); ``True`` also on CUDA (one host sync per call);
    ``False`` never.
    """
    _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, None, 0.0)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if cu_seqlens_k is not None:
        wants = (not cu_seqlens_k.is_cuda) if check_cu_seqlens is None else check_cu_seqlens
        if wants and _may_sync(cu_seqlens_k):
            _check_cu_seqlens_values(cu_seqlens_k, k.shape[0])
    dropout_mask = None
    if dropout_p > 0.0:
        B, Lq, H, _ = q.shape
        shape = (H, Lq, k.shape[0]) if cu_seqlens_k is not None else (B, H, Lq, k.shape[1])
        dropout_mask = torch.rand(shape, device=q.device) >= dropout_p
    scale = None if scale is None else float(scale)
    return library.op(OP)(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask,
                          float(dropout_p), backend)[0]


# ---- backends -----------------------------------------------------------------------------------

def _reference_impl(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p):
    from python_ref.ops.qformer import qformer_attention

    _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p)
    if cu_seqlens_k is not None:  # the reference reads the values anyway
        _check_cu_seqlens_values(cu_seqlens_k, k.shape[0])
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):  # the op computes in its inputs' dtype
        out, lse = qformer_attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                     cu_seqlens_k=cu_seqlens_k, scale=scale, dropout_mask=dropout_mask,
                                     dropout_p=dropout_p)
    return out.contiguous(), lse.contiguous()


def _check_triton_dtype(q) -> None:
    if q.dtype not in _TRITON_FLOATS:
        raise TypeError(f"attention: the triton backend takes float32, float16 or bfloat16 q, got {q.dtype} "
                        "(float64 runs on backend='reference')")


def _triton_impl(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p):
    from ..triton import qformer_attention as kernel

    _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p)
    _check_triton_dtype(q)
    return kernel.attention_forward(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale,
                                    dropout_mask, dropout_p)


registry.register(OP, "reference", _reference_impl, devices=("cpu", "cuda"))
registry.register(OP, "triton", _triton_impl, devices=("cuda", "cpu"))
registry.register(OP, "cpu", library.native_backend(OP, "cpu"), devices=("cpu",))
registry.set_preference(OP, "cuda", ("triton", "reference"))
registry.set_preference(OP, "cpu", ("cpu", "reference"))


def _lse_dtype(q) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@library.register_fake(OP)
def _fake(q, k, v, key_padding_mask=None, attn_mask=None, cu_seqlens_k=None, scale=None, dropout_mask=None,
          dropout_p=0.0, backend="auto"):
    _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p)
    B, Lq, H, d = q.shape
    return q.new_empty((B, Lq, H, d)), q.new_empty((B, H, Lq), dtype=_lse_dtype(q))


# ---- backward -----------------------------------------------------------------------------------

def _check_backward(grad, q, out, lse) -> None:
    B, Lq, H, _ = q.shape
    for name, t, want in (("grad", grad, _shape(q)), ("out", out, _shape(q)), ("lse", lse, (B, H, Lq))):
        if not isinstance(t, torch.Tensor) or _shape(t) != want:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention_backward: {name} must have shape {want}, got {got}")
    for name, t in (("grad", grad), ("out", out)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention_backward: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    if lse.dtype != _lse_dtype(q):
        raise TypeError(f"attention_backward: lse must be {_lse_dtype(q)}, got {lse.dtype}")


def _reference_backward(grad, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k, scale,
                        dropout_mask, dropout_p):
    from python_ref.ops.qformer import qformer_attention_backward

    _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p)
    _check_backward(grad, q, out, lse)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        grads = qformer_attention_backward(grad, q, k, v, out, lse, key_padding_mask=key_padding_mask,
                                           attn_mask=attn_mask, cu_seqlens_k=cu_seqlens_k, scale=scale,
                                           dropout_mask=dropout_mask, dropout_p=dropout_p)
    return tuple(g.contiguous() for g in grads)


def _triton_backward(grad, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k, scale,
                     dropout_mask, dropout_p):
    from ..triton import qformer_attention as kernel

    _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p)
    _check_backward(grad, q, out, lse)
    _check_triton_dtype(q)
    return kernel.attention_backward(grad, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k,
                                     scale, dropout_mask, dropout_p)


registry.register(BWD, "reference", _reference_backward, devices=("cpu", "cuda"))
registry.register(BWD, "triton", _triton_backward, devices=("cuda", "cpu"))
registry.register(BWD, "cpu", library.native_backend(BWD, "cpu"), devices=("cpu",))
registry.set_preference(BWD, "cuda", ("triton", "reference"))
registry.set_preference(BWD, "cpu", ("cpu", "reference"))


@library.register_fake(BWD)
def _fake_backward(grad, q, k, v, out, lse, key_padding_mask=None, attn_mask=None, cu_seqlens_k=None,
                   scale=None, dropout_mask=None, dropout_p=0.0, backend="auto"):
    _check(q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p)
    _check_backward(grad, q, out, lse)
    # every backend returns contiguous gradients
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_mask, cu_seqlens_k, scale, dropout_mask, dropout_p, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k, dropout_mask)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k, dropout_mask = ctx.saved_tensors
    # the backward runs the forward's backend choice (a forced reference forward gets a reference vjp)
    dq, dk, dv = library.op(BWD)(grad.contiguous(), q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_k,
                                 ctx.scale, dropout_mask, ctx.dropout_p, ctx.backend)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            None, None, None, None, None, None, None)


library.register_autograd(OP, _backward, _setup_context)
