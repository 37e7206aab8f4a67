"""``moe_align_block_size``: group (token, slot) entries by expert in vLLM's padded-block layout.

Contract (vLLM's ``moe_align_block_size``, made stable; see
:func:`python_ref.ops.moe.moe_align_block_size`): for ``ids [T,k]``

* ``sorted_token_ids`` int32 ``[M]``, ``M = T*k + E*(block_size-1)`` (capped at ``T*k*block_size``
  when ``T*k < E``; vLLM's ``max_num_tokens_padded``): flattened entries ``t*k+j`` grouped by
  expert id ascending, token order kept inside an expert, each expert's segment padded to a
  multiple of ``block_size`` with the sentinel ``T*k``; everything past the last segment is the
  sentinel too.
* ``expert_ids`` int32 ``[ceil(M/block_size)]``: the expert of each block; -1 for unused blocks.
* ``num_tokens_post_padded`` int32 ``[1]``: total padded length, ``sum_e ceil(cnt_e/B)*B``.

With ``expert_map`` (``[E]`` global -> local id, -1 = not on this rank) segments and
``expert_ids`` use local ids. Entries whose id is outside ``[0, E)`` or maps to -1 (or outside
``[0, E)``) are dropped, never clamped into a real expert. The result is deterministic.
"""

from __future__ import annotations

import torch

from .. import library, registry
from python_ref.ops import moe as _ref

__all__ = ["moe_align_block_size"]

OP = "moe_align_block_size"
INT_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


def check_align_args(ids, num_experts, block_size, expert_map) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"moe_align_block_size: ids must be a Tensor, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"moe_align_block_size: ids must be 2-D [T, k], got shape {tuple(ids.shape)}")
    if ids.dtype not in INT_DTYPES:
        raise TypeError(f"moe_align_block_size: ids must be int32 or int64, got {ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"moe_align_block_size: num_experts must be >= 1, got {num_experts}")
    if block_size < 1:
        raise ValueError(f"moe_align_block_size: block_size must be >= 1, got {block_size}")
    n = ids.shape[0] * ids.shape[1]
    if n + num_experts * block_size > _INT32_MAX:
        raise ValueError(f"moe_align_block_size: T*k + E*block_size = {n + num_experts * block_size} overflows int32")
    if expert_map is not None:
        if not isinstance(expert_map, torch.Tensor):
            raise TypeError(f"moe_align_block_size: expert_map must be a Tensor or None, got {type(expert_map).__name__}")
        if tuple(expert_map.shape) != (num_experts,):
            raise ValueError(
                f"moe_align_block_size: expert_map must have shape [num_experts={num_experts}], got {tuple(expert_map.shape)}"
            )
        if expert_map.dtype not in INT_DTYPES:
            raise TypeError(f"moe_align_block_size: expert_map must be int32 or int64, got {expert_map.dtype}")
        if expert_map.device != ids.device:
            raise ValueError(f"moe_align_block_size: expert_map is on {expert_map.device} but ids on {ids.device}")


def output_sizes(ids, num_experts, block_size) -> tuple[int, int]:
    M = _ref.moe_align_max_padded(ids.shape[0] * ids.shape[1], num_experts, block_size)
    return M, (M + block_size - 1) // block_size


def _empty_outputs(ids, num_experts, block_size):
    M, nb = output_sizes(ids, num_experts, block_size)
    dev = ids.device
    return (torch.empty(M, dtype=torch.int32, device=dev), torch.empty(nb, dtype=torch.int32, device=dev),
            torch.empty(1, dtype=torch.int32, device=dev))


def _reference(ids, num_experts, block_size, expert_map):
    check_align_args(ids, num_experts, block_size, expert_map)
    return _ref.moe_align_block_size(ids, num_experts, block_size, expert_map=expert_map)


def _narrow(t, num_experts):
    """int32 contiguous copy; int64 values outside [0, E) become -1 (dropped) instead of wrapping
    (``narrow_ids`` in csrc/ops/moe_align.cpp does the same for the C++ kernels)."""
    if t.dtype == torch.int64:
        t = torch.where((t >= 0) & (t < num_experts), t, torch.full_like(t, -1))
    t = t.contiguous()
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _kernel_inputs(ids, expert_map, num_experts):
    return _narrow(ids, num_experts), None if expert_map is None else _narrow(expert_map, num_experts)


def _triton(ids, num_experts, block_size, expert_map):
    check_align_args(ids, num_experts, block_size, expert_map)
    from ..triton.moe_align import MAX_EXPERTS, moe_align_block_size_triton

    if num_experts > MAX_EXPERTS:
        raise ValueError(
            f"moe_align_block_size: the triton backend takes num_experts <= {MAX_EXPERTS}, got num_experts={num_experts}"
        )
    ids, expert_map = _kernel_inputs(ids, expert_map, num_experts)
    M, _ = output_sizes(ids, num_experts, block_size)
    return moe_align_block_size_triton(ids, int(num_experts), int(block_size), expert_map, M)


registry.register(OP, "reference", _reference, devices=("cpu", "cuda"))
registry.register(OP, "cpu", library.native_backend(OP, "cpu"), devices=("cpu",))
registry.register(OP, "cuda", library.native_backend(OP, "cuda"), devices=("cuda",))
_OP = library.op(OP).default
registry.register(OP, "triton", _triton, devices=("cpu", "cuda"))


@library.register_fake(OP)
def _fake(ids, num_experts, block_size, expert_map=None, backend="auto"):
    check_align_args(ids, num_experts, block_size, expert_map)
    return _empty_outputs(ids, num_experts, block_size)


def moe_align_block_size(
    ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    *,
    expert_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened ``(token, slot)`` entries of ``ids [T,k]`` by expert into padded blocks.

    Returns ``(sorted_token_ids int32 [M], expert_ids int32 [ceil(M/block_size)],
    num_tokens_post_padded int32 [1])`` in vLLM's layout with ``M = T*k + E*(block_size-1)``
    (``min(that, T*k*block_size)`` when ``T*k < E``). Unused entries hold the sentinel ``T*k``,
    unused blocks the expert -1. Stable (token order within an expert) and deterministic.
    ``expert_map [E]`` maps global to local expert ids; -1 (and any id outside ``[0, E)``) drops
    the entry. ``T == 0`` gives empty buffers and ``num_tokens_post_padded == [0]``.
    """
    return _OP(ids, num_experts, block_size, expert_map) if backend == "auto" else \
        _OP(ids, num_experts, block_size, expert_map, backend)
