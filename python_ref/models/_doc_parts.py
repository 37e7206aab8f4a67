"""Shared scaffolding for the document-designed architectures (minigpt5, dynamic_qformer, leo,
florence_vl, dynamic_vision_selector, gpt4v, claude): a prefix-LM base class that declares which
parameters are vision / fusion / LLM (read by :mod:`python_ref.training`), vision-expert builders
and the example-batch helper.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import components as C

# CLIP's normalisation (openai/clip-vit-*), used by the tilers that take uint8 images.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DocVLM(nn.Module):
    """A vision front end + fusion module + HF decoder LLM (``language_model``), run as a prefix LM.

    ``PARTS`` maps each part (``vision``, ``fusion``, ``llm``) to parameter-name prefixes; every
    parameter must fall under exactly one of them (checked by ``python_ref.training.parts``).
    """

    PARTS: dict[str, tuple[str, ...]] = {}

    def __init__(self, size: str, llm_overrides: Optional[dict] = None):
        super().__init__()
        self.size = C.check_size(size)
        self.language_model = C.build_llm(size, "llama", **(llm_overrides or {}))

    @property
    def llm_hidden(self) -> int:
        return self.language_model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.language_model.config.vocab_size

    def run_llm(self, visual_embeds, input_ids, attention_mask=None, labels=None, extras=None, aux_loss=None):
        return C.prefix_lm_forward(self.language_model, visual_embeds, input_ids, attention_mask, labels,
                                   aux_loss=aux_loss, extras=extras)


def vision_expert(size: str, kind: str = "clip", **overrides) -> nn.Module:
    """A CLIP/SigLIP tower from the preset at ``size`` with geometry overrides (image_size, patch_size, ...)."""
    if kind == "clip" and size != "base":
        overrides.setdefault("attention_dropout", 0.0)
    return C.build_vision_tower(size, kind, **overrides)


def patch_tokens(tower: nn.Module, pixel_values: torch.Tensor, keep_cls: bool = False) -> torch.Tensor:
    """Last hidden state of a CLIP/SigLIP tower; CLIP's CLS token dropped unless ``keep_cls``."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")
    feats = tower(pixel_values=pixel_values).last_hidden_state
    has_cls = isinstance(tower, C.CLIPVisionModel)
    return feats[:, 1:] if has_cls and not keep_cls else feats


def resize_images(pixel_values: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of normalized images to a square ``image_size`` (identity when it already is)."""
    if tuple(pixel_values.shape[-2:]) == (image_size, image_size):
        return pixel_values
    return F.interpolate(pixel_values, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True)


def resample_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, g*g, D] patch tokens -> [B, grid*grid, D] by bilinear interpolation of the square patch map
    (how Eagle aligns towers with different token counts before mixing them)."""
    b, n, d = tokens.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"expected a square patch grid, got {n} tokens")
    if side == grid:
        return tokens
    fmap = tokens.transpose(1, 2).reshape(b, d, side, side)
    fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False, antialias=side > grid)
    return fmap.flatten(2).transpose(1, 2)


def check_pixels(pixel_values: torch.Tensor, name: str = "pixel_values") -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"{name} must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name} must be floating point (normalized), got {pixel_values.dtype}")


def example_batch(model: Optional[DocVLM], builder, batch_size: int, seed: int, size: str, *,
                  image_size: Optional[int] = None, uint8: bool = False, image_hw=None) -> dict:
    """Seeded ``pixel_values``/``input_ids``/``attention_mask``/``labels`` matching ``model`` (or a
    meta-device default build). ``image_hw`` gives a non-square (H, W) image."""
    ref = C.config_of(model, size, builder)
    image_size = image_size or getattr(ref, "image_size")
    batch = C.make_example_batch(batch_size, seed, image_size=image_size, vocab_size=ref.vocab_size,
                                 text_len=C.TEXT_LEN[size], uint8=uint8)
    if image_hw is not None:
        gen = C.generator(seed + 1)
        shape = (batch_size, 3, *image_hw)
        batch["pixel_values"] = (C.random_uint8_images(gen, *shape) if uint8
                                 else C.random_pixel_values(gen, *shape))
    return batch


class TiledVLM(DocVLM):
    """uint8 images -> ``tiler`` (its own submodule, so ``patch()`` can swap it) -> one shared vision tower
    over every tile -> per-tile-kind embedding -> MLP projector -> LLM prefix."""

    PARTS = {"vision": ("vision_tower.",), "fusion": ("tile_embeddings", "projection."), "llm": ("language_model.",)}

    def __init__(self, size: str, tiler: nn.Module, tile_kinds: list[int], vision_overrides=None,
                 llm_overrides=None):
        super().__init__(size, llm_overrides)
        self.tiler = tiler
        self.vision_tower = vision_expert(size, "clip", image_size=tiler.tile_size, **(vision_overrides or {}))
        d = self.vision_tower.config.hidden_size
        # [T] kind id of each tile slot (a scale, or a grid position)
        self.register_buffer("tile_kinds", torch.tensor(tile_kinds, dtype=torch.long), persistent=False)
        self.tile_embeddings = nn.Parameter(torch.randn(max(tile_kinds) + 1, d) * 0.02)
        self.projection = nn.Sequential(nn.Linear(d, self.llm_hidden), nn.GELU(), nn.Linear(self.llm_hidden, self.llm_hidden))

    @property
    def tiles_per_image(self) -> int:
        return self.tile_kinds.numel()

    def encode_images(self, images) -> torch.Tensor:
        tiles = self.tiler(images)                                    # [B, T, 3, S, S] normalized
        b, t = tiles.shape[:2]
        feats = patch_tokens(self.vision_tower, tiles.flatten(0, 1).to(self.tile_embeddings.dtype))
        feats = feats.view(b, t, feats.shape[1], -1) + self.tile_embeddings[self.tile_kinds][None, :, None]
        return self.projection(feats.flatten(1, 2))                   # [B, T * P, H]

    def forward(self, images, input_ids, attention_mask=None, labels=None):
        return self.run_llm(self.encode_images(images), input_ids, attention_mask, labels)


def as_image_list(images) -> list:
    """uint8 [B, 3, H, W] or a list of uint8 [3, H, W] (any sizes) -> list of images."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be uint8 [B, 3, H, W] or a list of [3, H, W], got {tuple(images.shape)}")
        images = list(images.unbind(0))
    if not images:
        raise ValueError("images is empty")
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8:
            raise TypeError(f"images[{i}] must be a uint8 tensor (raw pixels; the tiler normalizes)")
    return images
