"""PIL images as uint8 ``[H, W, C]`` tensors, read in place where Pillow allows it.

A PIL image's layout is known (rows, then pixels, then bands), so nothing here infers it. Pillow
stores an RGB image as 4 bytes per pixel (RGBX); when the image sits in one memory block, Pillow
exports it through the Arrow C data interface (``Image.__arrow_c_array__``, Pillow >= 11.2) and
:func:`pil_hwc` returns an ``[H, W, 3]`` view with strides ``(4 W, 4, 1)`` over those bytes: no copy.
The C++ CPU tiler reads such RGBX rows in place (its storage covers whole pixels), the CUDA and
reference ones take any strides. The view keeps the image and the export alive.

Pillow keeps larger images (above its 16 MiB block size by default, e.g. 2048x1536 and 4032x3024
RGB) in several blocks, which no strided view covers. :func:`pil_view` reads those in place too,
as a :class:`~vlmkernels.anyres.tile.RowRuns`: Pillow's table of row pointers (the ``image`` field
of the ``Imaging`` struct that ``Image.getim()`` hands out) splits into a few runs of consecutive
rows, each contiguous and viewed as above; the op takes the runs as the image's parts and the C++
CPU tiler reads them where they are. The struct's layout is not an API, so it is recognised, not
assumed: the fields around ``xsize``/``ysize`` must read as an RGB image's (3 bands, no 8-bit rows,
``image32 == image``, pixel size 4, line size ``4 W``), and the first and last row of every run must
hold the bytes Pillow itself reads there; otherwise (or without ``getim``) the image is pasted
(Pillow's C row copy, RGBX as it is) into a one-block image and viewed there. Each thread keeps that
image and reuses it for the next image of the same size once no view of it is alive, so the copy
costs a quarter of ``np.asarray``'s, which packs RGBX into RGB through Python-level chunks and
touches fresh pages. Other modes and older Pillows take ``np.asarray``'s copy, after HF's
``convert_to_rgb`` for modes other than RGB. ``COUNTS`` counts the images read each way.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import weakref

import numpy as np
import torch

from .tile import RowRuns, from_numpy

__all__ = ["pil_hwc", "pil_view", "is_pil"]

# images read: "view" (one block, in place), "runs" (several blocks, in place), "paste" (several
# blocks, pasted into one), "copy" (np.asarray, other modes and older Pillows)
COUNTS: collections.Counter = collections.Counter()


class _ArrowArray(ctypes.Structure):
    pass


# the Arrow C data interface's ArrowArray (a stable ABI)
_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _Pixels:
    """Pixel memory owned by someone else, for ``np.asarray``; holds the owners while numpy (and the
    tensor built on it) holds this."""

    def __init__(self, address: int, shape: tuple, strides: tuple, owners: tuple):
        self.__array_interface__ = {"data": (address, True), "shape": shape, "strides": strides,
                                    "typestr": "|u1", "version": 3}
        self._owners = owners


def is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "getbands")


def _rgbx_address(pixels, w: int, h: int) -> tuple[int, object] | None:
    """(address of the RGBX pixels of ``pixels``, an RGB PIL image or Pillow core, and the export
    that keeps them), or None when they are not one block."""
    export = getattr(pixels, "__arrow_c_array__", None)
    if export is None:
        return None
    try:
        array = export()
    except ValueError:  # "Image rows are not contiguous in memory": several blocks
        return None
    if isinstance(array, tuple):  # an Image exports (schema, array); its core the array alone
        array = array[1]
    a = _ArrowArray.from_address(_capsule_pointer(array, b"arrow_array"))
    # an RGB image exports as fixed-size lists of 4 bytes, the bytes in its one child array
    if a.length != w * h or a.offset != 0 or a.n_children != 1:
        return None
    child = a.children[0].contents
    if child.length != 4 * w * h or child.offset != 0 or child.n_buffers != 2 or not child.buffers[1]:
        return None
    return child.buffers[1], array


_scratch = threading.local()  # .block: this thread's one-block RGB image; .view: a weakref to its view


def _one_block_copy(img):
    """``img``'s pixels in a one-block image: this thread's kept one when no view of it is alive and
    the size matches, else a new one that it keeps (None where Pillow has no block allocator)."""
    from PIL import Image

    new_block = getattr(Image.core, "new_block", None)
    if new_block is None:
        return None
    block, view = getattr(_scratch, "block", None), getattr(_scratch, "view", None)
    if block is None or block.size != img.size or (view is not None and view() is not None):
        block = _scratch.block = new_block("RGB", img.size)
    block.paste(img.im, (0, 0) + img.size)
    return block


def _row_pointers(core, w: int, h: int) -> np.ndarray | None:
    """Pillow's row pointers of an RGB image core (int64 ``[h]``, row y's RGBX bytes), read from the
    ``Imaging`` struct behind ``core.ptr`` (the capsule ``Image.getim()`` returns); None when there
    is none or its fields do not read as this image's (see the module doc)."""
    capsule = getattr(core, "ptr", None)
    if capsule is None or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        base = _capsule_pointer(capsule, b"Pillow Imaging")
    except (ValueError, TypeError, AttributeError):
        return None
    if not base:
        return None
    # the struct opens with the mode (char[7] up to Pillow 11, an int since), then the ints type,
    # depth, bands, xsize, ysize, then the pointers palette, image8, image32, image, block, blocks
    # and the ints pixelsize, linesize
    head = (ctypes.c_int32 * 16).from_address(base)
    at = next((i for i in range(1, 14) if head[i] == w and head[i + 1] == h and head[i - 1] == 3), None)
    if at is None:
        return None
    fields = (4 * (at + 2) + 7) // 8 * 8  # after ysize, pointer-aligned
    _, image8, image32, image, _, _ = (ctypes.c_uint64 * 6).from_address(base + fields)
    pixelsize, linesize = (ctypes.c_int32 * 2).from_address(base + fields + 48)
    if image8 or not image or image32 != image or pixelsize != 4 or linesize != 4 * w:
        return None
    rows = np.ctypeslib.as_array((ctypes.c_int64 * h).from_address(image)).copy()
    return rows if rows.all() else None


