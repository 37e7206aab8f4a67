"""``fused_moe``: the routed experts of an MoE layer in HF v5's weight layout.

``fused_moe(hidden [T,H], gate_up_proj [E,2I,H], down_proj [E,H,I], weights [T,k], ids [T,k])``
returns ``sum_j weights[t,j] * down[e](act(gate[e] x_t) * up[e] x_t)`` with ``e = ids[t,j]``
(exact math in :mod:`python_ref.ops.moe_experts`).

Backends: ``triton`` (CUDA, and CPU tensors under ``TRITON_INTERPRET=1``; the kernel is in
:mod:`vlmkernels.triton.fused_moe`) and ``reference`` (any device): python_ref's math in plain
PyTorch, computed like HF's ``grouped_mm`` experts (slots sorted by expert, one gather, one GEMM per
expert that received tokens -- ``torch._grouped_mm`` for fp32 CPU tensors where torch has it --
into preallocated buffers, activation and scatter once over all slots), so that on CPU the patched
experts run no slower than HF's. ``auto`` picks triton on CUDA and the reference on CPU.

Autograd: the forward always runs the selected backend; the backward is the op
``fused_moe_backward`` (opaque to ``torch.compile``, so a compiled training step traces), which
recomputes the layer's intermediates and applies the hand-written vjp of
:func:`python_ref.ops.moe_experts.fused_moe_backward`: gradients for hidden, both expert weights and
the routing weights, with the same grouped GEMMs as the forward (one host sync). ``ids`` get no
gradient.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

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
    """A range check reads values: never while tracing, on tensors without data (meta, fake) or
    while capturing a CUDA graph."""
    if torch.compiler.is_compiling() or t.is_meta or is_fake(t):
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
    backend reads out of bounds. NaN/Inf in ``hidden`` or in the routing weights of routed slots
    propagate to the affected tokens' rows only; a dropped slot's weight is never read.
    """
    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    wants_check = (not ids.is_cuda) if check_ids is None else check_ids
    if wants_check and _may_sync(ids):
        _check_ids_range(ids, gate_up_proj.shape[0])
    return library.op(OP)(hidden, gate_up_proj, down_proj, weights, ids, activation, backend)


# ---- backends -----------------------------------------------------------------------------------

