"""``anyres_pack``: HF ``pack_image_features`` (LLaVA-NeXT / LLaVA-OneVision) as one fused gather.

The host turns ``image_sizes`` into an int64 plan table (:func:`pack_plan`; it needs the sizes as
Python ints, exactly as HF's own ``pack_image_features`` does), and the op
``torch.ops.vlmkernels.anyres_pack(features, plan, newline, total_rows)`` writes every packed row
of the batch in one launch: base tile, unpadded grid rows (``round(., 7)`` rule), one newline per
row, and OneVision's ``anyres_max_N`` bilinear downsample.

Backends: ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``) and ``reference`` (torch slicing +
``F.interpolate`` per image, bit-identical to HF). Autograd: ``anyres_pack_backward`` (reference only:
autograd through the torch version; the pack is linear, so this vjp is exact).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from python_ref.ops.anyres import select_best_resolution
from python_ref.ops.anyres_embed import unpad_hw

from .. import library, registry

__all__ = ["anyres_pack", "anyres_pack_backward", "pack_plan"]

OP = "anyres_pack"
BWD = "anyres_pack_backward"
PLAN_COLUMNS = (
    "feat_start", "n_tiles", "nph", "npw", "row0", "nrows", "col0", "ncols",
    "out_h", "out_w", "out_start", "n_rows",
)


def _sizes_list(image_sizes) -> list[tuple[int, int]]:
    if torch.is_tensor(image_sizes):
        if image_sizes.dim() != 2 or image_sizes.shape[-1] != 2:
            raise ValueError(f"image_sizes must be [num_images, 2] (H, W), got shape {tuple(image_sizes.shape)}")
        if image_sizes.is_floating_point() or image_sizes.is_complex():
            raise TypeError(f"image_sizes must hold integers, got {image_sizes.dtype}")
        image_sizes = image_sizes.tolist()
    sizes = []
    for s in image_sizes:
        s = tuple(s.tolist() if torch.is_tensor(s) else s)
        if len(s) != 2 or not all(isinstance(v, int) or (hasattr(v, "__index__")) for v in s):
            raise ValueError(f"each image size must be (H, W) integers, got {s!r}")
        h, w = int(s[0]), int(s[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"image sizes must be positive, got (H, W) = ({h}, {w})")
        sizes.append((h, w))
    return sizes


def pack_plan(
    image_sizes,
    grid_pinpoints,
    tile_size: int,
    side: int,
    *,
    max_area_tiles: int | None = None,
    tiles_per_image: Sequence[int] | None = None,
    newline: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """The int64 ``[num_images, 12]`` plan (columns :data:`PLAN_COLUMNS`) and each image's row count.

    ``side`` is the token grid side of one tile (P = side²); ``tiles_per_image`` defaults to
    grid + 1 (base tile) per image, like HF ``image_size_to_num_patches``.
    """
    if not isinstance(tile_size, int) or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    if max_area_tiles is not None and (not isinstance(max_area_tiles, int) or max_area_tiles <= 0):
        raise ValueError(f"max_area_tiles must be a positive int or None, got {max_area_tiles!r}")
    pins = [tuple(int(v) for v in p) for p in grid_pinpoints]
    if not pins or any(len(p) != 2 or p[0] < tile_size or p[1] < tile_size for p in pins):
        raise ValueError(f"grid_pinpoints must be (height, width) pairs of at least tile_size={tile_size}, got {grid_pinpoints!r}")
    sizes = _sizes_list(image_sizes)
    if tiles_per_image is not None and len(tiles_per_image) != len(sizes):
        raise ValueError(f"tiles_per_image has {len(tiles_per_image)} entries for {len(sizes)} images")
    P = side * side
    nl = 1 if newline else 0
    rows, lens = [], []
    feat_start = out_start = 0
    for i, hw in enumerate(sizes):
        bh, bw = select_best_resolution(hw, pins)
        nph, npw = bh // tile_size, bw // tile_size
        n_tiles = nph * npw + 1 if tiles_per_image is None else int(tiles_per_image[i])
        if n_tiles == 1:
            row = [feat_start, 1, 0, 0, 0, 0, 0, 0, 0, 0, out_start, P + nl]
        else:
            if n_tiles != nph * npw + 1:
                raise ValueError(
                    f"image {i} of size {hw} has a {nph}x{npw} grid (+1 base tile) but tiles_per_image says {n_tiles}"
                )
            r0, nr, c0, nc = unpad_hw(hw, (nph * side, npw * side))
            oh, ow = nr, nc
            if max_area_tiles is not None:
                ratio = math.sqrt(nr * nc / (max_area_tiles * side**2))
                if ratio > 1.1:
                    oh, ow = int(nr // ratio), int(nc // ratio)
            row = [feat_start, n_tiles, nph, npw, r0, nr, c0, nc, oh, ow, out_start, P + oh * (ow + nl)]
        rows.append(row)
        lens.append(row[-1])
        feat_start += n_tiles
        out_start += row[-1]
    plan = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(PLAN_COLUMNS))
    return plan, lens


# ---- implementations ----------------------------------------------------------------------------

def _pack_torch(features, plan, newline, total_rows):
    """Plan-driven torch implementation (HF's slicing and interpolate; differentiable)."""
    t, p, c = features.shape
    side = math.isqrt(p)
    pieces = []
    for (fs, nt, nph, npw, r0, nr, c0, nc, oh, ow, _, _) in plan.tolist():
        if nt == 1:
            pieces.append(features[fs])
            if newline is not None:
                pieces.append(newline[None])
            continue
        x = features[fs + 1 : fs + nt].reshape(nph, npw, side, side, c)
        x = x.permute(4, 0, 2, 1, 3).reshape(c, nph * side, npw * side)[:, r0 : r0 + nr, c0 : c0 + nc]
        if (oh, ow) != (nr, nc):
            x = F.interpolate(x[None], [oh, ow], mode="bilinear")[0]
        if newline is not None:
            x = torch.cat([x, newline[:, None, None].expand(c, oh, 1)], dim=-1)
        pieces += [features[fs], x.flatten(1, 2).t()]
    if not pieces:
        return features.new_empty(0, c)
    out = torch.cat(pieces, dim=0)
    assert out.shape[0] == total_rows, "plan row counts disagree with total_rows"
    return out


def _validate_plan(features, plan, newline, total_rows) -> torch.Tensor:
    """The plan on the CPU, checked so that no kernel reads or writes out of bounds with a
    hand-made table (the functional API builds valid ones)."""
    if plan.dtype != torch.int64 or plan.dim() != 2 or plan.shape[1] != len(PLAN_COLUMNS):
        raise ValueError(f"plan must be int64 [num_images, {len(PLAN_COLUMNS)}], got {plan.dtype} {tuple(plan.shape)}")
    if newline is not None and newline.shape != (features.shape[-1],):
        raise ValueError(f"newline must be [C={features.shape[-1]}], got {tuple(newline.shape)}")
    cpu = plan.cpu()
    t, p, _ = features.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"features.shape[1] = {p} is not a square number of tokens")
    fs, nt, nph, npw, r0, nr, c0, nc, oh, ow, start, rows = cpu.unbind(1)
    nl = 1 if newline is not None else 0
    grid = nt > 1
    ok = (fs >= 0) & (nt >= 1) & (fs + nt <= t)
    # an unpadded grid may be empty (HF keeps 0 columns for e.g. 300x20 in a 3x1 grid)
    ok &= ~grid | ((nph * npw + 1 == nt) & (r0 >= 0) & (nr >= 0) & (r0 + nr <= nph * side)
                   & (c0 >= 0) & (nc >= 0) & (c0 + nc <= npw * side) & (oh >= 0) & (ow >= 0)
                   & (oh <= nr) & (ow <= nc))
    ok &= rows == torch.where(grid, p + oh * (ow + nl), p + nl)
    ends = torch.cumsum(rows, 0)
    ok &= start == ends - rows
    if not bool(ok.all()) or (int(ends[-1]) if len(ends) else 0) != total_rows:
        bad = int((~ok).nonzero()[0]) if not bool(ok.all()) else -1
        raise ValueError(
            f"anyres_pack: invalid plan (first bad image {bad}) for features {tuple(features.shape)} and "
            f"total_rows={total_rows}; build it with vlmkernels.anyres.pack.pack_plan"
        )
    return cpu


