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
Plain torch ops only, so autograd works through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_moe", "moe_activation", "MOE_ACTIVATIONS"]

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

    Ids outside ``[0, E)`` contribute nothing (HF's expert-parallel sentinel convention); the
    vlmkernels functional API rejects them before they get here.
    """
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    k = ids.shape[1]
    acc = _acc_dtype(hidden.dtype)
    flat_ids = ids.reshape(-1).long()
    flat_w = weights.reshape(-1).to(acc)
    token_of_slot = torch.arange(T * k, device=hidden.device) // k
    contrib = hidden.new_zeros((T * k, H), dtype=acc)
    # Loop over the experts that received tokens: dense per-slot weight gathers would need
    # T*k*3*H*I memory. The .tolist() sync is fine for a reference.
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    in_range = (sorted_ids >= 0) & (sorted_ids < E)
    start = int((sorted_ids < 0).sum())  # negative sentinels sort first
    for e, n in enumerate(torch.bincount(sorted_ids[in_range], minlength=E).tolist()):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        x = hidden[token_of_slot[slots]].to(acc)
        gu = x @ gate_up_proj[e].to(acc).t()
        h = moe_activation(gu[:, :inter], activation) * gu[:, inter:]
        h = h.to(hidden.dtype).to(acc)
        contrib = contrib.index_copy(0, slots, h @ down_proj[e].to(acc).t())
    out = (contrib * flat_w[:, None]).view(T, k, H).sum(dim=1)
    return out.to(hidden.dtype)

