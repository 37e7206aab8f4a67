"""Triton ``moe_topk_route``: one program per token row, the whole row (E <= 1024) in registers.

Same semantics as the C++/CUDA kernels (python_ref.ops.moe.moe_topk_route): fp32 math, NaN/Inf
scores -> 0, selection on score+bias, optional group-limited selection, ties to the lowest
index (every argmax below is "max value, then min index among equal values"), output ordered by
unbiased weight descending then id.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher

MAX_EXPERTS = 1024


@triton.jit
def _argmax_lowest(vals, avail, offs, BLOCK: tl.constexpr):
    """(max over available lanes, lowest lane index holding it); -inf maxima are still picked."""
    m = tl.max(tl.where(avail, vals, float("-inf")), axis=0)
    i = tl.min(tl.where(avail & (vals == m), offs, BLOCK), axis=0)
    return m, i


@triton.jit
def _moe_route_kernel(
    logits_ptr, bias_ptr, w_ptr, id_ptr,
    E, K, S, G, TG, scale, stride_row,
    SCORING: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr, GROUP_MAX: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    x = tl.load(logits_ptr + row * stride_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if SCORING == 0:
        m = tl.max(x, axis=0)
        ex = tl.where(valid, tl.exp(x - m), 0.0)
        score = ex / tl.sum(ex, axis=0)  # a NaN/Inf anywhere makes the sum NaN: whole row -> 0
    else:
        score = 1.0 / (1.0 + tl.exp(-x))
    score = tl.where(valid & (score - score == 0.0), score, 0.0)
    key = score
    if HAS_BIAS:
        key = score + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        key = tl.where(key != key, 0.0, key)

    avail = valid
    if GROUPED:
        gid = offs // S
        offs_g = tl.arange(0, BLOCK_G)
        gscores = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for g in range(0, G):
            in_g = valid & (gid == g)
            m1, i1 = _argmax_lowest(key, in_g, offs, BLOCK_E)
            if GROUP_MAX:
                gs = m1
            else:
                m2 = tl.max(tl.where(in_g & (offs != i1), key, float("-inf")), axis=0)
                gs = tl.where(S >= 2, m1 + m2, m1)
            gs = tl.where(gs != gs, 0.0, gs)
            gscores = tl.where(offs_g == g, gs, gscores)
        gavail = offs_g < G
        avail = offs < 0
        for _ in range(0, TG):
            _gm, gi = _argmax_lowest(gscores, gavail, offs_g, BLOCK_G)
            gavail = gavail & (offs_g != gi)
            avail = avail | (gid == gi)
        avail = avail & valid

    sel = offs < 0
    for _ in range(0, K):
        _km, ki = _argmax_lowest(key, avail, offs, BLOCK_E)
        avail = avail & (offs != ki)
        sel = sel | (offs == ki)
    mul = scale
    if RENORM:
        total = tl.sum(tl.where(sel, score, 0.0), axis=0)
        mul = scale / tl.where(total > 0.0, total, 1.0)
    out = row * K
    for r in range(0, K):
        sm, si = _argmax_lowest(score, sel, offs, BLOCK_E)
        sel = sel & (offs != si)
        tl.store(w_ptr + out + r, sm * mul)
        tl.store(id_ptr + out + r, si.to(tl.int32))


@launcher
def moe_topk_route_triton(logits, bias, top_k, scoring, renormalize, num_groups, topk_groups, group_score,
                          scaling_factor):
    """Launch on contiguous ``logits [T,E]`` (fp32/fp16/bf16) and fp32 ``bias [E]`` or None.

    ``scoring``/``group_score`` are codes (0 softmax / 1 sigmoid; 0 top2_sum / 1 max). Returns
    ``(weights fp32 [T,k], ids int32 [T,k])``.
    """
    T, E = logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"moe_topk_route (triton): E must be <= {MAX_EXPERTS}, got {E}")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    block_e = max(16, triton.next_power_of_2(E))
    grouped = num_groups > 1
    _moe_route_kernel[(T,)](
        logits, bias if bias is not None else logits, weights, ids,
        E, top_k, E // num_groups, num_groups, topk_groups, float(scaling_factor), logits.stride(0),
        SCORING=int(scoring), RENORM=bool(renormalize), HAS_BIAS=bias is not None,
        GROUPED=grouped, GROUP_MAX=int(group_score) == 1,
        BLOCK_E=block_e, BLOCK_G=max(16, triton.next_power_of_2(num_groups)) if grouped else 16,
        num_warps=4 if block_e >= 512 else (2 if block_e >= 128 else 1),
    )
    return weights, ids
