"""Patch rules for HF LLaVA-NeXT / LLaVA-OneVision image processors (torchvision and PIL classes).

The patched instance's ``preprocess`` (what ``processor(images=...)`` calls) runs the whole AnyRes
pipeline with one ``anyres_tile`` op: grid choice, Pillow-exact bicubic resize, zero padding, tiles,
global view, rescale + normalize, and the zero padding of the tile axis to the batch maximum. It
returns HF's ``BatchFeature`` layout: ``pixel_values`` [B, max_tiles, 3, S, S] float32 and
``image_sizes`` [B, 2] (plus ``batch_num_images`` for OneVision). The numbers are those of HF's PIL
backend (``LlavaNextImageProcessorPil``), for either class: the torchvision backend itself differs
from the PIL backend by 1-2 uint8 steps. The resize follows Pillow >= 13, which runs the vertical
pass first when the height shrinks much more than the width (python-pillow/Pillow#9549); with an
older Pillow installed the PIL backend can differ from the fast path on those images.

Inputs: PIL images (HWC by construction, never inferred; RGB read in place, also where Pillow keeps
it in several blocks, other modes converted with HF's ``convert_to_rgb``: alpha composited onto white; see
``vlmkernels/anyres/pil.py``), uint8 numpy arrays or torch tensors laid out by HF's rule (``[H, W]``
grayscale; channels first when the first dim is 1, 3 or 4, else last; ``input_data_format``
overrides; grayscale replicated, RGBA composited onto white as HF's numpy path does), on CPU or
(torchvision class, ``device=``/CUDA tensors) CUDA.

A processor whose own settings always need HF's code (e.g. ``LlavaNextImageProcessor()``, whose 224
tiles do not divide its 336-multiple pinpoints) is not patched: ``patch()`` warns and reports it
skipped, with the reason. Per call, everything else falls back to the original ``preprocess``,
unchanged (logged at DEBUG): ``return_tensors`` other than "pt",
``do_resize``/``do_rescale``/``do_pad``/``do_convert_rgb`` False, a resample other than bicubic,
``rescale_factor`` != 1/255, global-view size / crop size / tile size that disagree, pinpoints that
are not multiples of the tile size, an ``image_std`` with a zero (HF returns inf), non-uint8
images, URLs, extra positional arguments, ``data_format`` other than channels-first, and OneVision
samples holding several images (HF pads those to a square instead of tiling).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from ..anyres.pil import is_pil, pil_view
from ..anyres.tile import _per_channel, from_numpy, hwc_view, tile_views
from .core import PatchRule, SkipPatch, register_rule

log = logging.getLogger("vlmkernels")

NEXT_CLASSES = ("LlavaNextImageProcessor", "LlavaNextImageProcessorPil", "LlavaNextImageProcessorFast")
ONEVISION_CLASSES = (
    "LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil", "LlavaOnevisionImageProcessorFast",
)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
_HANDLED = {
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_pad", "do_convert_rgb", "image_grid_pinpoints",
    "return_tensors", "input_data_format", "data_format", "device", "disable_grouping", "pad_size",
}


class _Fallback(Exception):
    """This call needs the original preprocess; the message says why."""


def _class_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _match(obj) -> bool:
    if isinstance(obj, torch.nn.Module):
        return False
    names = _class_names(obj)
    return bool(names & set(NEXT_CLASSES + ONEVISION_CLASSES)) and callable(getattr(type(obj), "preprocess", None))


def _is_bicubic(resample) -> bool:
    if resample is None:
        return False
    value = getattr(resample, "value", resample)
    return value == _BICUBIC or str(value).lower() == "bicubic"


def _tile_size(size, crop_size, do_center_crop) -> int:
    """S when the global view, the tile and HF's per-tile resize/crop all agree on S x S, else fallback."""
    if size is None:
        raise _Fallback("size is not set")
    se = getattr(size, "shortest_edge", None)
    if getattr(size, "height", None) and getattr(size, "width", None):
        if size.height != size.width:
            raise _Fallback(f"non-square size {size}")
        view = size.height
    elif se and not getattr(size, "longest_edge", None):
        view = se
    else:
        raise _Fallback(f"unsupported size {size}")
    tile = crop_size.height if crop_size is not None and getattr(crop_size, "height", None) else view
    if tile != view:
        raise _Fallback(f"global view {view} != tile size {tile}")
    if do_center_crop and (crop_size is None or (crop_size.height, crop_size.width) != (tile, tile)):
        raise _Fallback(f"center crop {crop_size} != tile {tile}")
    return int(tile)


def _resolve(proc, kwargs: dict) -> dict:
    unknown = set(kwargs) - _HANDLED
    if unknown:
        raise _Fallback(f"unhandled arguments {sorted(unknown)}")
    kw = dict(kwargs)
    for name in getattr(proc, "_valid_kwargs_names", ()):
        kw.setdefault(name, getattr(proc, name, None))
    kw = proc._standardize_kwargs(**kw)
    rt = kw.get("return_tensors")
    if str(getattr(rt, "value", rt)) != "pt":
        raise _Fallback(f"return_tensors={rt!r}")
    for flag in ("do_resize", "do_rescale", "do_pad", "do_convert_rgb"):
        if not kw.get(flag):
            raise _Fallback(f"{flag}={kw.get(flag)!r}")
    if not _is_bicubic(kw.get("resample")):
        raise _Fallback(f"resample={kw.get('resample')!r}")
    if abs(float(kw["rescale_factor"]) - 1 / 255) > 1e-12:
        raise _Fallback(f"rescale_factor={kw['rescale_factor']}")
    df = kw.get("data_format")
    if df is not None and str(getattr(df, "value", df)) != "channels_first":
        raise _Fallback(f"data_format={df!r}")
    tile = _tile_size(kw.get("size"), kw.get("crop_size"), kw.get("do_center_crop"))
    pins = kw.get("image_grid_pinpoints")
    if not pins or any(int(h) % tile or int(w) % tile for h, w in pins):
        raise _Fallback(f"grid pinpoints {pins} are not multiples of {tile}")
    if kw.get("do_normalize"):
        try:
            mean, std = _per_channel(kw["image_mean"], "image_mean"), _per_channel(kw["image_std"], "image_std")
        except (TypeError, ValueError) as e:
            raise _Fallback(str(e)) from None
        if 0.0 in std:
            raise _Fallback(f"image_std={std} has a zero (HF divides by it)")
    else:
        mean, std = [0.0] * 3, [1.0] * 3  # (x - 0) / 1 is exactly HF's rescale-only output
    idf = kw.get("input_data_format")
    idf = None if idf is None else str(getattr(idf, "value", idf))
    return {"tile": tile, "pins": [[int(h), int(w)] for h, w in pins], "mean": mean, "std": std,
            "input_data_format": idf, "device": kw.get("device")}


