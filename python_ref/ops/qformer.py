"""Reference Q-Former cross-attention and hoisted cross K/V projection (explicit math, float64-capable).

Attention (HF ``Blip2QFormerMultiHeadAttention`` after the projections, heads as ``[B, L, H, d]``)::

    S[b,h,i,j] = scale * q[b,i,h] . k[b,j,h]          (scale defaults to d**-0.5)
    keep[b,i,j] = key_padding_mask[b,j] & attn_mask[b,i,j]    (True = attend; None = all True)
    P = softmax_j(S where keep else -inf)             (a row without a kept key: P = 0)
    out[b,i,h] = sum_j P[b,h,i,j] * D[b,h,i,j] * v[b,j,h]
    D = dropout_mask / (1 - dropout_p)                (None: D = 1)
    lse[b,h,i] = log sum_{kept j} exp S[b,h,i,j]      (+inf for a row without a kept key)

Packed keys (``cu_seqlens_k``, int32 ``[B+1]`` prefix sums): ``k``/``v`` are ``[total_k, H, d]`` and
batch ``b`` owns keys ``cu[b]:cu[b+1]``; every key axis is then the packed one and the batch axis
goes: ``key_padding_mask [total_k]``, ``attn_mask [Lq, total_k]``, ``dropout_mask [H, Lq, total_k]``.

Softmax and products run in float32 (float64 for float64 inputs); the output is rounded once.
No SDPA: masks, empty rows and dropout are exactly the semantics above. Plain torch ops, so autograd
works through :func:`attention`; :func:`attention_backward` is the same vjp written out (recomputing
P from lse, as the kernels do).

Cross K/V: ``qformer_cross_kv(x [B,N,E], weight [R,E], bias [R]) = x @ weight.T + bias`` where the rows
``R = L*2*D`` stack every cross-attention layer's key then value projection (layer-major).
"""

from __future__ import annotations

import torch

__all__ = ["qformer_attention", "qformer_attention_backward", "qformer_cross_kv"]


def default_scale(d: int) -> float:
    """``d**-0.5`` (1 for an empty head dim, whose output is empty anyway)."""
    return d ** -0.5 if d else 1.0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(q, k, v, key_padding_mask, attn_mask, dropout_mask, cu_seqlens_k):
    """Per batch element: (q, k, v, keep [Lq, Lk] or None, dropout [H, Lq, Lk] or None), all with a
    batch axis of 1 (packed keys are unpacked here; dense inputs give a single full-batch segment)."""
    if cu_seqlens_k is None:
        keep = None
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :].expand(q.shape[0], q.shape[1], k.shape[1])
        if attn_mask is not None:
            keep = attn_mask if keep is None else keep & attn_mask
        yield slice(None), q, k, v, keep, dropout_mask
        return
    bounds = cu_seqlens_k.tolist()
    for b in range(q.shape[0]):
        lo, hi = bounds[b], bounds[b + 1]
        keep = None
        if key_padding_mask is not None:
            keep = key_padding_mask[lo:hi][None, None, :].expand(1, q.shape[1], hi - lo)
        if attn_mask is not None:
            am = attn_mask[None, :, lo:hi]
            keep = am if keep is None else keep & am
        drop = None if dropout_mask is None else dropout_mask[None, :, :, lo:hi]
        yield slice(b, b + 1), q[b:b + 1], k[lo:hi][None], v[lo:hi][None], keep, drop


def _heads(t, acc):
    """``[B, L, H, d]`` -> ``[B, H, L, d]`` in the accumulation dtype, contiguous (one copy, then
    every product is a plain batched GEMM)."""
    return t.to(acc).transpose(1, 2).contiguous()


def _scores(qh, kh, keep, scale):
    """``S = scale * Q K^T`` ``[B, H, Lq, Lk]``, -inf where a key is dropped."""
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    return s if keep is None else s.masked_fill(~keep[:, None], float("-inf"))


