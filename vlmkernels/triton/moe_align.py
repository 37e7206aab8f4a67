"""Triton ``moe_align_block_size`` (vLLM layout, stable, deterministic).

Four launches over contiguous chunks of the flattened entries:
1. ``_count``: per-chunk expert histogram (one-hot reduction, no atomics).
2. ``_prefix``: one program turns the histograms into segment starts per (chunk, expert), pads each
   expert's segment to ``block_size`` and writes ``num_tokens_post_padded`` and segment ends.
3. ``_scatter``: each entry goes to its chunk's running slot for its expert plus its rank among
   earlier entries of the same expert in the chunk, which keeps the flattened order.
4. ``_block_experts``: expert of every block (-1 past the padded total).
The sentinel fill of ``sorted_token_ids`` is a plain ``torch.full``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher

# _count and _block_experts hold a [16, next_power_of_2(E)] one-hot tile; Triton caps a tile at 2**20
# elements
MAX_EXPERTS = 2**16


@triton.jit
def _local_expert(ids_ptr, map_ptr, offs, n, E, HAS_MAP: tl.constexpr):
    """Local expert per entry, -1 for padding lanes and dropped entries."""
    e = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
    ok = (e >= 0) & (e < E)
    if HAS_MAP:
        e = tl.load(map_ptr + e, mask=ok, other=-1)
        ok = ok & (e >= 0) & (e < E)
    return tl.where(ok, e, -1)


@triton.jit
def _count(ids_ptr, map_ptr, counts_ptr, n, E, HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_X: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    e = _local_expert(ids_ptr, map_ptr, offs, n, E, HAS_MAP)
    ex = tl.arange(0, BLOCK_X)
    hist = tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * E + ex, hist, mask=ex < E)


@triton.jit
def _prefix(counts_ptr, starts_ptr, seg_end_ptr, total_ptr, num_chunks, E, B, BLOCK_X: tl.constexpr):
    ex = tl.arange(0, BLOCK_X)
    m = ex < E
    cnt = tl.zeros([BLOCK_X], tl.int32)
    for c in range(0, num_chunks):
        cnt += tl.load(counts_ptr + c * E + ex, mask=m, other=0)
    padded = (cnt + B - 1) // B * B
    seg_end = tl.cumsum(padded, axis=0)
    run = seg_end - padded
    for c in range(0, num_chunks):
        tl.store(starts_ptr + c * E + ex, run, mask=m)
        run += tl.load(counts_ptr + c * E + ex, mask=m, other=0)
    tl.store(seg_end_ptr + ex, seg_end, mask=m)
    tl.store(total_ptr, tl.sum(padded, axis=0))


@triton.jit
def _scatter(ids_ptr, map_ptr, starts_ptr, out_ptr, n, E, HAS_MAP: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    offs = c * CHUNK + lane
    e = _local_expert(ids_ptr, map_ptr, offs, n, E, HAS_MAP)
    keep = e >= 0
    # rank among earlier lanes of this chunk with the same expert: stable within the chunk
    earlier = (e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    start = tl.load(starts_ptr + c * E + e, mask=keep, other=0)
    tl.store(out_ptr + start + rank, offs.to(tl.int32), mask=keep)


@triton.jit
def _block_experts(seg_end_ptr, total_ptr, eid_ptr, num_blocks, E, B, BLOCK_B: tl.constexpr, BLOCK_X: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ex = tl.arange(0, BLOCK_X)
    total = tl.load(total_ptr)
    seg_end = tl.load(seg_end_ptr + ex, mask=ex < E, other=total)
    pos = b * B
    # the block's expert is the number of segments that end at or before its first row
    expert = tl.sum((seg_end[None, :] <= pos[:, None]).to(tl.int32), axis=1)
    tl.store(eid_ptr + b, tl.where(pos < total, expert, -1), mask=b < num_blocks)


@launcher
def moe_align_block_size_triton(ids, num_experts, block_size, expert_map, max_padded):
    """``ids`` contiguous int32 ``[T,k]``; ``expert_map`` contiguous int32 ``[E]`` or None."""
    n = ids.numel()
    E, B = num_experts, block_size
    dev = ids.device
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=dev)
    num_blocks = (max_padded + B - 1) // B
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    total = torch.zeros(1, dtype=torch.int32, device=dev)
    if n == 0:
        expert_ids.fill_(-1)
        return sorted_ids, expert_ids, total
    block_x = max(16, triton.next_power_of_2(E))
    chunk = 16 if block_x >= 1024 else (32 if block_x >= 256 else 64)  # bounds the one-hot tile
    num_chunks = triton.cdiv(n, chunk)
    counts = torch.empty(num_chunks, E, dtype=torch.int32, device=dev)
    starts = torch.empty(num_chunks, E, dtype=torch.int32, device=dev)
    seg_end = torch.empty(E, dtype=torch.int32, device=dev)
    has_map = expert_map is not None
    emap = expert_map if has_map else ids
    _count[(num_chunks,)](ids, emap, counts, n, E, HAS_MAP=has_map, CHUNK=chunk, BLOCK_X=block_x)
    _prefix[(1,)](counts, starts, seg_end, total, num_chunks, E, B, BLOCK_X=block_x, num_warps=4)
    _scatter[(num_chunks,)](ids, emap, starts, sorted_ids, n, E, HAS_MAP=has_map, CHUNK=chunk)
    block_b = 16
    _block_experts[(triton.cdiv(num_blocks, block_b),)](seg_end, total, expert_ids, num_blocks, E, B,
                                                        BLOCK_B=block_b, BLOCK_X=block_x)
    return sorted_ids, expert_ids, total
