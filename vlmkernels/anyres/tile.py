"""``anyres_tile``: uint8 images of any sizes -> normalized LLaVA-NeXT tiles, in one op.

The functional :func:`anyres_tile` validates the images, finds each one's layout, plans the grids
on the host and calls ``torch.ops.vlmkernels.anyres_tile`` with a fixed schema (a list of uint8
``[H, W, C]`` views plus an int64 plan table), so the op works with ``torch.compile`` and opcheck.

``out_dtype=torch.uint8`` emits the rounded, zero-padded tile bytes without normalizing (what
``anyres_encode`` feeds to ``patch_embed_uint8``).

Backends: ``cpu`` (C++, multithreaded, Pillow-exact bicubic), ``cuda`` (one kernel launch for the
whole batch) and ``reference`` (python_ref, pure PyTorch).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Sequence

import numpy as np
import torch

from python_ref.ops.anyres import image_to_rgb_chw, normalize_u8, tiles_from_plan

from .. import library, registry
from .plan import as_int, plan_rows, tile_pinpoints

__all__ = ["anyres_tile"]

OP = "anyres_tile"
PLAN_COLS = 8  # resized_h, resized_w, pad_top, pad_left, rows, cols, first output tile, parts
MAX_TILE, MAX_SIDE, MAX_GRID = 65536, 1 << 24, 1 << 20  # as csrc/common/anyres_tile_args.h
_CHANNELS = (1, 3, 4)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)  # uint8: raw tiles, not normalized
_IDENTITY_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor of a (possibly read-only, e.g. ``np.asarray(PIL image)``) array; never written."""
    if any(s < 0 for s in array.strides):
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


class RowRuns:
    """One uint8 ``[H, W, C]`` image held as runs of consecutive rows, each an ``[h_i, W, C]`` view
    (a PIL image that Pillow keeps in several memory blocks, read in place: ``pil.pil_view``). The
    op takes the runs as consecutive ``images`` entries, the plan's ``parts`` column saying how many;
    every backend reads them as the image they stack into (the C++ CPU tiler in place)."""

    def __init__(self, runs):
        self.runs = tuple(runs)
        h = sum(r.shape[0] for r in self.runs)
        self.shape = torch.Size((h, *self.runs[0].shape[1:]))
        self.device, self.dtype = self.runs[0].device, self.runs[0].dtype

    def to(self, device) -> "RowRuns":
        return RowRuns([r.to(device) for r in self.runs])

    def tensor(self) -> torch.Tensor:
        """The image as one tensor (a copy)."""
        return torch.cat(self.runs)

    def __repr__(self) -> str:
        return f"RowRuns({len(self.runs)} runs, shape={tuple(self.shape)})"