def _probs(s):
    """(P, lse) of masked scores: lse = +inf and P = 0 on rows without a kept key."""
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], float("inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])  # masked entries: exp(-inf) = 0
    return p, torch.where(empty, float("inf"), lse)


def _dropped(p, dropout_mask, dropout_p):
    if dropout_mask is None:
        return p
    return p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)


def qformer_attention(q, k, v, *, key_padding_mask=None, attn_mask=None, cu_seqlens_k=None, scale=None,
                      dropout_mask=None, dropout_p=0.0):
    """``(out [B,Lq,H,d] in q's dtype, lse float32 [B,H,Lq])`` (lse float64 for float64 inputs)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    acc = _acc_dtype(q.dtype)
    B, Lq, H, d = q.shape
    outs, lses = [], []
    for _, qs, ks, vs, keep, drop in _segments(q, k, v, key_padding_mask, attn_mask, dropout_mask, cu_seqlens_k):
        p, lse = _probs(_scores(_heads(qs, acc), _heads(ks, acc), keep, scale))
        outs.append(torch.matmul(_dropped(p, drop, dropout_p), _heads(vs, acc)))
        lses.append(lse)
    out = _cat(outs, (0, H, Lq, d), q, acc).transpose(1, 2)
    lse = _cat(lses, (0, H, Lq), q, acc)
    return out.to(q.dtype), lse


def _cat(parts, empty_shape, like, dtype):
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else like.new_zeros(empty_shape, dtype=dtype)


def qformer_attention_backward(grad, q, k, v, out, lse, *, key_padding_mask=None, attn_mask=None,
                               cu_seqlens_k=None, scale=None, dropout_mask=None, dropout_p=0.0):
    """vjp of :func:`qformer_attention` from its saved ``(out, lse)``: ``(dq, dk, dv)``.

    ``delta = rowsum(dO * O)``; ``P = exp(S - lse)``; ``dV = (P*D)^T dO``; ``dP = (dO V^T) * D``;
    ``dS = P * (dP - delta)``; ``dQ = scale * dS K``; ``dK = scale * dS^T Q``.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    acc = _acc_dtype(q.dtype)
    B, Lq, H, d = q.shape
    delta = (grad.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Lq]
    dqs, dks, dvs = [], [], []
    for rows, qs, ks, vs, keep, drop in _segments(q, k, v, key_padding_mask, attn_mask, dropout_mask, cu_seqlens_k):
        qh, kh, vh, gh = _heads(qs, acc), _heads(ks, acc), _heads(vs, acc), _heads(grad[rows], acc)
        p = torch.exp(_scores(qh, kh, keep, scale) - lse[rows].to(acc)[..., None])  # lse = +inf: P = 0
        dvs.append(torch.matmul(_dropped(p, drop, dropout_p).transpose(-1, -2), gh))
        dp = _dropped(torch.matmul(gh, vh.transpose(-1, -2)), drop, dropout_p)
        ds = p * (dp - delta[rows][..., None]) * scale
        dqs.append(torch.matmul(ds, kh))
        dks.append(torch.matmul(ds.transpose(-1, -2), qh))
    dq = _cat(dqs, (0, H, Lq, d), q, acc).transpose(1, 2)
    if cu_seqlens_k is None:
        dk, dv = dks[0].transpose(1, 2), dvs[0].transpose(1, 2)
    else:  # [1, H, n, d] per image -> packed [total_k, H, d]
        dk = _cat([t[0].transpose(0, 1) for t in dks], (0, H, d), k, acc)
        dv = _cat([t[0].transpose(0, 1) for t in dvs], (0, H, d), v, acc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def qformer_cross_kv(encoder_states, weight, bias=None):
    """``encoder_states @ weight.T + bias`` -> ``[B, N, R]`` as one ``addmm`` in the input dtype: torch's
    GEMMs (cuBLAS, oneDNN) accumulate 16-bit products in fp32 and round once, so no upcast copy of
    the (large) stacked weight is made; float64 runs in float64."""
    B, N, E = encoder_states.shape
    x = encoder_states.reshape(B * N, E)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    return y.view(B, N, weight.shape[0])
