"""``anyres_encode(..., fused=True)``: uint8 images -> tile patch embeddings in ONE kernel.

The op ``anyres_encode_fused`` takes the batch as three flat tables built here on the host:

- ``src``: every image's bytes in one flat uint8 tensor (on the images' device). 3-channel images
  that are contiguous HWC or CHW and grayscale planes with unit pixel stride are used as they are
  (one image: no copy at all; several: one ``torch.cat``). Anything else (RGBA, strided crops,
  other strides) is first converted to a contiguous copy as HF converts it (RGBA composited onto
  white, python_ref's rule, bit-identical to the tilers').
- ``desc``: CPU int64 ``[num_tiles, NDESC]``, one row per output tile (global view first, then
  row-major grid tiles, as ``anyres_tile``): where its image starts in ``src``, its strides, the
  resize it samples, where the tile sits in the resized image (padding), and its tap tables.
- ``taps``: CPU int32 rows ``{xmin, w_0 .. w_(k-1)}`` per output pixel of each resize axis, from
  the C++ helper ``anyres_taps_cpu`` (the tilers' own arithmetic, common/anyres_resample.h),
  cached per ``(in, out)`` and shared by every image of the batch with that axis.

The backends upload the two small tables and compute each tile pixel from the source on the fly
(see vlmkernels/triton/anyres_encode.py). Backends: ``triton`` (one launch for the whole batch;
CUDA, or CPU under ``TRITON_INTERPRET=1``) and ``reference`` (materializes the uint8 tiles from
the same tables in PyTorch, then the reference uint8 embedding). Autograd: gradients reach
weight, bias, class token, positions and the LayerNorm affine (images are uint8: none); the
backward recomputes the uint8 tiles from the tables and reuses patch_embed_uint8's formulas.
"""

from __future__ import annotations

import functools

import torch

from python_ref.ops.anyres import image_to_rgb_chw, pil_bicubic_coefficients, vertical_first

from .. import _ext, library, registry
from ..triton.anyres_encode import NDESC, PRECISION_BITS
from ..triton.anyres_encode import (D_IN_A, D_IN_B, D_K_A, D_K_B, D_OUT_H, D_OUT_W, D_RX0, D_RY0, D_SRC,
                                    D_STRIDE_A, D_STRIDE_B, D_STRIDE_C, D_TAPS_A, D_TAPS_B, D_VFIRST)
from .embed import _check_params, _grads, _lut, _lut_pixels
from .plan import plan_rows, tile_pinpoints
from .tile import image_views

__all__: list[str] = []  # served by vlmkernels.ops.anyres_encode(fused=True)

OP = "anyres_encode_fused"
OP_TILES = "anyres_encode_fused_tiles"


# ---- host-side tables -----------------------------------------------------------------------------

