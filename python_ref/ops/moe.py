"""Reference MoE routing ops in plain PyTorch: the ground truth for the vlmkernels kernels.

Semantics (shared by every backend):

* ``moe_topk_route``: scores = softmax|sigmoid(logits) computed in fp32 (float64 for float64
  logits); non-finite scores count as 0. Selection uses ``key = score + bias`` (a NaN key counts
  as 0); with groups, a group's score is the sum of its top-2 keys (``top2_sum``) or its max key
  (``max``) and only the ``topk_groups`` best groups are eligible. Ties go to the lowest index
  (groups and experts). The returned weight is the *unbiased* score; within a row the k entries
  are ordered by that score descending, then id ascending. ``renormalize`` divides by the sum of
  the k selected scores (a zero sum divides by 1); ``scaling_factor`` multiplies at the end.
* ``moe_align_block_size``: vLLM's layout, made stable (see the function's docstring).
* ``topk_select_tokens``: top-k rows of ``tokens`` by ``scores`` per batch, descending, ties to
  the lowest index, NaN ranked below every number.

Weights are differentiable with respect to the logits (and selected tokens w.r.t. tokens);
selection itself is piecewise constant and carries no gradient.
"""

from __future__ import annotations

import torch

__all__ = ["moe_topk_route", "moe_align_block_size", "topk_select_tokens", "moe_align_max_padded"]

