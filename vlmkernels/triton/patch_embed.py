"""Triton patch embedding: the stride-p patch conv as an im2col-free GEMM with a fused epilogue.

Kernel 1 computes ``out[n, t, d] = sum_k A[n, m, k] W[d, k] + bias + pos`` where the A tile
(patch ``m`` of image ``n``, ``k = (c, ky, kx)``) is loaded straight from the strided pixels: no
unfold copy. The program holding the first patch block also writes the class-token row
(``cls + pos[0]``). With a pre-LayerNorm the epilogue writes fp32 rows and kernel 2 normalizes
each row over D (a row is too wide for one GEMM tile's registers), so the LN sees unrounded
values. ``patch_embed_uint8`` runs the same kernel on uint8 tiles, normalizing each loaded byte
through a [C, 256] table, so float tiles never exist in memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import launcher


@triton.jit
def _gemm_step(acc, a, w_ptr, d, k, K, kmask, dmask, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc += A[:, k] @ W[d, k]^T, with A cast to the weight dtype first (HF casts pixels before the conv)."""
    a = a.to(w_ptr.dtype.element_ty)
    wt = tl.load(w_ptr + d[None, :].to(tl.int64) * K + k[:, None], mask=kmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    elif IEEE:
        acc += tl.dot(a, wt, input_precision="ieee")
    else:
        acc += tl.dot(a, wt)
    return acc


@triton.jit
def _store_epilogue(acc, n, m, d, mmask, dmask, pid_m, b_ptr, cls_ptr, pos_ptr, out_ptr, D, ROWS,
                    HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr, HAS_POS: tl.constexpr):
    """Patches m of image n: + bias + positions, stored at rows m (+1 after the class token); the
    first M block also writes the class-token row (cls + pos[0])."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    t = m + (1 if HAS_CLS else 0)  # output row of each patch
    if HAS_POS:
        pos = tl.load(pos_ptr + t[:, None].to(tl.int64) * D + d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        acc += pos.to(tl.float32)
    out_rows = n.to(tl.int64) * ROWS + t
    tl.store(out_ptr + out_rows[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])
    if HAS_CLS:
        if pid_m == 0:
            v = tl.load(cls_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            if HAS_POS:
                v += tl.load(pos_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + n.to(tl.int64) * ROWS * D + d, v.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _patch_gemm_kernel(
    px_ptr, lut_ptr, w_ptr, b_ptr, cls_ptr, pos_ptr, out_ptr,
    P, GW, D, K,
    s_n, s_c, s_h, s_w,
    ROWS,  # output rows per image: P (+1 with a class token)
    PATCH: tl.constexpr, FROM_U8: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr, HAS_POS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_d = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mmask = m < P
    dmask = d < D
    gy = m // GW
    gx = m % GW
    # pixel offset of each patch's top-left corner
    row_base = n.to(tl.int64) * s_n + (gy * PATCH).to(tl.int64) * s_h + (gx * PATCH).to(tl.int64) * s_w
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        c = k // (PATCH * PATCH)
        ky = (k // PATCH) % PATCH
        kx = k % PATCH
        k_off = c.to(tl.int64) * s_c + ky.to(tl.int64) * s_h + kx.to(tl.int64) * s_w
        amask = mmask[:, None] & kmask[None, :]
        if FROM_U8:
            # uint8 tiles: normalize through the per-channel 256-entry table
            u = tl.load(px_ptr + row_base[:, None] + k_off[None, :], mask=amask, other=0).to(tl.int32)
            a = tl.load(lut_ptr + c[None, :] * 256 + u, mask=amask, other=0.0)
        else:
            a = tl.load(px_ptr + row_base[:, None] + k_off[None, :], mask=amask, other=0.0)
        acc = _gemm_step(acc, a, w_ptr, d, k, K, kmask, dmask, IEEE, UPCAST)
    _store_epilogue(acc, n, m, d, mmask, dmask, pid_m, b_ptr, cls_ptr, pos_ptr, out_ptr, D, ROWS,
                    HAS_BIAS, HAS_CLS, HAS_POS)


@triton.jit
def _row_layernorm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, D, eps,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    x = tl.load(x_ptr + row * D + d, mask=dmask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(dmask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    y = xc * (1.0 / tl.sqrt(var + eps))
    if HAS_W:
        y = y * tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + d, y.to(out_ptr.dtype.element_ty), mask=dmask)


@launcher
def patch_embed(pixels, weight, bias, class_embedding, position_embedding, ln_weight, ln_bias, ln_eps, lut=None):
    """Shapes validated by the caller; ``weight`` [D, 3, p, p] contiguous; pixels any strides.
    With ``lut`` (float32 [C, 256], contiguous) ``pixels`` are uint8 tiles normalized on load."""
    n, _, h, w = pixels.shape
    d, c, p, _ = weight.shape
    gh, gw = h // p, w // p
    P = gh * gw
    rows = P + (1 if class_embedding is not None else 0)
    K = c * p * p
    out = torch.empty(n, rows, d, dtype=weight.dtype, device=pixels.device)
    if out.numel() == 0:
        return out
    staged = out if ln_eps is None else torch.empty(n, rows, d, dtype=torch.float32, device=pixels.device)
    # untuned (no GPU was at hand): 64x128 tiles for CLIP/SigLIP-sized problems, smaller for tiny ones
    block_m, block_d = gemm_blocks(P, d)
    block_k = 32
    dummy = weight
    grid = (n, triton.cdiv(P, block_m), triton.cdiv(d, block_d))
    _patch_gemm_kernel[grid](
        pixels, lut if lut is not None else dummy, weight, bias if bias is not None else dummy,
        class_embedding if class_embedding is not None else dummy,
        position_embedding if position_embedding is not None else dummy, staged,
        P, gw, d, K, *pixels.stride(), rows,
        PATCH=p, FROM_U8=lut is not None, HAS_BIAS=bias is not None, HAS_CLS=class_embedding is not None,
        HAS_POS=position_embedding is not None, IEEE=weight.dtype in (torch.float32, torch.float64),
        # the interpreter's bf16 dot is unreliable (numpy has no bf16); bf16 products are exact in fp32
        UPCAST=weight.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k,
    )
    if ln_eps is not None:
        row_layernorm(staged, ln_weight, ln_bias, ln_eps, out)
    return out


def gemm_blocks(P: int, d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the patch GEMMs for P patches and width d (untuned: no GPU at hand)."""
    block_m = 64 if P >= 256 else (32 if P >= 32 else max(16, triton.next_power_of_2(P)))
    block_d = 128 if d >= 512 else (64 if d >= 64 else max(16, triton.next_power_of_2(d)))
    return block_m, block_d


@launcher
def row_layernorm(staged: torch.Tensor, ln_weight, ln_bias, ln_eps: float, out: torch.Tensor) -> None:
    """out[..., :] = LayerNorm over the last dim of the fp32 rows in ``staged`` (same shape)."""
    d = staged.shape[-1]
    dummy = staged
    _row_layernorm_kernel[(staged.numel() // d,)](
        staged, ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
        out, d, float(ln_eps), HAS_W=ln_weight is not None, HAS_B=ln_bias is not None,
        BLOCK_D=triton.next_power_of_2(d),
    )


def aot_compile(arch: int = 90, from_u8: bool = True, dtype: str = "bf16"):
    """The patch GEMM built for ``sm_<arch>`` without a GPU (see triton/aot.py)."""
    from .aot import aot_compile as compile_for

    types = {n: "*" + dtype for n in _patch_gemm_kernel.arg_names if n.endswith("_ptr")}
    types.update(px_ptr="*u8" if from_u8 else "*" + dtype, lut_ptr="*fp32", out_ptr="*fp32")
    types.update({n: "i64" for n in ("s_n", "s_c", "s_h", "s_w")})
    consts = dict(PATCH=14, FROM_U8=from_u8, HAS_BIAS=True, HAS_CLS=True, HAS_POS=True, IEEE=dtype == "fp32",
                  UPCAST=False, BLOCK_M=64, BLOCK_D=128, BLOCK_K=32)
    return compile_for(_patch_gemm_kernel, types, consts, arch=arch)