def _pack_reference(features, plan, newline, total_rows):
    return _pack_torch(features, _validate_plan(features, plan, newline, total_rows), newline, total_rows).contiguous()


def _pack_triton(features, plan, newline, total_rows):
    from ..triton.anyres_pack import anyres_pack as kernel

    cpu = _validate_plan(features, plan, newline, total_rows)
    max_rows = int(cpu[:, -1].max()) if len(cpu) else 0
    return kernel(features.contiguous(), plan.to(features.device).contiguous(),
                  None if newline is None else newline.contiguous(), total_rows, max_rows)


registry.register(OP, "reference", _pack_reference, devices=("cpu", "cuda"))
registry.register(OP, "triton", _pack_triton, devices=("cpu", "cuda"))
# no C++ kernel: on CPU tensors the torch reference is the fast path, on CUDA the Triton gather
registry.set_preference(OP, "cuda", ("triton", "reference"))


@library.register_fake(OP)
def _fake(features, plan, newline, total_rows, backend="auto"):
    return features.new_empty(total_rows, features.shape[-1])


def _pack_vjp(grad, features, plan, newline):
    # the pack is linear in (features, newline): its vjp is autograd through the torch version
    f = features.detach().requires_grad_(True)
    nl = None if newline is None else newline.detach().requires_grad_(True)
    with torch.enable_grad():
        out = _pack_torch(f, _validate_plan(features, plan, newline, grad.shape[0]), nl, grad.shape[0])
        wrt = [f] + ([nl] if nl is not None else [])
        grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    g_f = grads[0] if grads[0] is not None else torch.zeros_like(features)
    g_nl = grads[1] if nl is not None and grads[1] is not None else features.new_zeros(features.shape[-1])
    return g_f, g_nl