def _rgb_runs(img, w: int, h: int) -> RowRuns | torch.Tensor | None:
    """``img`` (RGB) read in place as its runs of consecutive rows (one run: a tensor), checked
    against the bytes Pillow reads; None where its memory can't be found (see the module doc)."""
    core = img.im
    rows = _row_pointers(core, w, h)
    if rows is None:
        return None
    line = 4 * w
    cuts = (np.flatnonzero(np.diff(rows) != line) + 1).tolist()
    starts, ends = [0, *cuts], [*cuts, h]
    # the first and last row of every run hold what Pillow reads there
    for y in {*starts, *(b - 1 for b in ends)}:
        got = np.frombuffer((ctypes.c_uint8 * line).from_address(int(rows[y])), dtype=np.uint8)
        if got.reshape(w, 4)[:, :3].tobytes() != img.crop((0, y, w, y + 1)).tobytes():
            return None
    runs = [from_numpy(np.asarray(_Pixels(int(rows[a]), (b - a, w, 4), (line, 4, 1), (core,))))[..., :3]
            for a, b in zip(starts, ends)]
    return runs[0] if len(runs) == 1 else RowRuns(runs)


def _rgb_view(img, runs: bool = False) -> torch.Tensor | RowRuns | None:
    """``img`` (RGB) in place: its one block; else, with ``runs``, its runs of rows; else a view
    of a one-block copy. None where Pillow exports neither."""
    w, h = img.size
    owner = img
    found = _rgbx_address(img, w, h)
    if found is None and runs:
        view = _rgb_runs(img, w, h)
        if view is not None:
            COUNTS["runs" if isinstance(view, RowRuns) else "view"] += 1
            return view
    if found is None and hasattr(img, "__arrow_c_array__"):
        owner = _one_block_copy(img)
        found = None if owner is None else _rgbx_address(owner, w, h)
    if found is None:
        return None
    COUNTS["view" if owner is img else "paste"] += 1
    address, export = found
    # all 4 bytes in the tensor's storage, so that the tilers may read whole RGBX pixels
    pixels = _Pixels(address, (h, w, 4), (4 * w, 4, 1), (export, owner))
    if owner is not img:  # the kept block is not reused while this view lives
        _scratch.view = weakref.ref(pixels)
    return from_numpy(np.asarray(pixels))[..., :3]


def pil_view(img) -> torch.Tensor | RowRuns:
    """What :func:`pil_hwc` returns, except that an RGB image Pillow keeps in several blocks comes
    as the :class:`~vlmkernels.anyres.tile.RowRuns` of its blocks, read in place (no copy), where
    its memory is found (else as :func:`pil_hwc`'s one-block copy). For the tile ops."""
    if img.mode == "RGB" and img.info.get("transparency") is None:
        img.load()
        view = _rgb_view(img, runs=True)
        if view is not None:
            return view
    return pil_hwc(img)


def pil_hwc(img) -> torch.Tensor:
    """A PIL image as HF reads it (``convert_to_rgb``: alpha onto white, palettes expanded), as a
    uint8 ``[H, W, 3]`` tensor: a view of Pillow's memory for one-block RGB images, a view of a
    one-block copy for larger RGB ones, else a copy of its own."""
    if img.mode == "RGB" and img.info.get("transparency") is None:
        view = _rgb_view(img)
        if view is not None:
            return view
    COUNTS["copy"] += 1
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return from_numpy(np.asarray(img))
    from transformers.image_transforms import convert_to_rgb

    # transformers < 5.2x has no return_numpy and returns a PIL image
    try:
        return from_numpy(np.asarray(convert_to_rgb(img, return_numpy=True)))
    except TypeError:
        return from_numpy(np.asarray(convert_to_rgb(img)))
