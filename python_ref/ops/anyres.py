"""Reference AnyRes planning and uint8 -> normalized tiles, in pure PyTorch.

Ground truth for the fused ``anyres_tile`` kernels and the parity oracle against HF's
``LlavaNextImageProcessorPil`` / ``LlavaOnevisionImageProcessorPil``.

Resampling replicates Pillow's ``Image.resize(..., BICUBIC)`` for 8-bit images (``Resample.c``):
separable (horizontal pass first, unless the height shrinks much more than the width: see
:func:`vertical_first`), cubic kernel with a = -0.5 and support 2 scaled by the downscale
factor (antialiasing), coefficients normalised to sum 1 and quantised to 22-bit fixed point, integer
accumulation with a rounding bias, and clipping to uint8 after *each* pass. The integer arithmetic
is carried out in float64 (exact: every partial sum is an integer below 2**53), so the result is
bit-identical to Pillow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "AnyResPlan",
    "anyres_encode",
    "anyres_plan",
    "anyres_tile",
    "image_to_rgb_chw",
    "pil_bicubic_coefficients",
    "normalize_u8",
    "resize_bicubic_u8",
    "tiles_from_plan",
    "vertical_first",
]

PRECISION_BITS = 22  # Pillow: 32 - 8 (uint8) - 2 (headroom)
CUBIC_A = -0.5
CUBIC_SUPPORT = 2.0


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnyResPlan:
    """Geometry of one image under an AnyRes strategy. All sizes are (height, width).

    ``strategy="llava"`` (LLaVA-NeXT / OneVision):
        best_hw     the chosen grid pinpoint (canvas size),
        resized_hw  the aspect-preserving resize that fits in the canvas (``get_patch_output_size``),
        padding     (left, top, right, bottom) zero padding placing the resized image in the canvas,
        grid        (rows, cols) = best_hw // tile_size,
        num_tiles   rows * cols + 1: the grid tiles plus the global (base) view, as HF's
                    ``image_size_to_num_patches`` counts them.
    ``strategy="internvl"`` (``dynamic_preprocess``):
        best_hw = resized_hw = (rows * tile, cols * tile) (a squash resize, no padding),
        padding = (0, 0, 0, 0), num_tiles = rows * cols, plus 1 thumbnail when ``use_thumbnail``
        and the grid has more than one tile (the thumbnail comes *last* in InternVL).
    ``strategy="qwen2vl"`` (``smart_resize`` with ``factor = tile_size``, 28 for Qwen2-VL):
        best_hw = resized_hw = the smart-resized size (multiples of ``tile_size``), no padding,
        grid = resized_hw // tile_size (2x2-merge windows for Qwen2-VL), num_tiles = rows * cols.
    """

    best_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padding: tuple[int, int, int, int]
    grid: tuple[int, int]
    num_tiles: int


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {(h, w)}")
    return h, w


def select_best_resolution(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """HF ``select_best_resolution``: the pinpoint keeping the most pixels, then wasting the fewest."""
    oh, ow = image_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def patch_output_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """HF ``get_patch_output_size``: aspect-preserving fit of the image into ``target_hw``."""
    oh, ow = image_hw
    th, tw = target_hw
    scale_w, scale_h = tw / ow, th / oh
    if scale_w < scale_h:
        return min(math.ceil(oh * scale_w), th), tw
    return th, min(math.ceil(ow * scale_h), tw)


def _llava_plan(hw, pinpoints, tile) -> AnyResPlan:
    if not pinpoints:
        raise ValueError("grid_pinpoints must be a non-empty list of (height, width) pairs")
    best = select_best_resolution(hw, pinpoints)
    rh, rw = patch_output_size(hw, best)
    # HF _get_padding_size: the odd remainder goes to the right / bottom
    left, rx = divmod(best[1] - rw, 2)
    top, ry = divmod(best[0] - rh, 2)
    rows, cols = best[0] // tile, best[1] // tile
    return AnyResPlan(best, (rh, rw), (left, top, left + rx, top + ry), (rows, cols), rows * cols + 1)


def _internvl_plan(hw, pinpoints, tile, min_tiles, max_tiles, use_thumbnail) -> AnyResPlan:
    h, w = hw
    if pinpoints:
        # explicit canvases (height, width) in pixels -> (cols, rows) ratios as InternVL spells them
        ratios = sorted({(int(pw) // tile, int(ph) // tile) for ph, pw in pinpoints}, key=lambda r: r[0] * r[1])
    else:
        ratios = sorted(
            {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles},
            key=lambda r: r[0] * r[1],
        )
    if not ratios:
        raise ValueError("internvl: no candidate grid (check min_tiles/max_tiles or grid_pinpoints)")
    aspect = w / h
    best, best_diff, area = (1, 1), float("inf"), w * h
    for ratio in ratios:  # InternVL find_closest_aspect_ratio, ties go to the later grid if the image is big
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    cols, rows = best
    canvas = (rows * tile, cols * tile)
    n = rows * cols + (1 if use_thumbnail and rows * cols != 1 else 0)
    return AnyResPlan(canvas, canvas, (0, 0, 0, 0), (rows, cols), n)


def _qwen2vl_plan(hw, factor, min_pixels, max_pixels) -> AnyResPlan:
    h, w = hw
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"qwen2vl: absolute aspect ratio must be smaller than 200, got {max(h, w) / min(h, w)}")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    rows, cols = hb // factor, wb // factor
    return AnyResPlan((hb, wb), (hb, wb), (0, 0, 0, 0), (rows, cols), rows * cols)


def anyres_plan(
    image_size,
    grid_pinpoints,
    tile_size: int,
    *,
    strategy: str = "llava",
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> AnyResPlan:
    """Plan the AnyRes geometry of one ``(height, width)`` image; see :class:`AnyResPlan`.

    ``grid_pinpoints`` is a list of (height, width) canvases (llava; optional for internvl, where it
    replaces the min/max_tiles enumeration; ignored by qwen2vl).
    """
    hw = _check_size(image_size)
    tile = int(tile_size)
    if tile <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if strategy == "llava":
        return _llava_plan(hw, grid_pinpoints, tile)
    if strategy == "internvl":
        return _internvl_plan(hw, grid_pinpoints, tile, min_tiles, max_tiles, use_thumbnail)
    if strategy == "qwen2vl":
        return _qwen2vl_plan(hw, tile, min_pixels, max_pixels)
    raise ValueError(f"strategy must be 'llava', 'internvl' or 'qwen2vl', got {strategy!r}")


# --------------------------------------------------------------------------------------------------
# PIL-compatible bicubic resampling of uint8 images
# --------------------------------------------------------------------------------------------------


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    a = CUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def pil_bicubic_coefficients(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pillow ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for one axis.

    Returns ``(xmin [out], count [out], weights [out, ksize])``: output pixel ``i`` reads source
    pixels ``xmin[i] .. xmin[i] + count[i] - 1`` with the int32 fixed-point ``weights[i, :count[i]]``.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = CUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = torch.arange(out_size, dtype=torch.float64)
    center = (xx + 0.5) * scale
    # C casts truncate toward zero; both bounds are then clamped into the image
    xmin = torch.trunc(center - support + 0.5).clamp_min(0)
    xmax = torch.trunc(center + support + 0.5).clamp_max(in_size) - xmin
    taps = torch.arange(ksize, dtype=torch.float64)
    valid = taps[None, :] < xmax[:, None]
    w = _bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = torch.where(valid, w, torch.zeros_like(w))
    total = torch.zeros(out_size, 1, dtype=torch.float64)
    for t in range(ksize):  # sequential, in tap order, as Pillow sums (a tree sum could differ in the last bit)
        total = total + w[:, t:t + 1]
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    fixed = w * float(1 << PRECISION_BITS)
    fixed = torch.where(fixed < 0, torch.trunc(fixed - 0.5), torch.trunc(fixed + 0.5))
    return xmin.long(), xmax.long(), fixed.to(torch.int32)


def _pass_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """Dense float64 [out, in] matrix holding the fixed-point weights (exact integers)."""
    xmin, count, fixed = pil_bicubic_coefficients(in_size, out_size)
    ksize = fixed.shape[1]
    cols = xmin[:, None] + torch.arange(ksize)[None, :]
    keep = torch.arange(ksize)[None, :] < count[:, None]
    m = torch.zeros(out_size, in_size + ksize, dtype=torch.float64)
    m.scatter_(1, torch.where(keep, cols, torch.full_like(cols, in_size)), torch.where(keep, fixed.double(), 0.0))
    return m[:, :in_size]


def _fixed_to_u8(acc: torch.Tensor) -> torch.Tensor:
    # Pillow: ss starts at 1 << (PRECISION_BITS - 1), clip8(ss) = clamp(ss >> PRECISION_BITS, 0, 255)
    return torch.floor((acc + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)).clamp_(0, 255)


def resize_bicubic_u8(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bit-exact Pillow ``resize((out_w, out_h), BICUBIC)`` of a uint8 ``[C, H, W]`` image."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise TypeError(f"image must be a uint8 [C, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    c, h, w = image.shape
    x = image.to(torch.float64)

    def horizontal(x):
        return _fixed_to_u8(x @ _pass_matrix(w, out_w).to(x.device).T)

    def vertical(x):
        return _fixed_to_u8(_pass_matrix(h, out_h).to(x.device) @ x)

    # Pillow skips an axis whose size does not change (that pass would be exact anyway)
    passes = ([horizontal] if out_w != w else []) + ([vertical] if out_h != h else [])
    if vertical_first(h, w, out_h, out_w):
        passes.reverse()
    for run in passes:
        x = run(x)
    return x.to(torch.uint8)


def vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow >= 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height
    shrinks by more than twice as many pixels as the width; older Pillow always went horizontal first.
    The pass order changes the uint8 rounding between passes, so it matters for bit parity."""
    return out_h < in_h and (in_h - out_h) > 2 * (in_w - out_w)


