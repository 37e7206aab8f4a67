"""Florence-VL, multi-granularity fusion of coarse, fine and semantic visual features.

    coarse   = vision_backbone(image)                    # DaViT stand-in at the base resolution
    fine     = pool2x(fine_encoder(image at 2x res))      # fine-grained detail, pooled to the same grid
    semantic = semantic_encoder(image)                    # a second tower (SigLIP) for semantics
    tokens   = MultiGranularityFusion(coarse, fine, semantic) -> LLM prefix

``fusion_variant="document"``: concat -> Linear -> LayerNorm -> GELU -> Linear (the document's
``unified_proj``). ``fusion_variant="dbfusion"``: the published DBFusion projector, concat -> 3-layer
GELU MLP with no LayerNorm (JiuhaiChen/Florence-VL ``mlp3x_gelu``; anchors/gated-fusion.md). Only the
projector is published: the three encoders are the document's, not Florence-2's DaViT features at
several depths and task prompts (4 x 1024 channels) that the published Florence-VL concatenates.
"""

from __future__ import annotations

from ..fusion import MultiGranularityFusion
from ..registry import Architecture, register_architecture
from ._doc_parts import DocVLM, check_pixels, example_batch, patch_tokens, resample_tokens, resize_images, vision_expert

# (image_size, patch_size): the fine encoder sees twice the resolution with the same patch size.
GEOMETRY = {"tiny": (28, 14), "small": (56, 14), "base": (336, 14)}  # base: 24x24 = 576 tokens x 1024 each


class FlorenceVL(DocVLM):
    PARTS = {"vision": ("vision_backbone.", "fine_encoder.", "semantic_encoder."),
             "fusion": ("multi_granularity_fusion.",), "llm": ("language_model.",)}

    def __init__(self, size: str = "tiny", fusion_variant: str = "document", llm_overrides=None):
        super().__init__(size, llm_overrides)
        img, p = GEOMETRY[size]
        self.image_size = img
        self.grid = img // p
        self.vision_backbone = vision_expert(size, "clip", image_size=img, patch_size=p)
        self.fine_encoder = vision_expert(size, "clip", image_size=2 * img, patch_size=p)
        self.semantic_encoder = vision_expert(size, "siglip", image_size=img, patch_size=p)
        dims = [m.config.hidden_size for m in (self.vision_backbone, self.fine_encoder, self.semantic_encoder)]
        self.multi_granularity_fusion = MultiGranularityFusion(dims, self.llm_hidden, variant=fusion_variant)

    def granularity_features(self, pixel_values):
        """(coarse, fine, semantic), each [B, grid*grid, D_i]."""
        check_pixels(pixel_values)
        x = resize_images(pixel_values, self.image_size)
        coarse = patch_tokens(self.vision_backbone, x)
        fine = resample_tokens(patch_tokens(self.fine_encoder, resize_images(pixel_values, 2 * self.image_size)),
                               self.grid)
        semantic = patch_tokens(self.semantic_encoder, x)
        return coarse, fine, semantic

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None):
        visual = self.multi_granularity_fusion(*self.granularity_features(pixel_values))
        return self.run_llm(visual, input_ids, attention_mask, labels)


def build(size: str = "tiny", **overrides) -> FlorenceVL:
    return FlorenceVL(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    return example_batch(model, build, batch_size, seed, size)


register_architecture(Architecture(
    name="florence_vl", builder=build, inputs=example_inputs, source="document",
    variants=("fusion_variant=document", "fusion_variant=dbfusion (the published projector only)"),
    description="The document's Florence-VL: coarse CLIP + fine CLIP (2x res, pooled) + semantic SigLIP -> "
                "MultiGranularityFusion -> Llama. The encoders are the document's stand-ins, not the "
                "published Florence-2 DaViT features; fusion_variant='dbfusion' swaps in only the published "
                "DBFusion projector.",
))
