"""AnyRes planning: which canvas, resize, padding and tile grid an image gets.

``anyres_plan`` plans one image with any strategy (pure Python, bit-exact with HF / InternVL /
Qwen2-VL). ``anyres_plan_batch`` plans many images with the LLaVA strategy through the op
``torch.ops.vlmkernels.anyres_plan_llava`` (C++ ``cpu`` backend sharing ``csrc/common/anyres_plan.h``
with the CUDA kernels, or the ``reference`` backend).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from python_ref.ops.anyres import AnyResPlan
from python_ref.ops.anyres import anyres_plan as _ref_plan
from python_ref.ops.anyres import patch_output_size, select_best_resolution

from .. import library, registry

__all__ = ["AnyResPlan", "anyres_plan", "anyres_plan_batch"]

OP = "anyres_plan_llava"
PLAN_FIELDS = ("best_h", "best_w", "resized_h", "resized_w", "pad_l", "pad_t", "pad_r", "pad_b", "rows", "cols")


def pinpoints_tensor(grid_pinpoints, name: str = "grid_pinpoints") -> torch.Tensor:
    """(height, width) pairs -> int64 [m, 2], validated. Callers must not modify the result: for
    lists of int pairs (the usual config value) it is cached, as the checks cost more than a
    small image's planning."""
    key = _pins_key(grid_pinpoints)
    if key is not None:
        return _pins_cached(key, name)
    return _pins_checked(grid_pinpoints, name)


def _pins_key(grid_pinpoints):
    if not isinstance(grid_pinpoints, (list, tuple)):
        return None
    try:
        key = tuple((p[0], p[1]) for p in grid_pinpoints if len(p) == 2)
    except TypeError:
        return None
    ok = len(key) == len(grid_pinpoints) and all(type(v) is int for pair in key for v in pair)
    return key if ok else None


@functools.lru_cache(maxsize=64)
def _pins_cached(key, name: str) -> torch.Tensor:
    return _pins_checked(key, name)


