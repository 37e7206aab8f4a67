"""LEO, mixture of vision encoders.

``variant="document"`` (the design document's LEO): N vision experts at different resolutions and patch
sizes (tiny stand-ins for the high-res / OCR / depth / CLIP encoders, in that order), each expert's patch
map resampled to the CLIP expert's grid, then

    w = ExpertRouter(cat_i mean_tokens(feat_i))       # [B, E]: MLP -> fp32 softmax (per sample)
    w = one_hot(image_type) where image_type is given  # the document's explicit override
    fused = ExpertMix([expert_proj_i(feat_i)], w)       # sum_i w_i * Linear_i(feat_i)
    tokens = project_to_llm(fused) -> LLM prefix

``top_k`` keeps the top-k experts per sample and renormalises (MoVA). The router-with-softmax pattern is
MoVA's; the published LEO has no router (anchors/gated-fusion.md).

``variant="published"`` (Mozhgan91/LEO): two encoders (InternViT-like on 448 px, SAM-like on 1024 px
with a 256-channel neck), pixel-unshuffle of each patch map to the same token count, one MLP adapter
per encoder (LayerNorm -> Linear -> GELU -> Linear) and the two token streams interleaved along the
sequence (encoder 1 at even positions, encoder 2 at odd positions). Images are tiled dynamically as the
LEO repository does (``--max_dynamic_patch 6``: InternVL's ``dynamic_preprocess`` with a thumbnail):
:func:`tile_images` plans the grid with ``python_ref.ops.anyres.anyres_plan(strategy="internvl")``
(the grid of at most 6 tiles closest to the image's aspect ratio), cuts the Pillow-bicubic-resized
image into row-major tiles and appends the whole image as a thumbnail when there is more than one
tile. ``forward(pixel_values=tiles, num_tiles=[n_b], ...)`` encodes every tile and gives sample b the
tokens of its ``n_b`` tiles in order (``n_b * 2 * 256`` tokens at base); without ``num_tiles`` each
``pixel_values`` row is one single-tile image.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import components as C
from ..fusion import ExpertMix, ExpertRouter
from ..ops.anyres import anyres_plan, image_to_rgb_chw, normalize_u8, resize_bicubic_u8, tiles_from_plan
from ..registry import Architecture, register_architecture
from ._doc_parts import (DocVLM, as_image_list, check_pixels, example_batch, patch_tokens, resample_tokens,
                         resize_images, vision_expert)

EXPERT_NAMES = ("high_res", "ocr", "depth", "clip")

# (image_size, patch_size) per expert; the fused grid is the "clip" expert's (24x24 = 576 tokens at base).
DOC_EXPERTS = {
    "tiny": {"high_res": (56, 14), "ocr": (28, 7), "depth": (28, 14), "clip": (28, 14)},
    "small": {"high_res": (112, 14), "ocr": (64, 16), "depth": (56, 14), "clip": (56, 14)},
    # CLIP-L/14 at 672 (48x48), an OCR ViT-L/16 at 448 (28x28), DPT-style ViT-L/16 at 384, CLIP-L/14-336
    "base": {"high_res": (672, 14), "ocr": (448, 16), "depth": (384, 16), "clip": (336, 14)},
}
ROUTER_HIDDEN = {"tiny": 32, "small": 64, "base": 1024}

# published LEO: (image_size, patch_size, unshuffle factor) per encoder, and the SAM-like neck width
PUB_ENCODERS = {
    "tiny": {"enc1": (28, 7, 2), "enc2": (56, 14, 2), "neck": 16},
    "small": {"enc1": (56, 7, 2), "enc2": (112, 14, 2), "neck": 32},
    # InternViT-300M-448px: 32x32 -> unshuffle 2 -> 256 x 4096; SAM-L 1024 px /16 = 64x64x256 -> unshuffle 4 -> 256 x 4096
    "base": {"enc1": (448, 14, 2), "enc2": (1024, 16, 4), "neck": 256},
}
MAX_TILES = 6  # Mozhgan91/LEO training scripts: --max_dynamic_patch 6
# InternVL's build_transform (LEO's image loader): ImageNet mean and std
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RAW_SIDES = {"tiny": (17, 120), "small": (40, 300), "base": (300, 1600)}  # raw example images, per size


def tile_images(images, tile: int, max_tiles: int = MAX_TILES) -> tuple[torch.Tensor, list[int]]:
    """uint8 images (a [B, 3, H, W] tensor or a list of [3, H, W] of any sizes) -> (normalized tiles
    [sum(num_tiles), 3, tile, tile], num_tiles per image): InternVL's ``dynamic_preprocess`` with
    ``use_thumbnail=True`` (row-major grid tiles, then the thumbnail), as LEO loads images."""
    tiles, counts = [], []
    for i, image in enumerate(as_image_list(images)):
        rgb = image_to_rgb_chw(image, name=f"images[{i}]")
        plan = anyres_plan(tuple(rgb.shape[1:]), None, tile, strategy="internvl", max_tiles=max_tiles,
                           use_thumbnail=True)
        mine = tiles_from_plan(rgb, plan.resized_hw, (0, 0), plan.grid, tile, global_view=False)
        if plan.num_tiles > len(mine):  # InternVL puts the thumbnail last
            mine.append(resize_bicubic_u8(rgb, tile, tile))
        tiles += mine
        counts.append(len(mine))
    return normalize_u8(torch.stack(tiles), IMAGENET_MEAN, IMAGENET_STD), counts


def pixel_unshuffle_tokens(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, g*g, C] -> [B, (g/f)^2, C*f*f]: space-to-depth on the square patch map."""
    b, n, c = tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n or g % factor:
        raise ValueError(f"cannot unshuffle {n} tokens (grid {g}) by {factor}")
    fmap = tokens.transpose(1, 2).reshape(b, c, g, g)
    return F.pixel_unshuffle(fmap, factor).flatten(2).transpose(1, 2)