_SCORINGS = ("softmax", "sigmoid")
_GROUP_SCORES = ("top2_sum", "max")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nan_to_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def _stable_desc_order(key: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``key`` descending along the last dim; equal keys keep index order."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def route_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """softmax|sigmoid of the logits in the compute dtype, non-finite results set to 0."""
    x = logits.to(_compute_dtype(logits.dtype))
    s = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    return torch.where(torch.isfinite(s), s, torch.zeros_like(s))


def _eligible_experts(key, num_groups, topk_groups, group_score):
    """Bool [T,E]: experts in the ``topk_groups`` best groups (all experts when there is one group)."""
    T, E = key.shape
    if num_groups == 1:
        return torch.ones_like(key, dtype=torch.bool)
    grouped = key.view(T, num_groups, E // num_groups)
    if group_score == "max":
        gscore = grouped.max(dim=-1).values
    else:
        n = min(2, grouped.shape[-1])
        gscore = torch.sort(grouped, dim=-1, descending=True).values[..., :n].sum(-1)
    gscore = _nan_to_zero(gscore)
    best = _stable_desc_order(gscore)[:, :topk_groups]
    gmask = torch.zeros(T, num_groups, dtype=torch.bool, device=key.device)
    gmask.scatter_(1, best, True)
    return gmask.repeat_interleave(E // num_groups, dim=1)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert routing. Returns ``(weights [T,k] weights_dtype, ids int32 [T,k])``."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}")
    if group_score not in _GROUP_SCORES:
        raise ValueError(f"group_score must be one of {_GROUP_SCORES}, got {group_score!r}")
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"E={E} must be divisible by num_groups={num_groups}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
    if topk_groups * (E // num_groups) < top_k:
        raise ValueError(
            f"too few eligible experts: topk_groups*E/num_groups = {topk_groups * (E // num_groups)} < top_k={top_k}"
        )
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"bias must have shape [E={E}], got {tuple(bias.shape)}")

    scores = route_scores(logits, scoring)
    key = scores.detach()
    if bias is not None:
        key = key + bias.to(key.dtype)
    key = _nan_to_zero(key)
    eligible = _eligible_experts(key, num_groups, topk_groups, group_score)
    # lexicographic (eligible desc, key desc, id asc) via two stable sorts
    by_key = _stable_desc_order(key)
    by_elig = torch.sort((~eligible.gather(1, by_key)).to(torch.int8), dim=-1, stable=True).indices
    ids = by_key.gather(1, by_elig)[:, :top_k]
    # order within the row: unbiased score descending, then id ascending
    ids = torch.sort(ids, dim=-1).values
    ids = ids.gather(1, _stable_desc_order(scores.detach().gather(1, ids)))
    weights = scores.gather(1, ids)
    if renormalize:
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    weights = weights * scaling_factor
    return weights.to(weights_dtype), ids.to(torch.int32)


def moe_align_max_padded(num_entries: int, num_experts: int, block_size: int) -> int:
    """Length of ``sorted_token_ids`` for ``num_entries = T*k`` (vLLM's ``max_num_tokens_padded``)."""
    n = num_entries + num_experts * (block_size - 1)
    if num_entries < num_experts:  # at most num_entries experts are hit, each padded to block_size
        n = min(n, num_entries * block_size)
    return n


def moe_align_block_size(
    ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    *,
    expert_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the flattened (token, slot) entries of ``ids [T,k]`` by expert, vLLM layout, stable.

    Returns ``(sorted_token_ids int32 [M], expert_ids int32 [ceil(M/block_size)],
    num_tokens_post_padded int32 [1])`` with ``M = T*k + E*(block_size-1)``, capped at
    ``T*k*block_size`` when ``T*k < E`` (vLLM's ``max_num_tokens_padded``).

    * Entry ``t*k+j`` goes to the segment of expert ``ids[t,j]`` (its local id when ``expert_map``
      is given); segments are laid out by expert id ascending, each padded up to a multiple of
      ``block_size`` with the sentinel ``T*k``; inside a segment entries keep flattened order.
    * ``expert_ids[b]`` is the expert of block ``b``; blocks past ``num_tokens_post_padded`` are -1,
      and ``sorted_token_ids`` past it holds the sentinel.
    * Ids outside ``[0, E)``, and ids whose ``expert_map`` entry is -1 (or outside ``[0, E)``), are
      dropped (never clamped into a real expert): they appear nowhere in the output.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be 2-D [T, k], got shape {tuple(ids.shape)}")
    T, k = ids.shape
    E, B = int(num_experts), int(block_size)
    n = T * k
    M = moe_align_max_padded(n, E, B)
    dev = ids.device
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    local = flat.clamp(0, max(E - 1, 0))
    if expert_map is not None:
        local = expert_map.long().to(dev)[local] if E > 0 else local
        valid &= (local >= 0) & (local < E)
    key = torch.where(valid, local, torch.full_like(local, E))  # dropped entries sort last
    counts = torch.bincount(key, minlength=E + 1)[:E]
    padded = (counts + B - 1) // B * B
    seg_start = torch.cumsum(padded, 0) - padded
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    first_in_sorted = torch.cumsum(counts, 0) - counts
    keep = sorted_key < E
    e = sorted_key[keep]
    rank = torch.arange(n, device=dev)[keep] - first_in_sorted[e]
    sorted_token_ids = torch.full((M,), n, dtype=torch.int32, device=dev)
    sorted_token_ids[seg_start[e] + rank] = order[keep].to(torch.int32)
    blocks = torch.repeat_interleave(torch.arange(E, device=dev), padded // B)
    expert_ids = torch.full(((M + B - 1) // B,), -1, dtype=torch.int32, device=dev)
    expert_ids[: blocks.numel()] = blocks.to(torch.int32)
    total = padded.sum().reshape(1).to(torch.int32)
    return sorted_token_ids, expert_ids, total


def topk_select_tokens(scores: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens per batch row: ``(selected [B,k,D], index int64 [B,k])``.

    Order is score descending, ties to the lowest index, NaN below every number. Gradient flows
    to ``tokens`` (a scatter into the selected rows); ``scores`` get none (use
    ``scores.gather(1, index)`` for a differentiable score of the selection).
    """
    if scores.dim() != 2 or tokens.dim() != 3 or tokens.shape[:2] != scores.shape:
        raise ValueError(
            f"expected scores [B,N] and tokens [B,N,D], got {tuple(scores.shape)} and {tuple(tokens.shape)}"
        )
    N = scores.shape[1]
    if not 0 <= k <= N:
        raise ValueError(f"k must be in [0, N={N}], got {k}")
    s = scores.detach()
    # NaN last: rank by (is-not-nan, value) via two stable sorts
    by_val = _stable_desc_order(torch.where(torch.isnan(s), torch.full_like(s, -float("inf")), s))
    by_nan = torch.sort(torch.isnan(s).gather(1, by_val).to(torch.int8), dim=-1, stable=True).indices
    index = by_val.gather(1, by_nan)[:, :k].contiguous()
    selected = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    return selected, index
