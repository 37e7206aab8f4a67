"""PIL images as uint8 ``[H, W, C]`` tensors, read in place where Pillow allows it.

A PIL image's layout is known (rows, then pixels, then bands), so nothing here infers it. Pillow
stores an RGB image as 4 bytes per pixel (RGBX); when the image sits in one memory block, Pillow
exports it through the Arrow C data interface (``Image.__arrow_c_array__``, Pillow >= 11.2) and
:func:`pil_hwc` returns an ``[H, W, 3]`` view with strides ``(4 W, 4, 1)`` over those bytes: no copy.
The C++ CPU tiler reads such RGBX rows in place (its storage covers whole pixels), the CUDA and
reference ones take any strides. The view keeps the image and the export alive.

Pillow keeps larger images (above its 16 MiB block size by default, e.g. 4032x3024 RGB) in several
blocks, which no strided view covers: those are pasted (Pillow's C row copy, RGBX as it is) into a
one-block image and viewed there. Each thread keeps that image and reuses it for the next image of
the same size once no view of it is alive, so the copy costs a quarter of ``np.asarray``'s, which
packs RGBX into RGB through Python-level chunks and touches fresh pages. Other modes and older Pillows take ``np.asarray``'s copy, after HF's
``convert_to_rgb`` for modes other than RGB.
"""

from __future__ import annotations

import ctypes
import threading
import weakref

import numpy as np
import torch

from .tile import from_numpy

__all__ = ["pil_hwc", "is_pil"]


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


def _rgb_view(img) -> torch.Tensor | None:
    w, h = img.size
    owner = img
    found = _rgbx_address(img, w, h)
    if found is None and hasattr(img, "__arrow_c_array__"):
        owner = _one_block_copy(img)
        found = None if owner is None else _rgbx_address(owner, w, h)
    if found is None:
        return None
    address, export = found
    # all 4 bytes in the tensor's storage, so that the tilers may read whole RGBX pixels
    pixels = _Pixels(address, (h, w, 4), (4 * w, 4, 1), (export, owner))
    if owner is not img:  # the kept block is not reused while this view lives
        _scratch.view = weakref.ref(pixels)
    return from_numpy(np.asarray(pixels))[..., :3]


def pil_hwc(img) -> torch.Tensor:
    """A PIL image as HF reads it (``convert_to_rgb``: alpha onto white, palettes expanded), as a
    uint8 ``[H, W, 3]`` tensor: a view of Pillow's memory for one-block RGB images, a view of a
    one-block copy for larger RGB ones, else a copy of its own."""
    if img.mode == "RGB" and img.info.get("transparency") is None:
        view = _rgb_view(img)
        return view if view is not None else from_numpy(np.asarray(img))
    from transformers.image_transforms import convert_to_rgb

    # transformers < 5.2x has no return_numpy and returns a PIL image
    try:
        return from_numpy(np.asarray(convert_to_rgb(img, return_numpy=True)))
    except TypeError:
        return from_numpy(np.asarray(convert_to_rgb(img)))