def split_tiles(tokens: torch.Tensor, num_tiles):
    """The published encoder's return: ``(tokens [tiles, n, H], {})`` without ``num_tiles``, else each image's
    tiles' tokens flattened (``num_tiles[i]`` tiles for image ``i``) and ``{"num_tiles": counts}``."""
    if num_tiles is None:
        return tokens, {}
    counts = [int(n) for n in num_tiles]
    if any(n < 1 for n in counts) or sum(counts) != tokens.size(0):
        raise ValueError(f"num_tiles must be positive and sum to the {tokens.size(0)} tiles of pixel_values, "
                         f"got {counts}")
    return [t.flatten(0, 1) for t in tokens.split(counts)], {"num_tiles": counts}


def _adapter(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class LEO(DocVLM):
    def __init__(self, size: str = "tiny", variant: str = "document", top_k: Optional[int] = None,
                 experts: Optional[dict] = None, llm_overrides=None):
        super().__init__(size, llm_overrides)
        if variant not in ("document", "published"):
            raise ValueError(f"variant must be 'document' or 'published', got {variant!r}")
        if variant == "published" and top_k is not None:
            raise ValueError("top_k applies to the routed (document) variant only")
        self.variant = variant
        if variant == "document":
            self._build_document(size, top_k, experts or DOC_EXPERTS[size])
        else:
            self._build_published(size, experts or PUB_ENCODERS[size])

    # --- document variant ---------------------------------------------------------------------
    def _build_document(self, size, top_k, geometry):
        self.expert_names = tuple(geometry)
        self.vision_experts = nn.ModuleDict({
            name: vision_expert(size, "clip", image_size=img, patch_size=p) for name, (img, p) in geometry.items()})
        dims = [e.config.hidden_size for e in self.vision_experts.values()]
        ref = self.vision_experts["clip"] if "clip" in geometry else next(iter(self.vision_experts.values()))
        self.grid = ref.config.image_size // ref.config.patch_size
        self.image_size = max(img for img, _ in geometry.values())
        out_dim = dims[-1]
        self.router = ExpertRouter(sum(dims), len(dims), hidden=ROUTER_HIDDEN[size], top_k=top_k)
        self.expert_proj = nn.ModuleList(nn.Linear(d, out_dim) for d in dims)
        self.mix = ExpertMix()
        self.project_to_llm = nn.Sequential(nn.Linear(out_dim, self.llm_hidden), nn.GELU(),
                                            nn.Linear(self.llm_hidden, self.llm_hidden))
        self.PARTS = {"vision": ("vision_experts.",), "fusion": ("router.", "expert_proj.", "project_to_llm."),
                      "llm": ("language_model.",)}

    def expert_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Each expert on the image at its own resolution, patch maps resampled to the common grid."""
        feats = []
        for enc in self.vision_experts.values():
            x = resize_images(pixel_values, enc.config.image_size)
            feats.append(resample_tokens(patch_tokens(enc, x), self.grid))
        return feats

    def image_type_ids(self, image_type, batch: int, device) -> Optional[torch.Tensor]:
        """``image_type`` as an expert name (whole batch), an int, or int64 [B] (-1 = route) -> int64 [B]."""
        if image_type is None:
            return None
        if isinstance(image_type, str):
            if image_type not in self.expert_names:
                raise ValueError(f"image_type must be one of {self.expert_names}, got {image_type!r}")
            image_type = self.expert_names.index(image_type)
        if isinstance(image_type, int):
            return torch.full((batch,), image_type, dtype=torch.long, device=device)
        return image_type

    def _encode_document(self, pixel_values, image_type):
        feats = self.expert_features(pixel_values)
        pooled = torch.cat([f.mean(dim=1) for f in feats], dim=-1)
        weights = self.router(pooled, self.image_type_ids(image_type, pixel_values.shape[0], pixel_values.device))
        fused = self.mix([proj(f) for proj, f in zip(self.expert_proj, feats)], weights)
        return self.project_to_llm(fused), {"router_weights": weights}

    # --- published variant --------------------------------------------------------------------
    def _build_published(self, size, geometry):
        (i1, p1, f1), (i2, p2, f2) = geometry["enc1"], geometry["enc2"]
        self.unshuffle = (f1, f2)
        self.image_size = max(i1, i2)
        self.vision_experts = nn.ModuleDict({
            "enc1": vision_expert(size, "clip", image_size=i1, patch_size=p1),
            "enc2": vision_expert(size, "clip", image_size=i2, patch_size=p2)})
        if (i1 // p1) // f1 != (i2 // p2) // f2:
            raise ValueError("both encoders must give the same token count after unshuffling")
        d1 = self.vision_experts["enc1"].config.hidden_size
        self.neck = nn.Linear(self.vision_experts["enc2"].config.hidden_size, geometry["neck"])  # SAM's 256-ch neck
        self.adapters = nn.ModuleList([_adapter(d1 * f1 * f1, self.llm_hidden),
                                       _adapter(geometry["neck"] * f2 * f2, self.llm_hidden)])
        self.PARTS = {"vision": ("vision_experts.", "neck."), "fusion": ("adapters.",), "llm": ("language_model.",)}

    @property
    def tile_size(self) -> int:
        """The side of one dynamic tile: encoder 1's input (448 px at base)."""
        return self.vision_experts["enc1"].config.image_size

    def _encode_published(self, pixel_values, num_tiles):
        e1, e2 = self.vision_experts["enc1"], self.vision_experts["enc2"]
        t1 = patch_tokens(e1, resize_images(pixel_values, e1.config.image_size))
        t2 = self.neck(patch_tokens(e2, resize_images(pixel_values, e2.config.image_size)))
        a = self.adapters[0](pixel_unshuffle_tokens(t1, self.unshuffle[0]))
        b = self.adapters[1](pixel_unshuffle_tokens(t2, self.unshuffle[1]))
        # token interleave: encoder 1 at even positions, encoder 2 at odd positions
        tokens = torch.stack([a, b], dim=2).flatten(1, 2)             # [tiles, 2 * n, H]
        return split_tiles(tokens, num_tiles)

    def encode_images(self, pixel_values, image_type=None, num_tiles=None):
        check_pixels(pixel_values)
        if self.variant == "published":
            if image_type is not None:
                raise ValueError("image_type routing exists only in the document variant")
            return self._encode_published(pixel_values, num_tiles)
        if num_tiles is not None:
            raise ValueError("num_tiles (dynamic tiling) exists only in the published variant")
        return self._encode_document(pixel_values, image_type)

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None,
                image_type: Union[None, str, int, torch.Tensor] = None, num_tiles=None):
        visual, extras = self.encode_images(pixel_values, image_type, num_tiles)
        if isinstance(visual, list) and len(visual) != input_ids.size(0):
            raise ValueError(f"num_tiles describes {len(visual)} images for a batch of {input_ids.size(0)}")
        return self.run_llm(visual, input_ids, attention_mask, labels, extras=extras)