registry.register(BWD, "reference", _pack_vjp, devices=("cpu", "cuda"))


@library.register_fake(BWD)
def _fake_bwd(grad, features, plan, newline, backend="auto"):
    return torch.empty_like(features), features.new_empty(features.shape[-1])


def _setup_context(ctx, inputs, output):
    features, plan, newline, _total_rows, _backend = inputs
    ctx.save_for_backward(features, plan, newline)


def _backward(ctx, grad):
    features, plan, newline = ctx.saved_tensors
    g_f, g_nl = library.op(BWD)(grad.contiguous(), features, plan, newline, "auto")
    return g_f, None, (g_nl if newline is not None else None), None, None


library.register_autograd(OP, _backward, _setup_context)


# ---- functional ---------------------------------------------------------------------------------

def _check_inputs(features, newline):
    if not torch.is_tensor(features):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must be [sum_tiles, P, C], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    side = math.isqrt(features.shape[1])
    if features.shape[1] == 0 or side * side != features.shape[1]:
        raise ValueError(
            f"features.shape[1] = {features.shape[1]} tokens per tile is not a square grid "
            "(drop the CLS token first, as vision_feature_select_strategy='default' does)"
        )
    if newline is not None:
        if not torch.is_tensor(newline) or newline.shape != (features.shape[-1],):
            raise ValueError(
                f"newline must be a [C={features.shape[-1]}] tensor, got "
                f"{tuple(newline.shape) if torch.is_tensor(newline) else type(newline).__name__}"
            )
        if newline.device != features.device:
            raise ValueError(f"newline is on {newline.device} but features are on {features.device}")
    return side


def pack_rows(features, image_sizes, grid_pinpoints, tile_size, newline, *, max_area_tiles=None,
              tiles_per_image=None, backend="auto") -> tuple[torch.Tensor, list[int]]:
    """Like :func:`anyres_pack` but returns the concatenated rows ``[sum n_i, C]`` and the ``n_i``."""
    side = _check_inputs(features, newline)
    plan, lens = pack_plan(image_sizes, grid_pinpoints, tile_size, side, max_area_tiles=max_area_tiles,
                           tiles_per_image=tiles_per_image, newline=newline is not None)
    need = int(plan[-1, 0] + plan[-1, 1]) if len(lens) else 0
    if need != features.shape[0]:
        raise ValueError(f"features has {features.shape[0]} tiles but image_sizes need {need}")
    if newline is not None:
        newline = newline.to(features.dtype)
    # the plan stays on the CPU: backends validate it there and copy it to the device themselves
    out = library.op(OP)(features, plan, newline, sum(lens), backend)
    return out, lens


def anyres_pack(features, image_sizes, grid_pinpoints, tile_size, newline, *, max_area_tiles=None,
                tiles_per_image=None, backend="auto") -> list[torch.Tensor]:
    """HF ``pack_image_features``: ``features [sum_tiles, P, C]`` -> one ``[n_i, C]`` per image.

    ``image_sizes``: original (H, W) per image (tensor ``[B, 2]`` or pairs). ``grid_pinpoints``:
    (height, width) candidates; ``tile_size``: the vision tower's image size. ``newline``: ``[C]``
    or None. ``max_area_tiles=N`` enables OneVision's ``anyres_max_N`` downsample.
    ``tiles_per_image`` overrides grid+1 (OneVision multi-image samples use 1 tile per image).
    """
    out, lens = pack_rows(features, image_sizes, grid_pinpoints, tile_size, newline,
                          max_area_tiles=max_area_tiles, tiles_per_image=tiles_per_image, backend=backend)
    return list(torch.split(out, lens, dim=0))


def anyres_pack_backward(grad, features, plan, newline=None, *, backend="auto"):
    """vjp of ``torch.ops.vlmkernels.anyres_pack``: ``(d features, d newline)`` for ``grad [rows, C]``
    (``d newline`` is zeros when ``newline`` is None). Autograd calls it; exposed for custom backwards."""
    if grad.dim() != 2 or grad.shape[-1] != features.shape[-1]:
        raise ValueError(f"grad must be [rows, C={features.shape[-1]}], got {tuple(grad.shape)}")
    return library.op(BWD)(grad.contiguous(), features, plan, newline, backend)
