"""``anyres_encode``: uint8 images -> AnyRes tile patch embeddings without float tiles.

What it is, honestly: **two kernels with a uint8 intermediate**, not one fused kernel.

1. ``anyres_tile(..., out_dtype=torch.uint8)`` resizes, pads and cuts the tiles and writes them as
   the rounded uint8 bytes (exactly the values HF normalizes), ``[sum_tiles, 3, S, S]``.
2. ``patch_embed_uint8`` reads those bytes and normalizes each one on load through a per-channel
   256-entry table (``(x/255 - mean) / std``, HF's PIL-backend arithmetic), inside the patch GEMM.

So the float32 tiles (4 bytes per value) never exist; the only intermediate is the uint8 tile
tensor (1 byte per value, a quarter of the traffic). The result equals
``patch_embed(anyres_tile(..., out_dtype=torch.float32), ...)``: the table holds the very float32
values the float path would have stored.

``fused=True`` selects the one-kernel variant (``encode_fused.py``, Triton): the patch GEMM computes
every tile pixel straight from the source bytes, so no tiles at all are materialized. It is opt-in
(``fused=None`` means the two-kernel path) because it recomputes each pixel's bicubic taps
(``k_v * k_h`` gathers) for every D block of the GEMM, while the tiler does that once per pixel;
whether the saved uint8 round trip pays for that has not been measured on a GPU yet.
"""

from __future__ import annotations

import torch

from .embed import patch_embed_uint8
from .encode_fused import anyres_encode_fused
from .tile import anyres_tile

__all__ = ["anyres_encode"]

# backend of anyres_encode -> (backend of anyres_tile, backend of patch_embed_uint8)
_BACKENDS = {
    "auto": ("auto", "auto"),
    "reference": ("reference", "reference"),
    "cpu": ("cpu", "auto"),      # C++ tiler; the embedding's CPU path (reference GEMM)
    "cuda": ("cuda", "auto"),    # CUDA tiler; the embedding's CUDA path (triton)
    "triton": ("auto", "triton"),  # the only triton kernel here is the embedding
}


def _split_backend(backend) -> tuple[str, str]:
    try:
        return _BACKENDS[backend]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}") from None


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
    backend: str = "auto",
    fused: bool | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """uint8 images -> (``embeddings [sum_tiles, P(+1), D]``, ``tiles_per_image``).

    Same as ``patch_embed(anyres_tile(images, grid_pinpoints, tile_size, mean, std)[0], weight, bias,
    ...)`` (LLaVA-NeXT tiling: global view first, then row-major grid tiles), but the tiles are kept
    as uint8 and normalized inside the patch GEMM's load; see the module docstring (two kernels,
    uint8 intermediate).

    ``images``: as :func:`anyres_tile` (uint8, ``[H, W]``/``[C, H, W]``/``[H, W, C]``, any sizes),
    on ``weight``'s device. ``weight [D, 3, p, p]`` and the epilogue arguments are as
    :func:`patch_embed` (``position_embedding`` has ``(S//p)**2 (+1)`` rows). ``backend``: ``auto``,
    ``reference`` (both steps in python_ref), ``cpu``/``cuda`` (that tiler), ``triton`` (the triton
    embedding). Output dtype is ``weight.dtype``; gradients reach the weights, not the images.

    ``fused``: ``True`` runs the one-kernel tile-and-encode (``backend`` ``auto``/``triton``: the
    Triton kernel, one launch per batch, on CUDA tensors; ``auto`` on CPU tensors and ``reference``:
    PyTorch, slow, for checking); ``None`` (default) or ``False`` the
    two-kernel path above (see the module docstring for why the default is not fused yet).
    """
    if fused not in (None, True, False):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if fused:
        return anyres_encode_fused(images, grid_pinpoints, tile_size, mean, std, weight, bias,
                                   class_embedding=class_embedding, position_embedding=position_embedding,
                                   pre_layernorm=pre_layernorm, global_view=global_view, backend=backend)
    tile_backend, embed_backend = _split_backend(backend)
    if not torch.is_tensor(weight):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    listed = images if isinstance(images, (list, tuple)) else [images]
    for i, im in enumerate(listed):
        if torch.is_tensor(im) and im.device != weight.device:
            raise ValueError(f"images[{i}] is on {im.device} but weight is on {weight.device}")
    tiles, counts = anyres_tile(images, grid_pinpoints, tile_size, mean, std, global_view=global_view,
                                out_dtype=torch.uint8, backend=tile_backend)
    if tiles.device != weight.device:  # numpy images are tiled on the CPU
        raise ValueError(f"images are on {tiles.device} but weight is on {weight.device}")
    out = patch_embed_uint8(tiles, weight, bias, mean=mean, std=std, class_embedding=class_embedding,
                            position_embedding=position_embedding, pre_layernorm=pre_layernorm,
                            backend=embed_backend)
    return out, counts