# ---- reference backend: python_ref's math as grouped GEMMs ----------------------------------------
#
# The same operations as python_ref.ops.moe_experts (fp32 accumulation, h rounded to the activation
# dtype, the k-slot sum in fp32 over a [T*k, H] buffer in slot order) without autograd recording,
# so every intermediate is written once into a preallocated buffer.

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Groups:
    """Slots routed to experts in ``[0, E)``, sorted by expert (stable), as GEMM row ranges."""

    def __init__(self, ids: torch.Tensor, num_experts: int):
        flat_ids = ids.reshape(-1).long()
        sorted_ids, order = torch.sort(flat_ids, stable=True)
        edges = torch.arange(num_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
        bounds = torch.searchsorted(sorted_ids, edges, out_int32=True)
        self._bounds = bounds.tolist()  # the one host sync
        lo, hi = self._bounds[0], self._bounds[-1]
        self.slots = order if (lo, hi) == (0, flat_ids.numel()) else order[lo:hi]
        self.rows = hi - lo
        self.complete = self.rows == flat_ids.numel()  # no slot dropped (every id in range)
        # torch._grouped_mm's offs: cumulative row counts per expert
        self.offsets = bounds[1:] if lo == 0 else bounds[1:] - lo

    @property
    def ranges(self):
        """``(expert, start row, end row)`` for every expert that received slots."""
        b, lo = self._bounds, self._bounds[0]
        return [(e, b[e] - lo, b[e + 1] - lo) for e in range(len(b) - 1) if b[e + 1] > b[e]]


_HAS_CPU_GROUPED_MM = hasattr(torch, "_grouped_mm") and torch.__version__ >= (2, 9)


def _aligned_16(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride() if st != 1)


def _grouped_mm_ok(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    # CPU torch._grouped_mm (no kernel before torch 2.9) wants 16-byte aligned pointers and strides
    # (inputs and output); fp32 only here: the half types go through fp32 (python_ref's
    # accumulation) in the per-expert loop.
    return (_HAS_CPU_GROUPED_MM and rows.device.type == "cpu" and rows.dtype == weight.dtype == torch.float32
            and rows.is_contiguous() and weight.is_contiguous() and _aligned_16(rows) and _aligned_16(weight)
            and weight.shape[-1] % 4 == 0 and weight.shape[-2] % 4 == 0)


def _grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, groups: _Groups, *, transpose: bool) -> torch.Tensor:
    """``rows[range of e] @ (weight[e].T if transpose else weight[e])`` for every expert range, in
    ``rows``' dtype (the accumulation dtype); ``weight`` is cast per used expert."""
    if _grouped_mm_ok(rows, weight):
        try:
            return torch._grouped_mm(rows, weight.transpose(-2, -1) if transpose else weight,
                                     offs=groups.offsets)
        except (RuntimeError, NotImplementedError):  # a layout this torch's CPU kernel refuses
            pass
    n = weight.shape[-2] if transpose else weight.shape[-1]
    out = rows.new_empty(rows.shape[0], n)
    for e, a, b in groups.ranges:
        w = weight[e].to(rows.dtype)
        torch.mm(rows[a:b], w.t() if transpose else w, out=out[a:b])
    return out


def _grouped_outer(a: torch.Tensor, b: torch.Tensor, groups: _Groups, num_experts: int) -> torch.Tensor:
    """Per expert ``a[range of e].T @ b[range of e]`` -> ``[E, a.shape[1], b.shape[1]]`` (weight
    gradients); zero for experts without rows."""
    A, B = a.shape[1], b.shape[1]
    if (_HAS_CPU_GROUPED_MM and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and a.is_contiguous() and b.is_contiguous() and A % 4 == 0 and B % 4 == 0
            and _aligned_16(a) and _aligned_16(b)):
        try:
            out = torch._grouped_mm(a.t(), b, offs=groups.offsets)
            if len(groups.ranges) < num_experts:  # don't rely on how a torch version fills empty groups
                counts = torch.diff(groups.offsets, prepend=groups.offsets.new_zeros(1))
                out.masked_fill_((counts == 0)[:, None, None], 0)
            return out
        except (RuntimeError, NotImplementedError):
            pass
    out = a.new_zeros(num_experts, A, B)
    for e, lo, hi in groups.ranges:
        torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
    return out


def _round_trip(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``h`` rounded to the activation dtype (python_ref: every HF implementation does)."""
    return h if h.dtype == dtype else h.to(dtype).to(h.dtype)


def _reference_impl(hidden, gate_up_proj, down_proj, weights, ids, activation):
    from python_ref.ops.moe_experts import moe_activation

    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    T, H = hidden.shape
    inter = gate_up_proj.shape[1] // 2
    k = ids.shape[1]
    acc = _acc_dtype(hidden.dtype)
    with torch.no_grad():
        groups = _Groups(ids, gate_up_proj.shape[0])
        # every slot gets written when no id was dropped: skip the zero fill then
        contrib = (torch.empty if groups.complete else torch.zeros)((T * k, H), dtype=acc, device=hidden.device)
        if groups.rows:
            x = hidden.index_select(0, torch.div(groups.slots, k, rounding_mode="floor")).to(acc)
            gu = _grouped_matmul(x, gate_up_proj, groups, transpose=True)
            h = moe_activation(gu[:, :inter], activation).mul_(gu[:, inter:])
            y = _grouped_matmul(_round_trip(h, hidden.dtype), down_proj, groups, transpose=True)
            # weights only on the computed slots: a dropped slot adds exactly 0, even with a NaN weight
            y.mul_(weights.reshape(-1, 1).to(acc).index_select(0, groups.slots))
            contrib.index_copy_(0, groups.slots, y)
        return contrib.view(T, k, H).sum(dim=1).to(hidden.dtype)


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
    """python_ref's hand-written vjp (:func:`python_ref.ops.moe_experts.fused_moe_backward`) as
    grouped GEMMs."""
    from python_ref.ops.moe_experts import moe_activation, moe_activation_grad

    _check(hidden, gate_up_proj, down_proj, weights, ids, activation)
    T, H = hidden.shape
    inter = gate_up_proj.shape[1] // 2
    k = ids.shape[1]
    acc = _acc_dtype(hidden.dtype)
    with torch.no_grad():
        d_hidden = torch.zeros((T, H), dtype=acc, device=hidden.device)
        d_w = torch.zeros(T * k, dtype=acc, device=hidden.device)
        E = gate_up_proj.shape[0]
        groups = _Groups(ids, E)
        d_gate_up = d_down = None
        if groups.rows:
            tok = torch.div(groups.slots, k, rounding_mode="floor")
            x = hidden.index_select(0, tok).to(acc)
            gu = _grouped_matmul(x, gate_up_proj, groups, transpose=True)
            gate, up = gu[:, :inter], gu[:, inter:]
            a = moe_activation(gate, activation)
            h = _round_trip(a * up, hidden.dtype)
            y = _grouped_matmul(h, down_proj, groups, transpose=True)
            g = grad.index_select(0, tok).to(acc)
            d_w.index_copy_(0, groups.slots, (g * y).sum(-1))
            dy = g.mul_(weights.reshape(-1).to(acc).index_select(0, groups.slots)[:, None])
            dh = _grouped_matmul(dy, down_proj, groups, transpose=False)
            d_gu = torch.cat([dh * up * moe_activation_grad(gate, activation), dh.mul_(a)], dim=1)
            d_down = _grouped_outer(dy, h, groups, E)
            d_gate_up = _grouped_outer(d_gu, x, groups, E)
            d_hidden.index_add_(0, tok, _grouped_matmul(d_gu, gate_up_proj, groups, transpose=False))
        if d_down is None:  # no slot routed to an expert in [0, E)
            d_gate_up = torch.zeros(gate_up_proj.shape, dtype=acc, device=hidden.device)
            d_down = torch.zeros(down_proj.shape, dtype=acc, device=hidden.device)
        return (d_hidden.to(hidden.dtype), d_gate_up.to(gate_up_proj.dtype), d_down.to(down_proj.dtype),
                d_w.view(T, k).to(weights.dtype))


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
