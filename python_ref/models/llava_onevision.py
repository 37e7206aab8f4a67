"""LLaVA-OneVision: SigLIP (last kept layer, all tokens) + 2-layer MLP projector + Qwen2, one model
for single images (AnyRes, ``anyres_max_9``), multi-image samples and video, exactly as HF
``LlavaOnevisionForConditionalGeneration`` (published) computes it.

- single image: AnyRes grid as LLaVA-NeXT; after unpadding, a grid larger than 9 tiles' worth of
  features is bilinearly shrunk; one ``image_newline`` per row; the base tile first.
- multi-image (a sample with >1 image): each image is padded to square and resized to one tile,
  no AnyRes: ``P + 1`` tokens per image (P = (S/14)^2).
- video: ``NUM_FRAMES = 16`` frames sampled uniformly with ``linspace(0, T-1, 16)`` (the document
  and the original LLaVA-OneVision loader), each tile's feature grid bilinearly pooled 2x, one
  newline per video: ``16 * ceil(sqrt(P)/2)^2 + 1`` tokens.
Example inputs use HF's own image and video processors on raw uint8 data.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from .. import components as C
from ..registry import Architecture, register_architecture
from ._hf_common import (check_config_keys, construct, placeholder_batch, pop_common,
                          random_image_sizes)
from .llava_next import grid_shape, random_images, unpadded_grid

NUM_FRAMES = 16
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
# llava-hf/llava-onevision-qwen2-7b-ov-hf
BASE_TEXT = dict(vocab_size=152128)
# SigLIP-so400m has 27 layers; LLaVA-NeXT's siglip_encoder.py deletes the last one (and the head) and
# reads the last hidden state, so the HF checkpoint's vision_config has 26 layers, read at -1.
BASE_VISION = dict(num_hidden_layers=26)
BASE_IMAGE_TOKEN, BASE_VIDEO_TOKEN = 151646, 151647
IMAGE_SIDES = {"tiny": (17, 120), "small": (60, 400), "base": (300, 1600)}
RAW_FRAMES = {"tiny": 37, "small": 48, "base": 64}  # frames of the raw example video, before sampling
MODES = ("single", "multi", "video")


def pinpoints_for(tile: int, size: str) -> list[list[int]]:
    n = 6  # published: 1..6 tiles each way (tiny tiles are 28 px, so this stays cheap)
    return [[tile * i, tile * j] for i in range(1, n + 1) for j in range(1, n + 1)]


def onevision_config(size: str, vision: Optional[dict] = None, text: Optional[dict] = None,
                     **overrides) -> LlavaOnevisionConfig:
    C.check_size(size)
    text = {**(BASE_TEXT if size == "base" else {}), **(text or {})}
    vision = {"vision_use_head": False, **(BASE_VISION if size == "base" else {}), **(vision or {})}
    vcfg = C.vision_config(size, "siglip", **vision)
    tcfg = C.llm_config(size, "qwen2", **text)
    if size == "base":
        image_token, video_token = BASE_IMAGE_TOKEN, BASE_VIDEO_TOKEN
    else:
        image_token, video_token = tcfg.vocab_size - 1, tcfg.vocab_size - 2
    kw = dict(image_token_index=image_token, video_token_index=video_token,
              image_grid_pinpoints=pinpoints_for(vcfg.image_size, size), projector_hidden_act="gelu",
              vision_feature_layer=-1, vision_feature_select_strategy="full",
              vision_aspect_ratio="anyres_max_9")
    kw.update(check_config_keys(LlavaOnevisionConfig, overrides, "llava_onevision"))
    return LlavaOnevisionConfig(vision_config=vcfg, text_config=tcfg, **kw)


def build(size: str = "tiny", **overrides):
    seed, attn, vision, text = pop_common(overrides)
    return construct(LlavaOnevisionForConditionalGeneration, onevision_config(size, vision, text, **overrides),
                     attn, seed)


def _side(config) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def image_token_count(config, orig_h: int, orig_w: int) -> int:
    """Placeholders for a single-image sample (AnyRes + anyres_max_N shrink + newlines)."""
    side = _side(config)
    gh, gw = grid_shape(orig_h, orig_w, config.image_grid_pinpoints, config.vision_config.image_size)
    rows, cols = unpadded_grid(orig_h, orig_w, gh * side, gw * side)
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_tiles * side * side))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * cols + rows


def multi_image_token_count(config) -> int:
    """Placeholders per image of a multi-image sample: one tile + one newline."""
    return _side(config) ** 2 + 1


def video_token_count(config, num_frames: int = NUM_FRAMES) -> int:
    """Placeholders per video: 2x-pooled tile grid per frame + one newline."""
    pooled = math.ceil(_side(config) / 2)
    return num_frames * pooled * pooled + 1


def sample_frames(video: torch.Tensor, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """``video[linspace(0, T-1, num_frames).long()]``: uniform frame sampling, first and last kept."""
    if video.dim() != 4:
        raise ValueError(f"video must be [T, C, H, W], got shape {tuple(video.shape)}")
    if video.size(0) < 1:
        raise ValueError("video has no frames")
    idx = torch.linspace(0, video.size(0) - 1, num_frames).long()
    return video[idx]


def _processor_kwargs(config) -> dict:
    tile = config.vision_config.image_size
    return dict(size={"height": tile, "width": tile}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)


def make_inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny", mode: str = "single",
                images_per_sample: int = 2, image_sizes: Optional[Sequence[tuple[int, int]]] = None) -> dict:
    """Example batch for ``mode`` in ``MODES``: ``"single"`` (one AnyRes image per sample),
    ``"multi"`` (``images_per_sample`` images per sample) or ``"video"`` (a raw video per sample,
    16 frames sampled by linspace)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = model.config if model is not None else onevision_config(size)
    gen = C.generator(seed)
    text_args = (C.TEXT_LEN[size], cfg.text_config.vocab_size)
    placeholder_kw = dict(pad_token_id=0, low=3)
    if mode == "video":
        from transformers import LlavaOnevisionVideoProcessor

        lo, hi = IMAGE_SIDES[size]
        h, w = random_image_sizes(gen, 1, lo, hi)[0]
        videos = [sample_frames(C.random_uint8_images(gen, RAW_FRAMES[size], 3, h, w)) for _ in range(batch_size)]
        proc = LlavaOnevisionVideoProcessor(**_processor_kwargs(cfg))
        pixel = proc(videos=videos, return_tensors="pt", do_sample_frames=False)["pixel_values_videos"]
        batch = placeholder_batch(gen, [[video_token_count(cfg)]] * batch_size, *text_args, cfg.video_token_id,
                                  **placeholder_kw)
        return {"pixel_values_videos": pixel, **batch}

    from transformers import LlavaOnevisionImageProcessor

    per = 1 if mode == "single" else images_per_sample
    if per < 2 and mode == "multi":
        raise ValueError(f"multi-image mode needs images_per_sample >= 2, got {per}")
    n = batch_size * per
    sizes = list(image_sizes) if image_sizes is not None else random_image_sizes(gen, n, *IMAGE_SIDES[size])
    if len(sizes) != n:
        raise ValueError(f"image_sizes must have {n} entries, got {len(sizes)}")
    images = random_images(gen, sizes)
    nested = [images[i * per:(i + 1) * per] for i in range(batch_size)]
    proc = LlavaOnevisionImageProcessor(image_grid_pinpoints=cfg.image_grid_pinpoints, **_processor_kwargs(cfg))
    processed = proc(images=nested if per > 1 else images, return_tensors="pt")
    if per == 1:
        counts = [[image_token_count(cfg, h, w)] for h, w in sizes]
    else:
        counts = [[multi_image_token_count(cfg)] * per for _ in range(batch_size)]
    batch = placeholder_batch(gen, counts, *text_args, cfg.image_token_id, **placeholder_kw)
    out = {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"], **batch}
    if per > 1:
        out["batch_num_images"] = torch.full((batch_size,), per, dtype=torch.long)
    return out


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    return make_inputs(model, batch_size, seed, size)


register_architecture(Architecture(
    name="llava_onevision", builder=build, inputs=inputs, source="published",
    variants=("single image (anyres_max_9)", "multi-image", "video (16 frames, linspace)"),
    description="HF LlavaOnevisionForConditionalGeneration: SigLIP (layer -1, full) -> MLP -> Qwen2; "
                "make_inputs(mode='single'|'multi'|'video') via HF's processors.",
))