# --------------------------------------------------------------------------------------------------
# image layout and colour conversion
# --------------------------------------------------------------------------------------------------

_CHANNELS = (1, 3, 4)


def image_to_rgb_chw(image: torch.Tensor, *, name: str = "image") -> torch.Tensor:
    """uint8 image -> uint8 ``[3, H, W]`` as HF converts it.

    Layout: a 2-D tensor is grayscale ``[H, W]``. A 3-D tensor is channels-first when its first dim
    is 1, 3 or 4 (also when both ends qualify, as HF resolves the ambiguity), otherwise
    channels-last when its last dim is 1, 3 or 4. Grayscale is replicated to RGB; RGBA is
    composited onto white (``round(a/255 * rgb + (1 - a/255) * 255)``, HF's numpy rule).
    """
    chw = _as_chw(image, name)
    c = chw.shape[0]
    if c == 1:
        return chw.expand(3, -1, -1)
    if c == 4:
        alpha = chw[3:4].to(torch.float64) / 255.0
        rgb = alpha * chw[:3].to(torch.float64) + (1.0 - alpha) * 255.0
        return torch.round(rgb).to(torch.uint8)
    return chw


def _as_chw(image, name: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {image.dtype}")
    if image.dim() == 2:
        image = image[None]
    elif image.dim() != 3:
        raise ValueError(f"{name} must be [H, W], [C, H, W] or [H, W, C], got shape {tuple(image.shape)}")
    elif image.shape[0] not in _CHANNELS:
        if image.shape[-1] not in _CHANNELS:
            raise ValueError(f"{name} must have 1, 3 or 4 channels (first or last dim), got shape {tuple(image.shape)}")
        image = image.permute(2, 0, 1)
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    return image


# --------------------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------------------


def normalize_u8(x: torch.Tensor, mean, std, out_dtype=torch.float32) -> torch.Tensor:
    """HF PIL backend: float64 ``x * (1/255)`` cast to float32, then ``(x - mean) / std`` in float32.

    ``out_dtype=torch.uint8`` returns the bytes unchanged (mean/std ignored)."""
    if out_dtype == torch.uint8:
        return x.to(torch.uint8)
    mean = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    scaled = (x.to(torch.float64) * (1.0 / 255.0)).to(torch.float32)
    return ((scaled - mean) / std).to(out_dtype)


def tiles_from_plan(img: torch.Tensor, resized_hw, pad_tl, grid, tile: int, global_view: bool) -> list[torch.Tensor]:
    """uint8 RGB ``[3, H, W]`` -> uint8 tiles: [global view] + row-major tiles of the zero-padded canvas
    holding the image resized to ``resized_hw`` at ``pad_tl`` = (top, left)."""
    rh, rw = resized_hw
    top, left = pad_tl
    rows, cols = grid
    canvas = torch.zeros(3, rows * tile, cols * tile, dtype=torch.uint8, device=img.device)
    canvas[:, top:top + rh, left:left + rw] = resize_bicubic_u8(img, rh, rw)
    tiles = [resize_bicubic_u8(img, tile, tile)] if global_view else []
    for r in range(rows):
        for c in range(cols):
            tiles.append(canvas[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
    return tiles


def _tiles_of_one(img: torch.Tensor, pinpoints, tile: int, global_view: bool) -> list[torch.Tensor]:
    plan = _llava_plan(tuple(img.shape[1:]), pinpoints, tile)
    left, top, _, _ = plan.padding
    return tiles_from_plan(img, plan.resized_hw, (top, left), plan.grid, tile, global_view)


def anyres_tile(
    images,
    grid_pinpoints,
    tile_size: int,
    mean,
    std,
    *,
    global_view: bool = True,
    resample: str = "bicubic",
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[int]]:
    """uint8 images -> normalized LLaVA-NeXT tiles ``[sum_tiles, 3, S, S]`` and tiles per image.

    ``out_dtype=torch.uint8`` gives the rounded, zero-padded uint8 tiles instead (mean/std ignored).

    Per image: choose the pinpoint, PIL-bicubic resize keeping the aspect, zero-pad (in uint8, so pad
    pixels normalize to ``-mean/std``), cut row-major ``S x S`` tiles, and put the global view (the
    whole image squashed to ``S x S``) first. Images are uint8 tensors, ``[H, W]``, ``[C, H, W]`` or
    ``[H, W, C]`` (see :func:`image_to_rgb_chw`), on any device.
    """
    if resample != "bicubic":
        raise ValueError(f"resample must be 'bicubic' (PIL filter 3), got {resample!r}")
    if isinstance(images, torch.Tensor):
        images = [images]
    tile = int(tile_size)
    out, counts = [], []
    for i, image in enumerate(images):
        rgb = image_to_rgb_chw(image, name=f"images[{i}]")
        tiles = _tiles_of_one(rgb, grid_pinpoints, tile, global_view)
        out.extend(normalize_u8(t, mean, std, out_dtype) for t in tiles)
        counts.append(len(tiles))
    if not out:
        dev = images[0].device if len(images) else torch.device("cpu")
        return torch.empty(0, 3, tile, tile, dtype=out_dtype, device=dev), counts
    return torch.stack(out), counts


def anyres_encode(
    images,
    grid_pinpoints,
    tile_size: int,
    mean,
    std,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_embedding: torch.Tensor | None = None,
    position_embedding: torch.Tensor | None = None,
    pre_layernorm=None,
    global_view: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """uint8 images -> (patch embeddings ``[sum_tiles, P(+1), D]``, tiles per image): the composition
    ``patch_embed(anyres_tile(images, ...), weight, ...)`` with float32 tiles, written out plainly."""
    from .anyres_embed import patch_embed

    tiles, counts = anyres_tile(images, grid_pinpoints, tile_size, mean, std, global_view=global_view)
    out = patch_embed(tiles.to(weight.device), weight, bias, class_embedding=class_embedding,
                      position_embedding=position_embedding, pre_layernorm=pre_layernorm)
    return out, counts
