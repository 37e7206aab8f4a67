"""Reference patch embedding (CLIP/SigLIP) and AnyRes feature packing (HF ``pack_image_features``).

Plain PyTorch, written to follow HF transformers step by step so that the fused ops can be
checked against it: ``anyres_pack`` reproduces LLaVA-NeXT's and LLaVA-OneVision's
``pack_image_features`` (base tile first, ``unpad_image`` with the ``round(., 7)`` rule, one
newline per row, OneVision's ``anyres_max_N`` bilinear downsample) bit for bit in fp32.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .anyres import select_best_resolution

# unpad_hw stays out of __all__ (python_ref.ops re-exports __all__): vlmkernels and python_ref.models
# import it from this module, its one definition
__all__ = ["patch_embed", "patch_embed_uint8", "normalize_lut", "anyres_pack"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def patch_embed(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_embedding: torch.Tensor | None = None,
    position_embedding: torch.Tensor | None = None,
    pre_layernorm=None,
) -> torch.Tensor:
    """CLIP/SigLIP patch embedding: ``[N, 3, H, W] -> [N, (H//p)*(W//p) (+1), D]`` in ``weight.dtype``.

    The stride-p conv is a GEMM over flattened ``(c, ky, kx)`` patches; pixels past the last full
    patch are ignored (conv "valid", e.g. SigLIP's 384 tile read as 27x14). ``class_embedding``
    ([D]) is prepended as row 0, ``position_embedding`` ([rows, D]) added to every row, then
    ``pre_layernorm`` (an ``nn.LayerNorm`` or a ``(weight, bias, eps)`` tuple) normalizes over D.
    Math runs in fp32 (fp64 for fp64 weights) and is rounded once at the end.
    """
    d, c, p, _ = weight.shape
    n, _, h, w = pixels.shape
    gh, gw = h // p, w // p
    cd = _compute_dtype(weight.dtype)
    # HF casts pixels to the weight dtype before the conv; do the same rounding first
    x = pixels[:, :, : gh * p, : gw * p].to(weight.dtype).to(cd)
    patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
    out = patches @ weight.reshape(d, c * p * p).to(cd).t()
    if bias is not None:
        out = out + bias.to(cd)
    if class_embedding is not None:
        out = torch.cat([class_embedding.to(cd).expand(n, 1, d), out], dim=1)
    if position_embedding is not None:
        out = out + position_embedding.to(cd)
    if pre_layernorm is not None:
        if isinstance(pre_layernorm, torch.nn.LayerNorm):
            ln_w, ln_b, eps = pre_layernorm.weight, pre_layernorm.bias, pre_layernorm.eps
        else:
            ln_w, ln_b, eps = pre_layernorm
        out = F.layer_norm(
            out, (d,), None if ln_w is None else ln_w.to(cd), None if ln_b is None else ln_b.to(cd), eps
        )
    return out.to(weight.dtype)


def unpad_hw(original_hw: Sequence[int], current_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """HF ``unpad_image`` as index ranges: (row0, rows, col0, cols) kept of a [cur_h, cur_w] grid,
    with HF's ``round(., 7)`` against float mismatches (transformers#34522)."""
    oh, ow = int(original_hw[0]), int(original_hw[1])
    ch, cw = int(current_hw[0]), int(current_hw[1])
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return pad, ch - 2 * pad, 0, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - 2 * pad


def anyres_pack(
    features: torch.Tensor,
    image_sizes,
    grid_pinpoints,
    tile_size: int,
    newline: torch.Tensor | None,
    *,
    max_area_tiles: int | None = None,
    tiles_per_image: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """HF ``pack_image_features`` on ``features [sum_tiles, P, C]`` (P = side², tiles of each image
    contiguous, base tile first). ``image_sizes`` are original (H, W); ``tile_size`` is the vision
    tower's image size (grid = best pinpoint // tile_size). ``max_area_tiles=N`` is OneVision's
    ``anyres_max_N``. ``tiles_per_image`` defaults to grid+1 per image (OneVision multi-image
    samples pass 1). Returns one ``[n_i, C]`` tensor per image.
    """
    sizes = [tuple(int(v) for v in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
    side = math.isqrt(features.shape[1])
    if tiles_per_image is None:
        tiles_per_image = []
        for hw in sizes:
            bh, bw = select_best_resolution(hw, grid_pinpoints)
            tiles_per_image.append((bh // tile_size) * (bw // tile_size) + 1)
    out = []
    start = 0
    for hw, n_tiles in zip(sizes, tiles_per_image):
        feat = features[start : start + n_tiles]
        start += n_tiles
        if n_tiles == 1:
            rows = feat[0]
            if newline is not None:
                rows = torch.cat([rows, newline[None].to(rows)], dim=0)
            out.append(rows)
            continue
        base, grid = feat[0], feat[1:]
        bh, bw = select_best_resolution(hw, grid_pinpoints)
        nph, npw = bh // tile_size, bw // tile_size
        x = grid.reshape(nph, npw, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, nph * side, npw * side)
        r0, nr, c0, nc = unpad_hw(hw, x.shape[1:])
        x = x[:, r0 : r0 + nr, c0 : c0 + nc]
        if max_area_tiles is not None:
            ratio = math.sqrt(nr * nc / (max_area_tiles * side**2))
            if ratio > 1.1:
                x = F.interpolate(x[None], [int(nr // ratio), int(nc // ratio)], mode="bilinear")[0]
        if newline is not None:
            x = torch.cat([x, newline[:, None, None].expand(*x.shape[:-1], 1).to(x)], dim=-1)
        out.append(torch.cat([base, x.flatten(1, 2).t()], dim=0))
    if start != features.shape[0]:
        raise ValueError(f"features has {features.shape[0]} tiles but the images need {start}")
    return out


def normalize_lut(mean, std, channels: int = 3) -> torch.Tensor:
    """float32 ``[channels, 256]``: each uint8 value normalized like HF's PIL backend
    (float64 ``x * (1/255)`` rounded to float32, then ``(x - mean) / std`` in float32)."""
    x = (torch.arange(256, dtype=torch.float64) * (1.0 / 255.0)).to(torch.float32)
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1).expand(channels, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1).expand(channels, 1)
    return ((x[None] - m) / s).contiguous()


def patch_embed_uint8(tiles: torch.Tensor, weight: torch.Tensor, bias=None, *, mean, std, **kw) -> torch.Tensor:
    """:func:`patch_embed` of uint8 tiles ``[N, C, H, W]`` normalized like HF's PIL backend."""
    c = tiles.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32, device=tiles.device).reshape(-1, 1, 1).expand(c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=tiles.device).reshape(-1, 1, 1).expand(c, 1, 1)
    pixels = ((tiles.to(torch.float64) * (1.0 / 255.0)).to(torch.float32) - m) / s
    return patch_embed(pixels, weight, bias, **kw)
