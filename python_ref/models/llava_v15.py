"""LLaVA-1.5: CLIP ViT-L/14-336 (penultimate layer, CLS dropped) -> 2-layer MLP projector with
erf GELU -> Vicuna-7B, visual tokens scattered into the image placeholder positions.

Built on HF ``LlavaForConditionalGeneration`` (published): its ``multi_modal_projector``
(``linear_1`` -> GELU (erf) -> ``linear_2``) is exactly the document's MLP projector. Variant
``"alignment_loss"`` (``build("llava_v15", alignment_loss_weight=w)``) adds the document's
alignment loss: MSE between the cosine-similarity matrix of (mean-pooled projected image tokens,
mean-pooled text embeddings) and the identity, weighted by ``w``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import LlavaConfig, LlavaForConditionalGeneration

from .. import components as C
from ..registry import Architecture, register_architecture
from ._hf_common import check_config_keys, construct, placeholder_batch, pop_common

# llava-hf/llava-1.5-7b-hf: vocab 32064, image token 32000, pad 32001
BASE_TEXT = dict(vocab_size=32064, pad_token_id=32001)
BASE_IMAGE_TOKEN = 32000


def llava_config(size: str, vision: Optional[dict] = None, text: Optional[dict] = None, **overrides) -> LlavaConfig:
    """The LLaVA config at ``size``: CLIP vision tower, Llama text model, image token = the last
    vocabulary id for tiny/small (32000 for base)."""
    C.check_size(size)
    text = {**(BASE_TEXT if size == "base" else {}), **(text or {})}
    vcfg = C.vision_config(size, "clip", **(vision or {}))
    tcfg = C.llm_config(size, "llama", **text)
    kw = dict(image_token_index=BASE_IMAGE_TOKEN if size == "base" else tcfg.vocab_size - 1,
              image_seq_length=C.num_patches(vcfg), projector_hidden_act="gelu",
              vision_feature_layer=-2, vision_feature_select_strategy="default")
    kw.update(check_config_keys(LlavaConfig, overrides, "llava"))
    return LlavaConfig(vision_config=vcfg, text_config=tcfg, **kw)


def image_tokens_per_image(config) -> int:
    """Placeholders per image: (image/patch)^2 patch tokens (+1 when the CLS is kept)."""
    n = C.num_patches(config.vision_config)
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def document_alignment_loss(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """The document's ``compute_alignment_loss``: MSE(normalize(img) @ normalize(txt)^T, I), [B, H] inputs."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    sim = img @ txt.T
    return F.mse_loss(sim, torch.eye(sim.size(0), device=sim.device, dtype=sim.dtype))


class LlavaV15WithAlignment(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose loss adds ``alignment_loss_weight`` x the document's
    alignment loss (one image per sample). ``.lm_loss`` and ``.aux_loss`` are set on the output."""

    def __init__(self, config, alignment_loss_weight: float = 0.1):
        config.loss_type = "ForCausalLM"  # HF derives it from the class name, which is new here
        super().__init__(config)
        self.alignment_loss_weight = float(alignment_loss_weight)
        self._captured = []
        # Capture the projector output instead of re-running the tower: the HF output field that
        # carries it was renamed across transformers versions.
        self.model.multi_modal_projector.register_forward_hook(self._capture_projection)

    def _capture_projection(self, module, args, output):
        self._captured.append(output)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, *args, labels=None, **kwargs):
        self._captured.clear()
        out = super().forward(input_ids, pixel_values, attention_mask, *args, labels=labels, **kwargs)
        captured, self._captured = self._captured, []
        if labels is None or not captured or self.alignment_loss_weight == 0.0:
            return out
        if input_ids is None:
            raise ValueError("the alignment loss needs input_ids (to find the text positions)")
        image = captured[-1]                                    # [n_images, tokens, H]
        if image.size(0) != input_ids.size(0):
            raise ValueError("the alignment loss needs exactly one image per sample, got "
                             f"{image.size(0)} images for batch {input_ids.size(0)}")
        text_mask = input_ids != self.config.image_token_id
        if attention_mask is not None:
            text_mask &= attention_mask.bool()
        emb = self.get_input_embeddings()(input_ids.masked_fill(~text_mask, 0))
        w = text_mask.unsqueeze(-1).to(emb.dtype)
        text = (emb * w).sum(1) / w.sum(1).clamp_min(1)
        aux = self.alignment_loss_weight * document_alignment_loss(image.mean(1), text)
        out["lm_loss"] = out.loss
        out["aux_loss"] = aux
        out.loss = out.loss + aux
        return out


def build_llava(size: str, **overrides):
    seed, attn, vision, text = pop_common(overrides)
    weight = overrides.pop("alignment_loss_weight", 0.0)
    cfg = llava_config(size, vision, text, **overrides)
    cls = LlavaForConditionalGeneration
    if weight:
        cls = functools.partial(LlavaV15WithAlignment, alignment_loss_weight=weight)
    return construct(cls, cfg, attn, seed)


def build(size: str = "tiny", **overrides):
    return build_llava(size, **overrides)


def llava_inputs(model, batch_size: int, seed: int, size: str) -> dict:
    """One image per sample: ``pixel_values`` [B, 3, S, S] (normalized floats), ``input_ids`` with
    ``image_tokens_per_image`` placeholders, ``attention_mask`` and ``labels``."""
    cfg = model.config if model is not None else llava_config(size)
    gen = C.generator(seed)
    s = cfg.vision_config.image_size
    pixel_values = C.random_pixel_values(gen, batch_size, 3, s, s)
    n = image_tokens_per_image(cfg)
    batch = placeholder_batch(gen, [[n]] * batch_size, C.TEXT_LEN[size], cfg.text_config.vocab_size,
                              cfg.image_token_id, pad_token_id=cfg.text_config.pad_token_id or 0)
    return {"pixel_values": pixel_values, **batch}


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    return llava_inputs(model, batch_size, seed, size)


register_architecture(Architecture(
    name="llava_v15", builder=build, inputs=inputs, source="published",
    variants=("mlp2x_gelu (HF LlavaForConditionalGeneration)", "alignment_loss"),
    description="LLaVA-1.5 on HF LlavaForConditionalGeneration: CLIP (layer -2, no CLS) -> "
                "Linear-GELU(erf)-Linear -> Llama; optional document alignment loss "
                "(alignment_loss_weight=w).",
))