def as_int(value, name: str) -> int:
    """An integer argument (a size): Python and numpy ints and one-element integer tensors. Floats
    are rejected, not truncated (``32.7`` is a mistake, not 32), and so are bools (``True`` is not a
    size)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value.item() if isinstance(value, torch.Tensor) else value)


def _is_int(value) -> bool:
    if isinstance(value, torch.Tensor):
        dt = value.dtype
        return value.numel() == 1 and dt != torch.bool and not dt.is_floating_point and not dt.is_complex
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _pins_checked(grid_pinpoints, name: str) -> torch.Tensor:
    if isinstance(grid_pinpoints, torch.Tensor):
        grid_pinpoints = grid_pinpoints.cpu().numpy()
    array = isinstance(grid_pinpoints, np.ndarray)
    try:  # lists as objects, so that each value is checked as given (a bool is not an int here)
        pins = grid_pinpoints if array else np.asarray(grid_pinpoints, dtype=object)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a list of (height, width) pairs, got {grid_pinpoints!r}") from None
    if pins.ndim != 2 or pins.shape[1] != 2 or pins.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty list of (height, width) pairs, got shape {pins.shape}")
    if not (pins.dtype.kind in "iu" if array else all(_is_int(v) for v in pins.reshape(-1))):
        raise TypeError(f"{name} must hold integers (floats are not truncated), got {grid_pinpoints!r}")
    pins = torch.from_numpy(pins.astype(np.int64))
    if bool((pins <= 0).any()):
        raise ValueError(f"{name} must be positive, got {pins.tolist()}")
    return pins


def _tile_pins(grid_pinpoints, tile: int) -> torch.Tensor:
    pins = pinpoints_tensor(grid_pinpoints)
    if bool((pins % tile != 0).any()):
        raise ValueError(f"every grid pinpoint must be a multiple of tile_size={tile}, got {pins.tolist()}")
    return pins


_tile_pins_cached = functools.lru_cache(maxsize=64)(_tile_pins)


def tile_pinpoints(grid_pinpoints, tile: int) -> torch.Tensor:
    """:func:`pinpoints_tensor`, also checking that every pinpoint is a multiple of ``tile`` (cached
    like it; do not modify the result)."""
    tile = as_int(tile, "tile_size")
    key = _pins_key(grid_pinpoints)
    return _tile_pins(grid_pinpoints, tile) if key is None else _tile_pins_cached(key, tile)


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
    """Plan one ``(height, width)`` image; see :class:`AnyResPlan` for each strategy's fields.

    ``"llava"`` matches HF ``select_best_resolution`` + ``get_patch_output_size`` + padding bit for
    bit (``num_tiles`` counts the global view); ``"internvl"`` is ``dynamic_preprocess``
    (``min_tiles``/``max_tiles``/``use_thumbnail``); ``"qwen2vl"`` is ``smart_resize`` with
    ``factor = tile_size`` (``min_pixels``/``max_pixels``).
    """
    if strategy == "llava":
        pinpoints_tensor(grid_pinpoints)
    return _ref_plan(
        image_size, grid_pinpoints, tile_size, strategy=strategy, min_tiles=min_tiles, max_tiles=max_tiles,
        use_thumbnail=use_thumbnail, min_pixels=min_pixels, max_pixels=max_pixels,
    )


def anyres_plan_batch(sizes, grid_pinpoints, tile_size: int, *, backend: str = "auto") -> torch.Tensor:
    """LLaVA plans of many images: ``sizes`` [n, 2] (H, W) -> int64 [n, 10] with the columns
    ``best_h, best_w, resized_h, resized_w, pad_l, pad_t, pad_r, pad_b, rows, cols``."""
    sizes = torch.as_tensor(sizes, dtype=torch.int64)
    if sizes.numel() == 0:
        sizes = sizes.reshape(0, 2)
    if sizes.dim() != 2 or sizes.shape[1] != 2:
        raise ValueError(f"sizes must be [n, 2] (height, width), got shape {tuple(sizes.shape)}")
    if bool((sizes <= 0).any()):
        raise ValueError("sizes must be positive")
    tile = as_int(tile_size, "tile_size")
    if tile <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    args = (sizes.cpu().contiguous(), pinpoints_tensor(grid_pinpoints), tile)
    return library.op(OP).default(*args, backend)


def _plan_reference(sizes: torch.Tensor, pins: torch.Tensor, tile: int) -> torch.Tensor:
    pin_list = pins.tolist()
    rows = []
    for h, w in sizes.tolist():
        bh, bw = select_best_resolution((h, w), pin_list)
        rh, rw = patch_output_size((h, w), (bh, bw))
        left, top = (bw - rw) // 2, (bh - rh) // 2
        rows.append([bh, bw, rh, rw, left, top, bw - rw - left, bh - rh - top, bh // tile, bw // tile])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 10)


registry.register(OP, "reference", _plan_reference, devices=("cpu", "cuda"))
registry.register(OP, "cpu", library.native_backend(OP, "cpu"), devices=("cpu",))


@library.register_fake(OP)
def _plan_fake(sizes, pins, tile, backend="auto"):
    return sizes.new_empty((sizes.shape[0], 10))


def plan_rows(sizes: Sequence[tuple[int, int]], grid_pinpoints, tile_size: int, backend: str = "auto") -> list[list[int]]:
    """Python lists of plan rows (host-side helper for the tile functional). Rows are cached per
    (size, pinpoints, tile) when the pinpoints are a list of int pairs: datasets repeat sizes, and
    a per-call round trip through the op costs more than a small image's tiling."""
    kind = "cpu" if registry.availability(OP, "cpu", "cpu")[0] and backend in ("auto", "cpu", "cuda") else "reference"
    key = _pins_key(grid_pinpoints)
    if key is None:
        return anyres_plan_batch(list(sizes), grid_pinpoints, tile_size, backend=kind).tolist()
    return [list(_plan_row(int(h), int(w), key, int(tile_size), kind)) for h, w in sizes]


@functools.lru_cache(maxsize=4096)
def _plan_row(h: int, w: int, pins_key, tile: int, kind: str) -> tuple[int, ...]:
    return tuple(anyres_plan_batch([(h, w)], pins_key, tile, backend=kind)[0].tolist())
