"""GPT-4V, the design document's *speculated* pipeline. OpenAI has not published GPT-4V's architecture:
this is the document's guess (smart aspect-preserving preprocessing, multi-scale region encoding,
adaptive aggregation), built from the same parts as the other references. It is not GPT-4V.

    tiles = MultiScaleTiler(image)     # scale 1: the whole image, aspect-preserving resize + pad to S x S;
                                       # scale s: the image aspect-preserved into an sS x sS canvas, s*s region tiles
    feats = ViT(tiles) + scale embedding of each tile
    tokens = MLP(concat of all tiles' tokens) -> LLM prefix

The tiler is its own submodule (``model.tiler``) so that the AnyRes patch rule can swap it; it uses
``python_ref.ops.anyres_tile`` (PIL-exact bicubic, uint8 rounding, zero padding, row-major tiles).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import anyres_tile
from ..registry import Architecture, register_architecture
from ._doc_parts import CLIP_MEAN, CLIP_STD, TiledVLM, as_image_list, example_batch

TILE = {"tiny": 28, "small": 56, "base": 336}  # base: CLIP ViT-L/14-336 tiles, 576 tokens each
SCALES = (1, 2)                                 # 1 + 4 = 5 tiles per image
EXAMPLE_HW = {"tiny": (37, 53), "small": (75, 101), "base": (768, 1024)}  # deliberately non-square


class MultiScaleTiler(nn.Module):
    """uint8 images -> normalized tiles [B, sum(s*s), 3, S, S]: for each scale s (ascending), the image
    resized keeping its aspect into an (s*S)^2 canvas, zero-padded, cut into s*s row-major tiles."""

    def __init__(self, tile_size: int, scales: Sequence[int] = SCALES, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        if not scales or min(scales) < 1:
            raise ValueError(f"scales must be positive integers, got {scales}")
        self.tile_size, self.scales = int(tile_size), tuple(sorted(int(s) for s in scales))
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def num_tiles(self) -> int:
        return sum(s * s for s in self.scales)

    def forward(self, images) -> torch.Tensor:
        images = as_image_list(images)
        per_scale = []
        for s in self.scales:
            side = s * self.tile_size
            tiles, _ = anyres_tile(images, [[side, side]], self.tile_size, self.mean, self.std, global_view=False)
            per_scale.append(tiles.view(len(images), s * s, *tiles.shape[1:]))
        return torch.cat(per_scale, dim=1)


class GPT4V(TiledVLM):
    def __init__(self, size: str = "tiny", scales: Sequence[int] = SCALES, **kw):
        tiler = MultiScaleTiler(TILE[size], scales)
        kinds = [i for i, s in enumerate(tiler.scales) for _ in range(s * s)]
        super().__init__(size, tiler, kinds, **kw)
        self.image_size = TILE[size]


def build(size: str = "tiny", **overrides) -> GPT4V:
    return GPT4V(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    batch = example_batch(model, build, batch_size, seed, size, uint8=True, image_hw=EXAMPLE_HW[size])
    batch["images"] = batch.pop("pixel_values")
    return batch


register_architecture(Architecture(
    name="gpt4v", builder=build, inputs=example_inputs, source="document",
    variants=("scales=(1, 2)", "scales=(1, 2, 3)"),
    description="speculative: aspect-preserving multi-scale tiles (anyres_tile) -> CLIP ViT + scale embedding "
                "-> MLP -> Llama",
))
