"""MiniGPT-5 as the design document sketches it: two vision encoders -> sigmoid gate -> Q-Former ->
projection -> LLM.

    clip = visual_encoder(image), lvg = lvg_encoder(image)         # [B, N, D] each
    g = sigmoid(W [clip; lvg] + c);  fused = g*clip + (1-g)*lvg       # SigmoidGate (fusion point)
    q = Q-Former(queries, cross-attending to fused)                   # [B, num_queries, Dq]
    tokens = projection(q)  -> prefix of the LLM input

The gate is the document's invention: the published MiniGPT-5 (eric-ai-lab/MiniGPT-5) has none. It
reads images as MiniGPT-4 does (its code builds on MiniGPT-4's: EVA ViT-g/14 + BLIP-2 Q-Former +
Linear into Vicuna-7B, which is ``build("minigpt4", variant="published")``) and maps the LLM's "voken"
states into Stable Diffusion 2.1's text-embedding space to generate images (anchors/gated-fusion.md);
that generation side needs diffusers and is not built here. ``gate_variant="gmu"`` swaps in
Arevalo et al.'s gated multimodal unit (2017), a published gate but not MiniGPT-5's. The "generative
vision encoder" is a second ViT stand-in.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import components as C
from ..fusion import SigmoidGate
from ..registry import Architecture, register_architecture
from ._doc_parts import DocVLM, check_pixels, example_batch, vision_expert

# Image geometry per size: base is CLIP ViT-L/14 at 224 px -> 256 patches + CLS = 257 tokens x 1024.
GEOMETRY = {"tiny": dict(image_size=28, patch_size=14), "small": dict(image_size=56, patch_size=14),
            "base": dict(image_size=224, patch_size=14)}


class MiniGPT5(DocVLM):
    PARTS = {"vision": ("visual_encoder.", "lvg_encoder."),
             "fusion": ("gate.", "query_tokens.", "q_former.", "projection."),
             "llm": ("language_model.",)}

    def __init__(self, size: str = "tiny", gate_variant: str = "document", num_query_tokens=None,
                 vision_overrides=None, llm_overrides=None):
        super().__init__(size, llm_overrides)
        vkw = {**GEOMETRY[size], **(vision_overrides or {})}
        self.visual_encoder = vision_expert(size, "clip", **vkw)
        self.lvg_encoder = vision_expert(size, "clip", **vkw)
        d = self.visual_encoder.config.hidden_size
        self.image_size = self.visual_encoder.config.image_size
        self.gate = SigmoidGate(d, d, d, variant=gate_variant)
        self.num_query_tokens = num_query_tokens or C.NUM_QUERY_TOKENS[size]
        self.q_former = C.build_qformer(size, encoder_hidden_size=d)
        self.query_tokens = C.QueryTokens(self.num_query_tokens, self.q_former.config.hidden_size)
        self.projection = nn.Linear(self.q_former.config.hidden_size, self.llm_hidden)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixels(pixel_values)
        # CLS kept: the Q-Former cross-attends to every token (257 for ViT-L/14 at 224 px)
        clip = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        lvg = self.lvg_encoder(pixel_values=pixel_values).last_hidden_state
        fused = self.gate(clip, lvg)
        q = self.q_former(query_embeds=self.query_tokens(fused.shape[0]), encoder_hidden_states=fused)
        return self.projection(q.last_hidden_state)

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None):
        visual = self.encode_images(pixel_values)
        return self.run_llm(visual, input_ids, attention_mask, labels)


def build(size: str = "tiny", **overrides) -> MiniGPT5:
    return MiniGPT5(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    return example_batch(model, build, batch_size, seed, size)


register_architecture(Architecture(
    name="minigpt5", builder=build, inputs=example_inputs, source="document",
    variants=("gate_variant=document", "gate_variant=gmu (Arevalo et al. 2017, not MiniGPT-5's)"),
    description="The document's MiniGPT-5: two ViTs -> SigmoidGate g*a+(1-g)*b -> Blip2QFormerModel -> Linear "
                "-> Llama prefix LM. The gate is the document's invention, not in the published MiniGPT-5, "
                "whose image input is MiniGPT-4's (build('minigpt4', variant='published')) and whose image "
                "generation through Stable Diffusion is not built; gate_variant='gmu' is Arevalo et al.'s GMU.",
))
