"""MiniGPT-4: frozen ViT -> frozen Q-Former (learned queries) -> trainable projection -> frozen
Llama (Vicuna-7B dims), the projected queries prefixed to the text.

- ``variant="document"`` (default), the design document's sketch: CLIP ViT-L/14 at 224 px (257
  tokens x 1024; the Q-Former reads all of them, CLS included, after a LayerNorm as BLIP-2's
  ``ln_vision``), a Q-Former with 32 queries x 768, and an MLP projection
  Linear(768, 2048) -> GELU -> Linear(2048, 4096).
- ``variant="published"``, the published model (Zhu et al. 2023; Vision-CAIR/MiniGPT-4
  minigpt4/models/minigpt4.py): BLIP-2's EVA ViT-g/14 (1408 wide, the 39 of EVA's 40 blocks LAVIS
  keeps, i.e. penultimate-layer features) and ``ln_vision``, BLIP-2's Q-Former (32 queries; its text
  half is unused), and ``llama_proj`` = one Linear(768, 4096). The vision side is HF's
  ``Blip2VisionModel`` (whose ``post_layernorm`` holds ``ln_vision`` in converted BLIP-2 checkpoints)
  and ``Blip2QFormerModel``, so BLIP-2 weights load as they are; the tests check it against HF's
  ``Blip2ForConditionalGeneration`` with the same parts.

Only the projection trains in the presets, as in both of MiniGPT-4's stages (``freeze=False``
unfreezes everything).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import components as C
from ..registry import Architecture, register_architecture

PROJ_HIDDEN = {"tiny": 32, "small": 128, "base": 2048}  # the document's MLP width
VARIANTS = ("document", "published")


class MiniGPT4(nn.Module):
    # BLIP-2's ViT + Q-Former are MiniGPT-4's frozen visual encoder; its fusion module (what the
    # alignment stages train) is the projection alone (python_ref.training)
    PARTS = {"vision": ("vision_tower.", "ln_vision.", "qformer.", "query_tokens."),
             "fusion": ("projection.",), "llm": ("language_model.",)}

    def __init__(self, vision_tower: nn.Module, ln_vision: nn.Module, qformer: nn.Module, num_queries: int,
                 projection: nn.Module, language_model: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        self.ln_vision = ln_vision
        self.qformer = qformer
        self.query_tokens = C.QueryTokens(num_queries, qformer.config.hidden_size)
        self.projection = projection
        self.language_model = language_model

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, num_queries, llm_hidden] visual tokens."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [B, C, H, W], got {tuple(pixel_values.shape)}")
        feats = self.ln_vision(self.vision_tower(pixel_values=pixel_values).last_hidden_state)
        # No encoder mask: every image token is valid (BLIP-2 passes an all-ones mask, which HF
        # then drops for SDPA anyway).
        queries = self.qformer(query_embeds=self.query_tokens(feats.size(0)),
                               encoder_hidden_states=feats).last_hidden_state
        return self.projection(queries)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> C.VLMOutput:
        visual = self.get_image_features(pixel_values)
        return C.prefix_lm_forward(self.language_model, visual, input_ids, attention_mask, labels)


def build(size: str = "tiny", **overrides) -> MiniGPT4:
    seed = overrides.pop("seed", 0)
    attn = overrides.pop("attn_implementation", None)
    variant = overrides.pop("variant", "document")
    freeze = overrides.pop("freeze", True)
    vision = dict(overrides.pop("vision_config", None) or {})
    text = dict(overrides.pop("text_config", None) or {})
    qformer = dict(overrides.pop("qformer_config", None) or {})
    num_queries = overrides.pop("num_query_tokens", C.NUM_QUERY_TOKENS[C.check_size(size)])
    if overrides:
        raise TypeError(f"unknown minigpt4 overrides: {sorted(overrides)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    published = variant == "published"
    if size == "base":
        vision.setdefault("image_size", 224)
    with C.seeded(seed):
        tower = C.build_vision_tower(size, "eva" if published else "clip", attn, **vision)
        d_vision = tower.config.hidden_size
        # Blip2VisionModel already ends in ln_vision (its post_layernorm); CLIP's last hidden state is
        # pre-norm, so the document's tower gets its own
        ln_vision = nn.Identity() if published else nn.LayerNorm(d_vision)
        qf = C.build_qformer(size, d_vision, attn, **qformer)
        llm = C.build_llm(size, "llama", attn, **text)
        q_hidden, l_hidden = qf.config.hidden_size, llm.config.hidden_size
        if published:
            proj = nn.Linear(q_hidden, l_hidden)
        else:
            proj = nn.Sequential(nn.Linear(q_hidden, PROJ_HIDDEN[size]), nn.GELU(),
                                 nn.Linear(PROJ_HIDDEN[size], l_hidden))
        model = MiniGPT4(tower, ln_vision, qf, num_queries, proj, llm)
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("projection."))
    return model


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    if model is None:
        with torch.device("meta"):
            model = build(size)
    return C.make_example_batch(batch_size, seed, image_size=model.vision_tower.config.image_size,
                                vocab_size=model.language_model.config.vocab_size, text_len=C.TEXT_LEN[size])


register_architecture(Architecture(
    name="minigpt4", builder=build, inputs=inputs, source="document",
    variants=("variant='document' (CLIP ViT-L/14, MLP projection)",
              "variant='published' (BLIP-2's EVA ViT-g/14 + Q-Former, Linear projection)"),
    description="Frozen ViT -> frozen Blip2QFormerModel (32 queries x 768 at base) -> trainable projection "
                "-> frozen Llama, visual tokens prefixed. The default is the document's sketch (CLIP, MLP); "
                "variant='published' is MiniGPT-4 as released (EVA ViT-g/14 from BLIP-2, Linear).",
))
