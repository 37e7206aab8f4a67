"""Dynamic vision expert selection (design document ``DynamicVisionSelector``; MoVA's pattern).

    r = mean_hw(routing_stem(image))            # cheap routing features [B, R] (the sketch's AdaptiveAvgPool2d)
    w = ExpertRouter(r)                         # Linear(R,256)-ReLU-Linear(256,E) -> fp32 softmax, per sample
    out = ExpertMix([expert_e(image)], w)       # sum_e w_e * expert_e(image), [B, N, D]
    tokens = proj(out) -> LLM prefix            # Linear(512 -> 4096) at base

``top_k`` (MoVA): fp32 softmax -> top-k -> renormalise, zeros for the other experts.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..fusion import ExpertMix, ExpertRouter
from ..registry import Architecture, register_architecture
from ._doc_parts import DocVLM, check_pixels, example_batch, patch_tokens, vision_expert

# Expert towers; base uses the document's 512-wide features (ViT-B/16 geometry at 224 px, 196 tokens).
EXPERT = {
    "tiny": dict(image_size=28, patch_size=14),
    "small": dict(image_size=56, patch_size=14),
    "base": dict(image_size=224, patch_size=16, hidden_size=512, intermediate_size=2048,
                 num_attention_heads=8, num_hidden_layers=12),
}
ROUTING = {"tiny": (16, 16), "small": (32, 32), "base": (512, 256)}  # (routing feature width, router hidden)


class DynamicVisionSelector(DocVLM):
    PARTS = {"vision": ("experts.",), "fusion": ("routing_stem.", "router.", "proj."), "llm": ("language_model.",)}

    def __init__(self, size: str = "tiny", num_experts: int = 4, top_k: Optional[int] = None, llm_overrides=None):
        super().__init__(size, llm_overrides)
        geo = EXPERT[size]
        self.image_size = geo["image_size"]
        self.experts = nn.ModuleList(vision_expert(size, "clip", **geo) for _ in range(num_experts))
        d = self.experts[0].config.hidden_size
        route_dim, route_hidden = ROUTING[size]
        # the sketch's "_extract_routing_features": a patchify conv, pooled to one vector per image
        self.routing_stem = nn.Conv2d(3, route_dim, kernel_size=geo["patch_size"], stride=geo["patch_size"])
        self.router = ExpertRouter(route_dim, num_experts, hidden=route_hidden, top_k=top_k)
        self.mix = ExpertMix()
        self.proj = nn.Linear(d, self.llm_hidden)

    def encode_images(self, pixel_values: torch.Tensor):
        check_pixels(pixel_values)
        weights = self.router(self.routing_stem(pixel_values).mean(dim=(2, 3)))
        fused = self.mix([patch_tokens(e, pixel_values) for e in self.experts], weights)
        return self.proj(fused), {"router_weights": weights}

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None):
        visual, extras = self.encode_images(pixel_values)
        return self.run_llm(visual, input_ids, attention_mask, labels, extras=extras)


def build(size: str = "tiny", **overrides) -> DynamicVisionSelector:
    return DynamicVisionSelector(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    return example_batch(model, build, batch_size, seed, size)


register_architecture(Architecture(
    name="dynamic_vision_selector", builder=build, inputs=example_inputs, source="document",
    variants=("dense softmax", "top_k=2 (MoVA: fp32 softmax -> top-k -> renormalise)"),
    description="The document's DynamicVisionSelector (MoVA's routing pattern, not a published system): N ViT "
                "experts; conv-stem pooled features -> ExpertRouter -> ExpertMix -> Linear -> Llama",
))
