"""Triton AnyRes pack: HF ``pack_image_features`` for a whole batch as one gather launch.

Each program owns a block of output rows of one image and a block of channels. The int64 plan
row of the image (see :func:`vlmkernels.anyres.pack.pack_plan`) tells where its tiles start, the
grid, the unpadded crop and the output size, so every output row is computed from indices alone:
base-tile rows, grid rows (tile-major features -> image-major rows), the newline column, and for
OneVision's ``anyres_max_N`` a 4-tap bilinear sample that follows torch's ``align_corners=False``
arithmetic (source index ``scale*(dst+0.5)-0.5`` clamped at 0, weights ``1-l``/``l``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher

# plan columns, read by offset below (vlmkernels.anyres.pack.PLAN_COLUMNS): 0 feat_start, 1 n_tiles,
# 2 nph, 3 npw, 4 row0, 5 nrows, 6 col0, 7 ncols, 8 out_h, 9 out_w, 10 out_start, 11 n_rows


@triton.jit
def _grid_src_row(gy, gx, row0, col0, npw, feat_start, SIDE: tl.constexpr):
    # (row, col) of the unpadded grid -> flat row of features [tiles*P, C]
    r = row0 + gy
    c = col0 + gx
    tile = (r // SIDE) * npw + (c // SIDE)
    return (feat_start + 1 + tile.to(tl.int64)) * (SIDE * SIDE) + (r % SIDE) * SIDE + (c % SIDE)


@triton.jit
def _anyres_pack_kernel(
    feat_ptr, plan_ptr, nl_ptr, out_ptr, C,
    SIDE: tl.constexpr, HAS_NL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    img = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    pl = plan_ptr + img * 12
    feat_start = tl.load(pl + 0)  # int64: feeds addresses
    out_start = tl.load(pl + 10)
    # grid geometry fits int32, which keeps the per-row divisions cheap
    n_tiles = tl.load(pl + 1).to(tl.int32)
    npw = tl.load(pl + 3).to(tl.int32)
    row0 = tl.load(pl + 4).to(tl.int32)
    nrows = tl.load(pl + 5).to(tl.int32)
    col0 = tl.load(pl + 6).to(tl.int32)
    ncols = tl.load(pl + 7).to(tl.int32)
    out_h = tl.load(pl + 8).to(tl.int32)
    out_w = tl.load(pl + 9).to(tl.int32)
    n_rows = tl.load(pl + 11).to(tl.int32)
    P: tl.constexpr = SIDE * SIDE

    rmask = rows < n_rows
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    is_base = rows < P
    # grid part: output row q -> (y, x) with one newline column per row when HAS_NL
    q = tl.maximum(rows - P, 0)
    row_w = out_w + (1 if HAS_NL else 0)
    row_w = tl.maximum(row_w, 1)
    y = q // row_w
    x = q % row_w
    is_nl = (~is_base) & (x >= out_w)
    if HAS_NL:
        # single-tile images: [tokens; newline]
        is_nl = is_nl | ((n_tiles == 1) & (rows == P))
    is_grid = (~is_base) & (~is_nl) & (n_tiles > 1)

    base_src = feat_start * P + rows
    down = (out_h != nrows) | (out_w != ncols)
    # torch upsample_bilinear2d (align_corners=False, no scale given): scale = in / out
    sh = nrows.to(tl.float32) / tl.maximum(out_h, 1).to(tl.float32)
    sw = ncols.to(tl.float32) / tl.maximum(out_w, 1).to(tl.float32)
    fy = tl.maximum(sh * (y.to(tl.float32) + 0.5) - 0.5, 0.0)
    fx = tl.maximum(sw * (x.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = fy.to(tl.int32)
    x0 = fx.to(tl.int32)
    y1 = y0 + (y0 < nrows - 1).to(tl.int32)
    x1 = x0 + (x0 < ncols - 1).to(tl.int32)
    ly1 = tl.minimum(tl.maximum(fy - y0.to(tl.float32), 0.0), 1.0)
    lx1 = tl.minimum(tl.maximum(fx - x0.to(tl.float32), 0.0), 1.0)
    ly0 = 1.0 - ly1
    lx0 = 1.0 - lx1
    # without the downsample the output grid is the unpadded grid itself
    y0 = tl.where(down, y0, y)
    x0 = tl.where(down, x0, x)

    src00 = tl.where(is_base, base_src, _grid_src_row(y0, x0, row0, col0, npw, feat_start, SIDE))
    m_main = m2 & (is_base | is_grid)[:, None]
    v = tl.load(feat_ptr + src00[:, None] * C + cols[None, :], mask=m_main, other=0.0).to(tl.float32)

    m_down = m2 & (is_grid & down)[:, None]
    if tl.max(m_down.to(tl.int32)) > 0:
        src01 = _grid_src_row(y0, x1, row0, col0, npw, feat_start, SIDE)
        src10 = _grid_src_row(y1, x0, row0, col0, npw, feat_start, SIDE)
        src11 = _grid_src_row(y1, x1, row0, col0, npw, feat_start, SIDE)
        v01 = tl.load(feat_ptr + src01[:, None] * C + cols[None, :], mask=m_down, other=0.0).to(tl.float32)
        v10 = tl.load(feat_ptr + src10[:, None] * C + cols[None, :], mask=m_down, other=0.0).to(tl.float32)
        v11 = tl.load(feat_ptr + src11[:, None] * C + cols[None, :], mask=m_down, other=0.0).to(tl.float32)
        # same association as torch's CPU kernel: rows of width taps, then height taps
        t0 = v * lx0[:, None] + v01 * lx1[:, None]
        t1 = v10 * lx0[:, None] + v11 * lx1[:, None]
        bil = t0 * ly0[:, None] + t1 * ly1[:, None]
        v = tl.where((is_grid & down)[:, None], bil, v)

    if HAS_NL:
        nl = tl.load(nl_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        v = tl.where(is_nl[:, None], nl[None, :], v)
    dst = out_ptr + (out_start + rows)[:, None] * C + cols[None, :]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=m2)


@launcher
def anyres_pack(features: torch.Tensor, plan: torch.Tensor, newline: torch.Tensor | None, total_rows: int,
                max_rows: int):
    """``features [T, P, C]`` contiguous, ``plan [B, 12]`` int64 on the same device (validated by the
    caller; ``max_rows`` = its largest per-image row count) -> ``[total_rows, C]``."""
    t, p, c = features.shape
    side = int(round(p**0.5))
    out = torch.empty(total_rows, c, dtype=features.dtype, device=features.device)
    b = plan.shape[0]
    if b == 0 or total_rows == 0 or c == 0:
        return out
    block_c = min(128, triton.next_power_of_2(c))
    block_r = 32
    grid = (b, triton.cdiv(max_rows, block_r), triton.cdiv(c, block_c))
    nl = newline if newline is not None else features  # dummy pointer, never read
    _anyres_pack_kernel[grid](
        features, plan, nl, out, c,
        SIDE=side, HAS_NL=newline is not None, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out
