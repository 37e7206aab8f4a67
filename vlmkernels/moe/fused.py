"""``fused_moe``: the routed experts of an MoE layer in HF v5's weight layout.

``fused_moe(hidden [T,H], gate_up_proj [E,2I,H], down_proj [E,H,I], weights [T,k], ids [T,k])``
returns ``sum_j weights[t,j] * down[e](act(gate[e] x_t) * up[e] x_t)`` with ``e = ids[t,j]``
(exact math in :mod:`python_ref.ops.moe_experts`).

Backends: ``triton`` (CUDA, and CPU tensors under ``TRITON_INTERPRET=1``; the kernel is in
:mod:`vlmkernels.triton.fused_moe`) and ``reference`` (any device). ``auto`` picks triton on CUDA and
the reference on CPU.

Autograd: the forward always runs the selected backend; the backward is the op
``fused_moe_backward`` (opaque to ``torch.compile``, so a compiled training step traces), which
recomputes the layer's intermediates and applies the hand-written vjp of
:func:`python_ref.ops.moe_experts.fused_moe_backward`: gradients for hidden, both expert weights and
the routing weights, at reference speed (a loop over the experts that received tokens, one host
sync). ``ids`` get no gradient.
"""

from __future__ import annotations

import torch

from .. import library, registry

__all__ = ["fused_moe", "fused_moe_backward"]

