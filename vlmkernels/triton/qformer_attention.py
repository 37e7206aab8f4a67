"""Triton Q-Former cross-attention: short queries (Lq ~ 32, up to ~160 with InstructBLIP's text) over
a few hundred keys per image, forward and backward.

Math and mask conventions are :mod:`python_ref.ops.qformer`'s. Every kernel reads its batch's keys
as the range ``[k_start, k_start + k_len)`` of a key axis: ``k_start = 0, k_len = Lk`` for dense
inputs, ``cu_seqlens_k[b], cu_seqlens_k[b+1] - k_start`` for packed ones (the batch strides of the
key-indexed tensors are then 0), so one code path serves both.

* Forward (:func:`attention_forward`): flash-style online softmax in base 2 (``qk_scale`` carries
  ``log2 e``), one program per (batch*head, query block, split). ``BLOCK_M`` is sized to the short
  query length; the head dim is padded to a power of two and masked (d = 88 -> 128). When
  ``B*H*m_blocks`` is below one wave of SMs the key range is split (:func:`num_splits`): each split
  writes a normalized partial output and its lse in fp32 and ``_combine_kernel`` merges them.
* Backward (:func:`attention_backward`): no atomics. ``_bwd_dkdv_kernel`` owns key blocks (strided
  over ``NUM_N_PROGRAMS`` programs per (b, h)) and loops over every query block, recomputing
  ``P = exp(S - lse)`` and ``delta = rowsum(dO * O)`` in-kernel; ``_bwd_dq_kernel`` owns query blocks
  and loops over keys. When the queries fit one block and one program walks all key blocks of a
  (b, h), the first kernel accumulates dQ as well (``FUSE_DQ``: one launch for the whole backward).

Masks (key padding, attn_mask) and the dropout keep-mask are read in-kernel as uint8 views of the
bool tensors. Softmax and accumulation are fp32; ``P`` and ``dS`` are rounded to the input dtype
for their tensor-core products (FlashAttention does the same). fp32 inputs use TF32 only where
torch allows it (:func:`vlmkernels.triton.fused_moe.dot_precision`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from python_ref.ops.qformer import default_scale

from .fused_moe import dot_precision
from .launch import launcher

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
MIN_BLOCKS_PER_SPLIT = 2


# ---- shared pieces --------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # interpreter only: its bf16 tl.dot is wrong (triton 3.8)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _key_range(cu_ptr, b, Lk, VARLEN: tl.constexpr):
    if VARLEN:
        k_start = tl.load(cu_ptr + b)
        k_len = tl.load(cu_ptr + b + 1) - k_start
    else:
        k_start = b * 0
        k_len = Lk + b * 0
    return k_start, k_len


@triton.jit
def _scores(q, k, offs_m, offs_n, m_ok, n_ok, b, k_start, qk_scale,
            kpm_ptr, s_kpb, s_kpn, am_ptr, s_amb, s_amm, s_amn,
            HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``q [BM, BD] @ k[BN, BD]^T * qk_scale`` (base-2 logits) with -inf where a key is dropped."""
    s = _mm(q, tl.trans(k), PREC, UPCAST) * qk_scale
    keep = n_ok[None, :] & (offs_m >= 0)[:, None]
    key_col = (k_start + offs_n).to(tl.int64)
    if HAS_KPM:
        kp = tl.load(kpm_ptr + b * s_kpb + key_col * s_kpn, mask=n_ok, other=0)
        keep = keep & (kp != 0)[None, :]
    if HAS_AM:
        am = tl.load(am_ptr + b * s_amb + offs_m[:, None].to(tl.int64) * s_amm + key_col[None, :] * s_amn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0)
        keep = keep & (am != 0)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _dropout_keep(drop_ptr, b, h, offs_m, offs_n, m_ok, n_ok, k_start, s_db, s_dh, s_dm, s_dn):
    key_col = (k_start + offs_n).to(tl.int64)
    keep = tl.load(drop_ptr + b * s_db + h * s_dh + offs_m[:, None].to(tl.int64) * s_dm + key_col[None, :] * s_dn,
                   mask=m_ok[:, None] & n_ok[None, :], other=0)
    return keep != 0