def axis_taps_cpu(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's taps of one axis, ``(xmin int32 [out], weights int32 [out, ksize])``: the C++ helper
    when the extension is built, else python_ref's (tests check both are equal)."""
    if _ext.C is not None and hasattr(_ext.C, "anyres_taps_cpu"):
        return _ext.C.anyres_taps_cpu(int(in_size), int(out_size))
    xmin, _, weights = pil_bicubic_coefficients(int(in_size), int(out_size))
    return xmin.to(torch.int32), weights


@functools.lru_cache(maxsize=4096)
def axis_rows(in_size: int, out_size: int) -> torch.Tensor:
    """int32 ``[out, 1 + k]`` rows ``{xmin, w_0 .. w_(k-1)}`` (cached; never written).

    An unchanged axis gets one identity tap (weight ``1 << 22``): Pillow skips that pass, and the
    identity reproduces it exactly at 1 gather per pixel instead of Pillow's 5 (0, 1, 0, 0, 0) taps.
    """
    if in_size == out_size:
        idx = torch.arange(out_size, dtype=torch.int32)
        return torch.stack([idx, torch.full_like(idx, 1 << PRECISION_BITS)], dim=1)
    xmin, weights = axis_taps_cpu(in_size, out_size)
    return torch.cat([xmin[:, None], weights], dim=1).contiguous()


def _source(view: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One ``[H, W, C]`` view -> (its bytes as a flat tensor, (stride_h, stride_w, stride_c))."""
    h, w, c = view.shape
    if c == 3 and view.is_contiguous():  # interleaved RGB
        return view.reshape(-1), view.stride()
    if c == 3 and view.permute(2, 0, 1).is_contiguous():  # planar CHW
        return view.permute(2, 0, 1).reshape(-1), view.stride()
    if c == 1:  # grayscale: one plane read for every channel
        plane = view[:, :, 0].contiguous()
        return plane.reshape(-1), (w, 1, 0)
    # RGBA (composited onto white, as HF does) and odd strides: one contiguous CHW RGB copy
    rgb = image_to_rgb_chw(view.permute(2, 0, 1)).contiguous()
    return rgb.reshape(-1), (w, 1, h * w)


class _Taps:
    """Accumulates axis tables into one flat int32 table; equal axes share one copy."""

    def __init__(self):
        self.parts, self.offsets, self.size = [], {}, 0

    def add(self, in_size: int, out_size: int) -> tuple[int, int]:
        key = (in_size, out_size)
        if key not in self.offsets:
            rows = axis_rows(in_size, out_size)
            self.offsets[key] = (self.size, rows.shape[1] - 1)
            self.parts.append(rows.reshape(-1))
            self.size += rows.numel()
        return self.offsets[key]

    def table(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(1, dtype=torch.int32)


def _resize_cols(taps: _Taps, h: int, w: int, sh: int, sw: int, oh: int, ow: int) -> dict[int, int]:
    """Descriptor columns of one resize ``(h, w) -> (oh, ow)``."""
    off_h, k_h = taps.add(w, ow)  # horizontal pass: along x
    off_v, k_v = taps.add(h, oh)
    # with one axis unchanged its pass is an identity and the order does not matter
    vf = w != ow and h != oh and vertical_first(h, w, oh, ow)
    if vf:  # first pass vertical (a = y), second horizontal (b = x)
        a, b = (off_v, k_v, sh, h), (off_h, k_h, sw, w)
    else:
        a, b = (off_h, k_h, sw, w), (off_v, k_v, sh, h)
    return {D_TAPS_A: a[0], D_K_A: a[1], D_STRIDE_A: a[2], D_IN_A: a[3],
            D_TAPS_B: b[0], D_K_B: b[1], D_STRIDE_B: b[2], D_IN_B: b[3],
            D_OUT_H: oh, D_OUT_W: ow, D_VFIRST: int(vf)}


def build_tables(views, grid_pinpoints, tile: int, global_view: bool, device=None):
    """``[H, W, C]`` views -> (src, desc, taps, tiles_per_image); see the module docstring."""
    tile_pinpoints(grid_pinpoints, tile)
    plans = plan_rows([tuple(v.shape[:2]) for v in views], grid_pinpoints, tile)
    taps, rows, parts, counts, base = _Taps(), [], [], [], 0
    for v, p in zip(views, plans):
        flat, (sh, sw, sc) = _source(v)
        h, w = int(v.shape[0]), int(v.shape[1])
        rh, rw, pad_l, pad_t, grid_r, grid_c = p[2], p[3], p[4], p[5], p[8], p[9]
        common = {D_SRC: base, D_STRIDE_C: sc}
        if global_view:
            rows.append({**common, **_resize_cols(taps, h, w, sh, sw, tile, tile), D_RY0: 0, D_RX0: 0})
        grid = _resize_cols(taps, h, w, sh, sw, rh, rw)
        for r in range(grid_r):
            for c in range(grid_c):
                rows.append({**common, **grid, D_RY0: r * tile - pad_t, D_RX0: c * tile - pad_l})
        counts.append(grid_r * grid_c + int(global_view))
        parts.append(flat)
        base += flat.numel()
    desc = torch.tensor([[row[i] for i in range(NDESC)] for row in rows], dtype=torch.int64).reshape(-1, NDESC)
    device = views[0].device if views else torch.device(device or "cpu")
    src = parts[0] if len(parts) == 1 else (torch.cat(parts) if parts else torch.zeros(1, dtype=torch.uint8,
                                                                                        device=device))
    return src, desc, taps.table(), counts


# ---- op checks and backends -----------------------------------------------------------------------

def _check_tables(src, desc, taps, lut, tile, weight):
    """The op may be called directly: reject tables that would read outside src/taps."""
    if src.dtype != torch.uint8 or src.dim() != 1 or not src.is_contiguous():
        raise TypeError(f"src must be a contiguous 1-D uint8 tensor, got {src.dtype} {tuple(src.shape)}")
    if desc.dtype != torch.int64 or desc.dim() != 2 or desc.shape[1] != NDESC or desc.device.type != "cpu":
        raise ValueError(f"desc must be a CPU int64 [num_tiles, {NDESC}] table, got {desc.dtype} "
                         f"{tuple(desc.shape)} on {desc.device}")
    if taps.dtype != torch.int32 or taps.dim() != 1 or taps.device.type != "cpu":
        raise ValueError(f"taps must be a CPU 1-D int32 table, got {taps.dtype} {tuple(taps.shape)} on {taps.device}")
    if weight is not None:  # the embedding op (the tiles op has no lut/weight)
        if lut.shape != (3, 256) or not lut.is_floating_point() or lut.device != weight.device:
            raise ValueError(f"lut must be a float [3, 256] table on {weight.device}, got {lut.dtype} "
                             f"{tuple(lut.shape)} on {lut.device}")
        if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"weight must be [D, 3, p, p], got {tuple(weight.shape)}")
        if not 0 < weight.shape[2] <= tile:
            raise ValueError(f"tile_size={tile} is smaller than one {weight.shape[2]}x{weight.shape[2]} patch")
        if src.device != weight.device:
            raise ValueError(f"src is on {src.device} but weight is on {weight.device}")
    if desc.shape[0] == 0:
        return
    d = desc.contiguous()
    col = lambda i: d[:, i]  # noqa: E731
    if bool((d[:, [D_SRC, D_STRIDE_C, D_STRIDE_A, D_STRIDE_B, D_TAPS_A, D_TAPS_B]] < 0).any()):
        raise ValueError("desc: negative source offset, stride or taps offset")
    if bool((d[:, [D_IN_A, D_IN_B, D_OUT_H, D_OUT_W, D_K_A, D_K_B]] < 1).any()):
        raise ValueError("desc: sizes and taps per pixel must be positive")
    vf = col(D_VFIRST) != 0
    if bool(((col(D_VFIRST) != 0) & (col(D_VFIRST) != 1)).any()):
        raise ValueError("desc: the vertical-first flag must be 0 or 1")
    last = (col(D_SRC) + 2 * col(D_STRIDE_C) + (col(D_IN_A) - 1) * col(D_STRIDE_A)
            + (col(D_IN_B) - 1) * col(D_STRIDE_B))
    if bool((last >= src.numel()).any()):
        raise ValueError(f"desc: a tile reads past the end of src ({src.numel()} bytes)")
    out_a = torch.where(vf, col(D_OUT_H), col(D_OUT_W))
    out_b = torch.where(vf, col(D_OUT_W), col(D_OUT_H))
    for off, k, out in ((D_TAPS_A, D_K_A, out_a), (D_TAPS_B, D_K_B, out_b)):
        if bool((col(off) + out * (col(k) + 1) > taps.numel()).any()):
            raise ValueError(f"desc: a tap table runs past the end of taps ({taps.numel()} entries)")
        for o, kk, n in {(int(a), int(b), int(c)) for a, b, c in zip(col(off), col(k), out)}:
            if bool((taps[o:o + n * (kk + 1):kk + 1] < 0).any()):
                raise ValueError("taps: a first source index (xmin) is negative")


def _materialize(src, desc, taps, tile):
    """uint8 tiles ``[T, 3, S, S]`` from the tables: the kernel's arithmetic in PyTorch (int64 is
    exact here: Pillow's int32 accumulators never overflow for uint8 inputs)."""
    dev = src.device
    out = torch.zeros(desc.shape[0], 3, tile, tile, dtype=torch.uint8, device=dev)
    src64 = src.to(torch.int64)
    taps_d = taps.to(dev, torch.int64)
    ar = torch.arange(tile, device=dev)
    chan = torch.arange(3, device=dev).view(3, 1, 1, 1)
    bias = 1 << (PRECISION_BITS - 1)
    clip8 = lambda acc: torch.clamp(acc >> PRECISION_BITS, 0, 255)  # noqa: E731
    for i, r in enumerate(desc.tolist()):
        ry = (r[D_RY0] + ar)[:, None].expand(tile, tile)
        rx = (r[D_RX0] + ar)[None, :].expand(tile, tile)
        inside = (ry >= 0) & (ry < r[D_OUT_H]) & (rx >= 0) & (rx < r[D_OUT_W])
        ra, rb = (ry, rx) if r[D_VFIRST] else (rx, ry)
        ra, rb = torch.where(inside, ra, 0), torch.where(inside, rb, 0)  # padding reads row 0, then is masked
        ka, kb = r[D_K_A], r[D_K_B]
        row_a = r[D_TAPS_A] + ra * (ka + 1)
        row_b = r[D_TAPS_B] + rb * (kb + 1)
        ja = taps_d[row_a][..., None] + torch.arange(ka, device=dev)   # [S, S, ka]
        wa = taps_d[row_a[..., None] + 1 + torch.arange(ka, device=dev)]
        ok_a = ja < r[D_IN_A]
        acc_b = torch.full((3, tile, tile), bias, dtype=torch.int64, device=dev)
        for t in range(kb):
            jb = taps_d[row_b] + t
            wb = taps_d[row_b + 1 + t]
            idx = r[D_SRC] + chan * r[D_STRIDE_C] + (jb * r[D_STRIDE_B])[..., None] + ja * r[D_STRIDE_A]
            ok = ok_a & (jb < r[D_IN_B])[..., None]
            px = torch.where(ok, src64[torch.where(ok, idx, 0)], 0)
            acc_a = bias + (px * torch.where(ok_a, wa, 0)).sum(-1)
            acc_b += clip8(acc_a) * torch.where(jb < r[D_IN_B], wb, 0)
        out[i] = torch.where(inside, clip8(acc_b), 0).to(torch.uint8)
    return out


def _tiles_reference(src, desc, taps, tile):
    if tile <= 0:
        raise ValueError(f"tile_size must be positive, got {tile}")
    _check_tables(src, desc, taps, None, tile, None)
    return _materialize(src, desc, taps, tile)


registry.register(OP_TILES, "reference", _tiles_reference, devices=("cpu", "cuda"))


@library.register_fake(OP_TILES)
def _tiles_fake(src, desc, taps, tile, backend="auto"):
    return src.new_empty(desc.shape[0], 3, tile, tile)


def _reference(src, desc, taps, lut, tile, weight, bias, cls, pos, ln_w, ln_b, ln_eps):
    _check_tables(src, desc, taps, lut, tile, weight)
    from .embed import _reference as embed_reference

    pixels = _lut_pixels(_materialize(src, desc, taps, tile), lut.to(torch.float32))
    return embed_reference(pixels, weight, bias, cls, pos, ln_w, ln_b, ln_eps)


def _triton(src, desc, taps, lut, tile, weight, bias, cls, pos, ln_w, ln_b, ln_eps):
    _check_tables(src, desc, taps, lut, tile, weight)
    if weight.dtype == torch.float64:
        raise TypeError("anyres_encode_fused: the triton backend takes float32/float16/bfloat16 weights, not float64")
    from ..triton.anyres_encode import anyres_encode as kernel

    dev = weight.device
    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    # the two host tables go up in two small copies (non_blocking only helps from pinned memory)
    return kernel(src, desc.to(dev, non_blocking=True), taps.to(dev, non_blocking=True),
                  lut.to(torch.float32).contiguous(), tile, weight.contiguous(), cont(bias), cont(cls), cont(pos),
                  cont(ln_w), cont(ln_b), ln_eps)


registry.register(OP, "reference", _reference, devices=("cpu", "cuda"))
registry.register(OP, "triton", _triton, devices=("cpu", "cuda"))


@library.register_fake(OP)
def _fake(src, desc, taps, lut, tile, weight, bias=None, cls=None, pos=None, ln_w=None, ln_b=None, ln_eps=None,
          backend="auto"):
    p = weight.shape[-1]
    rows = (tile // p) ** 2 + (1 if cls is not None else 0)
    return weight.new_empty(desc.shape[0], rows, weight.shape[0])


def _setup_context(ctx, inputs, output):
    src, desc, taps, lut, tile, weight, bias, cls, pos, ln_w, ln_b, ln_eps, _ = inputs
    ctx.save_for_backward(src, desc, taps, lut, weight, bias, cls, pos, ln_w, ln_b)
    ctx.tile, ctx.ln_eps = tile, ln_eps


def _backward(ctx, grad):
    src, desc, taps, lut, *params = ctx.saved_tensors
    # recompute the uint8 tiles (uint8 images get no gradient); then patch_embed_uint8's formulas
    # (through an op: the host loop over the descriptors cannot be traced by AOT autograd)
    with torch.no_grad():
        tiles = library.op(OP_TILES)(src, desc, taps, ctx.tile, "reference")
        pixels = _lut_pixels(tiles, lut.to(torch.float32))
    need = (False,) + tuple(ctx.needs_input_grad[5:11])
    grads = _grads(grad, need, pixels, *params, ctx.ln_eps)
    return (None, None, None, None, None, *grads[1:], None, None)


library.register_autograd(OP, _backward, _setup_context)


# ---- functional (called by anyres_encode(..., fused=True)) ----------------------------------------

def anyres_encode_fused(images, grid_pinpoints, tile_size, mean, std, weight, bias=None, *, class_embedding=None,
                        position_embedding=None, pre_layernorm=None, global_view=True, backend="auto"):
    """See :func:`vlmkernels.anyres.encode.anyres_encode`; ``backend``: auto, triton or reference."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"fused=True: backend must be 'auto', 'triton' or 'reference' (the one-kernel path has "
                         f"no {backend!r} implementation), got {backend!r}")
    if not torch.is_tensor(weight):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    tile = int(tile_size)
    if tile <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    views = image_views(images)
    for i, v in enumerate(views):
        if v.device != weight.device:
            raise ValueError(f"images[{i}] is on {v.device} but weight is on {weight.device}")
    if weight.dim() == 4 and weight.shape[1] != 3:
        raise ValueError(f"weight must take 3 (RGB) channels, got shape {tuple(weight.shape)}")
    probe = torch.empty(0, 3, tile, tile, dtype=torch.uint8, device=weight.device)  # shape checks only
    params = _check_params(probe, weight, bias, class_embedding, position_embedding, pre_layernorm)
    lut = _lut(mean, std, 3, weight.device)
    src, desc, taps, counts = build_tables(views, grid_pinpoints, tile, global_view, weight.device)
    out = library.op(OP)(src, desc, taps, lut, tile, weight, *params, backend)
    return out, counts
