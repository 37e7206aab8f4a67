"""LLaVA-NeXT (LLaVA-1.6): AnyRes tiling + CLIP + 2-layer MLP projector + Llama, exactly as HF
``LlavaNextForConditionalGeneration`` (published) computes it.

Per image: the best grid from ``image_grid_pinpoints`` is chosen, the image is resized
(aspect-preserving), padded and cut into tiles; the global view (squashed to one tile) comes
first. Features of the grid tiles are unpadded and one ``image_newline`` is appended per row. So
an image contributes ``P + rows*cols + rows`` tokens (P = (S/14)^2 for tile size S) instead of the
document's fixed ``5 x P`` (global + 2x2). Example inputs go through HF's own
``LlavaNextImageProcessor`` on raw uint8 images, so ``pixel_values``/``image_sizes`` and the
placeholder counts match the published pipeline.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from .. import components as C
from ..ops.anyres_embed import unpad_hw
from ..registry import Architecture, register_architecture
from ._hf_common import (check_config_keys, construct, placeholder_batch, pop_common,
                          random_image_sizes)

# llava-hf/llava-v1.6-vicuna-7b-hf
BASE_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
BASE_TEXT = dict(vocab_size=32064, pad_token_id=32001)
BASE_IMAGE_TOKEN = 32000
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# raw image sides used by the example inputs, per size
IMAGE_SIDES = {"tiny": (17, 90), "small": (60, 260), "base": (300, 1100)}


def pinpoints_for(tile: int, size: str) -> list[list[int]]:
    if size == "base":
        return [[h * tile // 336, w * tile // 336] for h, w in BASE_PINPOINTS]
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]


def next_config(size: str, vision: Optional[dict] = None, text: Optional[dict] = None,
                **overrides) -> LlavaNextConfig:
    C.check_size(size)
    text = {**(BASE_TEXT if size == "base" else {}), **(text or {})}
    vcfg = C.vision_config(size, "clip", **(vision or {}))
    tcfg = C.llm_config(size, "llama", **text)
    kw = dict(image_token_index=BASE_IMAGE_TOKEN if size == "base" else tcfg.vocab_size - 1,
              image_grid_pinpoints=pinpoints_for(vcfg.image_size, size), projector_hidden_act="gelu",
              vision_feature_layer=-2, vision_feature_select_strategy="default",
              image_seq_length=C.num_patches(vcfg))
    kw.update(check_config_keys(LlavaNextConfig, overrides, "llava_next"))
    return LlavaNextConfig(vision_config=vcfg, text_config=tcfg, **kw)


def build(size: str = "tiny", **overrides):
    seed, attn, vision, text = pop_common(overrides)
    return construct(LlavaNextForConditionalGeneration, next_config(size, vision, text, **overrides), attn, seed)


def unpadded_grid(orig_h: int, orig_w: int, rows: int, cols: int) -> tuple[int, int]:
    """(rows, cols) of the feature grid kept by HF ``unpad_image`` for an ``orig_h x orig_w`` image
    whose padded feature grid is ``rows x cols`` (symmetric crop of the padding)."""
    _, kept_rows, _, kept_cols = unpad_hw((orig_h, orig_w), (rows, cols))
    return kept_rows, kept_cols


def grid_shape(orig_h: int, orig_w: int, pinpoints, tile: int) -> tuple[int, int]:
    """Tiles (down, across) of the best AnyRes grid for the image."""
    best_h, best_w = select_best_resolution((orig_h, orig_w), pinpoints)
    return best_h // tile, best_w // tile


def image_token_count(config, orig_h: int, orig_w: int) -> int:
    """Placeholders HF needs for one image: base tile + unpadded grid + one newline per row."""
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    side = tile // patch
    gh, gw = grid_shape(orig_h, orig_w, config.image_grid_pinpoints, tile)
    rows, cols = unpadded_grid(orig_h, orig_w, gh * side, gw * side)
    base = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    return base + rows * cols + rows


def image_processor(config):
    from transformers import LlavaNextImageProcessor

    tile = config.vision_config.image_size
    return LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                   image_grid_pinpoints=config.image_grid_pinpoints,
                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)


def random_images(gen: torch.Generator, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    return [C.random_uint8_images(gen, 3, h, w) for h, w in sizes]


def make_inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny", images_per_sample: int = 1,
                image_sizes: Optional[Sequence[tuple[int, int]]] = None) -> dict:
    """Raw uint8 images of varied sizes -> HF processor -> ``pixel_values`` [N_img, max_tiles, 3, S, S],
    ``image_sizes`` [N_img, 2]; ``input_ids`` hold ``image_token_count`` placeholders per image
    (images of a sample are consecutive, in batch order)."""
    cfg = model.config if model is not None else next_config(size)
    gen = C.generator(seed)
    n = batch_size * images_per_sample
    sizes = list(image_sizes) if image_sizes is not None else random_image_sizes(gen, n, *IMAGE_SIDES[size])
    if len(sizes) != n:
        raise ValueError(f"image_sizes must have batch_size*images_per_sample={n} entries, got {len(sizes)}")
    processed = image_processor(cfg)(images=random_images(gen, sizes), return_tensors="pt")
    counts = [image_token_count(cfg, h, w) for h, w in sizes]
    per_sample = [counts[i * images_per_sample:(i + 1) * images_per_sample] for i in range(batch_size)]
    batch = placeholder_batch(gen, per_sample, C.TEXT_LEN[size], cfg.text_config.vocab_size,
                              cfg.image_token_id, pad_token_id=cfg.text_config.pad_token_id or 0)
    return {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"], **batch}


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    return make_inputs(model, batch_size, seed, size)


register_architecture(Architecture(
    name="llava_next", builder=build, inputs=inputs, source="published",
    variants=("single image", "multi-image (make_inputs(images_per_sample=k))"),
    description="HF LlavaNextForConditionalGeneration: AnyRes grid (global view first, unpad, "
                "image_newline per row), CLIP layer -2, MLP projector, Llama; inputs via HF's processor.",
))
