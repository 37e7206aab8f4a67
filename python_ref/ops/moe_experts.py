"""Reference MoE expert computation with transformers v5's expert weight layout.

``gate_up_proj [E, 2I, H]`` holds the gate rows first and the up rows second (HF ``*Experts``;
vLLM's ``w13``), ``down_proj [E, H, I]`` (vLLM's ``w2``). For every (token t, slot j) with expert
``e = ids[t, j]``::

    gate, up = (hidden[t] @ gate_up_proj[e].T).chunk(2)
    h        = act(gate) * up                      # rounded to the activation dtype
    out[t]  += weights[t, j] * (h @ down_proj[e].T)

Both products accumulate in fp32 (float64 for float64 inputs); ``h`` is rounded to the activation
dtype like every HF implementation (eager, ``grouped_mm``, ``batched_mm``) and vLLM's intermediate
cache; the weighted sum over the k slots is done in fp32 and cast once, like HF's ``reshape+sum``.
Plain torch ops only, so autograd works through it; :func:`fused_moe_backward` is the same vjp
written out by hand (usable where autograd cannot record, e.g. inside a custom op's kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_moe", "fused_moe_backward", "moe_activation", "moe_activation_grad", "MOE_ACTIVATIONS"]

# name -> HF ``hidden_act`` spellings that mean the same function
MOE_ACTIVATIONS = {
    "silu": ("silu", "swish"),
    "gelu": ("gelu",),
    "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"),
}


def moe_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The gate activation, evaluated in ``x``'s dtype."""
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"activation must be one of {sorted(MOE_ACTIVATIONS)}, got {activation!r}")


def moe_activation_grad(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx."""
    if activation == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(x * 0.5**0.5)) + x * torch.exp(-0.5 * x * x) * (2 * torch.pi) ** -0.5
    if activation == "gelu_tanh":
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    raise ValueError(f"activation must be one of {sorted(MOE_ACTIVATIONS)}, got {activation!r}")


def _expert_groups(ids: torch.Tensor, num_experts: int):
    """The slots routed to an expert in ``[0, E)``, sorted by expert (stable: slot order within an
    expert), and ``(expert, start, end)`` row ranges of that order for every expert that received
    slots. Ids outside ``[0, E)`` are left out. One host sync (the range bounds)."""
    flat_ids = ids.reshape(-1).long()
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    edges = torch.arange(num_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
    bounds = torch.searchsorted(sorted_ids, edges).tolist()
    lo = bounds[0]
    groups = [(e, bounds[e] - lo, bounds[e + 1] - lo) for e in range(num_experts) if bounds[e + 1] > bounds[e]]
    return order[lo:bounds[-1]], groups


def _per_expert(rows: torch.Tensor, groups, weight_of) -> torch.Tensor:
    """``rows[start:end] @ weight_of(e)`` for every group, stacked in the groups' order."""
    return torch.cat([rows[a:b] @ weight_of(e) for e, a, b in groups])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_moe(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    activation: str = "silu",
) -> torch.Tensor:
    """``[T, H]`` output of the routed experts; see the module docstring for the exact math.

    Ids outside ``[0, E)`` contribute nothing, whatever their weight (HF's expert-parallel sentinel
    convention); the vlmkernels functional API rejects them before they get here.
    """
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    k = ids.shape[1]
    acc = _acc_dtype(hidden.dtype)
    flat_w = weights.reshape(-1).to(acc)
    contrib = hidden.new_zeros((T * k, H), dtype=acc)
    # Slots sorted by expert, one GEMM per expert that received tokens (dense per-slot weight
    # gathers would need T*k*3*H*I memory); gathers, activation and scatter run once over all
    # slots. The .tolist() sync in _expert_groups is fine for a reference.
    slots, groups = _expert_groups(ids, E)
    if groups:
        x = hidden.index_select(0, torch.div(slots, k, rounding_mode="floor")).to(acc)
        gu = _per_expert(x, groups, lambda e: gate_up_proj[e].to(acc).t())
        h = moe_activation(gu[:, :inter], activation) * gu[:, inter:]
        h = h.to(hidden.dtype).to(acc)
        y = _per_expert(h, groups, lambda e: down_proj[e].to(acc).t())
        # weights only on the routed slots: a dropped slot adds exactly 0, even with a NaN weight
        contrib = contrib.index_copy(0, slots, y * flat_w.index_select(0, slots)[:, None])
    return contrib.view(T, k, H).sum(dim=1).to(hidden.dtype)


def fused_moe_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    activation: str = "silu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vjp of :func:`fused_moe` for ``grad [T, H]``: grads of hidden, gate_up_proj, down_proj, weights
    (each in its input's dtype). The rounding of ``h`` is treated as identity (straight-through)."""
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    k = ids.shape[1]
    acc = _acc_dtype(hidden.dtype)
    g_out = grad.to(acc)
    flat_w = weights.reshape(-1).to(acc)
    d_hidden = torch.zeros((T, H), dtype=acc, device=hidden.device)
    d_gate_up = torch.zeros(gate_up_proj.shape, dtype=acc, device=hidden.device)
    d_down = torch.zeros(down_proj.shape, dtype=acc, device=hidden.device)
    d_w = torch.zeros(T * k, dtype=acc, device=hidden.device)
    slots, groups = _expert_groups(ids, E)
    if groups:
        w_gu = {e: gate_up_proj[e].to(acc) for e, _, _ in groups}
        w_dn = {e: down_proj[e].to(acc) for e, _, _ in groups}
        tok = torch.div(slots, k, rounding_mode="floor")
        x = hidden.index_select(0, tok).to(acc)
        gu = _per_expert(x, groups, lambda e: w_gu[e].t())
        gate, up = gu[:, :inter], gu[:, inter:]
        a = moe_activation(gate, activation)
        h = (a * up).to(hidden.dtype).to(acc)
        y = _per_expert(h, groups, lambda e: w_dn[e].t())
        g = g_out.index_select(0, tok)
        d_w.index_copy_(0, slots, (g * y).sum(-1))
        dy = g * flat_w.index_select(0, slots)[:, None]
        dh = _per_expert(dy, groups, lambda e: w_dn[e])
        d_gu = torch.cat([dh * up * moe_activation_grad(gate, activation), dh * a], dim=1)
        for e, lo, hi in groups:
            torch.mm(dy[lo:hi].t(), h[lo:hi], out=d_down[e])
            torch.mm(d_gu[lo:hi].t(), x[lo:hi], out=d_gate_up[e])
        d_hidden.index_add_(0, tok, _per_expert(d_gu, groups, lambda e: w_gu[e]))
    return (d_hidden.to(hidden.dtype), d_gate_up.to(gate_up_proj.dtype), d_down.to(down_proj.dtype),
            d_w.view(T, k).to(weights.dtype))