def _is_image(x) -> bool:
    return is_pil(x) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def _flatten(images, onevision: bool) -> tuple[list, list[int]]:
    """HF's flattening: one image, a list, a 4-D batch, or (OneVision) a list of per-sample lists."""
    if _is_image(images):
        return [images], [1]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), [1] * len(images)
    if not isinstance(images, (list, tuple)) or not images:
        raise _Fallback(f"unsupported images container {type(images).__name__}")
    if all(_is_image(x) for x in images):
        return list(images), [1] * len(images)
    if all(isinstance(x, (list, tuple)) for x in images):
        samples = [list(x) for x in images if len(x)] if onevision else [list(x) for x in images]
        flat = [im for s in samples for im in s]
        if not all(_is_image(x) for x in flat):
            raise _Fallback("nested images of an unsupported type")
        counts = [len(s) for s in samples]
        if onevision and any(n != 1 for n in counts):
            raise _Fallback("OneVision samples with several images are padded to squares, not tiled")
        return flat, counts
    raise _Fallback("unsupported images (URLs, mixed types)")


def _to_view(image, idf: str | None, index: int) -> torch.Tensor:
    if is_pil(image):  # HWC by construction: its layout is never inferred
        return pil_view(image)
    if image.dtype not in (np.uint8, torch.uint8):
        raise _Fallback(f"images[{index}] is {image.dtype}, not uint8")
    if isinstance(image, np.ndarray):
        image = from_numpy(image)
    if idf is not None and image.ndim == 3:  # an explicit layout overrides HF's inference
        if idf == "channels_first":
            image = image.permute(1, 2, 0)
        if image.shape[-1] not in (1, 3, 4):
            raise _Fallback(f"images[{index}] does not have 1, 3 or 4 channels")
        return image
    try:  # HF's inference (infer_channel_dimension_format with 1, 3 or 4 channels)
        return hwc_view(image, f"images[{index}]")
    except (TypeError, ValueError) as e:
        raise _Fallback(str(e)) from None


def _fast_preprocess(proc, images, kwargs: dict, backend: str, onevision: bool):
    from transformers.image_processing_utils import BatchFeature

    s = _resolve(proc, kwargs)
    flat, counts = _flatten(images, onevision)
    views = [_to_view(im, s["input_data_format"], i) for i, im in enumerate(flat)]
    if s["device"] is not None:
        views = [v.to(s["device"]) for v in views]
    if len({v.device for v in views}) > 1:
        raise _Fallback("images on several devices")
    out, tiles = tile_views(views, s["pins"], s["tile"], s["mean"], s["std"], pad_to_max=True, backend=backend)
    b, t = len(views), max(tiles)
    data = {
        "pixel_values": out.view(b, t, 3, s["tile"], s["tile"]),
        "image_sizes": torch.tensor([list(v.shape[:2]) for v in views], dtype=torch.int64),
    }
    if onevision:
        data["batch_num_images"] = torch.tensor(counts, dtype=torch.int64)
    return BatchFeature(data=data)


def _check_own_settings(proc) -> None:
    """Skip, with a warning saying why, a processor whose own settings always need HF's code (e.g.
    ``LlavaNextImageProcessor()``: 224 tiles of 336-multiple pinpoints, whose partial tiles HF
    resizes again): patched, it would run HF's code on every call while the report said "patched"."""
    try:
        _resolve(proc, {"return_tensors": "pt"})
    except _Fallback as why:
        reason = f"its settings need HF's code on every call: {why}"
        warnings.warn(f"vlmkernels.patch: {type(proc).__name__} not patched: {reason}", stacklevel=4)
        raise SkipPatch(reason) from None


def _build(proc, backend: str) -> dict:
    names = _class_names(proc)
    onevision = bool(names & set(ONEVISION_CLASSES))
    if not hasattr(proc, "_standardize_kwargs"):
        raise SkipPatch("transformers < 5: the processor has no _standardize_kwargs (v5 API)")
    _check_own_settings(proc)

    def preprocess(self, images, *args, **kwargs):
        original = type(self).preprocess
        if args:
            return original(self, images, *args, **kwargs)
        try:
            return _fast_preprocess(self, images, kwargs, backend, onevision)
        except _Fallback as why:
            log.debug("vlmkernels: %s.preprocess falls back to HF: %s", type(self).__name__, why)
            return original(self, images, **kwargs)

    preprocess.__doc__ = "vlmkernels anyres_tile fast path of HF preprocess (falls back when unsupported)."
    return {"preprocess": preprocess}


register_rule(PatchRule("anyres", "hf_image_processor", match=_match, build=_build))