def build(size: str = "tiny", **overrides) -> LEO:
    return LEO(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    """The document variant: one normalized image per sample. The published variant: raw images of
    varied sizes through :func:`tile_images` (``pixel_values`` = the tiles, plus ``num_tiles``)."""
    batch = example_batch(model, build, batch_size, seed, size)
    if model is None or model.variant != "published":
        return batch
    gen = C.generator(seed + 1)
    lo, hi = RAW_SIDES[size]
    sides = torch.randint(lo, hi + 1, (batch_size, 2), generator=gen).tolist()
    images = [C.random_uint8_images(gen, 3, h, w) for h, w in sides]
    batch["pixel_values"], batch["num_tiles"] = tile_images(images, model.tile_size)
    return batch


register_architecture(Architecture(
    name="leo", builder=build, inputs=example_inputs, source="document",
    variants=("variant=document", "variant=document,top_k=2", "variant=published (Mozhgan91/LEO)"),
    description="The document's LEO: 4 ViT experts (high-res/OCR/depth/CLIP) -> ExpertRouter (+image_type "
                "override) -> ExpertMix of per-expert Linear -> MLP -> Llama. The router is the document's "
                "invention (MoVA's pattern), not in the published LEO; variant='published' builds LEO as "
                "released: 2 encoders, one MLP adapter each, tokens interleaved.",
))