# ---- forward --------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, kpm_ptr, am_ptr, drop_ptr,
    Lq, Lk, H, D, num_splits, qk_scale, inv_keep,
    s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
    s_os, s_ob, s_om, s_oh, s_ls, s_lb, s_lh,
    s_kpb, s_kpn, s_amb, s_amm, s_amn, s_db, s_dh, s_dm, s_dn,
    VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, HAS_DROP: tl.constexpr,
    PARTIAL: tl.constexpr,  # split-KV: write the normalized partial output and lse in fp32
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)  # B*H on the grid axis without the 65535 limit
    pid_m = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_start, k_len = _key_range(cu_ptr, b, Lk, VARLEN)
    per_split = tl.cdiv(tl.cdiv(k_len, BLOCK_N), num_splits) * BLOCK_N
    n_lo = split * per_split
    n_hi = tl.minimum(k_len, n_lo + per_split)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * s_kb + h * s_kh + k_start.to(tl.int64) * s_kn
    v_base = v_ptr + b * s_vb + h * s_vh + k_start.to(tl.int64) * s_vn

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        kv_off = offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        s = _scores(q, k, offs_m, offs_n, m_ok, n_ok, b, k_start, qk_scale,
                    kpm_ptr, s_kpb, s_kpn, am_ptr, s_amb, s_amm, s_amn, HAS_KPM, HAS_AM, PREC, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no kept key so far
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROP:
            kept = _dropout_keep(drop_ptr, b, h, offs_m, offs_n, m_ok, n_ok, k_start, s_db, s_dh, s_dm, s_dn)
            p = tl.where(kept, p * inv_keep, 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453
    if PARTIAL:
        lse = tl.where(has_keys, lse, float("-inf"))  # an empty split weighs nothing in the combine
    else:
        lse = tl.where(has_keys, lse, float("inf"))  # the backward's P = exp(S - lse) is then 0
    o_ptrs = o_ptr + split * s_os + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + split * s_ls + b * s_lb + h * s_lh + offs_m, lse, mask=m_ok)


@triton.jit
def _combine_kernel(
    po_ptr, plse_ptr, o_ptr, lse_ptr, Lq, H, D, num_splits,
    s_pos, s_pob, s_pom, s_poh, s_pls, s_plb, s_plh, s_ob, s_om, s_oh, s_lb, s_lh,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``lse = logsumexp_s(lse_s)``, ``out = sum_s exp(lse_s - lse) * out_s``; no kept key -> 0, +inf."""
    bh = tl.program_id(0)  # B*H on the grid axis without the 65535 limit
    pid_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    lse_base = plse_ptr + b * s_plb + h * s_plh + offs_m
    po_base = po_ptr + b * s_pob + h * s_poh + offs_m[:, None].to(tl.int64) * s_pom + offs_d[None, :]
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(num_splits):
        top = tl.maximum(top, tl.load(lse_base + s * s_pls, mask=m_ok, other=float("-inf")))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for s in range(num_splits):
        w = tl.exp(tl.load(lse_base + s * s_pls, mask=m_ok, other=float("-inf")) - top_safe)
        total += w
        acc += w[:, None] * tl.load(po_base + s * s_pos, mask=mask, other=0.0)
    has_keys = total > 0.0
    out = acc / tl.where(has_keys, total, 1.0)[:, None]
    lse = tl.where(has_keys, top_safe + tl.log(tl.where(has_keys, total, 1.0)), float("inf"))
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + b * s_lb + h * s_lh + offs_m, lse, mask=m_ok)


# ---- backward -------------------------------------------------------------------------------------

@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, cu_ptr, kpm_ptr, am_ptr, drop_ptr,
    Lq, Lk, H, D, num_n_programs, qk_scale, sm_scale, inv_keep,
    s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_om, s_oh, s_dob, s_dom, s_doh,
    s_lb, s_lh, s_dqb, s_dqm, s_dqh, s_dkb, s_dkn, s_dkh, s_dvb, s_dvn, s_dvh,
    s_kpb, s_kpn, s_amb, s_amm, s_amn, s_db, s_dh, s_dm, s_dn,
    VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, HAS_DROP: tl.constexpr,
    FUSE_DQ: tl.constexpr,  # one query block and one program per (b, h): dQ here too
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_start, k_len = _key_range(cu_ptr, b, Lk, VARLEN)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = q_ptr + b * s_qb + h * s_qh
    o_base = o_ptr + b * s_ob + h * s_oh
    do_base = do_ptr + b * s_dob + h * s_doh
    lse_base = lse_ptr + b * s_lb + h * s_lh
    k_base = k_ptr + b * s_kb + h * s_kh + k_start.to(tl.int64) * s_kn
    v_base = v_ptr + b * s_vb + h * s_vh + k_start.to(tl.int64) * s_vn
    dk_base = dk_ptr + b * s_dkb + h * s_dkh + k_start.to(tl.int64) * s_dkn
    dv_base = dv_ptr + b * s_dvb + h * s_dvh + k_start.to(tl.int64) * s_dvn
    if FUSE_DQ:
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(pid_n * BLOCK_N, k_len, num_n_programs * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for m0 in range(0, Lq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            row_off = offs_m[:, None].to(tl.int64)
            qd_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + row_off * s_qm + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(do_base + row_off * s_dom + offs_d[None, :], mask=qd_mask, other=0.0)
            o = tl.load(o_base + row_off * s_om + offs_d[None, :], mask=qd_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
            s = _scores(q, k, offs_m, offs_n, m_ok, n_ok, b, k_start, qk_scale,
                        kpm_ptr, s_kpb, s_kpn, am_ptr, s_amb, s_amm, s_amn, HAS_KPM, HAS_AM, PREC, UPCAST)
            p = tl.exp2(s - lse2[:, None])
            dp = _mm(do, tl.trans(v), PREC, UPCAST)
            if HAS_DROP:
                kept = _dropout_keep(drop_ptr, b, h, offs_m, offs_n, m_ok, n_ok, k_start, s_db, s_dh, s_dm, s_dn)
                pd = tl.where(kept, p * inv_keep, 0.0)
                dp = tl.where(kept, dp * inv_keep, 0.0)
            else:
                pd = p
            dv += _mm(tl.trans(pd.to(do.dtype)), do, PREC, UPCAST)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk += _mm(tl.trans(ds), q, PREC, UPCAST)
            if FUSE_DQ:
                dq += _mm(ds, k, PREC, UPCAST)
        tl.store(dk_base + offs_n[:, None].to(tl.int64) * s_dkn + offs_d[None, :],
                 (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_base + offs_n[:, None].to(tl.int64) * s_dvn + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    if FUSE_DQ:
        offs_m = tl.arange(0, BLOCK_M)
        tl.store(dq_ptr + b * s_dqb + h * s_dqh + offs_m[:, None].to(tl.int64) * s_dqm + offs_d[None, :],
                 (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=(offs_m < Lq)[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, cu_ptr, kpm_ptr, am_ptr, drop_ptr,
    Lq, Lk, H, D, qk_scale, sm_scale, inv_keep,
    s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_om, s_oh, s_dob, s_dom, s_doh,
    s_lb, s_lh, s_dqb, s_dqm, s_dqh, s_kpb, s_kpn, s_amb, s_amm, s_amn, s_db, s_dh, s_dm, s_dn,
    VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, HAS_DROP: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block."""
    bh = tl.program_id(0)  # B*H on the grid axis without the 65535 limit
    pid_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_start, k_len = _key_range(cu_ptr, b, Lk, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    row_off = offs_m[:, None].to(tl.int64)
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + row_off * s_qm + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + b * s_dob + h * s_doh + row_off * s_dom + offs_d[None, :], mask=qd_mask, other=0.0)
    o = tl.load(o_ptr + b * s_ob + h * s_oh + row_off * s_om + offs_d[None, :], mask=qd_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse2 = tl.load(lse_ptr + b * s_lb + h * s_lh + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    k_base = k_ptr + b * s_kb + h * s_kh + k_start.to(tl.int64) * s_kn
    v_base = v_ptr + b * s_vb + h * s_vh + k_start.to(tl.int64) * s_vn
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, k_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k, offs_m, offs_n, m_ok, n_ok, b, k_start, qk_scale,
                    kpm_ptr, s_kpb, s_kpn, am_ptr, s_amb, s_amm, s_amn, HAS_KPM, HAS_AM, PREC, UPCAST)
        p = tl.exp2(s - lse2[:, None])
        dp = _mm(do, tl.trans(v), PREC, UPCAST)
        if HAS_DROP:
            kept = _dropout_keep(drop_ptr, b, h, offs_m, offs_n, m_ok, n_ok, k_start, s_db, s_dh, s_dm, s_dn)
            dp = tl.where(kept, dp * inv_keep, 0.0)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += _mm(ds, k, PREC, UPCAST)
    tl.store(dq_ptr + b * s_dqb + h * s_dqh + row_off * s_dqm + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


# ---- launchers ------------------------------------------------------------------------------------

def block_sizes(Lq: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): the query block covers the short query length (16..64), the head
    dim is padded to a power of two, key blocks shrink for wide heads (register pressure)."""
    block_d = max(16, triton.next_power_of_2(d))
    block_m = min(64, max(16, triton.next_power_of_2(Lq)))
    block_n = 64 if block_d <= 64 else 32
    return block_m, block_n, block_d


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count_of(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_splits(device: torch.device, programs: int, keys_per_batch: int, block_n: int) -> int:
    """Split-KV factor: 1 once ``programs`` (B*H*m_blocks) fill a wave of SMs; else enough splits to
    fill it, each keeping at least ``MIN_BLOCKS_PER_SPLIT`` key blocks (a split's fixed cost -- one
    more partial row and the combine -- must buy real work). CPU (interpreter): 1."""
    if device.type != "cuda" or programs == 0:
        return 1
    sms = _sm_count_of(device)
    if programs >= sms:
        return 1
    key_blocks = triton.cdiv(keys_per_batch, block_n)
    return max(1, min(triton.cdiv(sms, programs), key_blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _u8(mask):
    return None if mask is None else mask.view(torch.uint8)


def _key_strides(t, varlen: bool):
    """(batch, key, head) strides of k/v (batch stride 0 for packed keys)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _mask_args(q, key_padding_mask, attn_mask, dropout_mask, varlen: bool):
    """Pointers and strides of the masks in the kernels' (batch, ..., key) order, batch strides 0 for
    packed keys; absent masks point at q and are never read."""
    kpm, am, drop = _u8(key_padding_mask), _u8(attn_mask), _u8(dropout_mask)
    if kpm is None:
        kpm_s = (0, 0)
    else:
        kpm_s = (0, kpm.stride(0)) if varlen else (kpm.stride(0), kpm.stride(1))
    if am is None:
        am_s = (0, 0, 0)
    else:
        am_s = (0, am.stride(0), am.stride(1)) if varlen else (am.stride(0), am.stride(1), am.stride(2))
    if drop is None:
        drop_s = (0, 0, 0, 0)
    else:
        drop_s = (0, *drop.stride()) if varlen else drop.stride()
    ptrs = tuple(q if t is None else t for t in (kpm, am, drop))
    return ptrs, (*kpm_s, *am_s, *drop_s)


def _flags(q, key_padding_mask, attn_mask, dropout_mask, varlen):
    return dict(VARLEN=varlen, HAS_KPM=key_padding_mask is not None, HAS_AM=attn_mask is not None,
                HAS_DROP=dropout_mask is not None, PREC=dot_precision(q.dtype),
                UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16)


def _scale(q, scale):
    return default_scale(q.shape[-1]) if scale is None else float(scale)


@launcher
def attention_forward(q, k, v, key_padding_mask=None, attn_mask=None, cu_seqlens_k=None, scale=None,
                      dropout_mask=None, dropout_p=0.0, *, splits=None):
    """``(out [B,Lq,H,d] in q's dtype, lse float32 [B,H,Lq])``; inputs validated by
    :func:`vlmkernels.ops.attention`. ``splits`` forces the split-KV factor (default :func:`num_splits`)."""
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    B, Lq, H, d = q.shape
    varlen = cu_seqlens_k is not None
    Lk = 0 if varlen else k.shape[1]
    total_k = k.shape[0] if varlen else B * Lk
    out = q.new_empty((B, Lq, H, d))
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * Lq * H == 0 or total_k == 0:  # (d = 0 runs: every score is 0, lse = log(kept keys))
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    block_m, block_n, block_d = block_sizes(Lq, d)
    m_blocks = triton.cdiv(Lq, block_m)
    if splits is None:
        splits = num_splits(q.device, B * H * m_blocks, triton.cdiv(total_k, B), block_n)
    partial = splits > 1
    if partial:
        o_buf = torch.empty((splits, B, Lq, H, d), dtype=torch.float32, device=q.device)
        lse_buf = torch.empty((splits, B, H, Lq), dtype=torch.float32, device=q.device)
        o_strides = o_buf.stride()[:4]
        l_strides = lse_buf.stride()[:3]
    else:
        o_buf, lse_buf = out, lse
        o_strides = (0, *out.stride()[:3])
        l_strides = (0, *lse.stride()[:2])
    (kpm, am, drop), mask_strides = _mask_args(q, key_padding_mask, attn_mask, dropout_mask, varlen)
    sm_scale = _scale(q, scale)
    _fwd_kernel[(B * H, m_blocks, splits)](
        q, k, v, o_buf, lse_buf, cu_seqlens_k if varlen else lse, kpm, am, drop,
        Lq, Lk, H, d, splits, sm_scale * LOG2E, 1.0 / (1.0 - dropout_p),
        q.stride(0), q.stride(1), q.stride(2), *_key_strides(k, varlen), *_key_strides(v, varlen),
        *o_strides, *l_strides, *mask_strides,
        PARTIAL=partial, **_flags(q, key_padding_mask, attn_mask, dropout_mask, varlen),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2,
    )
    if partial:
        _combine_kernel[(B * H, m_blocks)](
            o_buf, lse_buf, out, lse, Lq, H, d, splits,
            *o_buf.stride()[:4], *lse_buf.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )
    return out, lse


@launcher
def attention_backward(grad, q, k, v, out, lse, key_padding_mask=None, attn_mask=None, cu_seqlens_k=None,
                       scale=None, dropout_mask=None, dropout_p=0.0, *, n_programs=None, fuse_dq=None):
    """``(dq, dk, dv)`` shaped like ``q, k, v``. ``n_programs`` (key-block programs per (b, h)) and
    ``fuse_dq`` force the launch shape (tests); by default every key block gets its own program
    unless B*H alone fills the SMs and the queries fit one block, which fuses dQ in (one launch)."""
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    grad, out, lse = _last_dim_unit(grad), _last_dim_unit(out), lse.contiguous()
    B, Lq, H, d = q.shape
    varlen = cu_seqlens_k is not None
    Lk = 0 if varlen else k.shape[1]
    total_k = k.shape[0] if varlen else B * Lk
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # packed keys: zero fill, so no unvalidated cu_seqlens_k can leave a row unwritten
    dk = (torch.zeros if varlen else torch.empty)(k.shape, dtype=k.dtype, device=k.device)
    dv = (torch.zeros if varlen else torch.empty)(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or total_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_m, block_n, block_d = block_sizes(Lq, d)
    m_blocks = triton.cdiv(Lq, block_m)
    key_blocks = triton.cdiv(triton.cdiv(total_k, B), block_n)
    if fuse_dq is None:
        fuse_dq = m_blocks == 1 and (q.device.type != "cuda" or B * H >= _sm_count_of(q.device))
    if n_programs is None:
        n_programs = 1 if fuse_dq else key_blocks
    if fuse_dq and (m_blocks != 1 or n_programs != 1):
        raise ValueError("attention_backward: fuse_dq needs Lq <= BLOCK_M and n_programs == 1")
    (kpm, am, drop), mask_strides = _mask_args(q, key_padding_mask, attn_mask, dropout_mask, varlen)
    sm_scale = _scale(q, scale)
    cu = cu_seqlens_k if varlen else lse
    flags = _flags(q, key_padding_mask, attn_mask, dropout_mask, varlen)
    qkvo_strides = (q.stride(0), q.stride(1), q.stride(2), *_key_strides(k, varlen), *_key_strides(v, varlen),
                    out.stride(0), out.stride(1), out.stride(2), grad.stride(0), grad.stride(1), grad.stride(2),
                    lse.stride(0), lse.stride(1))
    _bwd_dkdv_kernel[(B * H, n_programs)](
        q, k, v, out, grad, lse, dq, dk, dv, cu, kpm, am, drop,
        Lq, Lk, H, d, n_programs, sm_scale * LOG2E, sm_scale, 1.0 / (1.0 - dropout_p),
        *qkvo_strides, *dq.stride()[:3], *_key_strides(dk, varlen), *_key_strides(dv, varlen), *mask_strides,
        FUSE_DQ=fuse_dq, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=1,
    )
    if not fuse_dq:
        _bwd_dq_kernel[(B * H, m_blocks)](
            q, k, v, out, grad, lse, dq, cu, kpm, am, drop,
            Lq, Lk, H, d, sm_scale * LOG2E, sm_scale, 1.0 / (1.0 - dropout_p),
            *qkvo_strides, *dq.stride()[:3], *mask_strides,
            **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=1,
        )
    return dq, dk, dv


# ---- ahead-of-time compile check ------------------------------------------------------------------

def aot_compile(kernel: str = "fwd", dtype: str = "bf16", d: int = 64, Lq: int = 32, arch: int = 90,
                masks: bool = True, dropout: bool = True, varlen: bool = False, **constexprs):
    """Compile one kernel variant for ``sm_<arch>`` without a GPU (needs a process without
    ``TRITON_INTERPRET=1``)."""
    from .aot import aot_compile as compile_for

    fn = {"fwd": _fwd_kernel, "combine": _combine_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[kernel]
    block_m, block_n, block_d = block_sizes(Lq, d)
    types = {}
    for n in fn.arg_names:
        if n in ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"):
            types[n] = "*" + dtype
        elif n == "o_ptr":
            types[n] = "*" + ("fp32" if kernel == "fwd" and constexprs.get("PARTIAL") else dtype)
        elif n in ("lse_ptr", "po_ptr", "plse_ptr"):
            types[n] = "*fp32"
        elif n == "cu_ptr":
            types[n] = "*i32"
        elif n.endswith("_ptr"):
            types[n] = "*u8"
        elif n in ("qk_scale", "sm_scale", "inv_keep"):
            types[n] = "fp32"
    values = dict(BLOCK_M=block_m, BLOCK_D=block_d)
    if kernel != "combine":
        values.update(BLOCK_N=block_n, VARLEN=varlen, HAS_KPM=masks, HAS_AM=masks, HAS_DROP=dropout,
                      PREC="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
        if kernel == "fwd":
            values["PARTIAL"] = False
        if kernel == "dkdv":
            values["FUSE_DQ"] = False
    values.update(constexprs)
    return compile_for(fn, types, values, arch=arch, num_warps=4, num_stages=2)
