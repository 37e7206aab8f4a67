"""CLIP: the dual encoder (image tower and text tower, each projected and L2-normalized; logits =
exp(logit_scale) x cosine similarity) with the symmetric contrastive loss, on HF ``CLIPModel``
(published). ``.logits`` is ``logits_per_image`` [B_img, B_txt]; ``labels`` [B] gives the matching
text of each image (default ``arange(B)``). Base: openai/clip-vit-large-patch14-336 (577 image
tokens x 1024, text 768 x 12 layers, 77 positions, projection 768).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

from .. import components as C
from ..registry import Architecture, register_architecture
from ._hf_common import check_config_keys, construct, pop_common

CLIP_TEXT = {
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=16, attention_dropout=0.0,
                 pad_token_id=0, bos_token_id=1),
    "small": dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, attention_dropout=0.0,
                  pad_token_id=0, bos_token_id=1),
    "base": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
}
PROJECTION_DIM = {"tiny": 32, "small": 128, "base": 768}
TEXT_LEN = {"tiny": 7, "small": 16, "base": 77}


def contrastive_loss(logits_per_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric cross entropy of CLIP: mean of image->text and text->image CE, fp32."""
    logits = logits_per_image.float()
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class CLIPDualEncoder(CLIPModel):
    """``CLIPModel`` whose forward returns a ``VLMOutput`` (``logits`` = logits_per_image, loss when
    ``labels`` or ``return_loss`` is given; text/image embeds and logits_per_text in ``extras``)."""

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None,
                return_loss: Optional[bool] = None, **kwargs):
        out = super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                              return_loss=False, **kwargs)
        logits = out.logits_per_image
        if labels is None and return_loss:
            labels = torch.arange(logits.size(0), device=logits.device)
        if labels is not None:
            if labels.shape != (logits.size(0),):
                raise ValueError(f"labels must be [B_img={logits.size(0)}], got {tuple(labels.shape)}")
            if logits.size(0) != logits.size(1):
                raise ValueError("the contrastive loss needs as many texts as images, got "
                                 f"{logits.size(0)} images and {logits.size(1)} texts")
        loss = contrastive_loss(logits, labels) if labels is not None else None
        return C.VLMOutput(loss=loss, logits=logits, extras={
            "logits_per_text": out.logits_per_text, "text_embeds": out.text_embeds,
            "image_embeds": out.image_embeds})


def clip_config(size: str, vision=None, text=None, **overrides) -> CLIPConfig:
    C.check_size(size)
    tkw = {**CLIP_TEXT[size], **(text or {})}
    # EOS = the last id: HF pools the text at the first EOS (ids != 2 select that path)
    tkw.setdefault("eos_token_id", tkw["vocab_size"] - 1)
    tkw.setdefault("projection_dim", PROJECTION_DIM[size])
    vcfg = C.vision_config(size, "clip", **{"projection_dim": PROJECTION_DIM[size], **(vision or {})})
    kw = dict(projection_dim=PROJECTION_DIM[size])
    kw.update(check_config_keys(CLIPConfig, overrides, "clip"))
    return CLIPConfig(text_config=CLIPTextConfig(**tkw).to_dict(), vision_config=vcfg.to_dict(), **kw)


def build(size: str = "tiny", **overrides) -> CLIPDualEncoder:
    seed, attn, vision, text = pop_common(overrides)
    return construct(CLIPDualEncoder, clip_config(size, vision, text, **overrides), attn, seed)


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    """Images [B, 3, S, S], captions of random tokens ending with EOS, ``labels = arange(B)``."""
    cfg = model.config if model is not None else clip_config(size)
    gen = C.generator(seed)
    s = cfg.vision_config.image_size
    eos = cfg.text_config.eos_token_id
    ids = C.random_token_ids(gen, batch_size, TEXT_LEN[size], cfg.text_config.vocab_size, exclude=(eos,))
    ids[:, -1] = eos
    return {"input_ids": ids, "pixel_values": C.random_pixel_values(gen, batch_size, 3, s, s),
            "attention_mask": torch.ones_like(ids), "labels": torch.arange(batch_size)}


register_architecture(Architecture(
    name="clip", builder=build, inputs=inputs, source="published",
    variants=("CLIPModel dual encoder",),
    description="HF CLIPModel (dual encoder) with the symmetric contrastive loss; .logits = logits_per_image.",
))