OP = "fused_moe"
BWD = "fused_moe_backward"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _check(hidden, gate_up_proj, down_proj, weights, ids, activation) -> None:
    """Metadata checks (no device sync); shared by the functional API, backends and the fake."""
    named = {"hidden": hidden, "gate_up_proj": gate_up_proj, "down_proj": down_proj,
             "weights": weights, "ids": ids}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_moe: {name} must be a Tensor, got {type(t).__name__}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"fused_moe: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if hidden.dim() != 2:
        raise ValueError(f"fused_moe: hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            "fused_moe: gate_up_proj must be [E, 2I, H] and down_proj [E, H, I], got shapes "
            f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
        )
    T, H = hidden.shape
    E, two_i, h_gu = gate_up_proj.shape
    if E < 1 or two_i < 2 or two_i % 2:
        raise ValueError(
            f"fused_moe: gate_up_proj must be [E>=1, 2I (even, >=2), H], got {tuple(gate_up_proj.shape)}"
        )
    inter = two_i // 2
    if h_gu != H or tuple(down_proj.shape) != (E, H, inter):
        raise ValueError(
            f"fused_moe: shapes disagree: hidden [T={T}, H={H}], gate_up_proj {tuple(gate_up_proj.shape)} "
            f"(expected [E, 2I, {H}]), down_proj {tuple(down_proj.shape)} (expected [{E}, {H}, {inter}])"
        )
    if ids.dim() != 2 or ids.shape[0] != T:
        raise ValueError(f"fused_moe: ids must be [T={T}, k], got shape {tuple(ids.shape)}")
    if tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"fused_moe: weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"fused_moe: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    for name in ("gate_up_proj", "down_proj"):
        if named[name].dtype != hidden.dtype:
            raise TypeError(f"fused_moe: {name} must have hidden's dtype {hidden.dtype}, got {named[name].dtype}")
    if weights.dtype not in _FLOATS:
        raise TypeError(f"fused_moe: weights must be float32, float16 or bfloat16, got {weights.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fused_moe: ids must be int32 or int64, got {ids.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"fused_moe: all tensors must be on one device, got {devices}")


def _check_ids_range(ids: torch.Tensor, num_experts: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"fused_moe: ids must be in [0, E={num_experts}), got values in [{lo}, {hi}]")


def _may_sync(t: torch.Tensor) -> bool:
    """A range check reads values: never while tracing or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def fused_moe(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    activation: str = "silu",
    backend: str = "auto",
    check_ids: bool | None = None,
) -> torch.Tensor:
    """Routed experts output ``[T, H]`` in ``hidden``'s dtype.

    ``ids`` should lie in ``[0, E)``. ``check_ids=None`` (default) verifies that, with a
    ``ValueError``, where it costs no device sync: CPU tensors, outside ``torch.compile``.
    ``check_ids=True`` also checks CUDA ids (one host sync per call, skipped while compiling or
    capturing a CUDA graph); ``False`` never checks. Unchecked ids outside ``[0, E)`` are dropped
    (their slots contribute zero, HF's expert-parallel sentinel convention) by every backend; no
    backend reads out of bounds. NaN/Inf in ``hidden`` or in the routing weights propagate to the
    affected tokens' rows only.
    """
    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    wants_check = (not ids.is_cuda) if check_ids is None else check_ids
    if wants_check and _may_sync(ids):
        _check_ids_range(ids, gate_up_proj.shape[0])
    return library.op(OP)(hidden, gate_up_proj, down_proj, weights, ids, activation, backend)


# ---- backends -----------------------------------------------------------------------------------

def _reference_impl(hidden, gate_up_proj, down_proj, weights, ids, activation):
    from python_ref.ops.moe_experts import fused_moe as reference

    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    with torch.no_grad():
        return reference(hidden, gate_up_proj, down_proj, weights, ids, activation=activation)


def _triton_impl(hidden, gate_up_proj, down_proj, weights, ids, activation):
    from ..triton import fused_moe as kernel

    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    return kernel.fused_moe(hidden, gate_up_proj, down_proj, weights.contiguous(), ids.contiguous(), activation)


registry.register(OP, "reference", _reference_impl, devices=("cpu", "cuda"))
registry.register(OP, "triton", _triton_impl, devices=("cuda", "cpu"))
registry.set_preference(OP, "cuda", ("triton", "reference"))
registry.set_preference(OP, "cpu", ("reference",))


@library.register_fake(OP)
def _fake(hidden, gate_up_proj, down_proj, weights, ids, activation="silu", backend="auto"):
    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    return hidden.new_empty(hidden.shape)


# ---- backward -----------------------------------------------------------------------------------

def fused_moe_backward(grad, hidden, gate_up_proj, down_proj, weights, ids, *, activation="silu",
                       backend="auto"):
    """vjp of :func:`fused_moe`: ``(d hidden, d gate_up_proj, d down_proj, d weights)``."""
    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    if grad.shape != hidden.shape:
        raise ValueError(
            f"fused_moe_backward: grad must have hidden's shape {tuple(hidden.shape)}, got {tuple(grad.shape)}"
        )
    return library.op(BWD)(grad, hidden, gate_up_proj, down_proj, weights, ids, activation, backend)


def _reference_backward(grad, hidden, gate_up_proj, down_proj, weights, ids, activation):
    from python_ref.ops.moe_experts import fused_moe_backward as reference

    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    with torch.no_grad():
        return reference(grad, hidden, gate_up_proj, down_proj, weights, ids, activation=activation)


registry.register(BWD, "reference", _reference_backward, devices=("cpu", "cuda"))
registry.set_preference(BWD, "cuda", ("reference",))
registry.set_preference(BWD, "cpu", ("reference",))


@library.register_fake(BWD)
def _fake_backward(grad, hidden, gate_up_proj, down_proj, weights, ids, activation="silu", backend="auto"):
    return (torch.empty_like(hidden), torch.empty_like(gate_up_proj), torch.empty_like(down_proj),
            torch.empty_like(weights))


def _setup_context(ctx, inputs, output):
    hidden, gate_up_proj, down_proj, weights, ids, activation, _backend = inputs
    ctx.save_for_backward(hidden, gate_up_proj, down_proj, weights, ids)
    ctx.activation = activation


def _backward(ctx, grad):
    hidden, gate_up_proj, down_proj, weights, ids = ctx.saved_tensors
    grads = library.op(BWD)(grad, hidden, gate_up_proj, down_proj, weights, ids, ctx.activation, "auto")
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])), None, None, None)


library.register_autograd(OP, _backward, _setup_context)
