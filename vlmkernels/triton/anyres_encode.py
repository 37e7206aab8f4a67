"""Triton one-kernel AnyRes tile-and-encode: uint8 source images -> tile patch embeddings.

The patch GEMM of ``_patch_gemm_kernel`` (patch_embed.py), except that its A operand is computed on
the fly from the *source* images: for tile pixel (y, x) of a tile, the kernel maps it into the
resized image (or the zero padding), evaluates Pillow's two separable bicubic passes in int32
exactly like ``csrc/common/anyres_resample.h`` (first pass rounded to uint8 for every tap of the
second pass, so the rounding between the passes is Pillow's), normalizes the byte through the
[3, 256] table and feeds it to ``tl.dot``. Neither float nor uint8 tiles are ever written.

Everything the kernel needs comes from three flat tensors built on the host
(vlmkernels/anyres/encode_fused.py): ``src`` (all images' bytes), ``desc`` (one int64 row per
output tile, columns below) and ``taps`` (int32 rows ``{xmin, w_0 .. w_(k-1)}`` per output pixel
of each resize axis), so the whole batch is one launch over (tiles, M blocks, D blocks).

Cost, honestly: each A element costs ``k_first * k_second`` byte gathers (plus as many table
loads), e.g. 25 when upscaling and ~81 for a 2x downscale, and the A tile is recomputed by every
D block (D / BLOCK_D times). The two-kernel path (tiler writing uint8 tiles, then the uint8 GEMM)
does that work once per pixel, so this kernel only wins where the saved uint8 round trip matters
more than the recomputation; it is not the default until a GPU has measured it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import launcher
from .patch_embed import _gemm_step, _store_epilogue, gemm_blocks, row_layernorm

# columns of the per-tile descriptor table (int64 [num_tiles, NDESC])
D_SRC = 0          # offset of the image's element [0, 0, channel 0] in src
D_STRIDE_C = 1     # source stride between channels (0: grayscale replicated)
D_STRIDE_B = 2     # source stride along the axis of the second (outer) pass
D_STRIDE_A = 3     # ... and along the axis of the first (inner) pass
D_IN_B = 4         # source size along the second pass's axis
D_IN_A = 5         # ... and along the first pass's axis
D_RY0 = 6          # resized-image row of the tile's pixel (0, 0) (negative: top padding)
D_RX0 = 7          # resized-image column of the tile's pixel (0, 0)
D_OUT_H = 8        # resized image size; tile pixels outside it are padding (byte 0)
D_OUT_W = 9
D_TAPS_B = 10      # offset in taps of the second pass's table, and its taps per output pixel
D_K_B = 11
D_TAPS_A = 12      # the first pass's table and taps per output pixel
D_K_A = 13
D_VFIRST = 14      # 1: vertical pass first (Pillow >= 13 rule), so the second pass is horizontal
NDESC = 15

PRECISION_BITS = 22  # Pillow's fixed point: the accumulators start at 2^21 and round with >> 22


@triton.jit
def _clip8(acc):
    return tl.minimum(tl.maximum(acc >> 22, 0), 255)


@triton.jit
def _anyres_encode_kernel(
    src_ptr, desc_ptr, taps_ptr, lut_ptr, w_ptr, b_ptr, cls_ptr, pos_ptr, out_ptr,
    P, GW, D, K,
    ROWS,  # output rows per tile: P (+1 with a class token)
    PATCH: tl.constexpr, NDESC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr,
    HAS_POS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_d = tl.program_id(2)
    drow = desc_ptr + n.to(tl.int64) * NDESC  # columns: the D_* constants above, in order
    src_base = tl.load(drow + 0)
    stride_c = tl.load(drow + 1)
    stride_b = tl.load(drow + 2)
    stride_a = tl.load(drow + 3)
    in_b = tl.load(drow + 4)
    in_a = tl.load(drow + 5)
    ry0 = tl.load(drow + 6)
    rx0 = tl.load(drow + 7)
    out_h = tl.load(drow + 8)
    out_w = tl.load(drow + 9)
    taps_b = tl.load(drow + 10)
    k_b = tl.load(drow + 11)
    taps_a = tl.load(drow + 12)
    k_a = tl.load(drow + 13)
    vfirst = tl.load(drow + 14)

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mmask = m < P
    dmask = d < D
    gy = m // GW
    gx = m % GW
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        c = k // (PATCH * PATCH)
        ky = (k // PATCH) % PATCH
        kx = k % PATCH
        amask = mmask[:, None] & kmask[None, :]
        # resized-image coordinates of every A element; outside the resized image: zero padding
        ry = ry0 + (gy * PATCH)[:, None] + ky[None, :]
        rx = rx0 + (gx * PATCH)[:, None] + kx[None, :]
        inside = amask & (ry >= 0) & (ry < out_h) & (rx >= 0) & (rx < out_w)
        # output index along the first (a) and second (b) pass's axis
        ra = tl.where(vfirst != 0, ry, rx)
        rb = tl.where(vfirst != 0, rx, ry)
        row_a = taps_ptr + taps_a + ra * (k_a + 1)
        row_b = taps_ptr + taps_b + rb * (k_b + 1)
        ja0 = tl.load(row_a, mask=inside, other=0)
        jb0 = tl.load(row_b, mask=inside, other=0)
        plane = src_base + c[None, :].to(tl.int64) * stride_c
        acc_b = tl.full((BLOCK_M, BLOCK_K), 1 << 21, tl.int32)
        for t in range(0, k_b):
            jb = jb0 + t
            line = plane + jb.to(tl.int64) * stride_b
            ok_b = inside & (jb < in_b)
            # first pass at source line jb, rounded to uint8 like Pillow's intermediate image
            acc_a = tl.full((BLOCK_M, BLOCK_K), 1 << 21, tl.int32)
            for s in range(0, k_a):
                ja = ja0 + s
                # taps past Pillow's count have weight 0 and may point past the image: masked
                px = tl.load(src_ptr + line + ja.to(tl.int64) * stride_a, mask=ok_b & (ja < in_a), other=0)
                wa = tl.load(row_a + 1 + s, mask=inside, other=0)
                acc_a += px.to(tl.int32) * wa
            wb = tl.load(row_b + 1 + t, mask=inside, other=0)
            acc_b += _clip8(acc_a) * wb
        byte = tl.where(inside, _clip8(acc_b), 0)
        a = tl.load(lut_ptr + c[None, :] * 256 + byte, mask=amask, other=0.0)
        acc = _gemm_step(acc, a, w_ptr, d, k, K, kmask, dmask, IEEE, UPCAST)
    _store_epilogue(acc, n, m, d, mmask, dmask, pid_m, b_ptr, cls_ptr, pos_ptr, out_ptr, D, ROWS,
                    HAS_BIAS, HAS_CLS, HAS_POS)


@launcher
def anyres_encode(src, desc, taps, lut, tile, weight, bias, class_embedding, position_embedding,
                  ln_weight, ln_bias, ln_eps):
    """Launch over all tiles. Validated by the caller: ``src`` uint8 flat, ``desc`` int64
    [T, NDESC] contiguous, ``taps`` int32 flat, ``lut`` float32 [3, 256], ``weight`` [D, 3, p, p]
    contiguous, epilogue tensors contiguous; all on one device. Returns [T, P(+1), D]."""
    num_tiles = desc.shape[0]
    d, c, p, _ = weight.shape
    gw = tile // p
    P = gw * gw
    rows = P + (1 if class_embedding is not None else 0)
    K = c * p * p
    out = torch.empty(num_tiles, rows, d, dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    staged = out if ln_eps is None else torch.empty(num_tiles, rows, d, dtype=torch.float32, device=weight.device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # untuned (no GPU was at hand); the same M/D tiles as patch_embed. Under the interpreter one wide
    # K block saves Python-level iterations of the tap loops (the numpy arrays stay tiny).
    block_m, block_d = gemm_blocks(P, d)
    block_k = min(256, max(16, triton.next_power_of_2(K))) if interpret else 32
    dummy = weight
    grid = (num_tiles, triton.cdiv(P, block_m), triton.cdiv(d, block_d))
    _anyres_encode_kernel[grid](
        src, desc, taps, lut, weight, bias if bias is not None else dummy,
        class_embedding if class_embedding is not None else dummy,
        position_embedding if position_embedding is not None else dummy, staged,
        P, gw, d, K, rows,
        PATCH=p, NDESC=NDESC, HAS_BIAS=bias is not None, HAS_CLS=class_embedding is not None,
        HAS_POS=position_embedding is not None, IEEE=weight.dtype in (torch.float32, torch.float64),
        # the interpreter's bf16 dot is unreliable (numpy has no bf16); bf16 products are exact in fp32
        UPCAST=weight.dtype == torch.bfloat16 and interpret,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k,
    )
    if ln_eps is not None:
        row_layernorm(staged, ln_weight, ln_bias, ln_eps, out)
    return out


def aot_compile(arch: int = 90, dtype: str = "bf16"):
    """The one-kernel tile-and-encode built for ``sm_<arch>`` without a GPU (see triton/aot.py)."""
    from .aot import aot_compile as compile_for

    types = {n: "*" + dtype for n in _anyres_encode_kernel.arg_names if n.endswith("_ptr")}
    types.update(src_ptr="*u8", desc_ptr="*i64", taps_ptr="*i32", lut_ptr="*fp32", out_ptr="*fp32")
    consts = dict(PATCH=14, NDESC=NDESC, HAS_BIAS=True, HAS_CLS=True, HAS_POS=True, IEEE=dtype == "fp32",
                  UPCAST=False, BLOCK_M=64, BLOCK_D=128, BLOCK_K=32)
    return compile_for(_anyres_encode_kernel, types, consts, arch=arch)
