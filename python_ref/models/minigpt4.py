"""MiniGPT-4 per the document: frozen CLIP ViT -> frozen Q-Former (learned queries) -> trainable
MLP projection (Linear(q, 2048) -> GELU -> Linear(2048, llm) at base) -> frozen Llama (Vicuna-7B),
the projected queries prefixed to the text.

Only the projection trains in the presets (``freeze=False`` unfreezes everything). Variant
``projection="linear"`` is the published MiniGPT-4 (one Linear(768 -> 4096) after the BLIP-2
Q-Former). Base: CLIP ViT-L/14 at 224 px = 257 tokens x 1024 (the Q-Former reads all of them,
CLS included, after a LayerNorm as BLIP-2's ``ln_vision``), 32 queries x 768.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import components as C
from ..registry import Architecture, register_architecture

PROJ_HIDDEN = {"tiny": 32, "small": 128, "base": 2048}
PROJECTIONS = ("mlp", "linear")


class MiniGPT4(nn.Module):
    # BLIP-2's ViT + Q-Former are MiniGPT-4's frozen visual encoder; its fusion module (what the
    # alignment stages train) is the projection alone (python_ref.training)
    PARTS = {"vision": ("vision_tower.", "ln_vision.", "qformer.", "query_tokens."),
             "fusion": ("projection.",), "llm": ("language_model.",)}

    def __init__(self, vision_tower: nn.Module, qformer: nn.Module, num_queries: int, projection: nn.Module,
                 language_model: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        self.ln_vision = nn.LayerNorm(vision_tower.config.hidden_size)
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
    projection = overrides.pop("projection", "mlp")
    freeze = overrides.pop("freeze", True)
    vision = dict(overrides.pop("vision_config", None) or {})
    text = dict(overrides.pop("text_config", None) or {})
    qformer = dict(overrides.pop("qformer_config", None) or {})
    num_queries = overrides.pop("num_query_tokens", C.NUM_QUERY_TOKENS[C.check_size(size)])
    if overrides:
        raise TypeError(f"unknown minigpt4 overrides: {sorted(overrides)}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if size == "base":
        vision.setdefault("image_size", 224)
    with C.seeded(seed):
        tower = C.build_vision_tower(size, "clip", attn, **vision)
        qf = C.build_qformer(size, tower.config.hidden_size, attn, **qformer)
        llm = C.build_llm(size, "llama", attn, **text)
        q_hidden, l_hidden = qf.config.hidden_size, llm.config.hidden_size
        if projection == "mlp":
            proj = nn.Sequential(nn.Linear(q_hidden, PROJ_HIDDEN[size]), nn.GELU(),
                                 nn.Linear(PROJ_HIDDEN[size], l_hidden))
        else:
            proj = nn.Linear(q_hidden, l_hidden)
        model = MiniGPT4(tower, qf, num_queries, proj, llm)
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
    variants=("projection='mlp' (document)", "projection='linear' (published)"),
    description="Frozen CLIP ViT -> frozen Blip2QFormerModel (32 queries x 768 at base) -> trainable MLP "
                "projection -> frozen Llama, visual tokens prefixed.",
))