def hwc_view(image, name: str = "image") -> torch.Tensor:
    """A uint8 image as an ``[H, W, C]`` view (no copy).

    Accepts a torch tensor or numpy array: ``[H, W]`` is grayscale; a 3-D image is channels-first
    when its first dim is 1, 3 or 4 (HF's rule, also when both ends qualify), else channels-last
    when its last dim is 1, 3 or 4.
    """
    if isinstance(image, RowRuns):
        return image
    if isinstance(image, np.ndarray):
        image = from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {image.dtype}")
    if image.dim() == 2:
        image = image[:, :, None]
    elif image.dim() != 3:
        raise ValueError(f"{name} must be [H, W], [C, H, W] or [H, W, C], got shape {tuple(image.shape)}")
    elif image.shape[0] in _CHANNELS:
        image = image.permute(1, 2, 0)
    elif image.shape[-1] not in _CHANNELS:
        raise ValueError(f"{name} must have 1, 3 or 4 channels (first or last dim), got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    return image


def image_views(images) -> list[torch.Tensor]:
    """One image or a list of them -> ``[H, W, C]`` views (see :func:`hwc_view`)."""
    if isinstance(images, (torch.Tensor, np.ndarray, RowRuns)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of uint8 tensors, got {type(images).__name__}")
    return [hwc_view(im, f"images[{i}]") for i, im in enumerate(images)]


def _per_channel(values, name: str) -> list[float]:
    """``mean``/``std``: one number, or 3 of them in a list, tuple, numpy array or tensor (as HF takes)."""
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = values.tolist()
    vals = values if isinstance(values, (list, tuple)) else [values]
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{name} must be a number or 3 numbers (list, tuple, array or tensor), got {values!r}")
    vals = [float(v) for v in vals] * (3 if len(vals) == 1 else 1)
    if len(vals) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers, got {values!r}")
    return vals


def tile_views(
    views: Sequence[torch.Tensor],
    grid_pinpoints,
    tile_size: int,
    mean,
    std,
    *,
    global_view: bool = True,
    out_dtype: torch.dtype = torch.float32,
    pad_to_max: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, list[int]]:
    """Tiles of ``[H, W, C]`` views (or :class:`RowRuns`). With ``pad_to_max`` every image gets ``max(tiles)`` slots
    (zero-filled past its own tiles), i.e. the output reshapes to HF's ``[B, max_tiles, 3, S, S]``."""
    tile = as_int(tile_size, "tile_size")
    if tile <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    tile_pinpoints(grid_pinpoints, tile)
    if out_dtype == torch.uint8:
        mean, std = _IDENTITY_NORM  # the kernels ignore them; don't reject values nobody reads
    mean, std = _per_channel(mean, "mean"), _per_channel(std, "std")
    devices = {v.device for v in views}
    if len(devices) > 1:
        raise ValueError(f"all images must be on one device, got {sorted(map(str, devices))}")
    plans = plan_rows([tuple(v.shape[:2]) for v in views], grid_pinpoints, tile, backend)
    counts = [p[8] * p[9] + int(global_view) for p in plans]
    slot = max(counts, default=0) if pad_to_max else None
    table, first, images = [], 0, []
    for p, n, v in zip(plans, counts, views):
        parts = v.runs if isinstance(v, RowRuns) else (v,)
        images.extend(parts)
        # columns: resized_h, resized_w, pad_top, pad_left, rows, cols, first output tile, parts
        table.append([p[2], p[3], p[5], p[4], p[8], p[9], first, len(parts)])
        first += slot if pad_to_max else n
    plan = torch.tensor(table, dtype=torch.int64).reshape(-1, PLAN_COLS)
    args = (images, plan, first, tile, mean, std, bool(global_view), out_dtype)
    out = library.op(OP).default(*args, backend)
    return out, counts


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
    backend: str = "auto",
) -> tuple[torch.Tensor, list[int]]:
    """uint8 images -> (``pixel_values`` [sum_tiles, 3, S, S], ``tiles_per_image``).

    Per image, as HF's ``LlavaNextImageProcessorPil``: choose the grid pinpoint, resize keeping
    the aspect ratio with Pillow-exact antialiased bicubic (uint8 rounding between the passes and
    before normalizing), zero-pad (pads normalize to ``-mean/std``), cut row-major ``S x S`` tiles
    and put the global view (the whole image squashed to ``S x S``) first.

    ``images``: one image or a list; uint8 torch tensors or numpy arrays, ``[H, W]`` (grayscale),
    ``[C, H, W]`` or ``[H, W, C]`` with C = 1, 3 or 4 (see :func:`hwc_view`), all on one device
    (CPU or CUDA). Grayscale is replicated to RGB and RGBA is composited onto white, as HF does.
    ``grid_pinpoints`` and ``tile_size`` must be integers (Python or numpy ints, integer tensors):
    floats are rejected rather than truncated, and so are bools. ``mean``/``std``: 3 numbers (or
    one), as a list, tuple, numpy array or tensor. ``out_dtype``: float32, float16 or bfloat16, or
    uint8 for the resized, zero-padded tile bytes *before* normalization (mean/std are then ignored;
    feed them to ``patch_embed_uint8``, or use ``anyres_encode``, to normalize on load).
    """
    if resample != "bicubic":
        raise ValueError(f"resample must be 'bicubic' (PIL filter 3), got {resample!r}")
    views = image_views(images)
    return tile_views(views, grid_pinpoints, tile_size, mean, std, global_view=global_view,
                      out_dtype=out_dtype, backend=backend)


# ---- backends ------------------------------------------------------------------------------------


def check_tile_args(images, plan, num_tiles, tile, mean, std, global_view, out_dtype, *, read_plan=True):
    """The Python backends' copy of ``csrc/common/anyres_tile_args.h``: the same checks in the same
    order, raising the same messages (tests/test_anyres_inputs.py holds them to it). ``read_plan``:
    check the plan's values too (not under fake tensors, which have none). Returns, per image (plan
    row), the range of its parts in ``images`` (None without ``read_plan``)."""
    n_parts = len(images)
    device = images[0].device if n_parts else torch.device("cpu")
    if not 1 <= tile <= MAX_TILE:
        raise ValueError(f"anyres_tile: tile_size must be in [1, {MAX_TILE}], got {tile}")
    if num_tiles < 0:
        raise ValueError(f"anyres_tile: num_tiles must be >= 0, got {num_tiles}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"anyres_tile: out_dtype must be float32, float16, bfloat16 or uint8, got {out_dtype}")
    if plan.dtype != torch.int64:
        raise TypeError(f"anyres_tile: plan must be int64, got {plan.dtype}")
    if plan.device.type != "cpu":
        raise ValueError("anyres_tile: plan must be a CPU tensor (a host-side table)")
    if plan.dim() != 2 or plan.shape[1] != PLAN_COLS:
        raise ValueError(f"anyres_tile: plan must be [num_images, {PLAN_COLS}], got {tuple(plan.shape)}")
    if not plan.is_contiguous():
        raise ValueError("anyres_tile: plan must be contiguous")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"anyres_tile: mean and std must have 3 values, got {len(mean)} and {len(std)}")
    for c in range(3):
        if std[c] == 0:
            raise ValueError(f"anyres_tile: std must be non-zero, got std[{c}] = 0")
    for j, im in enumerate(images):
        _check_image(j, im, device)
    if not read_plan:
        return None
    spans, ranges, j0 = [], [], 0
    for i, row in enumerate(plan.tolist()):
        parts = row[7]
        if not 1 <= parts <= n_parts - j0:
            raise ValueError(f"anyres_tile: plan[{i}]: its {parts} parts from images[{j0}] are not among the "
                             f"{n_parts} images")
        h = 0
        for j in range(j0, j0 + parts):
            if images[j].shape[1:] != images[j0].shape[1:]:
                raise ValueError(f"anyres_tile: plan[{i}]: images[{j}] has shape {tuple(images[j].shape)} but "
                                 f"images[{j0}] {tuple(images[j0].shape)}: the parts of an image must agree in "
                                 "width and channels")
            h += images[j].shape[0]
        if h >= MAX_SIDE:
            raise ValueError(f"anyres_tile: plan[{i}]: the image is too large: {h} rows")
        ranges.append((j0, j0 + parts))
        j0 += parts
        _check_plan_row(i, row, tile, num_tiles, global_view)
        spans.append((row[6], row[6] + row[4] * row[5] + int(global_view)))
    if j0 != n_parts:
        raise ValueError(f"anyres_tile: plan: its {len(ranges)} images hold {j0} parts, but images has {n_parts}")
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise ValueError("anyres_tile: plan: the output tiles of two images overlap")
    return ranges


def _check_image(i: int, im: torch.Tensor, device: torch.device) -> None:
    if im.dtype != torch.uint8:
        raise TypeError(f"anyres_tile: images[{i}] must be uint8, got {im.dtype}")
    if im.dim() != 3:
        raise ValueError(f"anyres_tile: images[{i}] must be an [H, W, C] view, got shape {tuple(im.shape)}")
    if im.device != device:
        raise ValueError(f"anyres_tile: images[{i}] is on {im.device} but images[0] is on {device}")
    h, w, c = im.shape
    if c not in _CHANNELS:
        raise ValueError(f"anyres_tile: images[{i}] must have 1, 3 or 4 channels, got {c}")
    if h <= 0 or w <= 0:
        raise ValueError(f"anyres_tile: images[{i}] is empty: shape {tuple(im.shape)}")
    if h >= MAX_SIDE or w >= MAX_SIDE:
        raise ValueError(f"anyres_tile: images[{i}] is too large: shape {tuple(im.shape)}")
    if any(s < 0 for s in im.stride()):
        raise ValueError(f"anyres_tile: images[{i}] must not have negative strides")


def _check_plan_row(i: int, row: list[int], tile: int, num_tiles: int, global_view: bool) -> None:
    rh, rw, pt, pl, rows, cols, first, _ = row
    if not (1 <= rows <= MAX_GRID and 1 <= cols <= MAX_GRID // rows):
        raise ValueError(f"anyres_tile: plan[{i}]: bad grid {rows}x{cols} (at most {MAX_GRID} tiles)")
    if not (1 <= rh < MAX_SIDE and 1 <= rw < MAX_SIDE):
        raise ValueError(f"anyres_tile: plan[{i}]: bad resized size {rh}x{rw}")
    if not (0 <= pt <= rows * tile - rh and 0 <= pl <= cols * tile - rw):
        raise ValueError(f"anyres_tile: plan[{i}]: the resized image {rh}x{rw} at ({pt}, {pl}) does not fit the "
                         f"{rows * tile}x{cols * tile} canvas")
    count = rows * cols + int(global_view)
    if not 0 <= first <= num_tiles - count:
        raise ValueError(f"anyres_tile: plan[{i}]: its {count} tiles from tile {first} exceed num_tiles={num_tiles}")


def _alloc(images, plan: torch.Tensor, num_tiles: int, tile: int, global_view: bool, out_dtype) -> torch.Tensor:
    device = images[0].device if len(images) else torch.device("cpu")
    covered = sum(r[4] * r[5] for r in plan.tolist()) + plan.shape[0] * int(global_view)
    make = torch.empty if covered == num_tiles else torch.zeros  # slots no image writes stay zero
    return make(num_tiles, 3, tile, tile, dtype=out_dtype, device=device)


def _tile_reference(images, plan, num_tiles, tile, mean, std, global_view, out_dtype):
    ranges = check_tile_args(images, plan, num_tiles, tile, mean, std, global_view, out_dtype)
    out = _alloc(images, plan, num_tiles, tile, global_view, out_dtype)
    for i, ((j0, j1), row) in enumerate(zip(ranges, plan.tolist())):
        rh, rw, top, left, rows, cols, first, _ = row
        n = rows * cols + int(global_view)
        im = images[j0] if j1 - j0 == 1 else torch.cat(images[j0:j1])  # row runs: the image they stack into
        rgb = image_to_rgb_chw(im.permute(2, 0, 1), name=f"images[{i}]")
        tiles = tiles_from_plan(rgb, (rh, rw), (top, left), (rows, cols), tile, global_view)
        out[first:first + n] = torch.stack([normalize_u8(t, mean, std, out_dtype) for t in tiles])
    return out


registry.register(OP, "reference", _tile_reference, devices=("cpu", "cuda"))
registry.register(OP, "cpu", library.native_backend(OP, "cpu"), devices=("cpu",))
registry.register(OP, "cuda", library.native_backend(OP, "cuda"), devices=("cuda",))


@library.register_fake(OP)
def _tile_fake(images, plan, num_tiles, tile, mean, std, global_view=True, out_dtype=torch.float32, backend="auto"):
    check_tile_args(images, plan, num_tiles, tile, mean, std, global_view, out_dtype, read_plan=False)
    device = images[0].device if len(images) else torch.device("cpu")
    return torch.empty(num_tiles, 3, tile, tile, dtype=out_dtype, device=device)
