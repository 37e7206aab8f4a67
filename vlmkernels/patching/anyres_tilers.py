"""Patch rules for python_ref's tilers of uint8 images (the document's GPT-4V and Claude sketches).

- ``MultiScaleTiler`` (``python_ref.models.gpt4v``): for each scale s, the image fit into an
  ``(s*S)^2`` canvas and cut into s*s tiles. The original calls the tiler once per scale; the patched
  forward tiles every (image, scale) pair in **one** ``anyres_tile`` call, by giving the op one plan
  row per pair (the same image view appears once per scale) whose output slots interleave as
  ``[B, sum(s*s), 3, S, S]``.
- ``DocumentTiler`` (``python_ref.models.claude``): the page squashed to S x S, then its
  ``grid`` canvas tiles; one ``anyres_tile`` call.

Both keep the original's input checks, output shape, dtype (float32) and values: the plans come
from the same LLaVA planner (a single pinpoint = the canvas), computed in plain Python from the
static image sizes, so the patched forwards also trace under ``torch.compile(fullgraph=True)``.

The models' vision path is left to the ``clip_vision_embeddings`` rule (``patch_embed``):
``anyres_encode`` would need the tower's encoder fed with precomputed embeddings, which HF's
``CLIPVisionModel.forward`` has no entry for, so it is not wired in here.
"""

from __future__ import annotations

import torch

from python_ref.ops.anyres import anyres_plan

from .. import library
from ..anyres.tile import OP, PLAN_COLS, RowRuns, _per_channel, hwc_view
from .core import PatchRule, SkipPatch, is_python_ref_class, register_rule, require_backend

FAMILY = "anyres"


def _tiles(images, canvases, tile: int, mean, std, global_view: bool, backend: str) -> torch.Tensor:
    """uint8 images -> float32 ``[B, T, 3, S, S]``: for each image, for each ``(h, w)`` canvas in
    order, [the global view if ``global_view``] + the canvas's row-major tiles. One op call."""
    views = [hwc_view(im, f"images[{i}]") for i, im in enumerate(images)]
    plans = [[anyres_plan(tuple(v.shape[:2]), [hw], tile) for hw in canvases] for v in views]
    per_image = sum(p.grid[0] * p.grid[1] + int(global_view) for p in plans[0]) if plans else 0
    rows, slot_views = [], []
    for b, (v, image_plans) in enumerate(zip(views, plans)):
        first = b * per_image
        parts = v.runs if isinstance(v, RowRuns) else (v,)
        for p in image_plans:
            left, top, _, _ = p.padding
            rows.append([p.resized_hw[0], p.resized_hw[1], top, left, p.grid[0], p.grid[1], first, len(parts)])
            slot_views.extend(parts)
            first += p.grid[0] * p.grid[1] + int(global_view)
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, PLAN_COLS)
    out = library.op(OP)(slot_views, table, len(views) * per_image, tile, _per_channel(mean, "mean"),
                         _per_channel(std, "std"), bool(global_view), torch.float32, backend)
    return out.view(len(views), per_image, 3, tile, tile)


def _build_multiscale(tiler, backend):
    require_backend(OP, backend)
    from python_ref.models._doc_parts import as_image_list  # the original's input rules and errors

    def forward(self, images) -> torch.Tensor:
        images = as_image_list(images)
        canvases = [(s * self.tile_size, s * self.tile_size) for s in self.scales]
        return _tiles(images, canvases, self.tile_size, self.mean, self.std, False, backend)

    return {"forward": forward}


def _build_document(tiler, backend):
    require_backend(OP, backend)
    from python_ref.models._doc_parts import as_image_list

    def forward(self, images) -> torch.Tensor:
        images = as_image_list(images)
        canvas = (self.grid[0] * self.tile_size, self.grid[1] * self.tile_size)
        return _tiles(images, [canvas], self.tile_size, self.mean, self.std, True, backend)

    return {"forward": forward}


register_rule(PatchRule(FAMILY, "python_ref_multiscale_tiler",
                        match=lambda o: is_python_ref_class(o, "MultiScaleTiler"), build=_build_multiscale))
register_rule(PatchRule(FAMILY, "python_ref_document_tiler", match=lambda o: is_python_ref_class(o, "DocumentTiler"),
                        build=_build_document))
