"""Claude's vision path, the design document's *speculated* pipeline. Anthropic has not published the
architecture: this is the document's guess (high-resolution document understanding via an encoder and a
projection into the language model), built from the same parts as the other references. It is not Claude.

    tiles = DocumentTiler(page)     # global thumbnail + a rows x cols grid of S x S tiles of the page,
                                    # aspect-preserving resize and zero padding (python_ref.ops.anyres_tile)
    feats = ViT(tiles) + embedding of each tile's slot (thumbnail or grid position)
    tokens = MLP(all tiles' tokens) -> LLM prefix
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import anyres_tile
from ..registry import Architecture, register_architecture
from ._doc_parts import CLIP_MEAN, CLIP_STD, TiledVLM, as_image_list, example_batch

TILE = {"tiny": 28, "small": 56, "base": 336}
GRID = {"tiny": (2, 1), "small": (2, 2), "base": (2, 2)}  # (rows, cols); base: 1 + 4 tiles x 576 tokens
EXAMPLE_HW = {"tiny": (61, 40), "small": (150, 110), "base": (1100, 850)}  # portrait pages (US letter ratio)


class DocumentTiler(nn.Module):
    """uint8 pages -> normalized tiles [B, 1 + rows*cols, 3, S, S]: the page squashed to S x S first, then
    the page resized keeping its aspect into a (rows*S, cols*S) canvas, zero-padded, row-major tiles."""

    def __init__(self, tile_size: int, grid=(2, 1), mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        rows, cols = grid
        if rows < 1 or cols < 1:
            raise ValueError(f"grid must be positive (rows, cols), got {grid}")
        self.tile_size, self.grid = int(tile_size), (int(rows), int(cols))
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def num_tiles(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    def forward(self, images) -> torch.Tensor:
        images = as_image_list(images)
        canvas = [[self.grid[0] * self.tile_size, self.grid[1] * self.tile_size]]
        tiles, _ = anyres_tile(images, canvas, self.tile_size, self.mean, self.std, global_view=True)
        return tiles.view(len(images), self.num_tiles, *tiles.shape[1:])


class Claude(TiledVLM):
    def __init__(self, size: str = "tiny", grid=None, **kw):
        tiler = DocumentTiler(TILE[size], grid or GRID[size])
        super().__init__(size, tiler, list(range(tiler.num_tiles)), **kw)
        self.image_size = TILE[size]


def build(size: str = "tiny", **overrides) -> Claude:
    return Claude(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    batch = example_batch(model, build, batch_size, seed, size, uint8=True, image_hw=EXAMPLE_HW[size])
    batch["images"] = batch.pop("pixel_values")
    return batch


register_architecture(Architecture(
    name="claude", builder=build, inputs=example_inputs, source="document",
    variants=("grid=(rows, cols) of high-res tiles + thumbnail",),
    description="speculative: page thumbnail + high-res document tiles (anyres_tile) -> CLIP ViT + slot "
                "embedding -> MLP -> Llama",
))
