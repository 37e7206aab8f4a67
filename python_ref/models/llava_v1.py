"""LLaVA-1.0: CLIP ViT-L/14 at 224 px (penultimate layer, CLS dropped: 256 tokens) -> one
Linear projector -> Vicuna-7B.

Built on HF ``LlavaForConditionalGeneration`` (published system, placeholder-token merge) with
the document's single linear projector swapped in for HF's 2-layer MLP (transformers has no
linear-projector option). The projector is ``model.model.multi_modal_projector.linear``.
"""

from __future__ import annotations

from torch import nn

from .. import components as C
from ..registry import Architecture, register_architecture
from . import llava_v15


class LinearProjector(nn.Module):
    """The document's ``nn.Linear(vision_dim, hidden_dim)`` projector."""

    def __init__(self, vision_hidden: int, text_hidden: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(vision_hidden, text_hidden, bias=bias)

    def forward(self, image_features):
        return self.linear(image_features)


def build(size: str = "tiny", **overrides):
    if "alignment_loss_weight" in overrides:
        raise TypeError("alignment_loss_weight is a llava_v15 option; llava_v1 has no alignment loss")
    vision = dict(overrides.pop("vision_config", None) or {})
    if size == "base":
        vision.setdefault("image_size", 224)  # LLaVA-1.0 used CLIP ViT-L/14 at 224 px
    seed = overrides.get("seed", 0)
    model = llava_v15.build_llava(size, vision_config=vision, **overrides)
    cfg = model.config
    with C.seeded(None if seed is None else seed + 1):
        # Built on the model's device (meta stays meta) right after the HF model.
        proj = LinearProjector(cfg.vision_config.hidden_size, cfg.text_config.hidden_size)
    model.model.multi_modal_projector = proj.to(next(model.parameters()).device)
    return model


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    if model is None:
        import torch
        with torch.device("meta"):
            model = build(size)
    return llava_v15.llava_inputs(model, batch_size, seed, size)


register_architecture(Architecture(
    name="llava_v1", builder=build, inputs=inputs, source="document",
    variants=("linear projector",),
    description="LLaVA-1.0 per the document: HF LlavaForConditionalGeneration (CLIP layer -2, no CLS; "
                "224 px at base = 256 tokens) with a single nn.Linear projector -> Llama.",
))
