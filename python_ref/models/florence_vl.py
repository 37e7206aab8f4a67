"""Florence-VL, multi-granularity fusion of coarse, fine and semantic visual features.

    coarse   = vision_backbone(image)                    # DaViT stand-in at the base resolution
    fine     = pool2x(fine_encoder(image at 2x res))      # fine-grained detail, pooled to the same grid
    semantic = semantic_encoder(image)                    # a second tower (SigLIP) for semantics
    tokens   = MultiGranularityFusion(coarse, fine, semantic) -> LLM prefix

``fusion_variant="document"``: concat -> Linear -> LayerNorm -> GELU -> Linear (the document's
``unified_proj``). ``fusion_variant="dbfusion"``: the published DBFusion projector, concat -> 3-layer
GELU MLP with no LayerNorm (JiuhaiChen/Florence-VL ``mlp3x_gelu``; anchors/gated-fusion.md). Only the
projector is published there: the three encoders are the document's.

``variant="published"``: Florence-VL as released (Chen et al. 2024, "Florence-VL", Sec. 3; anchors/
gated-fusion.md) on transformers' Florence-2 (large at base: DaViT [256, 512, 1024, 2048], BART-large
encoder, 768 px -> 24 x 24 + 1 = 577 tokens x 1024). Depth-breadth fusion: the DaViT features after
Florence-2's projection ("depth": the lower level) and the Florence-2 encoder's outputs at the image
positions under three task prompts ("breadth": detailed caption, OCR, grounding), concatenated
channel-wise (4 x 1024) -> DBFusion MLP -> LLM. The prompts arrive as ``task_prompt_ids``, tokenized
by Florence-2's processor (python_ref has no tokenizer files): three 1-D id tensors. The BART decoder is
not used and not built.
"""

from __future__ import annotations

import torch
from transformers import Florence2Config
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import Florence2MultiModalProjector, Florence2VisionBackbone

from .. import components as C
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


# Florence-2 configs: microsoft/Florence-2-large at base (config.json vision_config / text_config)
FLORENCE2_VISION = {
    "tiny": dict(embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2], depths=[1, 1, 1, 1],
                 window_size=2, projection_dim=32, drop_path_rate=0.0),
    "small": dict(embed_dim=[16, 32, 64, 128], num_heads=[1, 2, 4, 4], num_groups=[1, 2, 4, 4],
                  depths=[1, 1, 2, 1], window_size=4, projection_dim=128, drop_path_rate=0.0),
    "base": dict(embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64], num_groups=[8, 16, 32, 64],
                 depths=[1, 1, 9, 1], window_size=12, projection_dim=1024),
}
FLORENCE2_TEXT = {
    "tiny": dict(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "small": dict(vocab_size=512, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=256,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    # BART-large
    "base": dict(vocab_size=51289, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                 max_position_embeddings=1024),
}
FLORENCE2_IMAGE = {"tiny": 64, "small": 128, "base": 768}  # DaViT downsamples 32x: 2x2, 4x4, 24x24 grids
NUM_TASK_PROMPTS = 3  # detailed caption, OCR, grounding
PROMPT_LENS = {"tiny": (5, 4, 6), "small": (9, 8, 10), "base": (12, 8, 11)}  # example prompt lengths


def florence2_config(size: str) -> Florence2Config:
    text = FLORENCE2_TEXT[C.check_size(size)]
    return Florence2Config(vision_config=FLORENCE2_VISION[size], text_config=text,
                           image_token_id=text["vocab_size"] - 1)


class FlorenceVLPublished(DocVLM):
    PARTS = {"vision": ("vision_tower.", "multi_modal_projector.", "encoder."),
             "fusion": ("multi_granularity_fusion.",), "llm": ("language_model.",)}

    def __init__(self, size: str = "tiny", llm_overrides=None):
        super().__init__(size, llm_overrides)
        self.florence_config = cfg = florence2_config(size)
        self.image_size = FLORENCE2_IMAGE[size]
        # the parts of transformers' Florence2Model that Florence-VL runs, under the same names
        self.vision_tower = Florence2VisionBackbone(cfg.vision_config)
        self.multi_modal_projector = Florence2MultiModalProjector(cfg)
        self.encoder = BartEncoder(cfg.text_config)
        d = cfg.vision_config.projection_dim
        self.multi_granularity_fusion = MultiGranularityFusion([d] * (1 + NUM_TASK_PROMPTS), self.llm_hidden,
                                                               variant="dbfusion")

    def florence_features(self, pixel_values, task_prompt_ids) -> list[torch.Tensor]:
        """[image features, encoder outputs at the image positions under each prompt], each [B, N, d]."""
        check_pixels(pixel_values)
        if len(task_prompt_ids) != NUM_TASK_PROMPTS or any(p.dim() != 1 for p in task_prompt_ids):
            raise ValueError(f"task_prompt_ids must be {NUM_TASK_PROMPTS} 1-D token id tensors (caption, OCR, "
                             f"grounding), got {[tuple(p.shape) for p in task_prompt_ids]}")
        image = self.multi_modal_projector(self.vision_tower(pixel_values).last_hidden_state)
        b, n = image.shape[:2]
        feats = [image]
        for ids in task_prompt_ids:
            prompt = self.encoder.embed_tokens(ids.expand(b, -1))
            encoded = self.encoder(inputs_embeds=torch.cat([image.to(prompt.dtype), prompt], dim=1))
            feats.append(encoded.last_hidden_state[:, :n])
        return feats

    def forward(self, pixel_values, input_ids, task_prompt_ids, attention_mask=None, labels=None):
        visual = self.multi_granularity_fusion(*self.florence_features(pixel_values, task_prompt_ids))
        return self.run_llm(visual, input_ids, attention_mask, labels)


VARIANTS = ("document", "published")


def build(size: str = "tiny", **overrides):
    variant = overrides.pop("variant", "document")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "published":
        return FlorenceVLPublished(size, **overrides)
    return FlorenceVL(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    """Normalized images and text; the published variant adds three task prompts of random Florence-2
    token ids (the image placeholder id excluded)."""
    batch = example_batch(model, build, batch_size, seed, size)
    if isinstance(model, FlorenceVLPublished):
        gen = C.generator(seed + 2)
        vocab, image_token = model.florence_config.text_config.vocab_size, model.florence_config.image_token_id
        batch["task_prompt_ids"] = [C.random_token_ids(gen, 1, n, vocab, exclude=(image_token,))[0]
                                    for n in PROMPT_LENS[size]]
    return batch


register_architecture(Architecture(
    name="florence_vl", builder=build, inputs=example_inputs, source="document",
    variants=("fusion_variant=document", "fusion_variant=dbfusion (the published projector only)",
              "variant=published (Florence-2 depth-breadth features, DBFusion)"),
    description="The document's Florence-VL: coarse CLIP + fine CLIP (2x res, pooled) + semantic SigLIP -> "
                "MultiGranularityFusion -> Llama. The encoders are the document's stand-ins; "
                "fusion_variant='dbfusion' swaps in only the published DBFusion projector, and "
                "variant='published' builds Florence-VL as released on transformers' Florence-2 (DaViT "
                "features + the Florence-2 encoder under 3 task prompts, 4 x 1024 channels, DBFusion).",
))
